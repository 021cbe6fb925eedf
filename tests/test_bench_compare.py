"""The side-by-side benchmark's bookkeeping (benchmarks/compare*.py), on made-up figures.

Nothing is timed or run here: these check the arithmetic of the report (ratios, roofline, agreement)
and the command line's defaults, which a benchmark run would otherwise only show by being wrong.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.test_bench_matrix import _load_as

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    """Import benchmarks/<name>.py by path: benchmarks/ is not put on sys.path (its kernels.py would
    shadow the `kernels` package that transformers looks for)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bandwidth = _load_as("bandwidth")  # compare_shapes and the reports import it by name
compare = _load("compare")
compare_report = _load("compare_report")
compare_engines = _load("compare_engines")

MiB = 1024 * 1024


def _cell(engine, bits, prefill, decode, batched=None, tokens=(1, 2, 3, 4), dtype="x"):
    return {
        "engine": engine, "bits": bits, "dtype": dtype, "file": f"m.{ {4: 'Q4_1', 32: 'F32'}[bits]}.gguf",
        "load_s": 2.0, "rss_after_imports_mb": 200.0, "rss_after_load_mb": 300.0, "peak_rss_b1_mb": 320.0,
        "bytes_per_token": 100 * MiB, "bytes_held": 100 * MiB, "loadavg_start": 1.0, "loadavg_end": 2.0,
        "b1": {"prefill_tok_s": prefill, "decode_tok_s": decode, "decode_best_tok_s": 2 * decode,
               "tokens": [list(tokens)]},
        "forced_argmax": list(tokens) * 2,
        "batched": {str(b): {"decode_tok_s": v, "row0_agrees_with_b1": 4} for b, v in (batched or {}).items()},
    }


def _meta():
    args = compare.parse_args(["--quick"])
    return {"date": "2026-01-01 00:00", "minutes": 1.0, "command": "python benchmarks/compare.py --quick",
            "machine": {"cpu": "cpu", "cores": 2, "python": "3", "torch": "t", "llama_cpp_python": "l",
                        "transformers": "tf", "gguf": "g", "llamaforge": "r"},
            "bandwidth": {"copy_gbs": 10.0, "read_gbs": 10.0, "roofline_gbs": 10.0},
            "args": vars(args) | {"out": None}}


def test_quick_and_full_defaults():
    q, f = compare.parse_args(["--quick"]), compare.parse_args([])
    assert (q.bits, q.gen_len, q.batch_sizes) == ([4, 32], 64, [4, 16])
    assert (f.bits, f.gen_len, f.runs, f.batch_sizes) == ([4, 8, 16, 32], 128, 5, [4, 8, 16])
    assert compare.parse_args(["--quick", "--gen-len", "9"]).gen_len == 9  # explicit beats --quick


def test_agreement_counts_leading_equal_tokens():
    assert compare_report.agreement([1, 2, 3, 9], [1, 2, 3, 4]) == 3
    assert compare_report.agreement([5], [1]) == 0
    assert compare_report.agreement([1, 2], [1, 2, 3]) == 2


def test_report_ratios_roofline_and_skips():
    cells = [
        _cell("llamaforge", 4, 300.0, 100.0, {4: 400.0, 16: 800.0}),
        _cell("llama.cpp", 4, 200.0, 50.0, {4: 100.0, 16: 400.0}, tokens=(1, 2, 9, 9)),
        {"bits": 4, "engine": "transformers", "skipped": "no 4-bit"},
        _cell("llamaforge", 32, 100.0, 30.0, {4: 60.0, 16: 60.0}),
        _cell("transformers", 32, 50.0, 10.0, {4: 20.0, 16: 30.0}, dtype="float32"),
    ]
    text = compare_report.render(_meta(), cells, decode=lambda ids: " ".join(map(str, ids)))
    lines = text.splitlines()
    vs_cpp = next(x for x in lines if x.startswith("| 4 | llama.cpp 4-bit |"))
    # prefill, decode (median), decode (best), batch 4, batch 16
    assert vs_cpp.split(" | ")[2:7] == ["1.50x", "2.00x", "2.00x", "4.00x", "2.00x"]
    vs_hf = next(x for x in lines if x.startswith("| 32 | transformers 32-bit |"))
    assert vs_hf.split(" | ")[2:4] == ["2.00x", "3.00x"]
    # roofline: 10 GB/s over 100 MiB per token = 95 tok/s; 100 tok/s decode is 105% of it
    row = next(x for x in lines if x.startswith("| 4 | llamaforge | Q4_1"))
    assert "| 95 | 105% |" in row
    assert "| 4 | transformers | no 4-bit |" in text
    agree = next(x for x in lines if x.startswith("| 4 | llama.cpp | 2/4 |"))
    # llama.cpp's continuation shares its first 2 tokens with llamaforge's; teacher-forced, 4 of 8
    # positions (1 2 9 9 1 2 9 9 vs 1 2 3 4 1 2 3 4) have the same argmax
    assert "| 50.0% |" in agree
    headline = next(x for x in lines if "transformers' fastest (float32)" in x)
    assert "| 10.00x |" in headline  # llamaforge 4-bit decode 100 vs transformers' best 10


