"""Tensor parallelism under a multi-process launch (`torchrun --nproc_per_node N`).

Only a multi-process launch starts torch.distributed (NCCL on CUDA, gloo otherwise); one process never
does. Each rank holds a slice of every transformer block, laid out as Meta's model-parallel checkpoints
are (fairscale's ColumnParallelLinear for wq/wk/wv/w1/w3, RowParallelLinear for wo/w2, whose partial
outputs are summed with an all-reduce); embeddings, norms and the output layer are replicated. Any
checkpoint runs on any world size that divides its heads: the loader merges model-parallel shards,
and `shard_for_rank` re-splits the merged weights for this rank.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Mapping

import torch
from torch import nn

from llamaforge import devices
from llamaforge.errors import ConfigError
from llamaforge.model.args import ModelArgs

log = logging.getLogger("llamaforge")

# Meta's model-parallel split dimension of each per-layer weight (see checkpoints/keymaps.py).
_COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
           "feed_forward.w1.weight", "feed_forward.w3.weight",
           "attention.wq.bias", "attention.wk.bias", "attention.wv.bias")  # per-head q/k norms are replicated
_ROW = ("attention.wo.weight", "feed_forward.w2.weight")


def init(device: torch.device) -> tuple[int, int]:
    """Start torch.distributed for this launch (if not started); returns (rank, world_size)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = devices.distributed_backend(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
        log.info("started torch.distributed (%s): rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return dist.get_rank(), dist.get_world_size()


def local_args(args: ModelArgs, world: int) -> ModelArgs:
    """The shape one rank's slice has: heads and the FFN width divided by `world`."""
    for what, value in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads), ("hidden_dim", args.hidden_dim)):
        if value % world:
            raise ConfigError(
                f"cannot run this model on {world} processes: {what}={value} is not divisible by {world}; "
                f"use a world size that divides n_heads={args.n_heads}, n_kv_heads={args.n_kv_heads} and "
                f"hidden_dim={args.hidden_dim}"
            )
    return dataclasses.replace(
        args, n_heads=args.n_heads // world, n_kv_heads=args.n_kv_heads // world,
        hidden_dim=args.hidden_dim // world, head_dim=args.head_dim,
    )


def shard_for_rank(state_dict: Mapping[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's slice of a merged Meta-named state dict (per-layer projections split; the rest kept)."""
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith(_COLUMN):
            out[key] = tensor.chunk(world, dim=0)[rank]
        elif key.endswith(_ROW):
            out[key] = tensor.chunk(world, dim=1)[rank]
        else:
            out[key] = tensor
    return out


def _all_reduce_output(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(output)
    return output


def apply_tensor_parallel(model: nn.Module) -> nn.Module:
    """Sum the partial outputs of every row-parallel projection (wo, w2) across ranks."""
    for layer in model.layers:
        layer.attention.wo.register_forward_hook(_all_reduce_output)
        layer.feed_forward.w2.register_forward_hook(_all_reduce_output)
    return model
