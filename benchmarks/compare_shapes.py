"""`compare.py --shape 1b|3b|8b`: llamaforge vs llama.cpp at Llama sizes, every common file type.

For each (type, threads, engine[, llama.cpp flash attention on/off]) one process (compare_steps.py) loads the
file and times prefill at each prompt length and the decode steps themselves at batch 1 (each length) and
at the batch sizes (shortest length). The tables give tok/s, the weight (+ KV cache) bytes read per second
of decoding beside them as GB/s and as a share of the measured bandwidth, and llamaforge / llama.cpp ratios
(against llama.cpp's faster flash-attention setting of each figure). Writes
benchmarks/_work/results/shape-<shape>-<time>.md + .json. Not run by the tests.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bandwidth import describe
from cpu_mode import cpu_env
from shapes import SHAPES, shape_files

HERE = Path(__file__).resolve().parent


def long_prompt(tok, text: str, n: int) -> list[int]:
    ids = tok.encode(text)
    return (ids * (1 + n // len(ids)))[:n]


def run_cell(cfg: dict, timeout: int) -> dict:
    """One compare_steps.py process for `cfg`, in the environment of its `cpu` mode (cpu_mode.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "MKL_NUM_THREADS": str(cfg["threads"]),
           **cpu_env(cfg.get("cpu", "native"), cfg["engine"])}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(HERE / "compare_steps.py"), "-"], input=json.dumps(cfg),
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"engine": cfg["engine"], "error": f"timed out after {timeout} s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    res = json.loads(lines[-1][7:]) if lines else {"engine": cfg["engine"], "error": f"exit {proc.returncode}"}
    if "error" in res:
        sys.stderr.write(proc.stderr[-3000:])
    res["wall_s"] = time.perf_counter() - t0
    return res


def prime_x8_cache(files: list[Path], timeout: int) -> None:
    """Load each file once in a process of its own: later loads map the x8 cache the first one writes (what a
    user waits for from the second load on, which is what the tables measure)."""
    for f in files:
        subprocess.run([sys.executable, "-c", "import sys; from llamaforge import Llama; Llama.build(sys.argv[1], "
                        "max_seq_len=8, max_batch_size=1, device='cpu', progress=False)", str(f)],
                       check=True, timeout=timeout)


def label(c: dict) -> str:
    cpu = "" if c.get("cpu", "native") == "native" else f" [{c['cpu']}]"
    if c["engine"] != "llama.cpp":
        return c["engine"] + cpu
    return f"llama.cpp FA {'on' if c['flash_attn'] else 'off'}{cpu}"


def merge_rounds(cells: list[dict]) -> list[dict]:
    """One cell per (type, threads, engine, flash attention, cpu) of `--rounds` repeats: each figure the median
    over the rounds (a loaded machine's processes alternate, so a slow minute hits every setting alike)."""
    groups: dict = {}
    for c in cells:
        key = (c.get("type"), c.get("threads"), c["engine"], c.get("flash_attn"), c.get("cpu", "native"))
        groups.setdefault(key, []).append(c)
    out = []
    for same in groups.values():
        ok = [c for c in same if "error" not in c]
        if len(ok) < 2:
            out.append(ok[0] if ok else same[0])
            continue
        merged = {**ok[0], "rounds": len(ok), "cells": {}}
        for k in ("load_s", "peak_rss_mb"):
            merged[k] = statistics.median(c[k] for c in ok)
        for name, fig in ok[0]["cells"].items():
            merged["cells"][name] = {**fig, **{f: statistics.median(c["cells"][name][f] for c in ok)
                                             for f, v in fig.items() if isinstance(v, float)}}
        out.append(merged)
    return out


