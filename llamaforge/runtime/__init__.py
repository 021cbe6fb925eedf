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

from llamaforge.checkpoints.gguf import GGUFQuantTensor, populate
from llamaforge.devices import available_memory_bytes
from llamaforge.kernels import X8_FORMATS, get_extension
from llamaforge.model import KVCache, ModelArgs, StepInput, Transformer, build_model, check_weights, empty_model
from llamaforge.model import kv_types, load_weights
from llamaforge.quantize import quantize_model, quantize_model_weights
from llamaforge.runtime import x8_cache
from llamaforge.runtime.adapters import AdapterTable
from llamaforge.runtime.compiled import CompiledDecode
from llamaforge.runtime.fused import FusedDecode

__all__ = ["AdapterTable", "CompiledDecode", "DecodeStep", "FusedDecode", "holds_gguf_weights", "build",
           "populate_in_place", "prepare"]


class DecodeStep:
    """`decode(tokens, step, cache)` -> float32 logits (B, 1, vocab) of one token per row, writing the cache.

    tokens (B, 1); step: their `StepInput` (positions (B, 1), slots, kv_len, mask); cache: the KV cache.
    With `fused`, the C++ step runs where it computes what the modules would (served LoRA adapters
    included: runtime/fused.py), and steps aside (the modules run) for other swapped modules, hooks (tensor
    parallel adds some), autograd, activations or a cache of another element type, and non-CPU tensors. With
    `compiled` (`Llama.build(compile=True)`), the modules through torch.compile (runtime/compiled.py: CUDA
    graphs on CUDA). Else, always the modules.
    `kv_type`: the element type of the caches made for this step (`new_cache`, `new_pool`; model/kv_types.py),
    None for the model's dtype.
    """

    def __init__(self, model: Transformer, *, fused: bool = False, compiled: bool = False,
                 kv_type: Optional[str] = None) -> None:
        self.model = model
        self.fused: Optional[FusedDecode] = (
            FusedDecode() if fused and not compiled and get_extension() is not None else None)
        self.compiled: Optional[CompiledDecode] = CompiledDecode(model) if compiled else None
        self.ran_fused = False  # whether the last call ran the fused C++ step (else the modules)
        self.kv_type = kv_types.choose_kv_type(kv_type, model_dtype=model.norm.weight.dtype, gguf_weights=False)

    def new_cache(self, n_slots: int, max_seq_len: int) -> KVCache:
        """A zeroed slot cache of n_slots sequences of max_seq_len positions in this step's `kv_type`."""
        weight = self.model.norm.weight
        return self._with_kernel(KVCache.for_model(self.model.args, n_slots, max_seq_len, dtype=weight.dtype,
                                                   device=weight.device, kv_type=self.kv_type))

    def new_pool(self, n_blocks: int, max_seq_len: int, block_size: int) -> KVCache:
        """A zeroed pool of n_blocks blocks of block_size positions in this step's `kv_type`."""
        weight = self.model.norm.weight
        return self._with_kernel(KVCache.pool(self.model.args, n_blocks, max_seq_len, dtype=weight.dtype,
                                              device=weight.device, block_size=block_size, kv_type=self.kv_type))

    def _with_kernel(self, cache: KVCache) -> KVCache:
        """With the fused step, prompt chunks attend over the cache's blocks in place by the C++ kernel the
        fused step's own attention runs (qattn_rows.h: each position's bits those of that position alone, so
        a chunk's rows stay batch-invariant), 2x the blocked softmax's speed at a 4096-token prompt."""
        if self.fused is not None and cache.k.device.type == "cpu":
            cache.block_attention = get_extension().kv_attend_blocks
        return cache

    def __call__(self, tokens: torch.Tensor, step: StepInput, cache: KVCache) -> torch.Tensor:
        if self.fused is not None:
            logits = self.fused(self.model, tokens, step, cache)
            if logits is not None:
                self.ran_fused = True
                return logits
        self.ran_fused = False
        if self.compiled is not None:
            logits = self.compiled(self.model, tokens, step, cache)
            if logits is not None:
                return logits
        return self.model(tokens, step, cache, last_only=True)

    def __repr__(self) -> str:
        return f"DecodeStep(fused={self.fused is not None}, compiled={self.compiled is not None}, kv_type={self.kv_type!r})"


