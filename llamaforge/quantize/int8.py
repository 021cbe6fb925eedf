"""Int8 weight-only layers for GPUs (`quantize="int8"`), as gpt-fast quantizes them."""

from __future__ import annotations

import torch
from torch import nn

import torch.nn.functional as F

from llamaforge.quantize.layers import float_bias

class Int8Linear(nn.Module):
    """`y = (x @ W8.T) * scale + b`: int8 weights, one scale per output row, for GPUs (gpt-fast's int8 scheme).

    `quantize="int8"`. Symmetric per-row quantization (scale = max |w| / 127 of each row); the weight is
    converted to the activations' dtype inside the matmul, which `torch.compile` fuses into one kernel on
    CUDA (`Llama.build(compile=True)`), so decode reads one byte per weight instead of two. On the CPU the
    GGUF schemes run on integer kernels and are the faster choice; this layer runs there too (tests).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (out,)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.register_buffer("bias", float_bias(linear))

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in) the int8 one stands for."""
        return self.weight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"
