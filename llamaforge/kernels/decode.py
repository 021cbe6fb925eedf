"""The fused decode step: all blocks of a quantized CPU model for one new token per row, in one C++ call.

At batch 1 a decode step of a small model is mostly Python and dispatcher overhead: ~40 PyTorch ops
per block around 7 matmuls that take a few microseconds each. `FusedDecode` is installed as
`Transformer.decode_step` by `llamaforge.quantize` and runs the blocks in C++ (qdecode.cpp), with the
same maths as llamaforge/model/layers.py: float32 RMSNorm, rotary, softmax; the same int8-activation
quantized matmuls as `QuantizedLinear`; keys and values written to and read from the KV cache in place.

It applies only where it computes exactly what the modules would: every block is the stock
TransformerBlock with seven `QuantizedLinear` projections on the C++ kernels, no hooks (tensor
parallel adds some), float32 activations and cache, CPU, no autograd. Anything else returns None and
the model runs its modules. The C++ decoder holds references to the weights and is rebuilt whenever
a module or weight tensor of the model changes (LoRA surgery, `.to()`, loading new weights).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from llamaforge.kernels import LAYOUT_IDS, get_extension


class FusedDecode:
    """`decode_step(model, h, input_pos, cache, slots, kv_len)` -> the blocks' output (B, 1, dim) or None.

    h: token embeddings (B, 1, dim); input_pos: an int start or positions (B, 1) / (1,); the other
    arguments as in `Transformer.hidden_states`. Picklable and deep-copyable (the C++ part is rebuilt).
    """

    def __init__(self) -> None:
        self._decoder: Any = None
        self._built_from: list = []  # the modules and tensors the decoder was built from (kept alive)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __deepcopy__(self, memo: dict) -> "FusedDecode":
        return FusedDecode()

    def __call__(
        self,
        model: nn.Module,
        h: torch.Tensor,
        input_pos: Union[int, torch.Tensor],
        cache: Any,
        slots: Optional[torch.Tensor],
        kv_len: Optional[int],
    ) -> Optional[torch.Tensor]:
        if (
            torch.is_grad_enabled()
            or h.dtype != torch.float32
            or h.device.type != "cpu"
            or cache.k.dtype != torch.float32
            or nn.modules.module._global_forward_hooks
            or nn.modules.module._global_forward_pre_hooks
        ):
            return None
        decoder = self._decoder_for(model)
        if decoder is None:
            return None
        bsz = h.shape[0]
        if isinstance(input_pos, int):
            pos = torch.full((bsz,), input_pos, dtype=torch.long)
            kv_len = input_pos + 1
        else:
            pos = input_pos.reshape(-1).expand(bsz) if input_pos.numel() == 1 else input_pos.reshape(bsz)
            kv_len = kv_len or cache.max_seq_len
        rows = slots if slots is not None else torch.arange(bsz)
        return decoder.step(h, pos, rows, cache.k, cache.v, kv_len)

    def _decoder_for(self, model: nn.Module) -> Any:
        """The C++ decoder for the model's current modules and weights, or None if they do not qualify."""
        from llamaforge.model.layers import Attention, FeedForward, RMSNorm, TransformerBlock
        from llamaforge.quantize import QuantizedLinear

        rope = model.rope
        if rope.cos.dtype != torch.float32 or rope.cos.device.type != "cpu":
            return None
        specs, parts_used = [], [rope.cos, rope.sin]
        for block in model.layers:
            attn, ffn = block.attention, block.feed_forward
            parts = (block, attn, ffn, block.attention_norm, block.ffn_norm)
            if (type(block), type(attn), type(ffn), type(block.attention_norm), type(block.ffn_norm)) != (
                TransformerBlock, Attention, FeedForward, RMSNorm, RMSNorm
            ) or any(m._forward_hooks or m._forward_pre_hooks for m in parts):
                return None
            projections = (attn.wq, attn.wk, attn.wv, attn.wo, ffn.w1, ffn.w2, ffn.w3)
            weights = []
            for p in projections:
                if type(p) is not QuantizedLinear or not p.uses_kernels or p._forward_hooks or p._forward_pre_hooks:
                    return None
                bias = None if p.bias is None else p.bias.detach().float().contiguous()
                weights.append((p.qweight, p._type_id, p.out_features, p.in_features, LAYOUT_IDS[p.layout], bias))
                parts_used += (p, p.qweight, p.bias)
            norms = (block.attention_norm.weight, block.ffn_norm.weight)
            if any(w.dtype != torch.float32 or w.device.type != "cpu" for w in norms):
                return None
            parts_used += norms
            specs.append((norms[0].detach(), norms[1].detach(), weights))
        if len(parts_used) != len(self._built_from) or any(a is not b for a, b in zip(parts_used, self._built_from)):
            ext = get_extension()
            if ext is None:
                return None
            args = model.args
            self._decoder = ext.Decoder(
                specs, args.n_heads, args.n_kv_heads, args.head_dim, args.norm_eps, rope.cos, rope.sin
            )
            self._built_from = parts_used
        return self._decoder
