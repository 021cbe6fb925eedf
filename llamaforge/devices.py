"""Device policy: the one place that decides where a model runs and in which dtype.

`resolve_device("auto")` picks CUDA, then Apple's MPS, then the CPU; `resolve_dtype` picks the
fastest dtype the device computes well (bf16 on CUDA where supported, fp16 on MPS, fp32 on CPU),
unless the caller asks for one. Everything below the API receives a `torch.device` and a
`torch.dtype` and never names a device itself. `torch.distributed` is only for a multi-process
launch (torchrun sets WORLD_SIZE), with NCCL on CUDA and gloo otherwise.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

import torch

from llamaforge.errors import DeviceError

log = logging.getLogger("llamaforge")

DeviceLike = Union[str, torch.device, None]
DTypeLike = Union[str, torch.dtype, None]

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(device: DeviceLike = "auto") -> torch.device:
    """Turn "auto", "cpu", "cuda", "cuda:1", "mps" or a torch.device into an available torch.device."""
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        if torch.cuda.is_available():
            index = local_rank() if world_size() > 1 else torch.cuda.current_device()
            return torch.device("cuda", index)
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} was asked for but CUDA is not available here; use device='auto' or 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type == "mps" and not mps_available():
        raise DeviceError(f"device {device!r} was asked for but MPS is not available here; use device='auto' or 'cpu'")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device type {dev.type!r}; use 'cpu', 'cuda' or 'mps'")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype a model runs in on `device` when the caller does not choose one."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def resolve_dtype(dtype: DTypeLike, device: torch.device) -> torch.dtype:
    """Validate a requested dtype ("float32", "bf16", torch.float16, ...) or pick the device default."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        resolved = _DTYPE_NAMES[dtype.lower()]
    else:
        raise DeviceError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16 (or 'auto')")
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise DeviceError(f"unsupported dtype {resolved}; use float32, bfloat16 or float16")
    if device.type == "cuda" and resolved == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise DeviceError("this CUDA device does not support bfloat16; use dtype='float16' or 'float32'")
    return resolved


def world_size() -> int:
    """Number of processes of a torchrun-style launch (1 for a plain `python` run)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def distributed_backend(device: torch.device) -> str:
    """The torch.distributed backend for a multi-process run on `device`."""
    return "nccl" if device.type == "cuda" else "gloo"


def available_memory_bytes(device: torch.device) -> Optional[int]:
    """Free memory on `device` (None when unknown), used to bound the default context length."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf"):
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            return None
    return None
