"""Preference tuning: the DPO and SimPO losses as the papers write them, answer-only masking in plain text
and in a chat format, and runs that learn, resume exactly and stop on NaN.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from llamaforge.errors import ConfigError
from llamaforge.training import preference as preference_module
from llamaforge.training import train
from llamaforge.training.data import IGNORE_INDEX
from llamaforge.training.preference import Pair, PairSet, encode_pair, pair_losses
from llamaforge.training.state import TrainingDiverged, load_state
from tests.test_training_support import WORDS, tiny_config, tiny_meta_checkpoint, tokenizer


def test_dpo_and_simpo_losses_are_the_papers_formulas():
    logp = torch.tensor([-3.0, -5.0, -4.0, -4.5])  # chosen (2), then rejected (2)
    ref = torch.tensor([-3.5, -4.0, -4.2, -4.0])
    n = torch.tensor([3, 5, 2, 4])
    loss, margin = pair_losses("dpo", 0.5, 0.0, logp, n, ref)
    want = 0.5 * ((logp[:2] - ref[:2]) - (logp[2:] - ref[2:]))
    torch.testing.assert_close(margin, want)
    torch.testing.assert_close(loss, -torch.log(torch.sigmoid(want)))
    loss, margin = pair_losses("simpo", 2.0, 0.7, logp, n, None)
    want = 2.0 * (logp[:2] / n[:2] - logp[2:] / n[2:]) - 0.7
    torch.testing.assert_close(margin, want)
    torch.testing.assert_close(loss, F.softplus(-want))


def test_plain_pairs_score_only_the_answers():
    tok = tokenizer()
    pair = encode_pair({"prompt": "the cat sat", "chosen": "on a mat.", "rejected": "by a tree."}, tok, None, "t")
    assert pair.prompt == tok.encode("the cat sat", bos=True)
    assert pair.chosen == tok.encode("on a mat.") + [tok.eos_id]
    x, y = PairSet([pair], "t").batch([0])
    assert x.shape == y.shape and x.shape[0] == 2
    for row, answer in enumerate((pair.chosen, pair.rejected)):
        counted = y[row][y[row] != IGNORE_INDEX].tolist()
        assert counted == answer
        seq = pair.prompt + answer
        assert x[row, : len(seq) - 1].tolist() == seq[:-1]
    with pytest.raises(ConfigError, match="'chosen' and 'rejected'"):
        encode_pair({"prompt": "x", "chosen": "y"}, tok, None, "line 3")
    with pytest.raises(ConfigError, match="need a tokenizer with a chat format"):
        encode_pair({"messages": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}, tok, None, "l")


def test_chat_pairs_mask_the_prompt_and_the_template_markup():
    from llamaforge.chat import chat_format_for
    from llamaforge.default_model import default_model_path
    from llamaforge.errors import CheckpointNotFoundError
    from llamaforge.tokenizer import Tokenizer, read_gguf_metadata

    try:
        tok = Tokenizer.from_gguf_metadata(read_gguf_metadata(default_model_path()))
    except CheckpointNotFoundError:
        pytest.skip("the default model package is not installed")
    fmt = chat_format_for(tok)
    messages = [{"role": "user", "content": "Name a colour."}]
    pair = encode_pair({"messages": messages, "chosen": "Red.", "rejected": {"role": "assistant", "content": "No."}},
                       tok, fmt, "l")
    assert tok.decode(pair.prompt).endswith("<|im_start|>assistant\n")
    assert tok.decode(pair.chosen).startswith("Red.") and tok.decode(pair.rejected).startswith("No.")
    assert pair.prompt + pair.chosen == fmt.encode_dialog(messages + [{"role": "assistant", "content": "Red."}],
                                                         add_generation_prompt=False)[: len(pair.prompt + pair.chosen)]


def _pairs_file(path, n=48, seed=0):
    """Pairs whose chosen answers end in 'red' and rejected ones in 'blue': learnable in a few steps."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        lines.append(json.dumps({"prompt": prompt.capitalize(), "chosen": f" {answer} red.",
                                 "rejected": f" {answer} blue."}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _pref_config(tmp_path, out, **kw):
    values = dict(model=str(tiny_meta_checkpoint()), model_args=None, tokenizer=None,
                  data=[str(_pairs_file(tmp_path / "pairs.jsonl"))], val_fraction=0.25, batch_size=4, max_steps=6,
                  lr=0.02, warmup_steps=0, eval_every=6, save_every=3, preference=dict(loss="dpo", beta=0.5),
                  lora=dict(rank=4, alpha=8.0, targets=["wq", "wv", "w2", "output"]))
    values.update(kw)
    return tiny_config(out, **values)


