#!/usr/bin/env bash
# Set up (scripts/setup.sh with the test extra) and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
exec .venv/bin/python -m pytest -q "$@"
