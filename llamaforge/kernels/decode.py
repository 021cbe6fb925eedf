"""The fused decode step: a whole one-token step of a CPU model in one C++ call.

At batch 1 a decode step of a small model is mostly Python and dispatcher overhead: ~40 PyTorch ops
per block around 7 matmuls that take a few microseconds each. `FusedDecode`, installed as
`Transformer.decode_step` (by `enable_fused_decode`: `Llama.build` on CPU, `llamaforge.quantize`),
runs the blocks, the final norm and the output projection in C++ (qdecode.cpp) with the maths of
llamaforge/model/layers.py: float32 RMSNorm, rotary and softmax; for `QuantizedLinear` projections the
same int8-activation matmuls; for float32 `nn.Linear` ones float32 dot products (the same products,
summed in another order than the BLAS: differences in the last bits); keys and values written to and
read from the KV cache in place.

It applies only where it computes what the modules would: stock blocks whose projections are
`QuantizedLinear` on the C++ kernels or float32 `nn.Linear`, no hooks (tensor parallel adds some),
float32 activations and cache, CPU, no autograd. Anything else returns None and the model runs its
modules. The C++ decoder holds references to the weights and is rebuilt whenever a module or weight
tensor of the model changes (LoRA surgery, `.to()`, new Parameters).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from llamaforge.kernels import LAYOUT_IDS, get_extension

_F32 = 0  # GGML type id of a plain float32 weight


def enable_fused_decode(model: nn.Module) -> bool:
    """Give a Transformer the C++ one-token step where the kernels exist; True if it now has one."""
    if not hasattr(model, "decode_step") or get_extension() is None:
        return False
    if not isinstance(model.decode_step, FusedDecode):
        model.decode_step = FusedDecode()
    return True


class FusedDecode:
    """`decode_step(model, tokens, input_pos, cache, slots, kv_len)` -> logits (B, 1, vocab) or None.

    tokens (B, 1); input_pos: an int start or positions (B, 1) / (1,); the other arguments as in
    `Transformer.forward`. Picklable and deep-copyable (the C++ part is rebuilt on first use).
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
        tokens: torch.Tensor,
        input_pos: Union[int, torch.Tensor],
        cache: Any,
        slots: Optional[torch.Tensor],
        kv_len: Optional[int],
    ) -> Optional[torch.Tensor]:
        if (
            torch.is_grad_enabled()
            or tokens.device.type != "cpu"
            or cache.k.dtype != torch.float32
            or nn.modules.module._global_forward_hooks
            or nn.modules.module._global_forward_pre_hooks
        ):
            return None
        decoder = self._decoder_for(model)
        if decoder is None:
            return None
        h = model.tok_embeddings(tokens)
        if h.dtype != torch.float32:
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

        rope = model.rope
        if rope.cos.dtype != torch.float32 or rope.cos.device.type != "cpu" or type(model.norm) is not RMSNorm:
            return None
        used: list = [rope.cos, rope.sin, model.norm.weight]
        specs = []
        for block in model.layers:
            attn, ffn = block.attention, block.feed_forward
            parts = (block, attn, ffn, block.attention_norm, block.ffn_norm)
            if (type(block), type(attn), type(ffn), type(block.attention_norm), type(block.ffn_norm)) != (
                TransformerBlock, Attention, FeedForward, RMSNorm, RMSNorm
            ) or any(m._forward_hooks or m._forward_pre_hooks for m in parts):
                return None
            weights = []
            for p in (attn.wq, attn.wk, attn.wv, attn.wo, ffn.w1, ffn.w2, ffn.w3):
                spec = _weight_spec(p, used)
                if spec is None:
                    return None
                weights.append(spec)
            norms = (block.attention_norm.weight, block.ffn_norm.weight)
            if any(n.dtype != torch.float32 or n.device.type != "cpu" for n in norms):
                return None
            used += norms
            specs.append((norms[0].detach(), norms[1].detach(), weights))
        output = _weight_spec(model.output, used)
        norm = model.norm.weight
        if output is None or norm.dtype != torch.float32 or norm.device.type != "cpu":
            return None
        if len(used) != len(self._built_from) or any(a is not b for a, b in zip(used, self._built_from)):
            args = model.args
            self._decoder = get_extension().Decoder(
                specs, args.n_heads, args.n_kv_heads, args.head_dim, args.norm_eps, rope.cos, rope.sin,
                norm.detach(), output,
            )
            self._built_from = used
        return self._decoder


def _weight_spec(module: nn.Module, used: list) -> Optional[tuple]:
    """(tensor, type id, N, K, layout id, bias) of a projection the C++ decoder can run, else None.

    Appends the module and its tensors to `used` (what the decoder is built from)."""
    from llamaforge.quantize import QuantizedLinear

    if module._forward_hooks or module._forward_pre_hooks:
        return None
    bias = getattr(module, "bias", None)
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return None
    b = None if bias is None else bias.detach().contiguous()
    if type(module) is QuantizedLinear:
        w = module.qweight
        if not module.uses_kernels or w.device.type != "cpu":
            return None
        spec = (w, module._type_id, module.out_features, module.in_features, LAYOUT_IDS[module.layout], b)
    elif type(module) is nn.Linear:
        w = module.weight
        if w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous():
            return None
        spec = (w.detach(), _F32, module.out_features, module.in_features, 0, b)
    else:
        return None
    used += (module, w, bias)
    return spec
