"""The GGUF-block layers: `QuantizedLinear`, `QuantizedEmbedding` and `DequantLinear` (QLoRA's backward).

The package docstring (llamaforge/quantize/__init__.py) says how they are used and how accurate they are.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch
from torch import nn

import torch.nn.functional as F

from llamaforge import kernels
from llamaforge.errors import ConfigError

_BACKENDS = ("auto", "torch")


class QuantTensorLike(Protocol):
    """What `quantize_model` needs of a quantized checkpoint tensor (e.g. checkpoints' GGUFQuantTensor)."""

    raw: torch.Tensor  # uint8 (rows, bytes_per_row)
    qtype: str  # "Q4_1", "Q8_0", ...
    shape: Sequence[int]  # (out_features, in_features)
    # Optional: `release()`, called once the layer holds a repacked copy and no longer needs `raw`
    # (GGUFQuantTensor drops its file pages from memory, keeping load-time peak memory near one copy).
    # Optional: `layout` ("gguf" when absent); "x8" bytes (runtime/x8_cache.py's) are used as they are.


def check_backend(backend: str) -> str:
    if backend not in _BACKENDS:
        raise ConfigError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    return backend


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in: autocast's (e.g. bfloat16) when it is on for x's device, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class DequantLinear(torch.autograd.Function):
    """`F.linear(x, W, b)` through a frozen quantized W, differentiable with respect to x only.

    W is dequantized (exactly, to float32, then to the compute dtype) in the forward pass and again in
    the backward pass instead of being saved: the backward keeps nothing of the layer but its blocks.
    Under autocast the matmuls run in autocast's dtype, the result has that dtype.
    """

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        dtype = compute_dtype(x)
        ctx.layer = layer  # type: ignore[attr-defined]
        with torch.autocast(x.device.type, enabled=False):
            bias = None if layer.bias is None else layer.bias.to(dtype)
            return F.linear(x.to(dtype), layer.dequantize().to(dtype), bias)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        layer = ctx.layer  # type: ignore[attr-defined]
        with torch.autocast(grad.device.type, enabled=False):
            return grad @ layer.dequantize().to(grad.dtype), None  # (..., out) @ (out, in) -> (..., in)


class QuantizedLinear(nn.Module):
    """`y = x @ W.T + b` with W held as GGUF blocks in the uint8 buffer `qweight`.

    `layout` says how the bytes are arranged: "gguf" (as in the file, (out_features, bytes_per_row))
    or "x8" (all but Q5_0/Q5_1, repacked for the C++ kernels; `gguf_bytes()` gives the file's bytes back).
    forward(x) takes x (..., in_features) in float32, bfloat16 or float16 and returns the same dtype.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        qtype: str,
        out_features: int,
        in_features: int,
        bias: Optional[torch.Tensor] = None,
        *,
        backend: str = "auto",
        layout: str = "gguf",
        repack: bool = True,
    ) -> None:
        """Wrap quantized bytes; prefer `from_gguf` / `from_float`, which validate their input.

        Args:
            qweight: uint8 bytes of the weight in `layout`: for "gguf" (out_features, bytes_per_row).
                Used as is (not copied) unless it is repacked.
            qtype: GGUF type name ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K").
            out_features, in_features: the float weight's shape.
            bias: optional float (out_features,), kept as a Parameter.
            backend: "auto" (C++ kernels on CPU where available) or "torch" (always dequantize).
            layout: "gguf", or "x8" for bytes already repacked by `llamaforge.kernels.repack`.
            repack: with backend "auto", repack GGUF bytes of any type but Q5_0/Q5_1 to "x8" when the
                C++ kernels are available: a copy of the same size, 2-4x faster kernels. False keeps
                `qweight` itself (e.g. a view of a memory-mapped file: nothing copied).
        """
        super().__init__()
        info = kernels.qtype_info(qtype)
        self.backend = check_backend(backend)
        qweight = _checked_bytes(qweight, info, out_features, in_features, layout)
        if repack and backend == "auto" and layout == "gguf":
            qweight, layout = kernels.repack(qweight, info.name, out_features, in_features)
        self.qtype = info.name
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.layout = layout
        self._type_id = info.type_id
        self._layout_id = kernels.LAYOUT_IDS[layout]
        self._gemm_rows = kernels.gemm_rows(layout)
        self.register_buffer("qweight", qweight.contiguous(), persistent=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        # Whether forward runs the C++ kernels on CPU inputs (the module object itself is looked up per
        # call, so that layers can be deep-copied and pickled).
        self.uses_kernels = backend == "auto" and kernels.get_extension() is not None
        # True: always the exact dequantize-then-matmul path (training sets it, so that losses and
        # gradients are those of the dequantized weights, not of int8 activations).
        self.exact = False

    @classmethod
    def from_gguf(
        cls,
        raw: torch.Tensor,
        qtype: str,
        shape: Sequence[int],
        bias: Optional[torch.Tensor] = None,
        *,
        backend: str = "auto",
        repack: bool = True,
    ) -> "QuantizedLinear":
        """A layer over GGUF bytes `raw` (uint8 (out, bytes_per_row)) holding a weight of `shape` (out, in).

        Raises ConfigError for an unsupported type or an in_features that is not a multiple of the
        block size, CheckpointError when the bytes do not match the shape.
        """
        info = kernels.qtype_info(qtype)
        if not isinstance(raw, torch.Tensor):
            raw = torch.as_tensor(raw)
        out_features, in_features = kernels.check_raw(raw, info, shape)
        return cls(raw, info.name, out_features, in_features, bias, backend=backend, repack=repack)

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, qtype: str = "Q8_0", bias: Optional[torch.Tensor] = None, *, backend: str = "auto"
    ) -> "QuantizedLinear":
        """Quantize a float weight (out, in) to `qtype` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) with gguf-py's quantizer."""
        info = kernels.qtype_info(qtype)
        if weight.dim() != 2:
            raise ConfigError(f"from_float needs a 2-D weight, got shape {tuple(weight.shape)}")
        raw = kernels.quantize_numpy(weight, info.name).to(weight.device)
        return cls(raw, info.name, weight.shape[0], weight.shape[1], bias, backend=backend)

    @property
    def type_id(self) -> int:
        """The GGML type id of `qtype`, as the C++ kernels take it."""
        return self._type_id

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 (out_features, in_features): exactly gguf.quants.dequantize of the blocks."""
        return kernels.dequantize(self.qweight, self.qtype, self.out_features, self.in_features, self.layout)

    def gguf_bytes(self) -> torch.Tensor:
        """The weight's GGUF bytes (out_features, bytes_per_row), undoing any repacking (for saving)."""
        return kernels.to_gguf_layout(self.qweight, self.qtype, self.out_features, self.in_features, self.layout)

    @classmethod
    def concat(cls, layers: Sequence["QuantizedLinear"]) -> "QuantizedLinear":
        """One layer computing the concatenated outputs of `layers` (e.g. wq|wk|wv, or w1|w3): fewer calls.

        All layers must share qtype and in_features; the result's output is
        `torch.cat([layer(x) for layer in layers], dim=-1)` (the same numbers: rows are independent).
        """
        if not layers:
            raise ConfigError("concat needs at least one QuantizedLinear")
        first = layers[0]
        for layer in layers[1:]:
            if (layer.qtype, layer.in_features) != (first.qtype, first.in_features):
                raise ConfigError(
                    f"cannot concatenate a {layer.qtype} layer with in_features {layer.in_features} to a "
                    f"{first.qtype} layer with in_features {first.in_features}"
                )
        raw = torch.cat([layer.gguf_bytes() for layer in layers], dim=0)
        biases = [layer.bias for layer in layers]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach() if b is not None else torch.zeros(layer.out_features, device=raw.device)
                              for b, layer in zip(biases, layers)])
        return cls(raw, first.qtype, raw.shape[0], first.in_features, bias, backend=first.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact or (x.requires_grad and torch.is_grad_enabled()):
            # The exact path, differentiable with respect to x, never keeping a float W.
            if x.shape[-1] != self.in_features:
                raise ConfigError(f"input has {x.shape[-1]} features, this layer takes {self.in_features}")
            return DequantLinear.apply(x, self)
        if self.uses_kernels and x.device.type == "cpu":
            args = (x, self.qweight, self._type_id, self.out_features, self.in_features, self.bias,
                    self._gemm_rows, self._layout_id)
            if torch.compiler.is_compiling():
                return torch.ops.llamaforge.qlinear(*args)
            return kernels.get_extension().qlinear(*args)
        if x.shape[-1] != self.in_features:
            raise ConfigError(f"input has {x.shape[-1]} features, this layer takes {self.in_features}")
        return kernels.qlinear(x, self.qweight, self.qtype, self.out_features, self.in_features, self.bias,
                               layout=self.layout, use_cpp=False)

    def rows_independent(self, x: torch.Tensor) -> bool:
        """Whether forward(x) runs the C++ kernels, whose every output row depends on its own input row only
        (the same bits at any row count; tests/test_ffn_rows.py): model/layers.py `rows_independent`."""
        return (self.uses_kernels and x.device.type == "cpu" and not self.exact
                and not (x.requires_grad and torch.is_grad_enabled()))

    def extra_repr(self) -> str:
        path = "cpp" if self.uses_kernels else "torch"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, "
            f"layout={self.layout}, bias={self.bias is not None}, kernels={path}"
        )


