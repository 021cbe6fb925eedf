#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run Meta's two examples, text and chat completion, on the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/llamaforge demo "$@"
