"""Optimizers and learning-rate schedules for training.

`SGD` is the mini-batch stochastic gradient descent of Nielsen's `network.py`:

    w <- w - (eta / len(mini_batch)) * sum_x nabla_w C_x

The training loop minimises the *mean* loss over the examples (or target tokens) of a mini-batch, so
the gradient it leaves in `param.grad` already is `(1 / len(mini_batch)) * sum_x nabla_w C_x`, and the
step is `w <- w - eta * grad`. Momentum and (decoupled-free, L2-style) weight decay are optional and off
by default; with both off the update is exactly the formula above.

`build_optimizer` makes `sgd` or `adamw` (torch's AdamW, weight decay only on matrices, not on norm
gains); `lr_at` is linear warmup followed by cosine decay to `min_lr`.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn

from llamaforge.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")


class SGD(torch.optim.Optimizer):
    """Mini-batch SGD: `w <- w - lr * grad` with `grad` the mean gradient over the mini-batch.

    Args:
        params: parameters or parameter groups.
        lr: the learning rate eta.
        momentum: heavy-ball momentum mu; the velocity is `v <- mu * v + grad` and the step `w <- w - lr * v`
            (0 disables it, and then no state is kept).
        weight_decay: L2 penalty lambda added to the gradient as `grad + lambda * w` (0 disables it).
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        if not lr >= 0:
            raise ConfigError(f"SGD learning rate must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ConfigError(f"SGD momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0:
            raise ConfigError(f"SGD weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Apply one update to every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if wd != 0:
                    grad = grad.add(p, alpha=wd)
                if mu != 0:
                    state = self.state[p]
                    if "velocity" not in state:
                        state["velocity"] = grad.detach().clone()
                    else:
                        state["velocity"].mul_(mu).add_(grad)
                    grad = state["velocity"]
                p.add_(grad, alpha=-lr)
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split so weight decay applies to matrices only (not norms, not biases)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    *,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """Make the optimizer `name` ("sgd" or "adamw") over the model's trainable parameters.

    Raises:
        ConfigError: unknown optimizer, or the model has no trainable parameter.
    """
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ConfigError("the model has no trainable parameters (with LoRA, check lora.targets)")
    if name == "sgd":
        return SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        # torch's fused AdamW (one kernel over all parameters, CPU and CUDA) instead of a Python loop per
        # parameter: a step's optimizer cost no longer grows with the number of adapted layers.
        params = [p for g in groups for p in g["params"]]
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                    and not hasattr(p, "placements") for p in params)  # DTensor (FSDP) keeps the default
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    raise ConfigError(f"unknown optimizer {name!r}; use one of {list(OPTIMIZERS)}")


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr: Optional[float] = None,
          schedule: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warmup from lr/warmup_steps to lr over the first `warmup_steps` steps, then (schedule
    "cosine") cosine decay to `min_lr` (default lr/10) at `max_steps`, or (schedule "constant") lr.
    """
    min_lr = lr / 10 if min_lr is None else min_lr
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ConfigError(f"unknown lr schedule {schedule!r}; use 'cosine' or 'constant'")
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
