"""Data pipeline: memory-mapped token files, packing, batch order, train/val split, chat masks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llamaforge.chat import JinjaChatFormat, Llama2ChatFormat
from llamaforge.errors import ConfigError
from llamaforge.training.corpus import encode_chat_example, iter_pieces, prepare_data
from llamaforge.training.data import IGNORE_INDEX, BatchOrder, PackedDataset, TokenFile, TokenWriter
from tests.test_training_support import tokenizer, workspace

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "the cat sat"},
    {"role": "assistant", "content": "on a mat."},
    {"role": "user", "content": "the dog ran"},
    {"role": "assistant", "content": "to a red house."},
]


def test_token_file_is_written_in_chunks_and_read_as_memmap(tmp_path):
    writer = TokenWriter(tmp_path / "train", vocab_size=70000, with_mask=True, chunk_tokens=5)
    docs = [list(range(i, i + 7)) for i in range(0, 60000, 9000)]
    for d in docs:
        writer.append(d, [i % 2 for i in range(len(d))])
    writer.close()
    tf = TokenFile.open(tmp_path / "train")
    assert isinstance(tf.ids, np.memmap) and isinstance(tf.mask, np.memmap)
    assert tf.ids.dtype == np.uint32  # a vocabulary over 65536 ids needs 32 bits
    assert tf.ids.tolist() == [t for d in docs for t in d]
    assert tf.n_targets == sum(i % 2 for d in docs for i in range(len(d)))
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ConfigError, match="out of range"):
        bad = TokenWriter(tmp_path / "bad", vocab_size=10, with_mask=False)
        bad.append([3, 12])
        bad.close()


def test_packing_shifts_targets_and_masks_non_targets(tmp_path):
    writer = TokenWriter(tmp_path / "d", vocab_size=100, with_mask=True)
    writer.append(list(range(20)), [0] * 5 + [1] * 15)
    writer.close()
    ds = PackedDataset(TokenFile.open(tmp_path / "d"), seq_len=6)
    assert len(ds) == 3  # windows start at 0, 6, 12 and need 7 tokens: (20 - 1) // 6
    x, y = ds.window(0)
    assert x.tolist() == [0, 1, 2, 3, 4, 5]
    assert y.tolist() == [IGNORE_INDEX] * 4 + [5, 6]  # targets 1..4 have mask 0
    x, y = ds.batch([2, 1])
    assert x.shape == (2, 6) and x[0].tolist() == list(range(12, 18)) and y[1].tolist() == list(range(7, 13))
    assert ds.n_targets([0, 1]) == 2 + 6
    with pytest.raises(ConfigError, match="fewer than seq_len"):
        PackedDataset(TokenFile.open(tmp_path / "d"), seq_len=40)


def test_batch_order_depends_on_the_step_only_and_splits_across_processes():
    one = BatchOrder(n=37, batch_size=3, grad_accum=4, world_size=1, seed=5)
    two = [BatchOrder(n=37, batch_size=3, grad_accum=2, world_size=2, seed=5) for _ in range(2)]
    for step in (0, 1, 5, 11):
        single = [one.micro_batch(step, 0, m) for m in range(4)]
        split = [two[r].micro_batch(step, r, m) for r in range(2) for m in range(2)]
        assert single == split  # N processes x accumulation a == 1 process x accumulation N*a
        assert sum(single, []) == one.step_windows(step)
    epoch = [one._example(k) for k in range(37)]
    assert sorted(epoch) == list(range(37))  # each window once per epoch
    assert [one._example(k) for k in range(37, 74)] != epoch  # reshuffled next epoch
    assert BatchOrder(37, 3, 4, 1, seed=5).micro_batch(9, 0, 2) == one.micro_batch(9, 0, 2)


def test_prepare_text_splits_pieces_and_is_reused(tmp_path):
    tok = tokenizer()
    corpus = workspace() / "corpus.txt"
    first = prepare_data([corpus], tok, tmp_path, val_fraction=0.2, seed=1, piece_chars=500)
    assert first.val_stem is not None and first.n_val_tokens > 0 and not first.has_mask
    train, val = TokenFile.open(first.train_stem), TokenFile.open(first.val_stem)
    whole = tok.encode(corpus.read_text(), bos=True, eos=True)
    assert len(train.ids) + len(val.ids) == pytest.approx(len(whole), rel=0.02)  # pieces tokenize ~ like the whole
    assert 0.1 < len(val.ids) / len(whole) < 0.3
    mtime = (tmp_path / "train.bin").stat().st_mtime_ns
    again = prepare_data([corpus], tok, tmp_path, val_fraction=0.2, seed=1, piece_chars=500)
    assert again == first and (tmp_path / "train.bin").stat().st_mtime_ns == mtime  # reused
    other = prepare_data([corpus], tok, tmp_path, val_fraction=0.0, seed=1, piece_chars=500)
    pieces = list(iter_pieces(corpus, tok, piece_chars=500))
    assert other.val_stem is None and other.n_train_tokens == sum(len(ids) for ids, _ in pieces)
    assert TokenFile.open(other.train_stem).ids.tolist() == sum((ids for ids, _ in pieces), [])
    assert "".join(tok.decode(ids) for ids, _ in pieces).split() == corpus.read_text().split()


def test_jsonl_text_and_errors(tmp_path):
    tok = tokenizer()
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"the cat {i}."}) for i in range(10)) + "\n")
    p = prepare_data([f], tok, tmp_path / "out", val_fraction=0.0)
    ids = TokenFile.open(p.train_stem).ids.tolist()
    assert ids == sum((tok.encode(f"the cat {i}.", bos=True, eos=True) for i in range(10)), [])
    f.write_text('{"txt": "x"}\n')
    with pytest.raises(ConfigError, match="d.jsonl:1"):
        prepare_data([f], tok, tmp_path / "out2", val_fraction=0.0)
    with pytest.raises(ConfigError, match="does not exist"):
        prepare_data([tmp_path / "missing.txt"], tok, tmp_path / "out3")


def _answer_text(tok, ids, mask):
    return tok.decode([t for t, m in zip(ids, mask) if m and t != tok.eos_id])


def test_llama2_chat_example_masks_only_the_answers():
    tok = tokenizer()
    fmt = Llama2ChatFormat(tok)
    ids, mask = encode_chat_example(fmt, DIALOG)
    assert len(ids) == len(mask)
    # the ids are Meta's chat_completion encoding of the finished exchanges
    follow_up = DIALOG + [{"role": "user", "content": "next"}]
    assert fmt.encode_dialog(follow_up) == ids + tok.encode("[INST] next [/INST]", bos=True)
    assert sum(1 for t, m in zip(ids, mask) if m and t == tok.eos_id) == 2  # each answer's EOS is a target
    answers = _answer_text(tok, ids, mask)
    assert "on a mat." in answers and "to a red house." in answers
    assert "cat" not in answers and "Be brief" not in answers and "INST" not in answers


def test_template_chat_example_masks_only_the_answers():
    tok = tokenizer()
    fmt = JinjaChatFormat(tok, CHATML)
    ids, mask = encode_chat_example(fmt, DIALOG)
    assert ids == fmt.encode_dialog(DIALOG, add_generation_prompt=False)
    answers = tok.decode([t for t, m in zip(ids, mask) if m])
    assert answers.count("<|im_end|>") == 2
    assert "on a mat." in answers and "to a red house." in answers
    assert "cat sat" not in answers and "assistant" not in answers and "brief" not in answers


def test_chat_jsonl_prepares_a_mask(tmp_path):
    tok = tokenizer()
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps({"messages": DIALOG}) for _ in range(3)) + "\n")
    p = prepare_data([f], tok, tmp_path / "out", val_fraction=0.0, chat_format=Llama2ChatFormat(tok))
    tf = TokenFile.open(p.train_stem)
    assert p.has_mask and tf.mask is not None
    ids, mask = encode_chat_example(Llama2ChatFormat(tok), DIALOG)
    assert tf.ids.tolist() == ids * 3 and tf.mask.tolist() == mask * 3
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ConfigError, match="no 'assistant' message"):
        prepare_data([f], tok, tmp_path / "out2", val_fraction=0.0, chat_format=Llama2ChatFormat(tok))


def test_validation_files_replace_the_random_split(tmp_path):
    tok = tokenizer()
    train_file, val_file = tmp_path / "train.txt", tmp_path / "val.txt"
    train_file.write_text("the cat sat on a mat.\n\n" * 50)
    val_file.write_text("a red fish.\n")
    p = prepare_data([train_file], tok, tmp_path / "out", val_fraction=0.5, val_sources=[val_file])
    assert TokenFile.open(p.val_stem).ids.tolist() == tok.encode("a red fish.\n", bos=True, eos=True)
    assert p.n_train_tokens == len(tok.encode(train_file.read_text(), bos=True, eos=True))
