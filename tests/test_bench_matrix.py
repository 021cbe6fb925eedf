"""The shape matrix runner's bookkeeping (benchmarks/matrix.py, matrix_report.py), on made-up figures.

Nothing is timed and no engine runs: these check which cells the matrix has and in what order, the estimate's
direction, that a results file survives a torn line and resumes where it stopped, that the driver writes each
cell as it finishes and stops at its budget, and the tables' ratios and target verdicts.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_as(name: str):
    """Import benchmarks/<name>.py under its own name (the modules import each other by it); benchmarks/ is
    not put on sys.path (its kernels.py would shadow the `kernels` package that transformers looks for)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


bandwidth = _load_as("bandwidth")  # compare_shapes and the reports import it by name
cpu_mode = _load_as("cpu_mode")  # compare_shapes, compare_steps and compare import it by name
shapes = _load_as("shapes")
compare_shapes = _load_as("compare_shapes")
compare_steps = _load_as("compare_steps")
matrix = _load_as("matrix")
matrix_report = _load_as("matrix_report")
compare = _load_as("compare")

TYPES = ["Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16"]


def _full():
    return matrix.cells(["1b", "3b", "8b"], TYPES, [1, 2], [128, 4096], [1, 4, 16], [False, True],
                        ["llamaforge", "llama.cpp"])


def test_full_matrix_has_every_cell_once():
    plan = _full()
    assert len({c.key for c in plan}) == len(plan)
    # per (shape, type, threads): llamaforge + llama.cpp FA on + FA off, each batch 1 at 128 and 4096 + a batch cell
    assert len(plan) == (7 + 7 + 3) * 2 * 3 * 3
    assert {c.type for c in plan if c.shape == "8b"} == {"Q4_0", "Q4_K_M", "Q8_0"}
    assert {c.batches for c in plan} == {(1,), (4, 16)}
    assert all(c.context == 128 for c in plan if c.batches != (1,))
    assert {c.flash_attn for c in plan if c.engine == "llamaforge"} == {False}


def test_important_cells_come_first_and_tiers_never_go_back():
    plan = _full()
    first = [c for c in plan if matrix.tier(c, 128) == 0]
    assert plan[: len(first)] == first
    # tier 0: 1B and 3B, every type, 2 threads, 128 tokens, batch 1, llamaforge and llama.cpp with FA on
    assert {(c.shape, c.type, c.label) for c in first} == {
        (s, t, e) for s in ("1b", "3b") for t in TYPES for e in ("llamaforge", "llama.cpp FA on")}
    assert {(c.threads, c.context, c.batches) for c in first} == {(2, 128, (1,))}
    tiers = [matrix.tier(c, 128) for c in plan]
    assert tiers == sorted(tiers)
    first_of = lambda test: next(i for i, c in enumerate(plan) if test(c))  # noqa: E731
    # then 8B at 128 tokens, the 4k prompts, batches, llama.cpp without flash attention, one thread
    assert len(first) == first_of(lambda c: c.shape == "8b") < first_of(lambda c: c.context == 4096) \
        < first_of(lambda c: c.batches != (1,)) < first_of(lambda c: c.label == "llama.cpp FA off") \
        < first_of(lambda c: c.threads == 1)
    assert first[0].key == "1b/Q4_0/t2/llamaforge/p128/b1" and first[1].key == "1b/Q4_0/t2/llama.cpp-FA-on/p128/b1"
    assert plan[-1].threads == 1 or plan[-1].shape == "8b"


def test_a_subset_keeps_the_same_order():
    plan = matrix.cells(["1b"], ["Q8_0", "Q4_0"], [2], [128], [1], [True], ["llamaforge", "llama.cpp"])
    assert [c.key for c in plan] == ["1b/Q8_0/t2/llamaforge/p128/b1", "1b/Q8_0/t2/llama.cpp-FA-on/p128/b1",
                                     "1b/Q4_0/t2/llamaforge/p128/b1", "1b/Q4_0/t2/llama.cpp-FA-on/p128/b1"]
    assert plan[0].plan == [(128, 1)]


