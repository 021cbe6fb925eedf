"""Shared fixtures: one tiny random Llama with a real sentencepiece tokenizer, saved in every format.

`tiny_checkpoints` holds paths to the same weights as a Meta checkpoint, a Meta checkpoint with two
model-parallel shards, a Hugging Face folder (sharded safetensors) and a GGUF file with the vocabulary
embedded (llama.cpp's SPM vocabulary kind), all written by the production savers.
"""

from __future__ import annotations

import io
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from hypothesis import settings


from llamaforge import checkpoints
from llamaforge.convert import sentencepiece_gguf_metadata
from llamaforge.default_model import default_model_path
from llamaforge.model import ModelArgs, Transformer

# Property tests draw the same examples on every run (CI never turns red by chance); a bug they find is
# then found every time. `--hypothesis-profile=explore` draws new examples, to hunt for more.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("ci")

WORDS = (
    "the a llama model token text chat user assistant system hello world meaning life of is are "
    "theory relativity states that cheese sea otter café naïve 日本 語 🤖 0 1 2 3 4 5 6 7 8 9"
).split()


def _corpus() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "." for _ in range(300)]


def train_tiny_sentencepiece(path: Path, vocab_size: int = 300) -> Path:
    """A Llama-2-like sentencepiece BPE model (byte fallback, <unk>=0, <s>=1, </s>=2), trained in well under 1 s."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )
    path.write_bytes(buf.getvalue())
    return path


@dataclass
class TinyCheckpoints:
    args: ModelArgs
    state_dict: dict
    tokenizer: Path
    meta: Path
    meta_mp2: Path
    hf: Path
    gguf: Path


def block_ggufs(t: "TinyCheckpoints", root: Path, types) -> tuple[dict, ModelArgs, dict]:
    """GGUF files of one random 256-wide model (rows a multiple of the K-quants' 256 columns) with the tiny
    vocabulary, one per type in `types` (save_gguf's names: "q4_k_m", "q8_0", ...): (files by type, args, vocab)."""
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=t.args.vocab_size, hidden_dim=512,
                     max_seq_len=64)
    torch.manual_seed(0)
    sd = {k: v.detach().clone() for k, v in Transformer(args).state_dict().items()}
    vocab = checkpoints.load(t.gguf).gguf_metadata
    files = {q: checkpoints.save_gguf(args, sd, root / f"m-{q}.gguf", dtype=q, tokenizer_metadata=vocab) for q in types}
    return files, args, vocab


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> TinyCheckpoints:
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = train_tiny_sentencepiece(root / "tokenizer.model")
    n_words = spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=n_words, hidden_dim=160,
                     max_seq_len=128, norm_eps=1e-5)
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():  # peaked output distributions keep greedy choices far from ties
        model.output.weight.mul_(6)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return TinyCheckpoints(
        args=args,
        state_dict=sd,
        tokenizer=tokenizer,
        meta=checkpoints.save_meta(args, sd, root / "meta", tokenizer_path=tokenizer),
        meta_mp2=checkpoints.save_meta(args, sd, root / "meta_mp2", tokenizer_path=tokenizer, num_shards=2),
        hf=checkpoints.save_hf(args, sd, root / "hf", tokenizer_path=tokenizer, max_shard_bytes=200_000),
        gguf=checkpoints.save_gguf(args, sd, root / "tiny.gguf", tokenizer_metadata=sentencepiece_gguf_metadata(tokenizer)),
    )


def tiny_llama(tok, max_seq_len: int, max_batch_size: int = 2):
    """A random one-block Llama (dim 32, seed 0) over the tokenizer `tok`, on the CPU: for tests of what
    surrounds a model (templates, the server), not of its numbers."""
    from llamaforge import Llama

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.n_words, hidden_dim=64,
                                  max_seq_len=max_seq_len)).eval()
    return Llama(model, tok, max_seq_len=max_seq_len, max_batch_size=max_batch_size, device=torch.device("cpu"))


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's tokenizer, loaded once; only a missing default model package skips (a tokenizer that
    fails to load is a failure)."""
    from llamaforge.errors import CheckpointNotFoundError
    from llamaforge.tokenizer import Tokenizer

    try:
        path = default_model_path()
    except CheckpointNotFoundError as exc:
        pytest.skip(f"default model package not installed: {exc}")
    return Tokenizer.from_file(path)


@pytest.fixture(scope="session")
def default_llama():
    """The default model, built once for the session on the CPU, dequantized to float32 (the reference path)."""
    from llamaforge import Llama

    return Llama.build(max_seq_len=512, max_batch_size=4, device="cpu", dtype="float32")


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD", ...); "" where it has none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), "")


def fresh_kernel_defaults(*getters: str) -> list[str]:
    """What the C++ extension's knobs / switches `getters` return, called without an argument, in a fresh process:
    their defaults (tests in this process set them, and put them back)."""
    code = ("from llamaforge import kernels; e = kernels.get_extension(); "
            f"print(*(getattr(e, g)() for g in {getters!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return out[-len(getters):]
