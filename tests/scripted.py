"""A tiny model whose greedy answer is a script: each token is followed by the one the script names.

The vocabulary is tests/test_architectures.py's Qwen2-style byte-level BPE plus the script's pieces as added
tokens (as Qwen3's and DeepSeek-R1's files add `<think>` / `</think>`: plain, not special), so a piece can be any
text, "<think>" or '{"name": "get"}' alike. The model is one block whose residual branches are zero
(`wo` = `w2` = 0), one-hot embeddings (dim = vocabulary) and an output matrix that maps token i to its
successor: logits are sqrt(dim) for the successor and 0 elsewhere, so greedy decoding, on any batch and
from the cache, follows the script (a bigram machine: each piece appears once in a script).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from tests.test_architectures import write_qwen_tokenizer


def script_tokenizer(folder: Path, pieces: Sequence[str], template: str) -> Path:
    """A tokenizer folder: the Qwen2-style vocabulary, `pieces` as added tokens, `template` as its chat template."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer

    write_qwen_tokenizer(folder)
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    hf.add_tokens([AddedToken(p, normalized=False, special=False) for p in pieces])
    hf.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


def scripted_llama(tok, script: dict[int, int], end: Optional[int] = None, max_seq_len: int = 256):
    """A `Llama` over `tok` whose greedy next token after token i is script[i] (else `end`, default EOS)."""
    from llamaforge.api import Llama
    from llamaforge.model import ModelArgs, Transformer

    vocab = tok.n_words
    dim = -(-vocab // 8) * 8  # heads of an even size
    model = Transformer(ModelArgs(dim=dim, n_layers=1, n_heads=2, vocab_size=vocab, hidden_dim=8,
                                  max_seq_len=max_seq_len)).eval()
    end = tok.eos_id if end is None else end
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.tok_embeddings.weight[torch.arange(vocab), torch.arange(vocab)] = 1.0
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
        nxt = torch.tensor([script.get(i, end) for i in range(vocab)])
        model.output.weight[nxt, torch.arange(vocab)] = 1.0
    return Llama(model, tok, max_seq_len=max_seq_len, max_batch_size=2, device=torch.device("cpu"))


def chain(tok, start: int, pieces: Sequence[str]) -> dict[int, int]:
    """The script that answers `pieces` in order after the token `start` (each piece one token of `tok`)."""
    ids = [start]
    for p in pieces:
        got = tok.encode(p, allow_special=True)
        assert len(got) == 1, (p, got)
        ids.append(got[0])
    assert len(set(ids)) == len(ids), f"a piece repeats: {pieces}"
    return dict(zip(ids, ids[1:]))
