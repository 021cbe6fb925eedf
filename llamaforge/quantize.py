"""Weight-only quantization by module surgery: GGUF-block Linear and Embedding layers.

A GGUF Q4/Q5/Q6/Q8 weight stays in its blocks (4.5-8.5 bits per weight) in memory. After the model
is built (on the meta device or not), `quantize_model(model, from_state=...)` swaps each
`nn.Linear` / `nn.Embedding` whose weight arrived quantized for a `QuantizedLinear` /
`QuantizedEmbedding`; `quantize_model_weights(model, "q8_0")` does the same for a float checkpoint
by quantizing each Linear's weight first. The tied output layer of a model whose `output.weight` is
`tok_embeddings.weight` becomes a `QuantizedLinear` over the very same bytes as the embedding.

Module surgery only: the fused one-token step over these layers is chosen by `llamaforge.runtime`, which
applies quantized layers to a model loaded by `Llama.build`.

The raw blocks are non-persistent buffers: a quantized model's `state_dict()` holds only its float
tensors, so `load_state_dict(float_part, strict=True)` works before or after the surgery.

Accuracy: on CPUs with the C++ kernels (see llamaforge.kernels) activations are quantized to int8
per block of 32 as llama.cpp does, so a layer's output differs from `F.linear(x, dequantize())` by
about 1e-2 of the output norm; the PyTorch fallback (CUDA/MPS, other CPUs, `backend="torch"`,
LLAMAFORGE_KERNELS=torch, inputs that require grad, or a layer whose `exact` is set, as training
does) is exact up to matmul rounding.

Training through a frozen quantized weight (QLoRA): `QuantizedLinear` is differentiable with respect to
its input only. `DequantLinear` dequantizes the blocks in the forward pass and again in the backward
pass (`grad_x = grad_y @ W`), so no float copy of the weight outlives one matmul and memory stays
at the quantized size plus one layer's float weight.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Protocol, Sequence

import torch
from torch import nn

import torch.nn.functional as F

from llamaforge import kernels
from llamaforge.errors import ConfigError
from llamaforge.progress import iterate_bytes, nbytes

__all__ = [
    "DequantLinear",
    "Int8Linear",
    "QuantTensorLike",
    "QuantizedLinear",
    "compute_dtype",
    "QuantizedEmbedding",
    "quantize_model",
    "quantize_model_weights",
]

_BACKENDS = ("auto", "torch")


class QuantTensorLike(Protocol):
    """What `quantize_model` needs of a quantized checkpoint tensor (e.g. checkpoints' GGUFQuantTensor)."""

    raw: torch.Tensor  # uint8 (rows, bytes_per_row)
    qtype: str  # "Q4_1", "Q8_0", ...
    shape: Sequence[int]  # (out_features, in_features)
    # Optional: `release()`, called once the layer holds a repacked copy and no longer needs `raw`
    # (GGUFQuantTensor drops its file pages from memory, keeping load-time peak memory near one copy).
    # Optional: `layout` ("gguf" when absent); "x8" bytes (runtime/x8_cache.py's) are used as they are.


def _check_backend(backend: str) -> str:
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
        self.backend = _check_backend(backend)
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


def _module_name(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _float_bias(module: nn.Module) -> Optional[torch.Tensor]:
    bias = getattr(module, "bias", None)
    if bias is None or bias.device.type == "meta":
        return None if bias is None else torch.zeros(bias.shape, dtype=torch.float32)
    return bias.detach()


def quantize_model(
    model: nn.Module,
    *,
    from_state: Mapping[str, QuantTensorLike],
    tie_output: Optional[bool] = None,
    backend: str = "auto",
    repack: bool = True,
) -> nn.Module:
    """Swap the model's Linear/Embedding modules whose weights arrive quantized; returns the model.

    Args:
        model: built model (on the meta device or not) with Meta-style module names.
        from_state: state-dict names ("layers.0.attention.wq.weight"; the ".weight" may be left off)
            -> quantized tensors with `.raw`, `.qtype`, `.shape` (e.g. GGUFQuantTensor).
        tie_output: replace `output` by a QuantizedLinear sharing the quantized `tok_embeddings`
            bytes. None (default) does so when `output.weight` is `tok_embeddings.weight` and no
            quantized `output.weight` was given.
        backend: "auto" or "torch" (force the PyTorch path), passed to every new layer.
        repack: repack bytes for the fast kernels (a copy; see QuantizedLinear). False keeps the
            given tensors (zero-copy over a memory-mapped file, slower kernels).

    Returns:
        The same model object, modified in place. A Linear bias that is still on the meta device
        becomes a zero float bias to be filled by a later `load_state_dict`.

    Raises:
        ConfigError naming the key when it names no module, a module that is not nn.Linear /
        nn.Embedding, or a shape that differs from the module's.
    """
    _check_backend(backend)
    embed_name = "tok_embeddings"
    tied = False
    if tie_output is None:
        emb, out = getattr(model, embed_name, None), getattr(model, "output", None)
        tied = (
            isinstance(emb, nn.Embedding)
            and isinstance(out, nn.Linear)
            and out.weight is emb.weight
            and not any(_module_name(k) == "output" for k in from_state)
        )
    else:
        tied = tie_output
    modules = dict(model.named_modules())
    replaced: dict[str, nn.Module] = {}
    for key, qt in from_state.items():
        name = _module_name(key)
        module = modules.get(name)
        if module is None:
            raise ConfigError(f"quantized weight {key!r} names no module of the model; modules with weights "
                              f"include {[n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Embedding))][:8]}")
        shape = tuple(int(s) for s in qt.shape)
        layout = getattr(qt, "layout", "gguf")
        if isinstance(module, nn.Linear):
            if shape != (module.out_features, module.in_features):
                raise ConfigError(f"quantized weight {key!r} has shape {shape}, module {name} expects "
                                  f"{(module.out_features, module.in_features)}")
            new: nn.Module
            if layout != "gguf":  # bytes already in the kernels' layout (runtime/x8_cache.py): used as they are
                new = QuantizedLinear(qt.raw, qt.qtype, *shape, _float_bias(module), backend=backend, layout=layout)
            else:
                new = QuantizedLinear.from_gguf(
                    qt.raw, qt.qtype, shape, _float_bias(module), backend=backend, repack=repack
                )
        elif isinstance(module, nn.Embedding):
            if shape != (module.num_embeddings, module.embedding_dim):
                raise ConfigError(f"quantized weight {key!r} has shape {shape}, module {name} expects "
                                  f"{(module.num_embeddings, module.embedding_dim)}")
            dtype = module.weight.dtype if module.weight.dtype.is_floating_point else torch.float32
            if layout != "gguf":
                new = QuantizedEmbedding(qt.raw, qt.qtype, *shape, dtype=dtype, layout=layout)
            else:
                new = QuantizedEmbedding.from_gguf(
                    qt.raw, qt.qtype, shape, dtype=dtype, repack=repack and backend == "auto"
                )
        else:
            raise ConfigError(f"quantized weight {key!r} belongs to {name} ({type(module).__name__}); only nn.Linear "
                              "and nn.Embedding modules can be quantized")
        replaced[name] = new
        release = getattr(qt, "release", None)
        if callable(release) and new.qweight.data_ptr() != qt.raw.data_ptr():
            release()  # the layer holds its own copy
    for name, new in replaced.items():
        _set_module(model, name, new)
    if tied:
        emb = getattr(model, embed_name, None)
        if not isinstance(emb, QuantizedEmbedding):
            raise ConfigError("tie_output=True needs a quantized tok_embeddings (give 'tok_embeddings.weight' in from_state)")
        _set_module(model, "output", emb.as_linear(backend=backend))
    return model


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
        self.register_buffer("bias", _float_bias(linear))

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in) the int8 one stands for."""
        return self.weight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


def _int8_linears(model: nn.Module, skip: set[str]) -> nn.Module:
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in skip}
    for name, module in linears.items():
        if module.weight.device.type == "meta":
            raise ConfigError(f"module {name} has no weights yet (meta device); load the checkpoint before quantizing")
        _set_module(model, name, Int8Linear(module))
    return model


def quantize_model_weights(
    model: nn.Module,
    scheme: str = "q8_0",
    *,
    skip: Iterable[str] = (),
    include_embeddings: bool = False,
    backend: str = "auto",
) -> nn.Module:
    """Quantize a float model's nn.Linear weights to GGUF blocks in place; returns the model.

    A tied output layer (`output.weight is tok_embeddings.weight`) is quantized together with the
    embedding, which then shares its bytes (skip "output" to keep both in float).

    Args:
        model: a model whose weights are loaded (not on the meta device).
        scheme: "q8_0" or "q4_0" (also "q4_1", "q5_0", "q5_1"), as gguf-py/llama.cpp quantize them; or
            "int8": int8 weights with per-row scales (`Int8Linear`, for GPUs; embeddings stay float).
        skip: module names to leave in float (e.g. ["output"]).
        include_embeddings: also quantize untied nn.Embedding tables.
        backend: "auto" or "torch", passed to every new layer.

    Raises:
        ConfigError for an unknown scheme, or a layer whose in_features is not a multiple of 32
        (name it in `skip` to keep it in float).
    """
    if str(scheme).lower() == "int8":
        return _int8_linears(model, set(skip))
    if str(scheme).upper() not in kernels.QUANTIZABLE:
        schemes = [q.lower() for q in kernels.QUANTIZABLE] + ["int8"]
        raise ConfigError(f"scheme must be one of {schemes}, got {scheme!r}")
    info = kernels.qtype_info(scheme)
    skip = set(skip)
    emb, out = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    tied = isinstance(emb, nn.Embedding) and isinstance(out, nn.Linear) and out.weight is emb.weight
    replaced: dict[str, nn.Module] = {}
    modules = iterate_bytes(model.named_modules(), lambda nm: nbytes(getattr(nm[1], "weight", None)),
                            f"quantizing to {info.name}")
    for name, module in modules:
        if name in skip or not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        if tied and name in ("output", "tok_embeddings"):
            if name == "output" or "output" in skip:
                continue  # the pair is quantized once, at the embedding, and shared below
        elif isinstance(module, nn.Embedding) and not include_embeddings:
            continue
        weight = module.weight
        if weight.device.type == "meta":
            raise ConfigError(f"module {name} has no weights yet (meta device); load the checkpoint before quantizing")
        if weight.shape[1] % info.block:
            raise ConfigError(
                f"module {name} has in_features {weight.shape[1]}, not a multiple of {info.block}; "
                f"{info.name} cannot hold it (pass skip=[{name!r}] to keep it in float)"
            )
        raw = kernels.quantize_numpy(weight, info.name).to(weight.device)
        if isinstance(module, nn.Linear):
            replaced[name] = QuantizedLinear(
                raw, info.name, module.out_features, module.in_features, _float_bias(module), backend=backend
            )
        else:
            replaced[name] = QuantizedEmbedding(
                raw, info.name, module.num_embeddings, module.embedding_dim, dtype=weight.dtype,
                repack=backend == "auto",
            )
    for name, new in replaced.items():
        _set_module(model, name, new)
    if tied and isinstance(replaced.get("tok_embeddings"), QuantizedEmbedding):
        _set_module(model, "output", replaced["tok_embeddings"].as_linear(backend=backend))
    return model