def test_gguf_weight_bytes_leaves_out_an_untied_input_embedding(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.add_tensor("output.weight", np.zeros((8, 4), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    per_token, total = compare_engines.gguf_weight_bytes(str(tmp_path / "m.gguf"))
    assert (per_token, total) == (4 * (32 + 16), 4 * (32 + 32 + 16))


def test_module_weight_bytes_counts_tied_weights_once():
    import torch

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_embeddings = torch.nn.Embedding(10, 4)
            self.layer = torch.nn.Linear(4, 4, bias=False)
            self.output = torch.nn.Linear(4, 10, bias=False)
            self.output.weight = self.tok_embeddings.weight  # tied: the output layer reads the table
            self.register_buffer("cache_k", torch.zeros(100))

    per_token, held = compare_engines.module_weight_bytes(M())
    assert (per_token, held) == (4 * (40 + 16), 4 * (40 + 16))
    m = M()
    m.output.weight = torch.nn.Parameter(torch.zeros(10, 4))  # untied: the table is read one row a token
    assert compare_engines.module_weight_bytes(m) == (4 * (40 + 16), 4 * (40 + 40 + 16))


# ----------------------------------------------------------------------------- --shape runs (made-up figures)

shapes = _load_as("shapes")
compare_shapes = _load_as("compare_shapes")


def test_shape_tensors_have_meta_llama_sizes():
    """Parameter counts of the shapes without their embeddings: Llama 3.2 1B 0.97B, 3B 2.8B, 3.1 8B 6.98B."""
    for name, want in (("1b", 0.97e9), ("3b", 2.80e9), ("8b", 6.98e9)):
        s = shapes.SHAPES[name]
        n = sum(
            int(__import__("math").prod(shp)) for t, shp in shapes.tensor_list(s, 49152)
            if t not in ("token_embd.weight", "output.weight")
        )
        assert abs(n - want) / want < 0.02, (name, n)
    assert [t for t, _ in shapes.tensor_list(shapes.SHAPES["8b"], 10)][-1] == "output.weight"
    assert "output.weight" not in dict(shapes.tensor_list(shapes.SHAPES["1b"], 10))


def _shape_cell(engine: str, fa: bool, decode: float, prefill: float) -> dict:
    cell = {"prefill_tok_s": prefill, "decode_tok_s": decode, "decode_best_tok_s": decode * 1.1,
            "decode_cpu_tok_s": decode}
    return {"engine": engine, "flash_attn": fa, "type": "Q4_0", "threads": 2, "load_s": 1.0, "peak_rss_mb": 900,
            "bytes_per_token": 10**9, "kv_bytes_per_position": 1000,
            "cells": {"128x1": cell, "128x4": {**cell, "decode_tok_s": 4 * decode}}}


def test_shape_report_ratios_use_llama_cpps_faster_setting():
    meta = {"command": "x", "date": "d", "minutes": 1, "load_start": 1.0, "load_end": 2.0,
            "bandwidth": {"roofline_gbs": 20.0},
            "machine": {"cpu": "c", "cores": 2, "flags": "avx2", "llamaforge": "abc", "llama_cpp_python": "0.3.36",
                        "torch": "2"},
            "args": {"contexts": [128], "batches": [1, 4], "shape": "1b", "threads_list": [2], "types": ["Q4_0"],
                     "steps": 8, "runs": 2, "long_steps": 4}}
    cells = [_shape_cell("llamaforge", False, 12.0, 60.0), _shape_cell("llama.cpp", False, 10.0, 40.0),
             _shape_cell("llama.cpp", True, 8.0, 50.0)]
    text = compare_shapes.render(meta, cells)
    ratio_row = [line for line in text.splitlines() if line.startswith("| Q4_0 | 2 | 1.")][0]
    assert ratio_row.split(" | ")[2:5] == ["1.20x", "1.20x", "1.20x"]  # prefill 60/50, decode 12/10, B=4 48/40
    # GB/s beside tok/s: (1e9 weight bytes + 128 positions x 1000 KV bytes) x 12 tok/s
    assert "12.0 (60%)" in text
