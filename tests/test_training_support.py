"""Shared pieces of the training tests: a small synthetic corpus, a tokenizer trained on it, tiny configs.

Built once per test process in a temporary folder (a few hundred milliseconds). Holds no tests itself
except a check that the pieces are what the other tests assume.
"""

from __future__ import annotations

import functools
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from llamaforge.model import ModelArgs, Transformer

WORDS = ("the cat sat on a mat and dog ran to big red house with small blue door in old town by river "
         "she he saw found took gave bird fish tree under over near green yellow").split()

TINY_ARGS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=64)


@functools.lru_cache(maxsize=None)
def workspace() -> Path:
    """A temporary folder with corpus.txt (about 30k words) and tok.model (320-piece BPE)."""
    from llamaforge.training.tokenizer_train import train_tokenizer

    root = Path(tempfile.mkdtemp(prefix="llamaforge-train-tests-"))
    rng = random.Random(0)
    paragraphs = []
    for _ in range(400):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(1, 4))]
        paragraphs.append(" ".join(sentences))
    (root / "corpus.txt").write_text("\n\n".join(paragraphs) + "\n")
    train_tokenizer([root / "corpus.txt"], root / "tok.model", vocab_size=320)
    return root


def tokenizer():
    from llamaforge.tokenizer import Tokenizer

    return Tokenizer.from_file(workspace() / "tok.model")


def tiny_config(out_dir: Path, **overrides: Any):
    """A from-scratch TrainConfig for a 2-layer, 32-wide model on the test corpus (fast on 2 cores)."""
    from llamaforge.training import TrainConfig

    ws = workspace()
    values: dict[str, Any] = dict(
        data=[str(ws / "corpus.txt")], tokenizer=str(ws / "tok.model"), out_dir=str(out_dir),
        model_args=dict(TINY_ARGS), seq_len=32, batch_size=4, max_steps=6, lr=3e-3, warmup_steps=2,
        eval_every=3, eval_batches=2, save_every=3, progress=False, plot=False, seed=7,
        data_dir=str(out_dir.parent / f"{out_dir.name}-data"),
    )
    values.update(overrides)
    return TrainConfig(**values)


@functools.lru_cache(maxsize=None)
def tiny_meta_checkpoint() -> Path:
    """A random tiny model saved as a Meta checkpoint with the test tokenizer (for fine-tuning tests)."""
    from llamaforge import checkpoints
    from llamaforge.training.modeling import init_weights

    ws = workspace()
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=tokenizer().n_words, **TINY_ARGS)
    model = Transformer(args)
    init_weights(model, 0.05)
    out = ws / "tiny-meta"
    checkpoints.save_meta(args, model.state_dict(), out, tokenizer_path=ws / "tok.model", overwrite=True)
    return out


def test_support_workspace_is_usable():
    tok = tokenizer()
    assert tok.n_words == 320
    ids = tok.encode("the cat sat on a mat.", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[1:-1]) == "the cat sat on a mat."
