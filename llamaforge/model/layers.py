"""The Llama building blocks as pure tensor maths: RMSNorm, rotary embeddings, attention, SwiGLU.

Follows Meta's reference `llama/model.py` (numerics included: norms and the attention softmax run in
float32, rotary embeddings rotate interleaved pairs in float32), written without fairscale so the same
modules serve one device, tensor-parallel surgery, quantized and LoRA layers: attention and feed-forward
receive nothing but their `nn.Linear` projections, which other code may swap.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llamaforge.errors import GenerationError
from llamaforge.model.args import ModelArgs, RopeScaling
from llamaforge.model.kv_cache import KVCache
from llamaforge.model.step import StepInput


def owned_result(out: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether `out op= other` may replace `out op other`: autograd is off (nothing saved for a backward), `out`
    already has the result's dtype and shape, and shares no memory with `other`.

    Inference writes the elementwise steps of a block into tensors it just made instead of new ones: a
    prefill's activations are large (a 128-token prefill of the 1B shape makes (128, 8192) float32 ones, 4 MiB,
    several per layer), and fewer fresh ones hold fewer at once and leave glibc's heap less to fragment
    (benchmarks/RESULTS.md, rss). The bits are those of the out-of-place expressions (tests/test_model.py).
    Plain shape arithmetic on purpose: `torch.broadcast_shapes` imports sympy, 23 MiB resident at the first call.
    """
    return (
        not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and out.dtype == torch.promote_types(out.dtype, other.dtype)
        and other.dim() <= out.dim()
        and all(o in (1, n) for o, n in zip(reversed(other.shape), reversed(out.shape)))  # other broadcasts to out
        and out.untyped_storage().data_ptr() != other.untyped_storage().data_ptr()
    )


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back (as Meta's reference does)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        if owned_result(normed, self.weight):
            return normed.mul_(self.weight)  # the same bits as `normed * weight`, without another activation
        return normed * self.weight


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling]) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in float32, with Llama 3.1 scaling when given."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device="cpu")[: head_dim // 2].float() / head_dim))
    if scaling is None:
        return freqs
    # Meta's llama3 `apply_scaling`: keep high frequencies, divide low ones by `factor`,
    # blend smoothly in between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    out = torch.where(wavelen < high_wavelen, freqs, blended)
    return torch.where(wavelen > low_wavelen, freqs / scaling.factor, out)


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for positions [0, max_seq_len) and the rotation of interleaved pairs.

    `max_seq_len` is the length being built (Llama.build's), not the context a checkpoint declares:
    a file that claims millions of positions must not size memory for them.
    """

    def __init__(self, args: ModelArgs, max_seq_len: Optional[int] = None):
        super().__init__()
        self.head_dim = args.head_dim
        self.theta = args.rope_theta
        self.scaling = args.rope_scaling
        self.max_seq_len = max_seq_len or args.max_seq_len
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_tables()

    def reset_tables(self, device: Optional[torch.device] = None) -> None:
        """(Re)compute the tables, e.g. on the real device after building on the meta device."""
        device = device or self.cos.device
        freqs = rope_frequencies(self.head_dim, self.theta, self.scaling)
        # Computed on the CPU whatever the default device (on "meta" there would be nothing to compute).
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32, device="cpu"), freqs)  # (L, hd/2)
        self.cos = torch.cos(angles).to(device)
        self.sin = torch.sin(angles).to(device)

    def tables(self, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cos and sin at positions input_pos (B, T), shaped (B, T, 1, hd/2) to broadcast over heads."""
        try:
            return self.cos[input_pos].unsqueeze(2), self.sin[input_pos].unsqueeze(2)
        except IndexError:  # (on the CPU; nothing is checked on the happy path)
            raise GenerationError(
                f"positions up to {int(input_pos.max())} but the model was built for {self.max_seq_len} "
                "(max_seq_len): build it with a larger max_seq_len, or pass fewer tokens") from None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, hd) by the angles of `RotaryEmbedding.tables`; pairs (x[2i], x[2i+1]) as in Meta."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, T, H, hd/2, 2)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Grouped-query attention with rotary positions, reading and writing an optional KV cache."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # Qwen3: RMSNorm over each head of q and k (weights shared by all heads), before the rotation.
        self.q_norm = RMSNorm(args.head_dim, eps=args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, eps=args.norm_eps) if args.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        step: StepInput,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """x (B, T, dim); rope = cos/sin tables at the step's positions; cache written and read when given."""
        bsz, seqlen, _ = x.shape
        # Heads are views of the projection outputs: (B, T, H, hd) for this and the next lines.
        xq = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        if self.q_norm is not None:
            xq, xk = self.q_norm(xq), self.k_norm(xk)
        xq, xk = apply_rope(xq, *rope), apply_rope(xk, *rope)
        q = xq.transpose(1, 2)  # (B, H, T, hd)
        k, v = xk.transpose(1, 2), xv.transpose(1, 2)  # (B, Hkv, T, hd)
        # A prompt chunk over the cache: the cache's kernel over its blocks in place, where it has one.
        out = cache.attend(self.layer_id, step, q, k, v) if cache is not None else None
        if out is None:
            if cache is not None:
                k, v = cache.update(self.layer_id, step, k, v)  # (B, Hkv, L, hd), as the cache stores them
                q = cache.round_query(q)  # through q8_0 for a q8_0 cache's keys, as llama.cpp; else q itself
            # Query head h reads kv head h // (H / Hkv), as Meta's repeat_kv, without copying the cache.
            # No mask means: causal from position 0 (T > 1), or one query that sees every key (T == 1).
            attend = decode_attention if seqlen == 1 else prefill_attention
            out = attend(q, k, v, step.mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))  # (B, H, T, hd) -> (B, T, H*hd) -> (B, T, dim)


