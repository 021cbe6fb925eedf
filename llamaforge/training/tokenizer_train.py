"""Train a sentencepiece BPE tokenizer with the settings of Llama 1/2's `tokenizer.model`.

The settings are those in the trainer spec stored inside Meta's Llama 2 tokenizer.model (and used
by karpathy/llama2.c's `train_vocab`): BPE, byte fallback (no unknown characters: any byte becomes a
token), digits split one by one, whitespace-only pieces allowed, the "identity" normalizer (text is
not changed), a dummy prefix space, ids unk=0, bos=1, eos=2 and no pad. The result loads with
`Tokenizer.from_file` and works with every model llamaforge builds.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from llamaforge.errors import ConfigError, TokenizerError

LLAMA_SPM_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.99995,
    split_digits=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    byte_fallback=True,
    allow_whitespace_only_pieces=True,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    max_sentence_length=4192,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
)


def _lines(paths: Sequence[Path]) -> Iterable[str]:
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    yield line


def train_tokenizer(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, vocab_size: int = 4096, *,
                    max_sentences: int = 2_000_000, threads: int | None = None) -> Path:
    """Train a Llama-style sentencepiece BPE model on text files and write it to `output`.

    Args:
        inputs: text files (one sentence or line per line; JSONL is read as text lines).
        output: path of the tokenizer.model to write (its folder is created); written atomically.
        vocab_size: number of pieces, including the 3 special ones and the 256 byte pieces.
        max_sentences: most lines sampled for training.
        threads: training threads (default: all cores).

    Returns:
        The written path.

    Raises:
        ConfigError: no input, or a vocabulary too small for byte fallback.
        TokenizerError: sentencepiece failed (its message is kept).
    """
    import sentencepiece as spm

    paths = [Path(p) for p in inputs]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise ConfigError(f"tokenizer training needs text files; missing: {missing or 'no input given'}")
    if vocab_size < 300:
        raise ConfigError(f"vocab_size={vocab_size} is too small: byte fallback alone takes 259 pieces; use >= 300")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        prefix = os.path.join(tmp, "tokenizer")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(_lines(paths)), model_prefix=prefix, vocab_size=vocab_size,
                input_sentence_size=max_sentences, shuffle_input_sentence=True, seed_sentencepiece_size=1_000_000,
                num_threads=threads or os.cpu_count() or 1, minloglevel=2, **LLAMA_SPM_SETTINGS,
            )
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(f"sentencepiece could not train a {vocab_size}-piece tokenizer: {exc}") from exc
        os.replace(prefix + ".model", out)
    return out
