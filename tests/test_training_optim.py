"""Optimizers, schedules and training configs: SGD is w - (eta/len(mini_batch)) * sum nabla_w, by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llamaforge.errors import ConfigError
from llamaforge.training.config import TrainConfig
from llamaforge.training.optim import SGD, build_optimizer, lr_at


def _per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        (0.5 * (model(x[i:i + 1]) - y[i:i + 1]).pow(2).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return grads


def test_sgd_step_is_eta_over_batch_times_sum_of_example_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    eta = 0.37
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = _per_example_grads(model, x, y)
    # Nielsen: w <- w - (eta / len(mini_batch)) * sum_x nabla_w C_x
    expected = {n: before[n] - (eta / len(x)) * sum(g[n] for g in grads) for n in before}

    opt = SGD(model.parameters(), lr=eta)
    opt.zero_grad()
    (0.5 * (model(x) - y).pow(2).sum(dim=1).mean()).backward()  # the mean cost over the mini-batch
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=0, atol=1e-12)


def test_sgd_momentum_and_weight_decay_follow_their_formulas():
    w0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    opt = SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    g1, g2 = torch.tensor([0.5, 0.25], dtype=torch.float64), torch.tensor([-1.0, 2.0], dtype=torch.float64)
    p.grad = g1.clone()
    opt.step()
    v1 = g1 + 0.01 * w0
    w1 = w0 - 0.1 * v1
    torch.testing.assert_close(p.detach(), w1, rtol=0, atol=1e-15)
    p.grad = g2.clone()
    opt.step()
    v2 = 0.9 * v1 + (g2 + 0.01 * w1)
    torch.testing.assert_close(p.detach(), w1 - 0.1 * v2, rtol=0, atol=1e-15)


def test_sgd_rejects_bad_settings():
    p = nn.Parameter(torch.zeros(2))
    for kwargs in (dict(lr=-1.0), dict(lr=0.1, momentum=1.5), dict(lr=0.1, weight_decay=-0.1)):
        with pytest.raises(ConfigError):
            SGD([p], **kwargs)


def test_warmup_then_cosine_schedule():
    kw = dict(lr=1.0, warmup_steps=4, max_steps=14, min_lr=0.1)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == pytest.approx(1.0)
    assert lr_at(9, **kw) == pytest.approx(0.55)  # halfway through the cosine: (1 + 0.1) / 2
    assert lr_at(14, **kw) == pytest.approx(0.1)
    assert lr_at(100, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_at(50, lr=2.0, warmup_steps=0, max_steps=10, schedule="constant") == 2.0
    assert lr_at(0, lr=1.0, warmup_steps=0, max_steps=10) == pytest.approx(1.0)
    assert lr_at(10, lr=1.0, warmup_steps=0, max_steps=10) == pytest.approx(0.1)  # default min_lr = lr / 10
    assert math.isclose(lr_at(5, lr=1.0, warmup_steps=0, max_steps=10, min_lr=0.0), 0.5)


def test_build_optimizer_decays_matrices_only():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    opt = build_optimizer(model, "adamw", 1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    decays = {len(g["params"]): g["weight_decay"] for g in opt.param_groups}
    assert decays == {1: 0.1, 3: 0.0}  # the weight matrix decays; the bias and the norm's two vectors do not
    assert isinstance(build_optimizer(model, "sgd", 0.1), SGD)
    with pytest.raises(ConfigError, match="unknown optimizer"):
        build_optimizer(model, "lion", 0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable"):
        build_optimizer(model, "sgd", 0.1)


def test_train_config_validation_and_toml(tmp_path):
    base = dict(data=["x.txt"], tokenizer="t.model", model_args={"dim": 32, "n_layers": 1, "n_heads": 2})
    TrainConfig(**base)
    for bad in (dict(lr=0), dict(batch_size=0), dict(optimizer="adam"), dict(autocast="fp8"), dict(export="onnx")):
        with pytest.raises(ConfigError):
            TrainConfig(**{**base, **bad})
    with pytest.raises(ConfigError, match="model"):
        TrainConfig(data=["x.txt"], tokenizer="t.model")
    with pytest.raises(ConfigError, match="tokenizer"):
        TrainConfig(data=["x.txt"], model_args={"dim": 32, "n_layers": 1, "n_heads": 2})
    toml = tmp_path / "run.toml"
    toml.write_text('data = ["a.txt"]\ntokenizer = "t.model"\nlr = 0.01\n[model_args]\ndim = 32\nn_layers = 1\n'
                    'n_heads = 2\n[lora]\nrank = 4\ntargets = ["wq", "wk"]\n')
    cfg = TrainConfig.from_toml(toml, overrides={"max_steps": 7})
    assert cfg.lr == 0.01 and cfg.max_steps == 7 and cfg.lora.rank == 4 and cfg.lora.targets == ["wq", "wk"]
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    toml.write_text('data = ["a.txt"]\ntokenizer = "t.model"\nlearning_rate = 0.1\n')
    with pytest.raises(ConfigError, match="learning_rate.*known settings"):
        TrainConfig.from_toml(toml)
    toml.write_text('data = ["a.txt"]\ntokenizer = "t.model"\n[model_args]\ndim = 32\n[lora]\nrank = 4\ntargets = ["wz"]\n')
    with pytest.raises(ConfigError, match="wz"):
        TrainConfig.from_toml(toml)
