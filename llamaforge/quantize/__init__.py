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

from typing import Iterable, Mapping, Optional

import torch
from torch import nn

from llamaforge import kernels
from llamaforge.errors import ConfigError
from llamaforge.progress import iterate_bytes, nbytes
from llamaforge.quantize.int8 import Int8Linear
from llamaforge.quantize.layers import (
    DequantLinear,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantTensorLike,
    check_backend,
    compute_dtype,
    float_bias,
)

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


def _module_name(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


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
    check_backend(backend)
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
                new = QuantizedLinear(qt.raw, qt.qtype, *shape, float_bias(module), backend=backend, layout=layout)
            else:
                new = QuantizedLinear.from_gguf(
                    qt.raw, qt.qtype, shape, float_bias(module), backend=backend, repack=repack
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
                raw, info.name, module.out_features, module.in_features, float_bias(module), backend=backend
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
