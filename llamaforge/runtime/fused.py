"""The fused decode step: a whole one-token step of a CPU model in one C++ call.

At batch 1 a decode step of a small model is mostly Python and dispatcher overhead: ~40 PyTorch ops
per block around 7 matmuls that take a few microseconds each. `FusedDecode`, which a
`llamaforge.runtime.DecodeStep` tries first where `llamaforge.runtime.prepare` chose it (CPU, one process),
runs the blocks, the final norm and the output projection in C++ (qdecode.cpp) with the maths of
llamaforge/model/layers.py (q/k/v biases and Qwen3's per-head q/k norms included): float32 RMSNorm,
rotary and softmax; for `QuantizedLinear` projections the
same int8-activation matmuls; for float32 `nn.Linear` ones float32 dot products (the same products,
summed in another order than the BLAS: differences in the last bits); keys and values written to and
read from the KV cache in place.

It applies only where it computes what the modules would: stock blocks whose projections are
`QuantizedLinear` on the C++ kernels or float32 `nn.Linear`, no hooks (tensor parallel adds some),
float32 activations, a cache of float32, float16, bfloat16 or q8_0 rows (stored and read in that type by
the C++ step, as `KVCache.update` and `KVCache.round_query` do for the modules), CPU, no autograd.
Anything else returns None and the DecodeStep runs the modules. The C++ decoder holds references to the weights and is rebuilt whenever a module or weight
tensor of the model changes (LoRA surgery, `.to()`, new Parameters, `param.data = ...`): `Llama.model` is
public, and a stale decoder would silently compute with old weights, so a ~0.1 ms check per step stays.
A served adapter's `RowLoRA` (runtime/adapters.py) it runs as its base layer plus, for the rows of each
adapter active in the forward (`AdapterTable.rows`), that adapter's delta inside the C++ step (kernels/qlora.h):
mixed batches of adapters and the base model stay in one fused step (with the adapters' C++ tensors,
`ServedAdapter.native`, the same kernel the modules' RowLoRA calls).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from llamaforge.kernels import LAYOUT_IDS, get_extension
from llamaforge.model.kv_cache import KVCache
from llamaforge.model.layers import Attention, FeedForward, RMSNorm, TransformerBlock
from llamaforge.model.step import StepInput
from llamaforge.quantize import QuantizedLinear
from llamaforge.runtime.adapters import AdapterTable, RowLoRA

_F32 = 0  # GGML type id of a plain float32 weight
# The KV element types the C++ step stores and reads (model/kv_types.py): float rows, or uint8 q8_0 blocks.
_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)


class FusedDecode:
    """`fused(model, tokens, step, cache)` -> logits (B, 1, vocab), or None where it does not apply.

    tokens (B, 1); step: the StepInput of those tokens (positions (B, 1), slots or block tables, kv_len; its mask
    is not needed: the C++ step lets row b see cached positions [0, min(pos_b + 1, kv_len)), which is that mask).
    Picklable and deep-copyable (the C++ part is rebuilt on first use).
    """

    def __init__(self) -> None:
        self._decoder: Any = None
        self._watch: Optional[_Watch] = None  # what the decoder was built from

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __deepcopy__(self, memo: dict) -> "FusedDecode":
        return FusedDecode()

    @property
    def built(self) -> bool:
        """Whether a C++ decoder exists for the model's current modules (the last call ran fused)."""
        return self._decoder is not None

    def __call__(self, model: nn.Module, tokens: torch.Tensor, step: StepInput, cache: KVCache) -> Optional[torch.Tensor]:
        if (
            torch.is_grad_enabled()
            or tokens.device.type != "cpu"
            or cache.k.dtype not in _CACHE_DTYPES
            or nn.modules.module._global_forward_hooks
            or nn.modules.module._global_forward_pre_hooks
        ):
            return None
        decoder = self._decoder_for(model)
        if decoder is None:
            return None
        bsz = tokens.shape[0]
        lora = self._lora_rows()
        if lora is None:
            return None
        h = model.tok_embeddings(tokens)
        if h.dtype != torch.float32:
            return None
        pos = step.positions.reshape(bsz)  # (B, 1) -> (B,)
        tables = cache.block_tables(step, bsz)  # (B, W): each row's blocks
        return decoder.step(h, pos, tables, cache.k, cache.v, step.kv_len or cache.max_seq_len, *lora)

    def _lora_rows(self) -> Optional[tuple]:
        """The step's LoRA arguments: () without active adapters, ([C++ adapter], row ids (B,): index or -1),
        or None where an active adapter has no C++ tensors (not float32 CPU: the modules run)."""
        table = self._watch.table
        if table is None or not table.active:
            return ()
        return table.native

    def _decoder_for(self, model: nn.Module) -> Any:
        """The C++ decoder for the model's current modules and weights, or None if they do not qualify."""
        if self._watch is not None and self._watch.unchanged():
            return self._decoder
        self._decoder = self._watch = None
        watch = _Watch()
        built = _build(model, watch)
        if built is not None:
            self._decoder, self._watch = built, watch
        return self._decoder