def holds_gguf_weights(state_dict: Mapping[str, Any]) -> bool:
    """Whether weights stay as a GGUF file holds them (quantized blocks, or F16 / BF16 kept 16-bit), not as
    float tensors: what decides the default KV type (`kv_types.choose_kv_type`)."""
    return any(not isinstance(v, torch.Tensor) for v in state_dict.values())


def build(args: ModelArgs, state_dict: Mapping[str, Any], *, device: torch.device, dtype: torch.dtype,
          max_seq_len: Optional[int] = None) -> Transformer:
    """A model holding exactly `state_dict`: float tensors assigned, quantized ones (GGUF blocks) as quantized layers.

    Keys and shapes of both kinds are checked first (CheckpointError naming them); the quantized layers are
    swapped in on the meta device, so no weight is ever held twice; GGUF weights come already repacked from
    the x8 cache file when it holds them (runtime/x8_cache.py), which the first load writes. `max_seq_len`:
    the positions the rotary tables cover (default: the context `args` declares; Llama.build passes the
    length it builds).
    """
    quantized = {k: v for k, v in state_dict.items() if not isinstance(v, torch.Tensor)}
    if not quantized:
        return build_model(args, state_dict, device=device, dtype=dtype, max_seq_len=max_seq_len)
    model = empty_model(args, max_seq_len)
    check_weights(model, state_dict)
    weights = x8_cache.repacked(quantized)
    quantize_model(model, from_state=weights)
    populate_in_place(weights, tied="output.weight" not in state_dict)
    floats = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    return load_weights(model, floats, device=device, dtype=dtype)


def populate_in_place(weights: Mapping[str, Any], *, tied: bool) -> int:
    """Fault in now the file pages of the GGUF weights the layers read where they lie; returns the bytes done.

    F16/BF16 (and any type without an x8 layout) stay in the file's pages, which the first forward would
    otherwise fault in (~0.1-0.15 s of one core per GB, as llama.cpp's MAP_POPULATE pays at load). Done
    here, on the loading thread and without the GIL (`checkpoints.gguf.populate`), it overlaps the tokenizer.
    The embedding table is read a row per token, so it is left to fault, unless the output shares it
    (`tied`). Nothing is done without the C++ kernels (the PyTorch path converts the weights anyway) or
    when the weights exceed half the memory available (the pages would push each other out).
    """
    todo = [w for name, w in weights.items() if isinstance(w, GGUFQuantTensor) and w.qtype not in X8_FORMATS
            and (tied or not name.startswith("tok_embeddings."))]
    total = sum(w.nbytes for w in todo)
    available = available_memory_bytes(torch.device("cpu"))
    if not todo or get_extension() is None or (available is not None and total > available // 2):
        return 0
    return populate(todo)


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
    compile: bool = False,
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
        compile: one-token steps through torch.compile (CUDA graphs on CUDA) instead of the fused C++ step
            or the plain modules.
        kv_type: the KV cache's element type ("float32", "float16", "bfloat16", "q8_0"); None chooses
            (`kv_types.choose_kv_type`: float16 where weights stay as a GGUF file holds them, else the model's dtype).

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
    kv = kv_types.choose_kv_type(kv_type, model_dtype=dtype, gguf_weights=holds_gguf_weights(state_dict))
    kv_types.row_size(kv, model.args.head_dim)  # q8_0 needs whole blocks: a clear error now, not at the first step
    return model, DecodeStep(model, fused=device.type == "cpu" and world == 1, compiled=compile, kv_type=kv)
