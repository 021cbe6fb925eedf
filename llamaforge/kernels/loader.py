"""Build-on-first-use loader for the C++ quantized matmul kernels (qmatmul.cpp).

The extension is compiled once with `torch.utils.cpp_extension.load` (gcc, ninja) into a cache
directory named after a hash of the sources (qmatmul.cpp, qkernels.cpp, qdecode.cpp and their headers), the
compiler flags and the torch/Python versions, so a new source or a new torch builds a new module and an
unchanged one is imported straight from the cached .so without running the compiler. Where the kernels
cannot run (no x86-64 AVX2/FMA/F16C, no compiler, a failed build, or LLAMAFORGE_KERNELS=torch in the
environment), `get_extension()` returns None and callers use the pure-PyTorch path; which path is used is logged once.

Environment:
    LLAMAFORGE_KERNELS       "auto" (default: build/load the C++ kernels when the CPU can run them)
                             or "torch" (never build; always dequantize + F.linear).
    LLAMAFORGE_X8_TILES      "avx2": no AVX-512 path even where the CPU has one (the AVX2 x8 tiles, the AVX2
                             16-bit prefill GEMM, BF16 by the FMA emulation of vdpbf16ps): exactly what
                             AVX2-only CPUs such as Zen 3 compute (the same bits), for tests and benchmarks;
                             else the fastest this CPU has. torch's own ops follow ATEN_CPU_CAPABILITY.
    LLAMAFORGE_KERNEL_CACHE  build/cache directory (default $XDG_CACHE_HOME/llamaforge/kernels,
                             i.e. ~/.cache/llamaforge/kernels).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

log = logging.getLogger("llamaforge.kernels")

SOURCE = Path(__file__).with_name("qmatmul.cpp")  # the Python bindings
SOURCES = (SOURCE, SOURCE.with_name("qkernels.cpp"), SOURCE.with_name("qdecode.cpp"),
           SOURCE.with_name("qgemm.cpp"))  # compiled in parallel
HEADERS = ("qattn.h", "qattn_rows.h", "qcommon.h", "qdecode.h", "qgemm.h", "qgemm_tiles.h", "qkernels.h", "qkv.h", "qlora.h", "qops.h",
           "qrows.h", "qx8.h", "qx8_tiles.h")
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp")
LDFLAGS = ("-fopenmp",)
ENV_BACKEND = "LLAMAFORGE_KERNELS"
ENV_CACHE = "LLAMAFORGE_KERNEL_CACHE"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ext": module or None once decided, "reason": why not


def default_cache_dir() -> Path:
    """Where built kernels are cached: $LLAMAFORGE_KERNEL_CACHE, else $XDG_CACHE_HOME/llamaforge/kernels."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llamaforge" / "kernels"


def extension_name() -> str:
    """Module name of the extension: changes whenever the source, flags, torch or Python change."""
    h = hashlib.sha256()
    for path in (*SOURCES, *(SOURCE.with_name(header) for header in HEADERS)):
        h.update(path.read_bytes())
    h.update(repr((CFLAGS, LDFLAGS, torch.__version__, sys.version_info[:2], platform.machine())).encode())
    return f"llamaforge_qmatmul_{h.hexdigest()[:16]}"


def cpu_can_run_kernels() -> tuple[bool, str]:
    """Whether this CPU can run the AVX2/FMA/F16C kernels, and if not, why."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"the kernels need an x86-64 CPU, this is {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return False, f"the kernels need AVX2, torch reports CPU capability {capability!r}"
    try:
        flags = Path("/proc/cpuinfo").read_text().split("\nflags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return True, ""
    missing = [f for f in ("avx2", "fma", "f16c") if f not in flags]
    if missing:
        return False, f"the CPU lacks {missing}"
    return True, ""


def _import_built(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the built kernels from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_extension(cache_dir: Optional[os.PathLike] = None, *, verbose: bool = False) -> ModuleType:
    """Compile (or import the cached build of) the C++ kernels and return the module.

    Args:
        cache_dir: build directory root; default `default_cache_dir()`. The module is built in
            `cache_dir/<extension_name()>` and reused from there by later processes.
        verbose: show the compiler command lines and output.

    Returns:
        The extension module (functions `qlinear`, `dequantize`, `dequantize_rows`, `repack_x8`; class `Decoder`).

    Raises:
        Whatever the compiler or the import raised (RuntimeError, OSError, ImportError).
    """
    name = extension_name()
    build_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    build_dir = build_dir / name
    built = build_dir / f"{name}.so"
    if built.exists():
        return _import_built(name, built)
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(path) for path in SOURCES],
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        build_directory=str(build_dir),
        verbose=verbose,
    )


def get_extension() -> Optional[ModuleType]:
    """The process-wide C++ kernels, built on first call; None where the PyTorch fallback must be used.

    The first call decides for the whole process and logs which path is used and why.
    """
    if "ext" in _state:
        return _state["ext"]  # type: ignore[return-value]
    with _lock:
        if "ext" in _state:
            return _state["ext"]  # type: ignore[return-value]
        ext: Optional[ModuleType] = None
        choice = os.environ.get(ENV_BACKEND, "auto").strip().lower()
        ok, reason = cpu_can_run_kernels()
        if choice in ("torch", "off", "0", "fallback", "none"):
            reason = f"{ENV_BACKEND}={choice}"
        elif choice not in ("auto", "", "cpp", "1", "on"):
            reason = f"{ENV_BACKEND}={choice!r} is not one of 'auto', 'torch'"
        elif ok:
            start = time.perf_counter()
            try:
                ext = build_extension()
            except Exception as exc:  # noqa: BLE001 - any build failure means: use the fallback
                first = str(exc).strip().splitlines()
                reason = f"building the C++ kernels failed ({type(exc).__name__}: {first[0] if first else ''})"
            else:
                log.info(
                    "llamaforge quantized matmul: C++ AVX2 kernels (%s, ready in %.1f s)",
                    extension_name(),
                    time.perf_counter() - start,
                )
        if ext is None:
            log.warning(
                "llamaforge quantized matmul: using the PyTorch fallback (dequantize + F.linear, slower) "
                "on CPU because %s",
                reason,
            )
        _state["ext"], _state["reason"] = ext, reason
        return ext


def backend_name() -> str:
    """"cpp" when the C++ kernels serve CPU tensors in this process, else "torch"."""
    return "cpp" if get_extension() is not None else "torch"
