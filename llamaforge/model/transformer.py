"""The Llama transformer: token ids and positions in, logits out.

No I/O, no tokenizer, no device strings, no torch.distributed: `build_model` puts weights that were
loaded elsewhere into a model made on the meta device, without ever holding two copies.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from llamaforge.errors import CheckpointError, ConfigError
from llamaforge.model.args import ModelArgs
from llamaforge.model.kv_cache import KVCache
from llamaforge.model.layers import RMSNorm, RotaryEmbedding, TransformerBlock


class Transformer(nn.Module):
    """A Llama decoder with Meta's parameter names (`tok_embeddings`, `layers.N.attention.wq`, ...)."""

    def __init__(self, args: ModelArgs, max_seq_len: Optional[int] = None):
        """`max_seq_len`: positions the rotary tables cover (default: the model's context length)."""
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope = RotaryEmbedding(args, max_seq_len)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Optional fast path for one-token steps with a cache: called by forward as
        # decode_step(self, tokens, input_pos, cache, slots, kv_len), it returns the logits or None
        # where it does not apply. llamaforge.kernels.decode has a C++ one (installed by Llama.build on
        # CPU and by llamaforge.quantize).
        self.decode_step: Optional[Callable[..., Optional[torch.Tensor]]] = None

    def hidden_states(
        self,
        tokens: torch.Tensor,
        input_pos: Union[int, torch.Tensor, None] = None,
        cache: Optional[KVCache] = None,
        slots: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
        layer: Optional[int] = None,
    ) -> torch.Tensor:
        """Final normalised hidden states (B, T, dim) for tokens (B, T).

        input_pos: an int `start` (every row at positions start..start+T-1, as Meta's `start_pos`; with a
            cache, attention reads positions [0, start+T)), or a tensor of positions, (B, T) per row or
            (T,) shared, with `kv_len` cached positions read (default: the whole cache); None means 0.
        cache, slots: the KV cache to write and read, and the slot of each row (rows 0..B-1 by default).
        layer: stop after the first `layer` blocks and return their (un-normalised) output instead;
            0 gives the token embeddings.
        """
        bsz, seqlen = tokens.shape
        device = tokens.device
        if input_pos is None:
            input_pos = 0
        if isinstance(input_pos, int):
            # Shared positions: the common cases need no mask tensor (a mask slows CPU attention ~5x).
            start = input_pos
            input_pos = torch.arange(start, start + seqlen, device=device).unsqueeze(0).expand(bsz, seqlen)
            if cache is not None:
                kv_len = start + seqlen
            if seqlen == 1 or start == 0:
                mask = None  # one query sees every cached key; from 0 it is plain causal attention
            else:
                key_pos = torch.arange(kv_len if cache is not None else seqlen, device=device)
                mask = key_pos[None, None, None, :] <= input_pos[:1, None, :, None]  # (1, 1, T, keys)
                if cache is None:
                    mask = input_pos[:1, None, None, :] <= input_pos[:1, None, :, None]
        else:
            if input_pos.dim() == 1:
                input_pos = input_pos.unsqueeze(0).expand(bsz, seqlen)  # (B, T)
            if cache is None:  # training, scoring: causal attention within these tokens
                key_pos = input_pos
            else:  # the first kv_len cached positions of each row's slot
                key_pos = torch.arange(kv_len or cache.max_seq_len, device=device).unsqueeze(0)
            mask = key_pos[:, None, None, :] <= input_pos[:, None, :, None]  # (B, 1, T, keys)
        rope = self.rope.tables(input_pos)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        if layer is not None and not 0 <= layer <= len(self.layers):
            raise ConfigError(f"layer must be in [0, {len(self.layers)}], got {layer}")
        for block in self.layers[:layer]:
            h = block(h, rope, mask, input_pos, cache, slots, kv_len)
        return h if layer is not None else self.norm(h)

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: Union[int, torch.Tensor, None] = None,
        cache: Optional[KVCache] = None,
        slots: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits in float32: (B, T, vocab), or (B, 1, vocab) for the last position when `last_only`."""
        if tokens.shape[1] == 1 and cache is not None and self.decode_step is not None:
            logits = self.decode_step(self, tokens, 0 if input_pos is None else input_pos, cache, slots, kv_len)
            if logits is not None:
                return logits
        h = self.hidden_states(tokens, input_pos, cache, slots, kv_len)
        if last_only:
            h = h[:, -1:]
        return self.output(h).float()


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Skip `torch.nn.init` calls while modules are made on the meta device: their values are replaced anyway,
    and a meta `normal_` (nn.Embedding's init) first imports torch._dynamo, ~1 s of a ~2 s load."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs.get("tensor")
        return func(*args, **(kwargs or {}))


def build_model(
    args: ModelArgs,
    state_dict: Mapping[str, Any],
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_seq_len: Optional[int] = None,
) -> Transformer:
    """Make a Transformer on `device` in `dtype` holding exactly the weights of `state_dict`.

    The model is created on the meta device and the tensors are assigned, so no random init runs and
    weights are never held twice. Values that are quantized tensors (with `.raw`, `.qtype`, `.shape`,
    e.g. GGUF Q4/Q8 blocks) become quantized modules (`llamaforge.quantize`) instead of being
    dequantized. Missing or unexpected keys raise CheckpointError naming them. `max_seq_len` is the
    length the rotary tables are built for (default: the context length `args` declares).
    """
    quantized = {k: v for k, v in state_dict.items() if not isinstance(v, torch.Tensor)}
    floats = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    with torch.device("meta"), _SkipInit():
        model = Transformer(args, max_seq_len)
    expected = dict(model.state_dict())
    if args.tie_embeddings:
        expected.pop("output.weight", None)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the model shape: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}"
        )
    for name, param in expected.items():
        shape = tuple(state_dict[name].shape)
        if shape != tuple(param.shape):
            raise CheckpointError(f"weight {name} has shape {shape} but the config implies {tuple(param.shape)}")
    if quantized:
        from llamaforge.quantize import quantize_model

        quantize_model(model, from_state=quantized)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in floats.items()}, strict=False, assign=True)
    if args.tie_embeddings and isinstance(model.output, nn.Linear) and isinstance(model.tok_embeddings, nn.Embedding):
        model.output.weight = model.tok_embeddings.weight
    model.rope.reset_tables(device)
    return model.to(device).eval()
