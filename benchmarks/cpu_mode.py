"""`--cpu avx2`: both engines as an AVX2-only CPU (AMD Zen 2 / Zen 3, Intel Haswell .. Comet Lake) runs them,
measured on a CPU that also has AVX-512.

The benchmark processes get their instruction sets from the environment they start in (what a library picks
at load time cannot be changed later):
    llamaforge  LLAMAFORGE_X8_TILES=avx2 (the C++ kernels: AVX2 x8 tiles with maddubs sums, the AVX2 16-bit
                GEMM, BF16 by its exact FMA emulation instead of vdpbf16ps; kernels/loader.py), and torch's own
                ops as on an AVX2 CPU: ATEN_CPU_CAPABILITY=avx2 (ATen's vectorised kernels: attention over a
                prompt, norms, softmax), MKL_ENABLE_INSTRUCTIONS=AVX2 and ONEDNN_MAX_CPU_ISA=AVX2 (their GEMMs)
    llama.cpp   LLAMA_CPP_LIB_PATH = an AVX2-only build of the same llama.cpp that llama-cpp-python vendors
                (benchmarks/build_llama_cpp_avx2.sh: GGML_NATIVE off, AVX / AVX2 / FMA / F16C / BMI2 on, every
                AVX-512 / AVX-VNNI / AMX variant off), found at $LLAMA_CPP_AVX2 (its `lib` folder), by default
                benchmarks/_work/llama.cpp-avx2
Each process then reports what it ran on (`isa` in its RESULT) and refuses to measure when it is not AVX2 only
(`check_isa`), so a table can never mix the two by mistake. Not run by the tests.
"""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("native", "avx2")
TORCH_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def llama_cpp_avx2_lib() -> Path:
    """The folder holding the AVX2-only libllama.so and its libggml*.so (they resolve from there: RUNPATH $ORIGIN)."""
    root = Path(os.environ.get("LLAMA_CPP_AVX2") or HERE / "_work" / "llama.cpp-avx2")
    lib = root / "lib"
    if not (lib / "libllama.so").exists():
        raise SystemExit(f"--cpu avx2 needs an AVX2-only llama.cpp build: no {lib / 'libllama.so'}; run "
                         "`bash benchmarks/build_llama_cpp_avx2.sh` (or set LLAMA_CPP_AVX2 to its output folder)")
    return lib


def cpu_env(mode: str, engine: str) -> dict[str, str]:
    """The environment variables a benchmark process of `engine` starts with to run as `mode` ("native": none)."""
    if mode == "native":
        return {}
    if mode != "avx2":
        raise SystemExit(f"--cpu must be one of {', '.join(MODES)}, got {mode!r}")
    if engine == "llama.cpp":
        return {"LLAMA_CPP_LIB_PATH": str(llama_cpp_avx2_lib())}
    if engine == "transformers":
        return dict(TORCH_AVX2)
    return {"LLAMAFORGE_X8_TILES": "avx2", **TORCH_AVX2}


def isa_of(engine: str) -> dict:
    """What this process's engine computes with (call after the engine is loaded)."""
    if engine == "llama.cpp":
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode()
        # ggml names only the features it was built with ("AVX512 = 1 | AVX512_VNNI = 1 | ...")
        return {"system_info": info, "avx512": "AVX512" in info or "AMX" in info or "AVX_VNNI" in info,
                "lib": os.environ.get("LLAMA_CPP_LIB_PATH", "(llama-cpp-python's own)")}
    import torch

    from llamaforge import kernels

    ext = kernels.get_extension()
    return {"torch": torch.backends.cpu.get_cpu_capability(),
            "vnni": bool(ext is not None and ext.use_vnni()),
            "avx512_gemm": bool(ext is not None and ext.use_avx512_gemm()),
            "bf16dot": bool(ext is not None and ext.use_bf16dot())}


def check_isa(mode: str, engine: str, isa: dict) -> None:
    """Raise when a process asked to run as `mode` does not (an AVX-512 path left on, the native llama.cpp)."""
    if mode != "avx2":
        return
    if engine == "llama.cpp":
        bad = isa["avx512"] or "AVX2 = 1" not in isa["system_info"]
    else:
        bad = isa["vnni"] or isa["avx512_gemm"] or isa["bf16dot"] or isa["torch"] != "AVX2"
    if bad:
        raise RuntimeError(f"--cpu avx2: this {engine} process does not run AVX2 only: {isa}")