def test_estimates_grow_with_size_context_batches_and_fewer_threads():
    c = matrix.Cell("1b", "Q4_0", 2, "llamaforge", False, 128, (1,))
    est = lambda cell, size=None: matrix.estimate_s(cell, size, steps=24, long_steps=12, runs=2)  # noqa: E731
    base = est(c)
    assert est(matrix.Cell("3b", "Q4_0", 2, "llamaforge", False, 128, (1,))) > base
    assert est(matrix.Cell("1b", "F16", 2, "llamaforge", False, 128, (1,))) > base
    assert est(matrix.Cell("1b", "Q4_0", 2, "llamaforge", False, 4096, (1,))) > 3 * base
    assert est(matrix.Cell("1b", "Q4_0", 2, "llamaforge", False, 128, (4, 16))) > base
    assert est(matrix.Cell("1b", "Q4_0", 1, "llamaforge", False, 128, (1,))) > base
    assert est(c, size=4 * 10**9) > est(c, size=10**9)
    assert (matrix.scale_of(0, 0), matrix.scale_of(30, 10), matrix.scale_of(1e6, 1)) == (1.0, 3.0, 5.0)
    # the shapes' weights, embedding included (49,152-token vocabulary)
    assert abs(matrix.n_params("1b") - 1.07e9) / 1.07e9 < 0.03
    assert abs(matrix.n_params("8b") - 7.38e9) / 7.38e9 < 0.03


def test_compare_steps_plan_default_and_explicit():
    cfg = {"prompt_lens": [128, 4096], "batches": [1, 4, 16]}
    assert compare_steps.plan(cfg) == [(128, 1), (128, 4), (128, 16), (4096, 1)]
    assert compare_steps.plan({**cfg, "plan": [[128, 4], [128, 16]]}) == [(128, 4), (128, 16)]
    assert matrix.WARM_STEPS == compare_steps.WARM_STEPS


def test_matrix_command_line():
    a = compare.parse_args(["--matrix", "full"])
    assert a.engines == ["llamaforge", "llama.cpp"] and a.runs == 2
    assert a.shapes == ["1b", "3b", "8b"] and a.types_8b == ["Q4_0", "Q4_K_M", "Q8_0"]
    assert a.flash_attn == [False, True] and a.contexts == [128, 4096] and a.batches == [1, 4, 16]
    with pytest.raises(SystemExit):
        compare.parse_args(["--matrix", "full", "--shapes", "2b"])


def test_matrix_refuses_rounds_it_would_not_run(capsys):
    # --rounds repeats --shape cells; a matrix cell runs once, so the flag was accepted and silently ignored
    with pytest.raises(SystemExit):
        compare.parse_args(["--matrix", "full", "--rounds", "3"])
    assert "--rounds: --shape runs only" in capsys.readouterr().err
    assert compare.parse_args(["--shape", "1b", "--rounds", "3"]).rounds == 3


# ------------------------------------------------------------------------------ results file and resume


def _result(decode: float, prefill: float, p: int = 128, batches=(1,), load: float = 1.0, peak: float = 1000.0):
    cells = {f"{p}x{b}": {"prefill_tok_s": prefill, "decode_tok_s": decode * b, "decode_best_tok_s": decode * b * 1.1}
             for b in batches}
    return {"engine": "x", "cells": cells, "load_s": load, "peak_rss_mb": peak, "rss_after_imports_mb": 200.0,
            "bytes_per_token": 10**9, "bytes_held": 10**9, "kv_bytes_per_position": 1000, "loadavg_start": 0.5,
            "loadavg_end": 0.7}


def _record(cell, result):
    return {"kind": "cell", "key": cell.key, "cell": matrix.asdict(cell), "steps": 8, "long_steps": 4,
            "result": result}


def _run_record():
    return {"kind": "run", "date": "2026-12-01 15:25", "command": "python benchmarks/compare.py --matrix full",
            "machine": {"cpu": "EPYC", "cores": 2, "flags": "avx2", "llamaforge": "abc", "llama_cpp_python": "0.3.36",
                        "torch": "2.13"},
            "bandwidth": {"2": {"roofline_gbs": 20.0}, "1": {"roofline_gbs": 15.0}},
            "settings": {"steps": 8, "runs": 2, "long_steps": 4}}