class _Watch:
    """What a built decoder depends on, checked before each step in ~0.1 ms (a full walk takes ~1 ms).

    The object in each module slot it read (submodule, parameter, buffer or plain attribute), the storage
    of each tensor (`.data = ...` and `.to()` give a tensor new storage), and the hooks of each module
    whose forward the step replaces.
    """

    _MISSING = object()

    def __init__(self) -> None:
        self.slots: list[tuple[dict, str, Any]] = []
        self.tensors: list[tuple[torch.Tensor, int]] = []
        self.modules: list[nn.Module] = []
        self.table: Optional[AdapterTable] = None  # the served adapters' table, if any projection is a RowLoRA

    def get(self, parent: nn.Module, name: str) -> Any:
        """parent.<name>, remembered."""
        for d in (parent._modules, parent._parameters, parent._buffers, parent.__dict__):
            if name in d:
                self.slots.append((d, name, d[name]))
                if isinstance(d[name], torch.Tensor):
                    self.tensors.append((d[name], d[name].data_ptr()))
                return d[name]
        return getattr(parent, name)  # a property or class attribute: nothing to watch

    def module(self, parent: nn.Module, name: str) -> Any:
        """A submodule whose forward the fused step stands in for: remembered, with its hooks checked."""
        m = self.get(parent, name)
        self.modules.append(m)
        return m

    def unchanged(self) -> bool:
        return (
            all(d.get(name, self._MISSING) is obj for d, name, obj in self.slots)
            and all(t.data_ptr() == ptr for t, ptr in self.tensors)
            and not any(m._forward_hooks or m._forward_pre_hooks for m in self.modules)
        )


def _build(model: nn.Module, watch: _Watch) -> Any:
    """A C++ decoder for the model's modules, recording what it reads in `watch`; None if they do not qualify."""
    args = model.args
    rope, norm = watch.get(model, "rope"), watch.module(model, "norm")
    cos, sin = watch.get(rope, "cos"), watch.get(rope, "sin")
    if cos.dtype != torch.float32 or cos.device.type != "cpu" or type(norm) is not RMSNorm:
        return None
    layers = watch.get(model, "layers")
    specs = []
    for i in range(len(layers)):
        block = watch.module(layers, str(i))
        if type(block) is not TransformerBlock:
            return None
        attn, ffn = watch.module(block, "attention"), watch.module(block, "feed_forward")
        norms = (watch.module(block, "attention_norm"), watch.module(block, "ffn_norm"))
        if (type(attn), type(ffn), type(norms[0]), type(norms[1])) != (Attention, FeedForward, RMSNorm, RMSNorm):
            return None
        qk_norms = tuple(watch.get(attn, name) for name in ("q_norm", "k_norm"))  # Qwen3's, or None
        watch.modules.extend(n for n in qk_norms if n is not None)
        if any(n is not None and type(n) is not RMSNorm for n in qk_norms):
            return None
        qk_weights = [None if n is None else _float32_cpu(watch.get(n, "weight")) for n in qk_norms]
        if any(n is not None and (w is None or n.eps != args.norm_eps) for n, w in zip(qk_norms, qk_weights)):
            return None
        weights = []
        for parent, name in ((attn, "wq"), (attn, "wk"), (attn, "wv"), (attn, "wo"), (ffn, "w1"), (ffn, "w2"),
                             (ffn, "w3")):
            spec = _weight_spec(watch.module(parent, name), watch)
            if spec is None:
                return None
            weights.append(spec)
        norm_weights = [_float32_cpu(watch.get(n, "weight")) for n in norms]
        if any(w is None for w in norm_weights):
            return None
        specs.append((*norm_weights, weights, *qk_weights))
    if type(model.output) is RowLoRA:
        return None  # no C++ delta for the output projection
    output = _weight_spec(watch.module(model, "output"), watch)
    norm_weight = _float32_cpu(watch.get(norm, "weight"))
    if output is None or norm_weight is None or any(m._forward_hooks or m._forward_pre_hooks for m in watch.modules):
        return None
    return get_extension().Decoder(
        specs, args.n_heads, args.n_kv_heads, args.head_dim, args.norm_eps, cos, sin, norm_weight, output
    )


def _float32_cpu(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t detached if it is a float32 CPU tensor, else None."""
    if t is None or t.dtype != torch.float32 or t.device.type != "cpu":
        return None
    return t.detach()


def _weight_spec(module: nn.Module, watch: _Watch) -> Optional[tuple]:
    """(tensor, type id, N, K, layout id, bias) of a projection the C++ decoder can run, else None."""
    if type(module) is RowLoRA:  # served adapters: the C++ step runs its base, and adds active rows' deltas
        if watch.table is not None and module._table is not watch.table:
            return None  # two tables over one model: not a layout the engine makes
        watch.table = module._table
        module = watch.module(module, "base")
    if type(module) is QuantizedLinear:
        w = watch.get(module, "qweight")
        if not module.uses_kernels or w.device.type != "cpu":
            return None
        spec = (w, module.type_id, module.out_features, module.in_features, LAYOUT_IDS[module.layout])
    elif type(module) is nn.Linear:
        w = _float32_cpu(watch.get(module, "weight"))
        if w is None or not w.is_contiguous():
            return None
        spec = (w, _F32, module.out_features, module.in_features, 0)
    else:
        return None
    bias = watch.get(module, "bias")
    if bias is not None and _float32_cpu(bias) is None:
        return None
    return (*spec, None if bias is None else bias.detach().contiguous())