def render(meta: dict, cells: list[dict]) -> str:
    a, bw = meta["args"], meta["bandwidth"]["roofline_gbs"]
    how = describe(meta["bandwidth"])
    short, lens = min(a["contexts"]), a["contexts"]
    batches = [b for b in a["batches"] if b > 1]
    m = meta["machine"]
    out = [f"### `{meta['command']}`", "",
           f"{meta['date']}, {meta['minutes']:.0f} min; {m['cpu']}, {m['cores']} cores, flags {m['flags']}; "
           f"{SHAPES[a['shape']].name} with random weights (benchmarks/shapes.py); memory bandwidth "
           f"{bw:.1f} GB/s ({how}, {a['threads_list'][-1]} threads); llamaforge {m['llamaforge']}, "
           f"llama-cpp-python {m['llama_cpp_python']}, torch {m['torch']}. Load average "
           f"{meta['load_start']:.1f} at the start, {meta['load_end']:.1f} at the end. Decode: each one-token step timed on its own, median of "
           f"{a['steps']} steps x {a['runs']} runs ({a['long_steps']} x 1 at long prompts); best = fastest step; "
           + (f"each figure the median of {a['rounds']} alternating rounds; " if a.get("rounds", 1) > 1 else "") +
           "CPU-time: the process's CPU seconds per step (1 thread only: robust to other jobs on the cores). "
           "Load: a fresh process from the constructor to the first token's logits (llamaforge's x8 cache written "
           "beforehand).", ""]
    head = ["type", "thr", "engine", "load s"] + [f"prefill {p}" for p in lens] + \
        [f"decode @{p} (best) tok/s" for p in lens] + ["decode CPU-time tok/s", f"GB/s @{short} (% bw)"] + \
        [f"decode B={b} tok/s" for b in batches] + ["peak RSS MiB"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        if "error" in c:
            out.append(f"| {c['type']} | {c['threads']} | {label(c)} | {c['error']} |")
            continue
        cc = c["cells"]
        row = [c["type"], str(c["threads"]), label(c), f"{c['load_s']:.2f}"]
        row += [f"{cc[f'{p}x1']['prefill_tok_s']:.1f}" for p in lens]
        row += [f"{cc[f'{p}x1']['decode_tok_s']:.2f} ({cc[f'{p}x1']['decode_best_tok_s']:.2f})" for p in lens]
        d = cc[f"{short}x1"]
        row.append(f"{d.get('decode_cpu_tok_s', float('nan')):.2f}" if c["threads"] == 1 else "-")
        gbs = (c["bytes_per_token"] + c["kv_bytes_per_position"] * short) * d["decode_tok_s"] / 1e9
        row.append(f"{gbs:.1f} ({100 * gbs / bw:.0f}%)")
        row += [f"{cc[f'{short}x{b}']['decode_tok_s']:.1f}" for b in batches]
        row.append(f"{c['peak_rss_mb']:.0f}")
        out.append("| " + " | ".join(row) + " |")
    # ratios: llamaforge over the faster llama.cpp setting, per figure
    out += ["", "llamaforge / llama.cpp (the faster of its flash-attention settings, per figure):", ""]
    keys = [("prefill", f"{p}x1", "prefill_tok_s") for p in lens] + \
        [("decode", f"{p}x1", "decode_tok_s") for p in lens] + \
        [("decode", f"{short}x{b}", "decode_tok_s") for b in batches] + \
        ([("prefill CPU-time", f"{short}x1", "prefill_cpu_tok_s"),
          ("decode CPU-time", f"{short}x1", "decode_cpu_tok_s")] if a["threads_list"] == [1] else [])
    cpus = a.get("cpu") or ["native"]  # --cpu avx2,native: a row per mode, same engines, same run
    head = ["type", "thr"] + (["cpu"] if len(cpus) > 1 else []) + [f"{k} {c}" for k, c, _ in keys] + \
        ["load (lower is better)"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in a["types"]:
        for thr, cpu in ((thr, cpu) for thr in a["threads_list"] for cpu in cpus):
            mine = [c for c in cells if c["type"] == t and c["threads"] == thr and c.get("cpu", "native") == cpu
                    and "error" not in c]
            ours = [c for c in mine if c["engine"] == "llamaforge"]
            peers = [c for c in mine if c["engine"] == "llama.cpp"]
            if not ours or not peers:
                continue
            row = [t, str(thr)] + ([cpu] if len(cpus) > 1 else [])
            for _, cell, fig in keys:
                best = max(p["cells"][cell][fig] for p in peers)
                row.append(f"{ours[0]['cells'][cell][fig] / best:.2f}x")
            row.append(f"{ours[0]['load_s']:.2f} / {min(p['load_s'] for p in peers):.2f} s")
            out.append("| " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


def run_shapes(args, command: str, src: Path, text: str, bandwidth, machine) -> None:
    from llamaforge.tokenizer import Tokenizer

    started = _dt.datetime.now()
    load_start = os.getloadavg()[0]
    files = shape_files(args.shape, args.types, src, max(args.threads_list))
    tok = Tokenizer.from_file(src)
    prompts = {str(p): long_prompt(tok, text, p) for p in args.contexts}
    if "llamaforge" in args.engines:
        prime_x8_cache([files[t] for t in args.types], args.timeout)
    bw = bandwidth(max(args.threads_list))
    print(f"[compare] memory bandwidth: {bw['roofline_gbs']:.1f} GB/s ({describe(bw)})", flush=True)
    cells = []
    for t, rnd in ((t, r) for r in range(args.rounds) for t in args.types):
        for thr in args.threads_list:
            for engine, cpu in ((e, c) for e in args.engines for c in args.cpu):  # modes alternate per engine
                for fa in (args.flash_attn if engine == "llama.cpp" else [False]):
                    cfg = {"engine": engine, "model": str(files[t]), "threads": thr, "prompt_lens": args.contexts,
                           "prompts": prompts, "batches": args.batches, "steps": args.steps,
                           "long_steps": args.long_steps, "runs": args.runs, "flash_attn": fa,
                           "kv_type": args.kv_type, "cpu": cpu}
                    tag = label({"engine": engine, "flash_attn": fa, "cpu": cpu})
                    print(f"[compare] {t:<7} {thr} thr {tag:<17} load avg {os.getloadavg()[0]:.1f} ...", end=" ",
                          flush=True)
                    res = run_cell(cfg, args.timeout)
                    res.update(type=t, threads=thr, engine=engine, flash_attn=fa, file=files[t].name, cpu=cpu,
                               round=rnd)
                    if "error" in res:
                        print(res["error"], flush=True)
                    else:
                        s = res["cells"][f"{min(args.contexts)}x1"]
                        print(f"load {res['load_s']:.1f}s prefill {s['prefill_tok_s']:.1f} decode "
                              f"{s['decode_tok_s']:.2f} tok/s ({res['wall_s']:.0f}s)", flush=True)
                    cells.append(res)
    meta = {"date": started.strftime("%Y-%m-%d %H:%M"), "minutes": (_dt.datetime.now() - started).seconds / 60,
            "command": command, "machine": machine(), "bandwidth": bw, "load_start": load_start,
            "load_end": os.getloadavg()[0], "args": {k: (str(v) if isinstance(v, Path) else v)
                                                     for k, v in vars(args).items()}}
    text_md = render(meta, merge_rounds(cells))
    print("\n" + text_md)
    out = args.out or HERE / "_work" / "results" / f"shape-{args.shape}-{started.strftime('%Y%m%d-%H%M%S')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text_md)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=1, default=str))
    print(f"[compare] wrote {out} and {out.with_suffix('.json')}")
