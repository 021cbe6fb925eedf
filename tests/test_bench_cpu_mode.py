"""`compare.py --cpu avx2` (benchmarks/cpu_mode.py): the environment each engine's process starts in, the check
that refuses a process not running AVX2 only, and the tables' row per mode. No engine is timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llamaforge.kernels import get_extension
from tests.test_bench_compare import _shape_cell
from tests.test_bench_matrix import BENCH, _load_as

cpu_mode = _load_as("cpu_mode")
compare = _load_as("compare")
compare_shapes = _load_as("compare_shapes")

AVX2_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | "
             "REPACK = 1 | ")
NATIVE_INFO = AVX2_INFO.replace("BMI2 = 1 |", "BMI2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 |")


def test_environment_per_engine(tmp_path, monkeypatch):
    assert cpu_mode.cpu_env("native", "llamaforge") == {} == cpu_mode.cpu_env("native", "llama.cpp")
    env = cpu_mode.cpu_env("avx2", "llamaforge")
    assert env == {"LLAMAFORGE_X8_TILES": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                   "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert "LLAMAFORGE_X8_TILES" not in cpu_mode.cpu_env("avx2", "transformers")
    monkeypatch.setenv("LLAMA_CPP_AVX2", str(tmp_path))
    with pytest.raises(SystemExit, match="build_llama_cpp_avx2.sh"):  # not built yet: say how
        cpu_mode.cpu_env("avx2", "llama.cpp")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libllama.so").write_bytes(b"")
    assert cpu_mode.cpu_env("avx2", "llama.cpp") == {"LLAMA_CPP_LIB_PATH": str(tmp_path / "lib")}
    with pytest.raises(SystemExit, match="--cpu"):
        cpu_mode.cpu_env("avx512", "llamaforge")


def test_a_process_not_running_avx2_only_is_refused():
    ok = {"torch": "AVX2", "vnni": False, "avx512_gemm": False, "bf16dot": False}
    cpu_mode.check_isa("avx2", "llamaforge", ok)
    for bad in ({"vnni": True}, {"avx512_gemm": True}, {"bf16dot": True}, {"torch": "AVX512"}):
        with pytest.raises(RuntimeError, match="AVX2 only"):
            cpu_mode.check_isa("avx2", "llamaforge", {**ok, **bad})
        cpu_mode.check_isa("native", "llamaforge", {**ok, **bad})  # native: whatever the CPU has
    cpu_mode.check_isa("avx2", "llama.cpp", {"system_info": AVX2_INFO, "avx512": False})
    with pytest.raises(RuntimeError, match="AVX2 only"):
        cpu_mode.check_isa("avx2", "llama.cpp", {"system_info": NATIVE_INFO, "avx512": True})


@pytest.mark.skipif(get_extension() is None, reason="the C++ kernels are not available here")
def test_the_avx2_environment_is_what_a_llamaforge_process_runs():
    code = (f"import sys, json; sys.path.append({str(BENCH)!r}); import cpu_mode; "
            "print(json.dumps(cpu_mode.isa_of('llamaforge')))")
    env = {**os.environ, **cpu_mode.cpu_env("avx2", "llamaforge")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    isa = json.loads(out.stdout.strip().splitlines()[-1])
    assert isa == {"torch": "AVX2", "vnni": False, "avx512_gemm": False, "bf16dot": False}
    cpu_mode.check_isa("avx2", "llamaforge", isa)


def test_command_line():
    assert compare.parse_args(["--shape", "1b"]).cpu == ["native"]
    assert compare.parse_args(["--shape", "1b", "--cpu", "avx2,native"]).cpu == ["avx2", "native"]
    assert compare.parse_args(["--matrix", "full", "--cpu", "avx2"]).cpu == ["avx2"]
    for bad in (["--shape", "1b", "--cpu", "avx512"], ["--matrix", "full", "--cpu", "avx2,native"]):
        with pytest.raises(SystemExit):
            compare.parse_args(bad)


def test_shape_ratios_have_a_row_per_mode():
    meta = {"command": "x", "date": "d", "minutes": 1, "load_start": 1.0, "load_end": 2.0,
            "bandwidth": {"roofline_gbs": 20.0},
            "machine": {"cpu": "c", "cores": 2, "flags": "avx2", "llamaforge": "abc", "llama_cpp_python": "0.3.36",
                        "torch": "2"},
            "args": {"contexts": [128], "batches": [1], "shape": "1b", "threads_list": [2], "types": ["Q4_0"],
                     "steps": 8, "runs": 2, "long_steps": 4, "cpu": ["avx2", "native"]}}
    cells = []
    for cpu, ours, theirs in (("avx2", 9.0, 10.0), ("native", 12.0, 10.0)):
        cells += [{**_shape_cell("llamaforge", False, ours, 60.0), "cpu": cpu},
                  {**_shape_cell("llama.cpp", True, theirs, 40.0), "cpu": cpu}]
    text = compare_shapes.render(meta, cells)
    assert "| llamaforge [avx2] |" in text and "| llama.cpp FA on [avx2] |" in text
    ratios = [line.split(" | ") for line in text.splitlines() if line.startswith("| Q4_0 | 2 | ")]
    rows = {r[2]: r[3:5] for r in ratios if r[2] in ("avx2", "native")}
    assert rows == {"avx2": ["1.50x", "0.90x"], "native": ["1.50x", "1.20x"]}  # prefill 60/40, decode ours/theirs


def test_rounds_merge_into_medians():
    cells = [{**_shape_cell("llamaforge", False, d, 50.0), "cpu": "avx2", "round": r} for r, d in enumerate((9., 3., 5.))]
    cells.append({**_shape_cell("llamaforge", False, 7.0, 50.0), "cpu": "native"})
    merged = compare_shapes.merge_rounds(cells)
    assert [(c["cpu"], c["cells"]["128x1"]["decode_tok_s"], c.get("rounds")) for c in merged] == \
        [("avx2", 5.0, 3), ("native", 7.0, None)]
