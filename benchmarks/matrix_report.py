"""Markdown for `compare.py --matrix`: figures per shape and thread count, llamaforge / llama.cpp ratios, and
issue 15's targets met or missed, from the records of a results file (matrix.py).

Each record is one cell: `cell` (shape, type, threads, engine, flash_attn, context, batches) and `result`
(compare_steps.py's output: `cells["PxB"]` figures, load, peak RSS, bytes read per token, KV bytes per
position). A figure nobody measured is "·"; a failed cell shows its error.
"""

from __future__ import annotations

from typing import Optional

from bandwidth import describe
from shapes import SHAPES

ENGINES = ("llamaforge", "llama.cpp FA on", "llama.cpp FA off")
TYPES = ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16")
# issue 15's targets: (name, the figure, the bound, which shapes it is set for)
DECODE_RATIO, BANDWIDTH, PREFILL_RATIO, LONG_DECODE_RATIO, RSS_OVER, LOAD_RATIO = 1.3, 0.70, 1.5, 1.0, 1.10, 1.0


def _label(cell: dict) -> str:
    return cell["engine"] if cell["engine"] != "llama.cpp" else f"llama.cpp FA {'on' if cell['flash_attn'] else 'off'}"


def _ok(rec: dict) -> bool:
    return "error" not in rec["result"] and "cells" in rec["result"]


class Figures:
    """The figures of one (shape, threads): lookups by (type, engine label, prompt length, batch)."""

    def __init__(self, records: list[dict], shape: str, threads: int, bandwidth_gbs: Optional[float]):
        self.shape, self.threads, self.bw = shape, threads, bandwidth_gbs  # bw: for records without their run's
        mine = [r for r in records if r["cell"]["shape"] == shape and r["cell"]["threads"] == threads]
        self.records = mine
        self.contexts = sorted({r["cell"]["context"] for r in mine})
        self.short = min(self.contexts) if self.contexts else 128
        self.batches = sorted({b for r in mine for b in r["cell"]["batches"] if b > 1})
        self.types = [t for t in TYPES if any(r["cell"]["type"] == t for r in mine)]
        self.errors = {(r["cell"]["type"], _label(r["cell"])): r["result"]["error"] for r in mine if not _ok(r)}

    def cell(self, t: str, engine: str, p: int, b: int) -> Optional[dict]:
        """compare_steps' figures of batch b after a p-token prompt, with the record's result as `_res`."""
        for r in self.records:
            c = r["cell"]
            if c["type"] == t and _label(c) == engine and c["context"] == p and b in c["batches"] and _ok(r):
                got = r["result"]["cells"].get(f"{p}x{b}")
                return None if got is None else {**got, "_res": r["result"], "_rec": r}
        return None

    def figure(self, t: str, engine: str, p: int, b: int, name: str) -> Optional[float]:
        c = self.cell(t, engine, p, b)
        return None if c is None else c.get(name)

    def gbs(self, t: str, engine: str, p: int) -> Optional[float]:
        """GB/s read while decoding at batch 1 after p tokens: (weights + KV cache at p) x tok/s."""
        c = self.cell(t, engine, p, 1)
        if c is None:
            return None
        return (c["_res"]["bytes_per_token"] + c["_res"]["kv_bytes_per_position"] * p) * c["decode_tok_s"] / 1e9

    def share(self, t: str, engine: str, p: int) -> Optional[float]:
        """gbs over the bandwidth probed in the same run as the cell (machines drift between runs: 36 then
        44.9 GB/s at 2 threads in the fifteenth session), else over the latest probe."""
        g, c = self.gbs(t, engine, p), self.cell(t, engine, p, 1)
        if g is None:
            return None
        own = c["_rec"].get("run_bandwidth", {}).get(str(self.threads), {}).get("roofline_gbs")
        bw = own or self.bw
        return g / bw if bw else None

    def load_s(self, t: str, engine: str) -> Optional[float]:
        c = self.load_cell(t, engine)
        return None if c is None else c["_res"]["load_s"]

    def load_cell(self, t: str, engine: str) -> Optional[dict]:
        """The batch-1 cell whose load time stands for this file (the short prompt's, else any)."""
        return self.cell(t, engine, self.short, 1) or next(
            (self.cell(t, engine, p, 1) for p in self.contexts if self.cell(t, engine, p, 1)), None)

    def peer_best(self, t: str, p: int, b: int, name: str) -> Optional[float]:
        """llama.cpp's faster flash-attention setting for this figure."""
        vals = [v for e in ENGINES[1:] if (v := self.figure(t, e, p, b, name)) is not None]
        return max(vals) if vals else None

    def ratio(self, t: str, p: int, b: int, name: str) -> Optional[float]:
        ours, theirs = self.figure(t, "llamaforge", p, b, name), self.peer_best(t, p, b, name)
        return ours / theirs if ours and theirs else None

    def load_ratio(self, t: str) -> Optional[float]:
        ours = self.load_s(t, "llamaforge")
        theirs = [v for e in ENGINES[1:] if (v := self.load_s(t, e)) is not None]
        return ours / min(theirs) if ours is not None and theirs and min(theirs) > 0 else None

    def rss_over(self, t: str) -> Optional[float]:
        """llamaforge's peak RSS (less the imports) over its weights + the KV cache of its short batch-1 cell."""
        c = self.cell(t, "llamaforge", self.short, 1)
        if c is None or "rss_after_imports_mb" not in c["_res"]:
            return None
        res, rec = c["_res"], c["_rec"]
        positions = self.short + max(rec.get("steps", 0), rec.get("long_steps", 0)) + 4
        need = res["bytes_held"] + res["kv_bytes_per_position"] * positions
        return (res["peak_rss_mb"] - res["rss_after_imports_mb"]) * 2**20 / need


