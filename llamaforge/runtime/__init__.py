"""A built model made ready to run: quantized layers, tensor parallel, and the decode step the loop calls.

The one place above `model`, `quantize` and `kernels` that puts them together (the model imports neither):
- `build(args, state_dict, ...)`: the float modules of `llamaforge.model`, with a quantized layer
  (`llamaforge.quantize`) for every weight that arrives as GGUF blocks;
- `prepare(...)`, called once by `Llama.build`: that, or tensor-parallel surgery under a multi-process launch,
  then `quantize=` for a float checkpoint, and the `DecodeStep`: the fused C++ step (runtime/fused.py) for a
  one-process CPU model, the model's modules elsewhere.

The decode loop calls its `DecodeStep` by name for the one-token steps, as gpt-fast calls `decode_one_token`,
and the model's `forward` for prefill; nothing replaces `Transformer.forward`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from llamaforge.kernels import get_extension
from llamaforge.model import KVCache, ModelArgs, StepInput, Transformer, build_model, check_weights, empty_model
from llamaforge.model import kv_types, load_weights
from llamaforge.quantize import quantize_model, quantize_model_weights
from llamaforge.runtime.adapters import AdapterTable
from llamaforge.runtime.fused import FusedDecode

__all__ = ["AdapterTable", "DecodeStep", "FusedDecode", "block_quantized", "build", "prepare"]


class DecodeStep:
    """`decode(tokens, step, cache)` -> float32 logits (B, 1, vocab) of one token per row, writing the cache.

    tokens (B, 1); step: their `StepInput` (positions (B, 1), slots, kv_len, mask); cache: the KV cache.
    With `fused`, the C++ step runs where it computes what the modules would, and steps aside (the modules
    run) for swapped modules such as LoRA, hooks (tensor parallel adds some), autograd, activations or a
    cache of another element type, and non-CPU tensors. Without it, always the modules.
    `kv_type`: the element type of the caches made for this step (`new_cache`; model/kv_types.py), None for the
    model's dtype.
    """

    def __init__(self, model: Transformer, *, fused: bool = False, kv_type: Optional[str] = None) -> None:
        self.model = model
        self.fused: Optional[FusedDecode] = FusedDecode() if fused and get_extension() is not None else None
        self.kv_type = kv_types.choose_kv_type(kv_type, model_dtype=model.norm.weight.dtype, quantized_weights=False)

    def new_cache(self, n_slots: int, max_seq_len: int) -> KVCache:
        """A zeroed cache of n_slots sequences of max_seq_len positions in this step's `kv_type`, on the model's device."""
        weight = self.model.norm.weight
        return KVCache.for_model(self.model.args, n_slots, max_seq_len, dtype=weight.dtype, device=weight.device,
                                 kv_type=self.kv_type)

    def __call__(self, tokens: torch.Tensor, step: StepInput, cache: KVCache) -> torch.Tensor:
        if self.fused is not None:
            logits = self.fused(self.model, tokens, step, cache)
            if logits is not None:
                return logits
        return self.model(tokens, step, cache, last_only=True)

    @property
    def ran_fused(self) -> bool:
        """Whether the last step ran the fused C++ step (its decoder is built for the current modules)."""
        return self.fused is not None and self.fused.built

    def __repr__(self) -> str:
        return f"DecodeStep(fused={self.fused is not None}, kv_type={self.kv_type!r})"


def block_quantized(state_dict: Mapping[str, Any]) -> bool:
    """Whether weights arrive as GGUF quantized blocks (Q4_0, Q8_0, K-quants, ...), not as floats or 16-bit GGUF
    weights kept 16-bit: what decides the default KV type (`kv_types.choose_kv_type`)."""
    return any(getattr(v, "qtype", "F32") not in ("F32", "F16", "BF16") for v in state_dict.values()
               if not isinstance(v, torch.Tensor))


def build(args: ModelArgs, state_dict: Mapping[str, Any], *, device: torch.device, dtype: torch.dtype,
          max_seq_len: Optional[int] = None) -> Transformer:
    """A model holding exactly `state_dict`: float tensors assigned, quantized ones (GGUF blocks) as quantized layers.

    Keys and shapes of both kinds are checked first (CheckpointError naming them); the quantized layers are
    swapped in on the meta device, so no weight is ever held twice. `max_seq_len`: the positions the rotary
    tables cover (default: the context `args` declares; Llama.build passes the length it builds).
    """
    quantized = {k: v for k, v in state_dict.items() if not isinstance(v, torch.Tensor)}
    if not quantized:
        return build_model(args, state_dict, device=device, dtype=dtype, max_seq_len=max_seq_len)
    model = empty_model(args, max_seq_len)
    check_weights(model, state_dict)
    quantize_model(model, from_state=quantized)
    floats = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    return load_weights(model, floats, device=device, dtype=dtype)


def prepare(
    args: ModelArgs,
    state_dict: Mapping[str, Any],
    *,
    device: torch.device,
    dtype: torch.dtype,
    quantize: Optional[str] = None,
    world: int = 1,
    rank: int = 0,
    max_seq_len: Optional[int] = None,
    kv_type: Optional[str] = None,
) -> tuple[Transformer, DecodeStep]:
    """The model ready for inference and the decode step to call on it.

    Args:
        args, state_dict: a loaded checkpoint (values: float tensors, or GGUF blocks kept quantized).
        device, dtype: where the float weights go and their dtype.
        quantize: "q8_0", "q4_0", ... to quantize the float linear layers after loading (None: as loaded).
        world, rank: a multi-process launch (torch.distributed already initialised): this rank's
            tensor-parallel slice is built instead.
        max_seq_len: the positions the rotary tables cover (default: the context `args` declares).
        kv_type: the KV cache's element type ("float32", "float16", "bfloat16", "q8_0"); None chooses
            (`kv_types.choose_kv_type`: float16 where weights stay in GGUF quantized blocks, else the model's dtype).

    Returns:
        (model, decode): the model in eval mode, and its DecodeStep (fused on a one-process CPU model).
    """
    if world > 1:
        from llamaforge import parallel

        shard = parallel.shard_for_rank(state_dict, rank, world)
        model = parallel.apply_tensor_parallel(
            build_model(parallel.local_args(args, world), shard, device=device, dtype=dtype, max_seq_len=max_seq_len)
        )
    else:
        model = build(args, state_dict, device=device, dtype=dtype, max_seq_len=max_seq_len)
    if quantize is not None:
        model = quantize_model_weights(model, quantize)
    kv = kv_types.choose_kv_type(kv_type, model_dtype=dtype, quantized_weights=block_quantized(state_dict))
    kv_types.row_size(kv, model.args.head_dim)  # q8_0 needs whole blocks: a clear error now, not at the first step
    return model, DecodeStep(model, fused=device.type == "cpu" and world == 1, kv_type=kv)
