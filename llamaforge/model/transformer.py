"""The Llama transformer: token ids and positions in, logits out.

No I/O, no tokenizer, no device strings, no torch.distributed: `build_model` puts weights that were
loaded elsewhere into a model made on the meta device, without ever holding two copies.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from llamaforge.errors import CheckpointError, ConfigError
from llamaforge.model.args import ModelArgs
from llamaforge.model.kv_cache import KVCache
from llamaforge.model.layers import RMSNorm, RotaryEmbedding, TransformerBlock, keep_positions
from llamaforge.model.step import StepInput


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

    def step_input(
        self,
        tokens: torch.Tensor,
        input_pos: Union[int, torch.Tensor, StepInput, None],
        cache: Optional[KVCache] = None,
        slots: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
    ) -> StepInput:
        """The StepInput of tokens (B, T): `input_pos` itself if it is one, else `StepInput.make` of the arguments."""
        if isinstance(input_pos, StepInput):
            if slots is not None or kv_len is not None:
                raise ConfigError("pass slots and kv_len inside the StepInput, not beside it")
            return input_pos
        bsz, seqlen = tokens.shape
        return StepInput.make(input_pos, bsz, seqlen, device=tokens.device,
                              cache_len=None if cache is None else cache.max_seq_len, slots=slots, kv_len=kv_len)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        input_pos: Union[int, torch.Tensor, StepInput, None] = None,
        cache: Optional[KVCache] = None,
        slots: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
        layer: Optional[int] = None,
        keep: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Final normalised hidden states (B, T, dim) for tokens (B, T).

        input_pos: a StepInput, or what `StepInput.make` takes: an int `start` (every row at positions
            start..start+T-1, as Meta's `start_pos`), or a tensor of positions, (B, T) per row or (T,) shared,
            with `kv_len` cached positions read (default: the whole cache); None means 0.
        cache, slots: the KV cache to write and read, and the slot of each row (rows 0..B-1 by default).
        layer: stop after the first `layer` blocks and return their (un-normalised) output instead;
            0 gives the token embeddings.
        keep: (B, n) positions of each row: only their states are returned, (B, n, dim), and the last block's
            feed-forward runs on them alone (`TransformerBlock.forward`); every position's keys and values are
            still written to `cache`.
        """
        step = self.step_input(tokens, input_pos, cache, slots, kv_len)
        blocks = self.layers[:layer]
        if layer is not None and not 0 <= layer <= len(self.layers):
            raise ConfigError(f"layer must be in [0, {len(self.layers)}], got {layer}")
        rope = self.rope.tables(step.positions)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        if keep is not None and len(blocks) == 0:
            h = keep_positions(h, keep)
        for i, block in enumerate(blocks):
            h = block(h, rope, step, cache, keep=keep if i == len(blocks) - 1 else None)
        return h if layer is not None else self.norm(h)

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: Union[int, torch.Tensor, StepInput, None] = None,
        cache: Optional[KVCache] = None,
        slots: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits in float32: (B, T, vocab), or (B, 1, vocab) for the last position when `last_only`.

        Always the modules: the decode loop's one-token step (`llamaforge.runtime.DecodeStep`) may run a fused
        equivalent instead, by its own choice, never by replacing this method. Without autograd, a forward of
        more than UBATCH tokens over a cache from an int start (a long prompt's prefill, as Meta's `generate`
        runs it) goes through the model in pieces of UBATCH positions, each piece's keys and values in the
        cache before the next reads them, as llama.cpp's `n_ubatch`: its activations are those of UBATCH
        positions (at the 1B shape a 4096-token prefill held 424 MiB of them over the weights at once).
        """
        bsz, seqlen = tokens.shape
        if (seqlen > UBATCH and cache is not None and isinstance(input_pos, (int, type(None))) and kv_len is None
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):
            return self._forward_in_pieces(tokens, input_pos or 0, cache, slots, last_only)
        keep = torch.full((bsz, 1), seqlen - 1, device=tokens.device) if last_only else None
        return self.output(self.hidden_states(tokens, input_pos, cache, slots, kv_len, keep=keep)).float()

    def _forward_in_pieces(self, tokens: torch.Tensor, start: int, cache: KVCache, slots: Optional[torch.Tensor],
                           last_only: bool) -> torch.Tensor:
        bsz, seqlen = tokens.shape
        nothing = torch.empty((bsz, 0), dtype=torch.long, device=tokens.device)  # no position's output is wanted
        out = None
        for s in range(0, seqlen, UBATCH):
            piece = tokens[:, s : s + UBATCH]
            if last_only and s + UBATCH < seqlen:  # only the cache is wanted from this piece
                self.hidden_states(piece, start + s, cache, slots, keep=nothing)
                continue
            logits = self.forward(piece, start + s, cache, slots, last_only=last_only)
            if last_only:
                return logits  # (B, 1, V)
            if out is None:
                out = logits.new_empty((bsz, seqlen, logits.shape[-1]))
            out[:, s : s + piece.shape[1]] = logits
        return out


UBATCH = 512  # positions per piece of a long forward over a KV cache (llama.cpp's default n_ubatch)


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Skip `torch.nn.init` calls while modules are made on the meta device: their values are replaced anyway,
    and a meta `normal_` (nn.Embedding's init) first imports torch._dynamo, ~1 s of a ~2 s load."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs.get("tensor")
        return func(*args, **(kwargs or {}))


def empty_model(args: ModelArgs, max_seq_len: Optional[int] = None) -> Transformer:
    """A Transformer on the meta device: its shapes and names, no memory, no random init.

    `max_seq_len` is the length the rotary tables are built for (default: the context length `args` declares).
    """
    with torch.device("meta"), _SkipInit():
        return Transformer(args, max_seq_len)


def check_weights(model: Transformer, state_dict: Mapping[str, Any]) -> None:
    """Raise CheckpointError naming the keys of `state_dict` that the model lacks or misses, or a wrong shape.

    Values may be tensors or anything with a `.shape` (a quantized checkpoint tensor's logical shape).
    """
    expected = dict(model.state_dict())
    if model.args.tie_embeddings:
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


def load_weights(
    model: Transformer, state_dict: Mapping[str, torch.Tensor], *, device: torch.device, dtype: torch.dtype
) -> Transformer:
    """Assign the float tensors of `state_dict` (every float weight the model has, checked) on `device` in `dtype`.

    The model may be on the meta device, and may have had modules swapped beforehand (quantized layers hold
    their own bytes, so their weights are not in `state_dict`). Returns the model, in eval mode.
    """
    check_weights(model, state_dict)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}, strict=False,
                          assign=True)
    if model.args.tie_embeddings and isinstance(model.output, nn.Linear) and isinstance(model.tok_embeddings,
                                                                                       nn.Embedding):
        model.output.weight = model.tok_embeddings.weight
    model.rope.reset_tables(device)
    return model.to(device).eval()


def build_model(
    args: ModelArgs,
    state_dict: Mapping[str, torch.Tensor],
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_seq_len: Optional[int] = None,
) -> Transformer:
    """Make a float Transformer on `device` in `dtype` holding exactly the weights of `state_dict`.

    The model is created on the meta device and the tensors are assigned, so no random init runs and
    weights are never held twice. Missing or unexpected keys raise CheckpointError naming them. A
    checkpoint whose values include quantized tensors (GGUF blocks) is built by `llamaforge.runtime.build`,
    which swaps in quantized layers; here they are an error.
    """
    quantized = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if quantized:
        raise CheckpointError(
            f"weights {quantized[:3]}{' ...' if len(quantized) > 3 else ''} are quantized tensors; build the model "
            "with llamaforge.runtime.build (or Llama.build), or dequantize them first"
        )
    return load_weights(empty_model(args, max_seq_len), state_dict, device=device, dtype=dtype)