def _f(x: Optional[float], fmt: str = "{:.1f}") -> str:
    return "·" if x is None else fmt.format(x)


def _x(x: Optional[float]) -> str:
    return "·" if x is None else f"{x:.2f}x"


def _verdict(x: Optional[float], bound: float, higher_is_better: bool = True, fmt: str = "{:.2f}x") -> str:
    if x is None:
        return "·"
    good = x >= bound if higher_is_better else x <= bound
    return ("met " if good else "**missed** ") + fmt.format(x)


def figures_table(fg: Figures) -> list[str]:
    lens, short = fg.contexts, fg.short
    head = ["type", "engine", "load s"] + [f"prefill {p} tok/s" for p in lens] + \
        [f"decode @{p} (best) tok/s" for p in lens] + [f"GB/s @{p} (% bw)" for p in lens] + \
        [f"decode B={b} tok/s" for b in fg.batches] + ["peak RSS MiB"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in fg.types:
        for e in ENGINES:
            if not any(_label(r["cell"]) == e and r["cell"]["type"] == t for r in fg.records):
                continue
            if (t, e) in fg.errors and not any(fg.cell(t, e, p, 1) for p in lens):
                out.append(f"| {t} | {e} | {fg.errors[(t, e)][:120]} |")
                continue
            lc = fg.load_cell(t, e)
            no_x8 = lc is not None and lc["_rec"].get("x8_cache") is False  # repacked at load: no room for its cache
            row = [t, e, _f(fg.load_s(t, e), "{:.2f}") + (" (no x8 cache)" if no_x8 else "")]
            row += [_f(fg.figure(t, e, p, 1, "prefill_tok_s")) for p in lens]
            for p in lens:
                c = fg.cell(t, e, p, 1)
                row.append("·" if c is None else f"{c['decode_tok_s']:.2f} ({c['decode_best_tok_s']:.2f})")
            for p in lens:
                g, share = fg.gbs(t, e, p), fg.share(t, e, p)
                row.append("·" if g is None else f"{g:.1f} ({100 * share:.0f}%)" if share else f"{g:.1f}")
            row += [_f(fg.figure(t, e, short, b, "decode_tok_s")) for b in fg.batches]
            c = fg.cell(t, e, short, 1)
            row.append(_f(None if c is None else c["_res"]["peak_rss_mb"], "{:.0f}"))
            out.append("| " + " | ".join(row) + " |")
    return out


def ratio_table(fg: Figures) -> list[str]:
    lens, short = fg.contexts, fg.short
    head = ["type"] + [f"prefill {p}" for p in lens] + [f"decode @{p}" for p in lens] + \
        [f"decode B={b}" for b in fg.batches] + ["load (lower is better)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in fg.types:
        row = [t] + [_x(fg.ratio(t, p, 1, "prefill_tok_s")) for p in lens] + \
            [_x(fg.ratio(t, p, 1, "decode_tok_s")) for p in lens] + \
            [_x(fg.ratio(t, short, b, "decode_tok_s")) for b in fg.batches] + [_x(fg.load_ratio(t))]
        out.append("| " + " | ".join(row) + " |")
    return out


def target_rows(fg: Figures) -> list[list[str]]:
    """One row per type: each of issue 15's targets met / missed / · (not measured, or not set at this shape)."""
    small = fg.shape in ("1b", "3b")  # the decode and bandwidth targets are set at 1B and 3B
    long = max(fg.contexts) if fg.contexts and max(fg.contexts) > fg.short else None
    rows = []
    for t in fg.types:
        row = [fg.shape, str(fg.threads), t,
               _verdict(fg.ratio(t, fg.short, 1, "decode_tok_s"), DECODE_RATIO) if small else "·",
               _verdict(fg.share(t, "llamaforge", fg.short), BANDWIDTH, fmt="{:.0%}") if small else "·",
               _verdict(fg.ratio(t, fg.short, 1, "prefill_tok_s"), PREFILL_RATIO),
               _verdict(fg.ratio(t, long, 1, "prefill_tok_s"), PREFILL_RATIO) if long else "·",
               _verdict(fg.ratio(t, long, 1, "decode_tok_s"), LONG_DECODE_RATIO) if long else "·",
               _verdict(fg.rss_over(t), RSS_OVER, higher_is_better=False, fmt="{:.2f}"),
               _verdict(fg.load_ratio(t), LOAD_RATIO, higher_is_better=False)]
        rows.append(row)
    return rows


def render(runs: list[dict], records: list[dict]) -> str:
    """The whole report: header from the latest run record, then per shape and thread count the figures and
    ratios, then the targets table with a count."""
    if not runs:
        return "(no run recorded yet)\n"
    last = runs[-1]
    m = last["machine"]
    bws, how, seen = {}, {}, {}
    for r in runs:  # the latest measurement per thread count, and the range over the runs
        bws.update({int(k): v["roofline_gbs"] for k, v in r["bandwidth"].items()})
        how.update({int(k): describe(v) for k, v in r["bandwidth"].items()})
        for k, v in r["bandwidth"].items():
            seen.setdefault(int(k), []).append(v["roofline_gbs"])
    loads = [r["result"].get(k) for r in records for k in ("loadavg_start", "loadavg_end")
             if r["result"].get(k) is not None]
    ok = sum(_ok(r) for r in records)
    s = last.get("settings", {})
    out = [f"### Shape matrix, `{last['command']}`", "",
           f"{runs[0]['date']} to {last['date']} ({len(runs)} run{'s' if len(runs) > 1 else ''} of the command, "
           f"{ok} cells measured, {len(records) - ok} failed); {m['cpu']}, {m['cores']} cores, flags {m['flags']}; "
           f"llamaforge {m['llamaforge']}, llama-cpp-python {m['llama_cpp_python']}, torch {m['torch']}. Memory "
           "read bandwidth: " + ", ".join(f"{bw:.1f} GB/s at {t} thread{'s' * (t > 1)} ({how[t]}"
                                           + (f"; {min(seen[t]):.1f}-{max(seen[t]):.1f} over the runs" if
                                              min(seen[t]) != max(seen[t]) else "") + ")"
                                           for t, bw in sorted(bws.items())) +
           f". Load average {min(loads, default=0):.1f} to {max(loads, default=0):.1f} during the cells. Random "
           "weights in Llama shapes (benchmarks/shapes.py), files made by llama.cpp's quantizer. Decode: each "
           f"one-token step timed on its own, median of {s.get('steps', '?')} steps x {s.get('runs', '?')} runs "
           "at batch 1 after the short prompt" +
           (f", of {s.get('long_steps', '?')} after a long one" if any(r["cell"]["context"] > 512 for r in records)
            else "") +
           (f", of {s.get('steps', '?')} steps of one run at batches" if any(r["cell"]["batches"] != [1]
                                                                        for r in records) else "") +
           "; best = fastest step. GB/s = (weight bytes + KV cache at that context) x tok/s, and as a "
           "share of the bandwidth probed at that thread count in the cell's own run. Ratios: llamaforge / the "
           "faster of llama.cpp's flash-attention settings per figure. Load: a fresh process to the first "
           "token's logits (llamaforge's x8 cache written beforehand).", ""]
    targets = []
    for shape in SHAPES:
        for thr in sorted({r["cell"]["threads"] for r in records if r["cell"]["shape"] == shape}, reverse=True):
            fg = Figures(records, shape, thr, bws.get(thr))
            if not fg.records:
                continue
            out += [f"#### {SHAPES[shape].name}, {thr} thread{'s' * (thr > 1)}", ""] + figures_table(fg)
            out += ["", "llamaforge / llama.cpp:", ""] + ratio_table(fg) + [""]
            targets += target_rows(fg)
    head = ["shape", "thr", "type", f"decode B=1 >= {DECODE_RATIO}x", f">= {BANDWIDTH:.0%} of bw",
            f"prefill short >= {PREFILL_RATIO}x", f"prefill long >= {PREFILL_RATIO}x",
            f"decode @long >= {LONG_DECODE_RATIO}x", f"peak RSS <= (weights + KV) x {RSS_OVER}",
            "load <= llama.cpp"]
    cells = [c for row in targets for c in row[3:]]
    met, missed = sum(c.startswith("met") for c in cells), sum(c.startswith("**missed") for c in cells)
    out += ["#### Issue 15's targets", "",
            f"{met} met, {missed} missed of {met + missed} measured (· = not measured, or a target not set at "
            "that shape: batch-1 decode and bandwidth are set at 1B and 3B). RSS: llamaforge's peak less its RSS "
            "after the imports, over its weights + KV cache.", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(row) + " |" for row in targets]
    return "\n".join(out) + "\n"