ATTENTION_BLOCK = 128  # keys per block of prefill_attention's online softmax (512 cost 8x at a 64-key cache)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Attention of T > 1 query positions; causal from position 0 when there is no mask (torch's SDPA).

    q (B, H, T, hd); k, v (B, Hkv, L, hd); mask (B or 1, 1, T, L) or None. With a mask and SDPA's flash
    kernel allowed (a long forward's pieces after the first, `Transformer.forward`), SDPA's own choice: on
    the CPU its flash kernel takes the mask and the grouped heads (2x faster than the blocked softmax
    below at the 1B shape's 512-query pieces). Under the math kernel, which the engine asks for because
    its rows must be batch-invariant, the H / Hkv query heads of a KV head are rows of one attention over
    that head (nothing copied per head: the math kernel copied every key and value H / Hkv times per
    call, half of a 4096-token prefill's attention time on the 1B shape), and float32 runs
    `_blocked_attention`: an online softmax over blocks of ATTENTION_BLOCK keys, so no (T, L) score matrix
    is ever made (1.3x faster than the math kernel at 4096 tokens), and a row's result depends only on its
    own query, keys and mask, never on the other rows.
    """
    bsz, n_heads, seqlen, head_dim = q.shape
    n_kv = k.shape[1]
    if mask is None or mask.shape[1] != 1 or torch.backends.cuda.flash_sdp_enabled():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=n_heads != n_kv)
    rep = n_heads // n_kv
    qg = q.reshape(bsz, n_kv, rep * seqlen, head_dim)  # (B, Hkv, rep * T, hd): head g * rep + r, row r * T + t
    mg = mask.repeat(1, 1, rep, 1) if rep > 1 else mask  # (B or 1, 1, rep * T, L)
    if q.dtype == torch.float32:
        out = _blocked_attention(qg, k, v, mg)
    else:
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mg)
    return out.reshape(bsz, n_heads, seqlen, head_dim)  # (B, Hkv, rep * T, hd) -> (B, H, T, hd)


def _blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd), masked) v, one block of keys at a time (flash attention's online softmax).

    q (B, G, R, hd); k, v (B, G, L, hd); mask (B or 1, 1, R, L). Blocks start at key 0 and all have
    ATTENTION_BLOCK keys (the last padded), so keys past a row's mask (a longer L) only add exact zeros to
    sums of the same shapes: a row's result does not depend on L either.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    neg_inf = float("-inf")
    m = total = acc = None
    for s in range(0, k.shape[2], ATTENTION_BLOCK):
        kb, vb, mb = k[:, :, s : s + ATTENTION_BLOCK], v[:, :, s : s + ATTENTION_BLOCK], mask[..., s : s + ATTENTION_BLOCK]
        if kb.shape[2] < ATTENTION_BLOCK:  # a last short block is padded with masked keys: every matmul has one shape
            pad = ATTENTION_BLOCK - kb.shape[2]
            kb, vb = F.pad(kb, (0, 0, 0, pad)), F.pad(vb, (0, 0, 0, pad))
            mb = F.pad(mb, (0, pad), value=False)
        scores = torch.matmul(q, kb.transpose(-1, -2)).mul_(scale)  # (B, G, R, block)
        scores.masked_fill_(~mb, neg_inf)
        new_m = scores.amax(-1, keepdim=True) if m is None else torch.maximum(m, scores.amax(-1, keepdim=True))
        ref = new_m.masked_fill(new_m == neg_inf, 0.0)  # rows with no key yet: exp(-inf - 0) = 0, no NaN
        p = scores.sub_(ref).exp_()
        pv = torch.matmul(p, vb)  # (B, G, R, hd)
        if m is None:
            total, acc = p.sum(-1, keepdim=True), pv
        else:
            corr = (m - ref).exp_()  # (B, G, R, 1): the earlier blocks rescaled to the new maximum
            total = total.mul_(corr).add_(p.sum(-1, keepdim=True))
            acc = acc.mul_(corr).add_(pv)
        m = new_m
    return acc / total


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Attention of one query position, as Meta computes it (matmul, float32 softmax, matmul).

    q (B, H, 1, hd); k, v (B, Hkv, L, hd); mask (B, 1, 1, L) or None. For a single query this is
    ~100x faster on the CPU than the fused SDPA kernel, which parallelises poorly over one position.
    """
    bsz, n_heads, _, head_dim = q.shape
    n_kv = k.shape[1]
    qg = q.reshape(bsz, n_kv, n_heads // n_kv, head_dim)  # (B, Hkv, rep, hd): head h is group h // rep
    scores = torch.matmul(qg, k.transpose(-1, -2)) / math.sqrt(head_dim)  # (B, Hkv, rep, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, L) broadcasts over heads
    probs = torch.softmax(scores.float(), dim=-1).type_as(q)
    return torch.matmul(probs, v).reshape(bsz, n_heads, 1, head_dim)  # (B, Hkv, rep, hd) -> (B, H, 1, hd)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        rows = x.numel() // x.shape[-1]
        if rows < 2 * FFN_ROWS or not all(rows_independent(w, x) for w in (self.w1, self.w2, self.w3)):
            return self._swiglu(x)
        # A long prompt's rows in pieces of ~FFN_ROWS: each row's result is its own (the projections say so),
        # so the bits are those of one call, and the (rows, hidden_dim) activations, a 4096-token prefill's
        # largest (128 MiB each at the 1B shape), are never made whole. Every piece has >= FFN_ROWS rows.
        flat = x.reshape(rows, x.shape[-1])  # (N, dim)
        n = rows // FFN_ROWS
        bounds = [rows * i // n for i in range(n + 1)]
        out = None
        for a, b in zip(bounds, bounds[1:]):
            piece = self._swiglu(flat[a:b])  # (b - a, dim)
            if out is None:
                out = piece.new_empty((rows, piece.shape[-1]))
            out[a:b] = piece
        return out.view(*x.shape[:-1], out.shape[-1])

    def _swiglu(self, x: torch.Tensor) -> torch.Tensor:
        # Without autograd silu and the product overwrite w1's output: the same bits as the line above, with
        # two (..., hidden_dim) activations live instead of three (a prefill's largest).
        gate = F.silu(self.w1(x), inplace=True)  # (..., hidden_dim)
        up = self.w3(x)
        return self.w2(gate.mul_(up) if owned_result(gate, up) else gate * up)


def keep_positions(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """h (B, T, dim) at positions keep (B, n) of each row -> (B, n, dim)."""
    return h.gather(1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))


FFN_ROWS = 512  # rows per piece of a long prompt's feed-forward (llama.cpp's default n_ubatch)


def rows_independent(linear: nn.Module, x: torch.Tensor) -> bool:
    """Whether `linear(x)`'s rows are bit for bit those of each row alone, whatever the other rows: a
    projection says so itself (`rows_independent(x)`, the quantized layers' C++ kernels); a plain
    nn.Linear does not (a BLAS may block its rows differently at another row count)."""
    says = getattr(linear, "rows_independent", None)
    return bool(says(x)) if callable(says) else False


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        step: StepInput,
        cache: Optional[KVCache] = None,
        keep: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim), every position's keys and values written to `cache` when given.

        keep: (B, n) positions of each row whose outputs are wanted; the feed-forward then runs on those alone
        and the result is (B, n, dim) (rows stay batch rows, as per-row LoRA adapters read them). For the last
        block of a forward whose other positions nobody reads (a prompt's last token, llama.cpp's
        `inp_out_ids`): at the 1B shape a 128-token prefill's last feed-forward is 5% of its work.
        """
        attn = self.attention(self.attention_norm(x), rope, step, cache)
        # Without autograd the residual sums go into the sublayers' fresh outputs (a + b is b + a, bit for bit);
        # x itself is never written.
        h = attn.add_(x) if owned_result(attn, x) else x + attn
        if keep is not None:
            h = keep_positions(h, keep)
        out = self.feed_forward(self.ffn_norm(h))
        return out.add_(h) if owned_result(out, h) else h + out
