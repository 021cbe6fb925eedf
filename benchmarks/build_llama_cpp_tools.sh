#!/usr/bin/env bash
# Builds llama.cpp's own tools (llama-server, llama-quantize, llama-bench) from the SAME llama.cpp source that
# the pinned llama-cpp-python sdist vendors (benchmarks/setup_peers.sh pins the version), so the server and the
# quantizer that llamaforge is compared with are the code llama-cpp-python runs.
#
#   bash benchmarks/build_llama_cpp_tools.sh      # idempotent; ~10-20 min on 2 cores (nice -n 19)
#
# Output: $LLAMA_CPP_TOOLS (default benchmarks/_work/llama.cpp)/bin/{llama-server,llama-quantize,llama-bench}.
# CPU build as llama.cpp users get it: GGML_NATIVE (-march=native), no BLAS, no CUDA/Vulkan/Metal, no curl.
# Only PyPI is contacted (pip download of the sdist). Not run by the tests.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VERSION=$(sed -n 's/^LLAMA_CPP_PYTHON_VERSION="\(.*\)"/\1/p' "$HERE/setup_peers.sh")
OUT="${LLAMA_CPP_TOOLS:-$HERE/_work/llama.cpp}"
JOBS="${JOBS:-2}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
stamp="$OUT/.built-$VERSION"
if [ -f "$stamp" ] && [ -x "$OUT/bin/llama-server" ]; then
    echo "[llama.cpp tools] $VERSION already built in $OUT/bin"
    exit 0
fi
cd "$OUT"
if [ ! -d "src-$VERSION" ]; then
    "$PY" -m pip download --disable-pip-version-check --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d sdist
    mkdir -p "src-$VERSION"
    tar xzf "sdist/llama_cpp_python-$VERSION.tar.gz" -C "src-$VERSION" --strip-components=1
fi
src="src-$VERSION/vendor/llama.cpp"
nice -n 19 cmake -S "$src" -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_BLAS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DBUILD_SHARED_LIBS=OFF > cmake.log 2>&1
nice -n 19 cmake --build build -j "$JOBS" --target llama-server llama-quantize llama-bench > build.log 2>&1
mkdir -p bin
cp build/bin/llama-server build/bin/llama-quantize build/bin/llama-bench bin/
touch "$stamp"
echo "[llama.cpp tools] built $VERSION into $OUT/bin"
