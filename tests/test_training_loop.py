"""The training loop: loss falls, exports load in Llama.build, resume is exact, NaN stops cleanly,
accumulation and activation checkpointing do not change the maths, LoRA fine-tunes export merged."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llamaforge.api import Llama
from llamaforge.errors import ConfigError
from llamaforge.training import TrainingDiverged, train
from llamaforge.training import loop as loop_module
from llamaforge.training.state import load_state
from tests.test_training_support import tiny_config, tiny_meta_checkpoint


def _logged_losses(out_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines())
            if "loss" in r}


def test_from_scratch_training_learns_and_the_export_loads_in_llama_build(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(out, max_steps=24, eval_every=12, save_every=12, lr=1e-2, plot=True,
                      sample_every=24, sample_prompts=["The cat"], sample_tokens=8)
    result = train(cfg)
    assert result.step == 24 and len(result.losses) == 24
    assert sorted(result.val_losses) == [0, 12, 24]
    assert result.val_losses[24] < result.val_losses[0] - 1.5  # from ~ln(320) = 5.8 down: the model learns
    assert result.losses[-1] < result.losses[0] - 1.5
    assert result.tokens_per_s > 0 and result.samples[24][0].startswith("The cat")
    for name in ("checkpoint.pt", "log.jsonl", "loss.png"):
        assert (out / name).is_file()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(_logged_losses(out)) == set(range(1, 25))

    assert result.exported == out / "model" and (out / "model" / "params.json").is_file()
    llama = Llama.build(str(result.exported), max_seq_len=64, max_batch_size=1, device="cpu")
    state = load_state(out / "checkpoint.pt")["model"]
    for name, tensor in llama.model.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)  # the export is the trained model
    text = llama.text_completion(["The cat"], max_gen_len=8, temperature=0)[0]["generation"]
    assert isinstance(text, str) and len(text) > 0


@pytest.mark.parametrize("mode", ["scratch-adamw", "lora-dropout-sgd"])
def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path, mode):
    if mode == "scratch-adamw":
        settings = dict(max_steps=6, save_every=3, eval_every=0)
    else:
        settings = dict(model=str(tiny_meta_checkpoint()), model_args=None, tokenizer=None, optimizer="sgd",
                        momentum=0.9, lr=0.05, max_steps=6, save_every=3, eval_every=0,
                        lora=dict(rank=4, alpha=8.0, dropout=0.2, targets=["wq", "wv", "w2"]))
    whole = train(tiny_config(tmp_path / "whole", **settings))
    first = train(tiny_config(tmp_path / "parts", **settings), stop_after=3)
    assert first.step == 3 and first.exported is None
    assert load_state(tmp_path / "parts" / "checkpoint.pt")["step"] == 3
    second = train(tiny_config(tmp_path / "parts", **settings))
    assert second.start_step == 3 and second.step == 6
    assert first.losses + second.losses == pytest.approx(whole.losses, rel=0, abs=1e-6)
    a = load_state(tmp_path / "whole" / "checkpoint.pt")["model"]
    b = load_state(tmp_path / "parts" / "checkpoint.pt")["model"]
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    train(tiny_config(tmp_path / "run", max_steps=2, eval_every=0), stop_after=1)
    with pytest.raises(loop_module.TrainingError, match="global batch"):
        train(tiny_config(tmp_path / "run", max_steps=2, eval_every=0, batch_size=2))
    with pytest.raises(loop_module.TrainingError, match="another shape"):
        train(tiny_config(tmp_path / "run", max_steps=2, eval_every=0,
                          model_args=dict(dim=32, n_layers=1, n_heads=4, multiple_of=32, max_seq_len=64)))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = loop_module.token_loss_sum
    calls = {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += 1
        value = real(logits, targets)
        return value * float("nan") if calls["n"] == 5 else value  # the 5th micro-batch = step 5

    monkeypatch.setattr(loop_module, "token_loss_sum", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"step 5: loss nan.*checkpoint.pt \(step 4\)"):
        train(tiny_config(out, max_steps=10, save_every=2, eval_every=0))
    state = load_state(out / "checkpoint.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (out / "model").exists()  # nothing exported from a diverged run
    events = [json.loads(line).get("event") for line in (out / "log.jsonl").read_text().splitlines()]
    assert "diverged" in events
    monkeypatch.setattr(loop_module, "token_loss_sum", real)
    resumed = train(tiny_config(out, max_steps=6, save_every=2, eval_every=0))
    assert resumed.start_step == 4 and all(math.isfinite(x) for x in resumed.losses)


def test_gradient_accumulation_equals_a_larger_batch(tmp_path):
    big = train(tiny_config(tmp_path / "big", batch_size=4, grad_accum=1, max_steps=4, eval_every=0, export="none"))
    acc = train(tiny_config(tmp_path / "acc", batch_size=2, grad_accum=2, max_steps=4, eval_every=0, export="none"))
    assert acc.losses == pytest.approx(big.losses, rel=0, abs=1e-5)
    a, b = (load_state(tmp_path / d / "checkpoint.pt")["model"] for d in ("big", "acc"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_activation_checkpointing_and_bf16_autocast(tmp_path):
    plain = train(tiny_config(tmp_path / "plain", max_steps=3, eval_every=0, export="none"))
    ckpt = train(tiny_config(tmp_path / "ckpt", max_steps=3, eval_every=0, export="none", activation_checkpointing=True))
    assert ckpt.losses == pytest.approx(plain.losses, rel=0, abs=1e-5)  # recomputation changes no number
    bf16 = train(tiny_config(tmp_path / "bf16", max_steps=3, eval_every=0, export="none", autocast="bf16"))
    assert all(math.isfinite(x) for x in bf16.losses)
    assert bf16.losses == pytest.approx(plain.losses, rel=0, abs=0.05)  # bf16 matmuls: close, not equal


def test_lora_fine_tune_exports_merged_weights_that_llama_build_loads(tmp_path):
    ckpt = tiny_meta_checkpoint()
    out = tmp_path / "lora"
    cfg = tiny_config(out, model=str(ckpt), model_args=None, tokenizer=None, max_steps=4, lr=0.05,
                      lora=dict(rank=4, alpha=8.0, targets=["wq", "wv"]), eval_every=0)
    result = train(cfg)
    state = load_state(out / "checkpoint.pt")["model"]
    assert set(state) == {f"layers.{i}.attention.{w}.lora_{ab}" for i in range(2) for w in ("wq", "wv") for ab in "ab"}
    base = Llama.build(str(ckpt), max_seq_len=64, max_batch_size=1, device="cpu")
    tuned = Llama.build(str(result.exported), max_seq_len=64, max_batch_size=1, device="cpu")
    changed = {k for k, v in tuned.model.state_dict().items() if not torch.equal(v, base.model.state_dict()[k])}
    assert changed == {f"layers.{i}.attention.{w}.weight" for i in range(2) for w in ("wq", "wv")}
    # the merged export computes what base + adapters compute
    from llamaforge.training.lora import apply_lora

    adapted = Llama.build(str(ckpt), max_seq_len=64, max_batch_size=1, device="cpu").model
    apply_lora(adapted, ["wq", "wv"], rank=4, alpha=8.0)
    adapted.load_state_dict(state, strict=False)
    tokens = torch.tensor([tuned.tokenizer.encode("The cat sat on", bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(tuned.model(tokens), adapted(tokens), rtol=1e-5, atol=1e-5)
    assert tuned.text_completion(["The cat"], max_gen_len=4, temperature=0)[0]["generation"] is not None


def test_bad_settings_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match="seq_len=128 is longer"):
        train(tiny_config(tmp_path / "r", seq_len=128))
    small = tmp_path / "small.txt"
    small.write_text("The cat sat. " * 3)
    with pytest.raises(ConfigError, match="training split has .* fewer than seq_len"):
        train(tiny_config(tmp_path / "r2", data=[str(small)], seq_len=60))


def test_export_in_hugging_face_format_loads_back(tmp_path):
    result = train(tiny_config(tmp_path / "hf", max_steps=2, eval_every=0, export="hf"))
    assert (result.exported / "config.json").is_file() and (result.exported / "model.safetensors").is_file()
    llama = Llama.build(str(result.exported), max_seq_len=64, max_batch_size=1, device="cpu")
    state = load_state(tmp_path / "hf" / "checkpoint.pt")["model"]
    for name, tensor in llama.model.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)  # q/k permuted for HF and back


def test_lora_chat_fine_tune_of_a_gguf_model_with_a_chat_template(tmp_path):
    """The default model's path in miniature: GGUF source with its vocabulary and ChatML template,
    tied embeddings, chat JSONL with assistant-only loss, merged export back to GGUF."""
    from llamaforge import checkpoints
    from llamaforge.default_model import default_model_path
    from llamaforge.errors import CheckpointNotFoundError
    from llamaforge.model import ModelArgs, Transformer
    from llamaforge.tokenizer import read_gguf_metadata
    from llamaforge.training.modeling import init_weights

    try:
        metadata = read_gguf_metadata(default_model_path())
    except CheckpointNotFoundError:
        pytest.skip("the default model package is not installed")
    vocab = len(metadata["tokenizer.ggml.tokens"])
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=32,
                     max_seq_len=128, tie_embeddings=True)
    model = Transformer(args)
    init_weights(model, 0.05)
    sd = {k: v for k, v in model.state_dict().items() if k != "output.weight"}
    source = checkpoints.save_gguf(args, sd, tmp_path / "tiny.gguf", tokenizer_metadata=metadata)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                       {"role": "assistant", "content": f"{w}!"}]})
                              for w in ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree") * 3) + "\n")
    result = train(tiny_config(tmp_path / "run", model=str(source), model_args=None, tokenizer=None,
                               data=[str(chat)], val_fraction=0.2, seq_len=48, max_steps=3, eval_every=3,
                               lora=dict(rank=2, alpha=4.0, targets=["wq", "wv", "w1"]), lr=0.02))
    assert result.exported == tmp_path / "run" / "model" / "model.gguf"
    tuned = Llama.build(str(result.exported), max_seq_len=128, max_batch_size=1, device="cpu")
    assert tuned.chat_format.name == "jinja" and tuned.model.args.tie_embeddings
    out = tuned.chat_completion([[{"role": "user", "content": "Say red."}]], temperature=0, max_gen_len=4)
    assert isinstance(out[0]["generation"]["content"], str)