def test_dpo_with_lora_learns_the_preference_and_resumes_exactly(tmp_path):
    whole = train(_pref_config(tmp_path, tmp_path / "whole"))
    assert whole.losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    before, after = whole.val_metrics[0], whole.val_metrics[6]
    assert whole.val_losses[6] < whole.val_losses[0] - 0.05
    assert after["reward_accuracy"] > 0.8 and after["preference_accuracy"] >= before["preference_accuracy"]
    first = train(_pref_config(tmp_path, tmp_path / "parts"), stop_after=3)
    second = train(_pref_config(tmp_path, tmp_path / "parts"))
    assert second.start_step == 3
    assert first.losses + second.losses == pytest.approx(whole.losses, rel=0, abs=1e-6)
    a = load_state(tmp_path / "whole" / "checkpoint.pt")["model"]
    b = load_state(tmp_path / "parts" / "checkpoint.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_dpo_on_full_weights_resumes_with_the_original_reference(tmp_path):
    settings = dict(lora=None, lr=3e-3, max_steps=4, save_every=2, eval_every=0, export="none")
    whole = train(_pref_config(tmp_path, tmp_path / "whole", **settings))
    first = train(_pref_config(tmp_path, tmp_path / "parts", **settings), stop_after=2)
    second = train(_pref_config(tmp_path, tmp_path / "parts", **settings))
    assert first.losses + second.losses == pytest.approx(whole.losses, rel=0, abs=1e-6)
    assert whole.losses[-1] < whole.losses[0]


def test_simpo_needs_no_reference_and_learns(tmp_path):
    result = train(_pref_config(tmp_path, tmp_path / "simpo", preference=dict(loss="simpo", beta=2.0, gamma=0.5),
                                max_steps=6, export="none"))
    assert all(math.isfinite(x) for x in result.losses)
    assert result.val_losses[6] < result.val_losses[0]


def test_dpo_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = preference_module.pair_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        losses, margins = real(*args, **kwargs)
        return (losses * float("nan"), margins) if calls["n"] == 5 else (losses, margins)

    monkeypatch.setattr(preference_module, "pair_losses", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"step 5: loss nan.*checkpoint.pt \(step 4\)"):
        train(_pref_config(tmp_path, out, max_steps=10, save_every=2, eval_every=0))
    state = load_state(out / "checkpoint.pt")
    assert state["step"] == 4 and all(torch.isfinite(t).all() for t in state["model"].values())
    monkeypatch.setattr(preference_module, "pair_losses", real)
    resumed = train(_pref_config(tmp_path, out, max_steps=6, save_every=2, eval_every=0))
    assert resumed.start_step == 4 and all(math.isfinite(x) for x in resumed.losses)


def test_preference_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="preference.loss must be"):
        _pref_config(tmp_path, tmp_path / "a", preference=dict(loss="ipo"))
    with pytest.raises(ConfigError, match="unknown setting"):
        _pref_config(tmp_path, tmp_path / "b", preference=dict(loss="dpo", tau=1))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "", "rejected": "z"}) + "\n")
    with pytest.raises(ConfigError, match="bad.jsonl:1: 'chosen' must be a non-empty string"):
        train(_pref_config(tmp_path, tmp_path / "c", data=[str(bad)]))
