"""One engine over a tensor-parallel model: rank 0 leads, every other rank runs the same model calls.

Under `torchrun --nproc_per_node N ... serve`, each rank holds a slice of the model (`llamaforge.parallel`),
and a forward is a collective: every rank must run it with the same inputs, in the same order. Rank 0
owns HTTP and the engine (scheduler, sampler, block pool); its `Leader` runner broadcasts each model call
(`torch.distributed.broadcast_object_list` of plain ints, from rank 0, on the engine thread) before running
it, and `follow` on the other ranks receives and runs the same call on its own slice and its own KV block pool
(whose heads are its share; the same block tables), until the leader's `stop_followers`. The row-parallel all-reduce leaves every
rank with the same full logits; only rank 0 samples.

Served LoRA adapters are not mirrored (a rank's projections are slices): a leader refuses rows with one.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from llamaforge.errors import GenerationError
from llamaforge.generation.runner import PrefillChunk, Runner
from llamaforge.model import KVCache

_STOP = "stop"


def _broadcast(message: Optional[tuple]) -> tuple:
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Leader(Runner):
    """Rank 0's runner: each model call is broadcast to the followers first, then run here too."""

    def new_pool(self, n_blocks: int, max_seq_len: int, block_size: int) -> KVCache:
        _broadcast(("new_pool", n_blocks, max_seq_len, block_size))
        return super().new_pool(n_blocks, max_seq_len, block_size)

    def prefill(self, cache: KVCache, chunks: Sequence[PrefillChunk]) -> list[torch.Tensor]:
        if any(c.adapter is not None for c in chunks):
            raise GenerationError("LoRA adapters are not served under tensor parallelism; serve them on one process")
        _broadcast(("prefill", [(list(c.tokens), c.start, list(c.blocks), c.all_logits) for c in chunks]))
        return super().prefill(cache, chunks)

    def decode(self, cache: KVCache, tokens: Sequence[int], pos: Sequence[int], blocks: Sequence[Sequence[int]],
               adapters=None) -> torch.Tensor:
        if adapters is not None and any(a is not None for a in adapters):
            raise GenerationError("LoRA adapters are not served under tensor parallelism; serve them on one process")
        _broadcast(("decode", list(tokens), list(pos), [list(b) for b in blocks]))
        return super().decode(cache, tokens, pos, blocks)

    def copy_block(self, cache: KVCache, src: int, dst: int, length: int) -> None:
        _broadcast(("copy_block", src, dst, length))
        super().copy_block(cache, src, dst, length)

    def embed(self, ids: Sequence[int]) -> list[float]:
        _broadcast(("embed", list(ids)))
        return super().embed(ids)

    def stop_followers(self) -> None:
        """End `follow` on every other rank (call once, after the engine thread has ended)."""
        _broadcast((_STOP,))


def follow(runner: Runner) -> None:
    """Run the leader's model calls on this rank until it stops the followers (ranks > 0)."""
    cache: Optional[KVCache] = None
    with torch.inference_mode():
        while True:
            op, *args = _broadcast(None)
            if op == _STOP:
                return
            if op == "new_pool":
                cache = runner.new_pool(*args)
            elif op == "prefill":
                runner.prefill(cache, [PrefillChunk(tokens, start, blocks, all_logits)
                                       for tokens, start, blocks, all_logits in args[0]])
            elif op == "decode":
                runner.decode(cache, *args)
            elif op == "copy_block":
                runner.copy_block(cache, *args)
            elif op == "embed":
                runner.embed(*args)
            else:
                raise GenerationError(f"the leader sent an unknown model call {op!r}")