class QuantizedEmbedding(nn.Module):
    """An embedding table held as GGUF blocks; a lookup dequantizes only the requested rows (exactly).

    The output dtype follows the module's floating dtype (`.to(torch.bfloat16)` etc., float32 by default).
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        qtype: str,
        num_embeddings: int,
        embedding_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        layout: str = "gguf",
        repack: bool = True,
    ) -> None:
        """Wrap quantized bytes (num_embeddings rows) in `layout`; prefer `from_gguf`.

        With `repack`, GGUF bytes are repacked like QuantizedLinear's, so that `as_linear()` (the
        tied output layer) gets the fast layout while sharing the same memory.
        """
        super().__init__()
        info = kernels.qtype_info(qtype)
        qweight = _checked_bytes(qweight, info, num_embeddings, embedding_dim, layout)
        if repack and layout == "gguf":
            qweight, layout = kernels.repack(qweight, info.name, num_embeddings, embedding_dim)
        self.qtype = info.name
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.layout = layout
        self.register_buffer("qweight", qweight.contiguous(), persistent=False)
        # Zero-size float buffer whose dtype/device follow .to(): it decides the output dtype.
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=dtype, device=qweight.device), persistent=False)

    @classmethod
    def from_gguf(
        cls,
        raw: torch.Tensor,
        qtype: str,
        shape: Sequence[int],
        *,
        dtype: torch.dtype = torch.float32,
        repack: bool = True,
    ) -> "QuantizedEmbedding":
        """An embedding over GGUF bytes `raw` for a (num_embeddings, embedding_dim) table."""
        info = kernels.qtype_info(qtype)
        if not isinstance(raw, torch.Tensor):
            raw = torch.as_tensor(raw)
        rows, dim = kernels.check_raw(raw, info, shape)
        return cls(raw, info.name, rows, dim, dtype=dtype, repack=repack)

    def dequantize(self) -> torch.Tensor:
        """The whole table as float32 (num_embeddings, embedding_dim), exactly as gguf-py dequantizes it."""
        return kernels.dequantize(self.qweight, self.qtype, self.num_embeddings, self.embedding_dim, self.layout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = kernels.dequantize_rows(
            self.qweight, tokens, self.qtype, self.num_embeddings, self.embedding_dim, self.layout
        )
        dtype = self._dtype_probe.dtype
        return out if dtype == torch.float32 else out.to(dtype)

    def as_linear(self, *, backend: str = "auto") -> QuantizedLinear:
        """A QuantizedLinear (embedding_dim -> num_embeddings) sharing these bytes: the tied output layer."""
        return QuantizedLinear(
            self.qweight, self.qtype, self.num_embeddings, self.embedding_dim, backend=backend, layout=self.layout
        )

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}, layout={self.layout}"


def _checked_bytes(qweight: torch.Tensor, info: kernels.QType, rows: int, cols: int, layout: str) -> torch.Tensor:
    if layout not in kernels.LAYOUTS:
        raise ConfigError(f"layout must be one of {kernels.LAYOUTS}, got {layout!r}")
    if not isinstance(qweight, torch.Tensor):
        qweight = torch.as_tensor(qweight)
    if layout == "gguf":
        kernels.check_raw(qweight, info, (rows, cols))
    elif info.name not in kernels.X8_FORMATS or tuple(qweight.shape) != kernels.x8_shape(info.name, rows, cols):
        raise ConfigError(f"x8 bytes {tuple(qweight.shape)} do not hold a {info.name} weight of shape {(rows, cols)}")
    return qweight


def float_bias(module: nn.Module) -> Optional[torch.Tensor]:
    bias = getattr(module, "bias", None)
    if bias is None or bias.device.type == "meta":
        return None if bias is None else torch.zeros(bias.shape, dtype=torch.float32)
    return bias.detach()
