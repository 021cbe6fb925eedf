"""Data-parallel training under torchrun: DistributedDataParallel, or FSDP to shard a large model.

A plain `python` run is one process and never touches torch.distributed. Under `torchrun
--nproc_per_node N` (WORLD_SIZE > 1) the process group starts with NCCL on CUDA and gloo otherwise
(`devices.distributed_backend`); each process takes its micro-batches (data.BatchOrder), gradients are
averaged across processes by DDP (or reduce-scattered by FSDP), and only rank 0 writes logs,
checkpoints and the exported model.

State dicts go through `torch.distributed.checkpoint.state_dict`, which gives the same full,
FQN-keyed model and optimizer state for a plain module, DDP and FSDP alike, so a checkpoint written by
N processes resumes in one and the other way round.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from llamaforge import devices


@dataclass
class DistInfo:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device) -> DistInfo:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1); else a single process."""
    world = devices.world_size()
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = devices.distributed_backend(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=devices.local_rank())


def teardown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        # Every rank past its last collective before any closes its connections: a gloo peer that
        # goes away while another still talks to it aborts that process.
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo, device: torch.device, fsdp: bool) -> nn.Module:
    """DDP (or FSDP with one unit per transformer block) around `model`; the model itself when alone."""
    if not info.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(model, "layers", []):
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


@contextlib.contextmanager
def no_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce for this micro-step when `skip` (all but the last of a step)."""
    if skip and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif skip and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def model_state(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Full, FQN-keyed model state (only trainable tensors when `trainable_only`), on the CPU.

    Collective under FSDP: every process must call it (rank 0 receives the tensors).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(ignore_frozen_params=trainable_only))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full optimizer state keyed by parameter names (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or devices.world_size() > 1