def test_results_file_survives_a_torn_line_and_resumes(tmp_path):
    plan = matrix.cells(["1b"], ["Q4_0"], [2], [128], [1, 4], [True], ["llamaforge", "llama.cpp"])
    path = tmp_path / "matrix-full.jsonl"
    matrix.append(path, _run_record())
    matrix.append(path, _record(plan[0], _result(10, 50)))
    matrix.append(path, _record(plan[1], {"engine": "llama.cpp", "error": "timed out after 9 s"}))
    with open(path, "a") as f:
        f.write('{"kind": "cell", "key": "1b/Q4_0/t2/llamaforge/p128/b4", "cell": {"sha')  # killed mid-write
    runs, done = matrix.read_results(path)
    assert len(runs) == 1 and set(done) == {plan[0].key, plan[1].key}
    assert [c.key for c in matrix.pending(plan, done)] == [c.key for c in plan[1:]]  # the failed one runs again
    moved = matrix.set_aside(path)
    assert not path.exists() and moved.exists() and moved.name.startswith("matrix-full.")
    assert matrix.read_results(path) == ([], {})


def _fake_run(monkeypatch, tmp_path, calls, fail_after=None):
    """Point run_matrix at fakes: files, prompts, bandwidth, x8 priming and the engine process."""
    monkeypatch.setenv("LLAMAFORGE_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLAMAFORGE_X8_CACHE", str(tmp_path / "x8"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 100)
    monkeypatch.setattr(shapes, "shape_files", lambda shape, types, src, thr, make=True: {t: model for t in types})
    monkeypatch.setattr(compare_shapes, "long_prompt", lambda tok, text, n: list(range(n)))
    monkeypatch.setattr(compare_shapes, "prime_x8_cache", lambda files, timeout: None)
    import llamaforge.tokenizer

    monkeypatch.setattr(llamaforge.tokenizer.Tokenizer, "from_file", staticmethod(lambda src: None))

    def run_cell(cfg, timeout):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt  # a kill between cells
        calls.append(cfg)
        return _result(20.0 if cfg["engine"] == "llamaforge" else 10.0, 50.0, cfg["prompt_lens"][0],
                       [b for _, b in cfg["plan"]])

    monkeypatch.setattr(compare_shapes, "run_cell", run_cell)


def _args(tmp_path, **kw):
    a = compare.parse_args(["--matrix", "full", "--shapes", "1b", "--types", "Q4_0,F16", "--threads-list", "2",
                            "--contexts", "128", "--batches", "1,4", "--flash-attn", "on", "--out",
                            str(tmp_path / "m.jsonl")])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def _bandwidth(threads):
    return {"copy_gbs": 20.0, "read_gbs": 18.0, "roofline_gbs": 20.0}


def _machine():
    return _run_record()["machine"]


def test_driver_keeps_each_cell_and_resume_finishes_the_rest(monkeypatch, tmp_path):
    calls = []
    _fake_run(monkeypatch, tmp_path, calls, fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        matrix.run_matrix(_args(tmp_path), "cmd", tmp_path / "m.gguf", "text", _bandwidth, _machine)
    runs, done = matrix.read_results(tmp_path / "m.jsonl")
    assert len(done) == 3 and (tmp_path / "m.md").exists()  # what finished before the kill is kept
    assert calls[0]["plan"] == [(128, 1)] and calls[0]["prompt_lens"] == [128]
    calls.clear()
    _fake_run(monkeypatch, tmp_path, calls)
    matrix.run_matrix(_args(tmp_path, resume=True), "cmd", tmp_path / "m.gguf", "text", _bandwidth, _machine)
    runs, done = matrix.read_results(tmp_path / "m.jsonl")
    assert len(calls) == 5 and len(done) == 8 and len(runs) == 2  # 2 types x 2 engines x (batch 1, batches)
    assert "2.00x" in (tmp_path / "m.md").read_text()  # llamaforge 20 tok/s over llama.cpp's 10
    # without --resume the finished file is set aside and every cell runs again
    calls.clear()
    matrix.run_matrix(_args(tmp_path), "cmd", tmp_path / "m.gguf", "text", _bandwidth, _machine)
    assert len(calls) == 8 and len(list(tmp_path.glob("m.*.jsonl"))) == 1


def test_driver_stops_at_its_budget(monkeypatch, tmp_path):
    calls = []
    _fake_run(monkeypatch, tmp_path, calls)
    matrix.run_matrix(_args(tmp_path, budget_minutes=0.01), "cmd", tmp_path / "m.gguf", "text", _bandwidth,
                      _machine)
    assert calls == []  # every cell is estimated at more than 0.6 s
    matrix.run_matrix(_args(tmp_path, plan=True), "cmd", tmp_path / "m.gguf", "text", _bandwidth, _machine)
    assert calls == []


# ------------------------------------------------------------------------------------------------ tables


def _records():
    lf = dict(engine="llamaforge", flash_attn=False, threads=2, shape="1b")
    on = dict(engine="llama.cpp", flash_attn=True, threads=2, shape="1b")
    off = dict(engine="llama.cpp", flash_attn=False, threads=2, shape="1b")
    C = matrix.Cell
    return [
        _record(C(type="Q4_0", context=128, batches=(1,), **lf), _result(26.0, 180.0, load=0.5, peak=1200)),
        _record(C(type="Q4_0", context=128, batches=(1,), **on), _result(20.0, 100.0, load=0.6)),
        _record(C(type="Q4_0", context=128, batches=(1,), **off), _result(18.0, 120.0, load=0.4)),
        _record(C(type="Q4_0", context=4096, batches=(1,), **lf), _result(15.0, 90.0, p=4096)),
        _record(C(type="Q4_0", context=4096, batches=(1,), **on), _result(16.0, 60.0, p=4096)),
        _record(C(type="Q4_0", context=128, batches=(4, 16), **lf), _result(10.0, 1.0, batches=(4, 16))),
        _record(C(type="Q4_0", context=128, batches=(4, 16), **on), _result(8.0, 1.0, batches=(4, 16))),
        _record(C(type="F16", context=128, batches=(1,), **lf), {"engine": "llamaforge", "error": "exit 1"}),
        _record(C(type="F16", context=128, batches=(1,), **on), _result(13.0, 80.0)),
    ]


def test_tables_ratios_bandwidth_and_targets():
    text = matrix_report.render([_run_record()], _records())
    lines = text.splitlines()
    ratio = [x for x in lines if x.startswith("| Q4_0 | 1.")][0].split(" | ")
    # prefill 128: 180 / max(100, 120); 4096: 90 / 60; decode @128 26/20; @4096 15/16; B=4 40/32; B=16 160/128
    assert ratio[1:7] == ["1.50x", "1.50x", "1.30x", "0.94x", "1.25x", "1.25x"]
    assert ratio[7].startswith("1.25x")  # load 0.5 s over llama.cpp's fastest 0.4 s
    # GB/s: (1e9 weight bytes + 128 x 1000 KV bytes) x 26 tok/s, over 20 GB/s
    assert "26.0 (130%)" in text
    assert "| Q4_0 | llama.cpp FA off |" in text and "| F16 | llamaforge | exit 1 |" in text
    target = [x for x in lines if x.startswith("| 1b | 2 | Q4_0 |")][0].split(" | ")
    assert target[3:9] == ["met 1.30x", "met 130%", "met 1.50x", "met 1.50x", "**missed** 0.94x",
                           "met 1.05"]  # RSS: (1200 - 200) MiB over 1e9 + (128 + 8 + 4) x 1000 bytes
    assert target[9].startswith("**missed** 1.25x")
    f16 = [x for x in lines if x.startswith("| 1b | 2 | F16 |")][0]
    assert f16.count("·") == 7  # llamaforge failed: nothing measured, no verdict
    assert "5 met, 2 missed of 7 measured" in text


def test_each_cell_is_rated_against_its_own_runs_bandwidth_probe(tmp_path):
    # the probe drifts between runs of a resumed matrix (36 then 44.9 GB/s at 2 threads); rating every cell
    # against the newest moved the share of cells measured in earlier runs
    recs = _records()
    first = next(r for r in recs if r["cell"]["type"] == "Q4_0" and r["cell"]["engine"] == "llamaforge"
                 and r["cell"]["context"] == 128)
    path = tmp_path / "m.jsonl"
    matrix.append(path, _run_record())
    matrix.append(path, first)
    later = _run_record()
    later["bandwidth"] = {"2": {"roofline_gbs": 40.0}, "1": {"roofline_gbs": 15.0}}
    matrix.append(path, later)
    runs, done = matrix.read_results(path)
    assert done[first["key"]]["run_bandwidth"]["2"]["roofline_gbs"] == 20.0
    text = matrix_report.render(runs, list(done.values()))
    assert "26.0 (130%)" in text and "26.0 (65%)" not in text  # 26 GB/s over its own run's 20, not the later 40
    assert "40.0 GB/s at 2 threads" in text and "20.0-40.0 over the runs" in text


def test_eight_b_has_no_decode_or_bandwidth_target_and_missing_figures_are_dots():
    rec = _records()[:2]
    for r in rec:
        r["cell"]["shape"] = "8b"
    text = matrix_report.render([_run_record()], rec)
    row = [x for x in text.splitlines() if x.startswith("| 8b | 2 | Q4_0 |")][0].split(" | ")
    assert row[3:5] == ["·", "·"] and row[5] == "met 1.80x"  # prefill 180 / 100
    assert "Llama-3.1-8B shape, 2 threads" in text and "decode B=4" not in text
    assert matrix_report.render([], []).startswith("(no run")


def test_render_command_reads_a_jsonl(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    for r in [_run_record()] + _records():
        matrix.append(path, r)
    compare.main(["--render", str(path)])
    assert "#### Issue 15's targets" in capsys.readouterr().out
    assert json.loads(path.read_text().splitlines()[0])["kind"] == "run" and (tmp_path / "m.md").exists()


def test_x8_caches_make_room_or_turn_off(monkeypatch, tmp_path):
    import collections
    import os

    monkeypatch.setenv("LLAMAFORGE_X8_CACHE", "unset")
    primed = []
    monkeypatch.setattr(compare_shapes, "prime_x8_cache", lambda files, timeout: primed.extend(files))
    model, other = tmp_path / "a.gguf", tmp_path / "b.gguf"
    model.write_bytes(b"x" * 1000)
    other.write_bytes(b"x")
    x8 = matrix.X8Caches(tmp_path / "x8", timeout=9)
    old = x8._path(other)
    old.write_bytes(b"old cache")
    usage = collections.namedtuple("usage", "total used free")
    free = {"bytes": matrix.X8_RESERVE}  # short of a 1000-byte file's cache until the old cache goes
    monkeypatch.setattr(matrix.shutil, "disk_usage",
                        lambda p: usage(0, 0, free["bytes"] + (0 if old.exists() else 10**6)))
    assert x8.use(model) is True and not old.exists() and primed == [model]
    assert os.environ["LLAMAFORGE_X8_CACHE"] == str(tmp_path / "x8")
    assert x8.use(model) is True and primed == [model]  # primed once per file
    x8.drop(model)
    old.write_bytes(b"old cache")
    free["bytes"] = -10**7  # no room even after evicting
    assert x8.use(model) is False and os.environ["LLAMAFORGE_X8_CACHE"] == "off"
    (tmp_path / "x8" / ".a.x8.1.tmp").write_bytes(b"torn")
    x8.clear()  # the end of a run: no cache left behind
    assert list((tmp_path / "x8").iterdir()) == []
    rec = _records()[:2]
    rec[0]["x8_cache"] = False
    assert "| Q4_0 | llamaforge | 0.50 (no x8 cache) |" in matrix_report.render([_run_record()], rec)


def test_warm_page_cache_reads_a_file_that_fits_and_leaves_one_that_does_not(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"\0" * (3 << 20))
    assert matrix.warm_page_cache(f, 8 << 20) == "read"  # 8 MiB available: a 3 MiB file fits in half of it
    assert matrix.warm_page_cache(f, 4 << 20).startswith("not read (0.0 GiB > half of")  # half is 2 MiB
    assert matrix.warm_page_cache(f, None) == "not read (available memory unknown)"
