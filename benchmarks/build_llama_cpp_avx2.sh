#!/usr/bin/env bash
# Builds an AVX2-only llama.cpp CPU library (what an AVX2 CPU such as AMD Zen 3 runs) from the SAME llama.cpp
# source that the installed llama-cpp-python vendors, for `benchmarks/compare.py --cpu avx2` (cpu_mode.py):
# llama-cpp-python loads it instead of its own through LLAMA_CPP_LIB_PATH.
#
#   bash benchmarks/build_llama_cpp_avx2.sh      # idempotent; ~5-15 min on 2 cores (nice -n 19)
#
# Output: $LLAMA_CPP_AVX2 (default benchmarks/_work/llama.cpp-avx2)/lib/{libllama,libggml,libggml-base,libggml-cpu}.so
# (their RUNPATH is $ORIGIN, so the ggml libraries resolve from there, not from llama-cpp-python's folder).
# Configuration: GGML_NATIVE off, SSE4.2 / AVX / AVX2 / FMA / F16C / BMI2 on, every AVX-512, AVX-VNNI and AMX
# variant off; llamafile's sgemm and the repacked (x8) quant paths on, as in the native build; OpenMP as the
# installed llama-cpp-python has it (its system info says OPENMP = 1 or not), so only the instruction sets
# differ. Only PyPI is contacted (pip download of the sdist, when the tools script has not fetched it). Not run
# by the tests.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
VERSION=$("$PY" -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))")
OUT="${LLAMA_CPP_AVX2:-$HERE/_work/llama.cpp-avx2}"
JOBS="${JOBS:-2}"
mkdir -p "$OUT"
stamp="$OUT/.built-$VERSION"
if [ -f "$stamp" ] && [ -f "$OUT/lib/libllama.so" ]; then
    echo "[llama.cpp avx2] $VERSION already built in $OUT/lib"
    exit 0
fi
OPENMP=$("$PY" -c "import llama_cpp; print('ON' if 'OPENMP = 1' in llama_cpp.llama_print_system_info().decode() else 'OFF')")
cd "$OUT"
if [ ! -d "src-$VERSION" ]; then
    "$PY" -m pip download --disable-pip-version-check --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d sdist
    mkdir -p "src-$VERSION"
    tar xzf "sdist/llama_cpp_python-$VERSION.tar.gz" -C "src-$VERSION" --strip-components=1
fi
nice -n 19 cmake -S "src-$VERSION/vendor/llama.cpp" -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' \
    -DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF \
    -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DGGML_OPENMP="$OPENMP" -DGGML_LLAMAFILE=ON -DGGML_CPU_REPACK=ON -DGGML_BLAS=OFF -DGGML_CCACHE=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF > cmake.log 2>&1
nice -n 19 cmake --build build -j "$JOBS" --target llama > build.log 2>&1
mkdir -p lib
cp -a build/bin/libllama.so* build/bin/libggml*.so* lib/
touch "$stamp"
echo "[llama.cpp avx2] built $VERSION (OpenMP $OPENMP) into $OUT/lib"
