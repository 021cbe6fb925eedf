"""A compiled one-token step: the model's modules through `torch.compile`, as gpt-fast's `decode_one_token`.

`Llama.build(compile=True)` (`--compile` on the CLI) makes the `DecodeStep` call this instead of the plain
modules. Shapes are kept static so the compiler sees the same graph every step: every step reads the whole
KV cache (`kv_len` = the cache's length) under a mask built from the rows' positions, instead of the
`kv_len` that grows with the sequence, so the graph does not change as the sequence grows. Each batch size
is its own graph (compiled once, when it is first seen). On CUDA the mode is "reduce-overhead": the step is
replayed as a CUDA graph, which removes the per-kernel launch cost that dominates batch-1 decode; elsewhere
plain inductor ("default"), which the tests use on the CPU to check the compiled step against eager.

Masked keys get zero weight in attention (their scores are -inf before the softmax), so reading the whole
cache computes the same attention as reading its first `kv_len` positions, up to summation order: the
compiled logits match the eager step's to float tolerance, not bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from llamaforge.model import KVCache, StepInput

__all__ = ["CompiledDecode"]


class CompiledDecode:
    """`step(model, tokens, step, cache)` -> logits (B, 1, vocab), or None where it does not apply.

    Applies to the model it was made for, in inference (no autograd); anything else returns None and the
    `DecodeStep` runs the modules. `mode`: torch.compile's mode (default: "reduce-overhead" on CUDA,
    "default" elsewhere).
    """

    def __init__(self, model: nn.Module, *, mode: Optional[str] = None) -> None:
        device = next(model.parameters()).device
        self.model = model
        self.mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
        self._graphs = self.mode == "reduce-overhead"
        self._fn = torch.compile(self._step, mode=self.mode, fullgraph=True, dynamic=False)

    def _step(self, tokens: torch.Tensor, step: StepInput, cache: KVCache) -> torch.Tensor:
        keys = torch.arange(cache.max_seq_len, device=tokens.device)
        mask = keys[None, None, None, :] <= step.positions[:, None, :, None]  # (B, 1, 1, L)
        whole = dataclasses.replace(step, kv_len=None, mask=mask)
        return self.model(tokens, whole, cache, last_only=True)

    def __call__(self, model: nn.Module, tokens: torch.Tensor, step: StepInput, cache: KVCache
                 ) -> Optional[torch.Tensor]:
        if model is not self.model or torch.is_grad_enabled() or tokens.shape[1] != 1:
            return None
        if step.slots is None:
            step = dataclasses.replace(step, slots=torch.arange(tokens.shape[0], device=tokens.device))
        if self._graphs:
            # A CUDA graph's outputs are overwritten by its next replay: mark the step, keep a copy.
            torch.compiler.cudagraph_mark_step_begin()
            return self._fn(tokens, step, cache).clone()
        return self._fn(tokens, step, cache)

    def __repr__(self) -> str:
        return f"CompiledDecode(mode={self.mode!r})"
