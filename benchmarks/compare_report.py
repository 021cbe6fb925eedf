"""Markdown tables for benchmarks/compare.py: figures per (weight width, engine), batched throughput,
roofline fractions, the llamaforge/llama.cpp and llamaforge/transformers ratios, and greedy agreement.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

from bandwidth import describe

MiB = 1024 * 1024


def _f(x: Optional[float], fmt: str = "{:.1f}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "–" if not a or not b or math.isnan(a) or math.isnan(b) else f"{a / b:.2f}x"


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading token ids two greedy continuations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _ok(c: dict) -> bool:
    return "b1" in c and "error" not in c


def render(meta: dict, cells: list[dict], decode: Callable[[list[int]], str]) -> str:
    """The report: header (date, machine, versions, command, bandwidth) and the tables."""
    m, bw, a = meta["machine"], meta["bandwidth"], meta["args"]
    by = {(c["bits"], c["engine"]): c for c in cells}
    bits_list = sorted({c["bits"] for c in cells})
    engines = list(dict.fromkeys(c["engine"] for c in cells))
    loads = [c.get(k) for c in cells for k in ("loadavg_start", "loadavg_end") if c.get(k) is not None]
    out = [
        f"### Side by side, {meta['date']} ({meta['minutes']:.0f} min)",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m.get('flags', '')}), {m.get('mem_gib', '?')} GiB; "
        f"python {m['python']}, torch {m['torch']}, llama-cpp-python {m['llama_cpp_python']}, transformers "
        f"{m['transformers']}, gguf {m['gguf']}, llamaforge {m['llamaforge']}",
        f"- settings: {a['threads']} threads; prompt {a['prompt_len']} tokens; batch 1: {a['gen_len']} new tokens, "
        f"median of {a['runs']} runs after a warm-up; batched: {a['batch_gen_len']} new tokens per sequence, "
        f"median of {a['batch_runs']}; greedy, no stop tokens; llamaforge dtype at 4/8/16 bits: "
        f"`{a['llamaforge_dtype']}`",
        f"- load average (1 min) during the cells: {min(loads, default=0):.1f} to {max(loads, default=0):.1f} on "
        f"{m['cores']} cores: other jobs shared the machine, so read the ratios, not the absolute figures",
        f"- memory bandwidth ({a['threads']} threads): {bw['roofline_gbs']:.1f} GB/s, {describe(bw)}; roofline = "
        "that / weight bytes read per token",
        "",
        "#### Batch 1",
        "",
        "| bits | engine | file → dtype | load s | prefill tok/s | decode tok/s (best) | roofline tok/s | % of roofline "
        "| weights read/token MiB | peak RSS MiB | RSS over imports: loaded / peak MiB | peak over weights | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for bits in bits_list:
        for e in engines:
            c = by.get((bits, e))
            if c is None:
                continue
            if "skipped" in c or "error" in c:
                why = c.get("skipped") or f"error: {c['error']}"
                out.append(f"| {bits} | {e} | {why} |" + " |" * 10)
                continue
            b1, per_tok = c["b1"], c["bytes_per_token"]
            bound = bw["roofline_gbs"] * 1e9 / per_tok if per_tok else None
            over = c["peak_rss_b1_mb"] - c["rss_after_imports_mb"]
            out.append(
                f"| {bits} | {e} | {c['file'].split('.')[-2]} → {c['dtype']} | {_f(c['load_s'], '{:.2f}')} | "
                f"{_f(b1['prefill_tok_s'], '{:.0f}')} | {_f(b1['decode_tok_s'])} ({_f(b1.get('decode_best_tok_s'))}) | "
                f"{_f(bound, '{:.0f}')} | "
                f"{_f(100 * b1['decode_tok_s'] / bound if bound else None, '{:.0f}%')} | "
                f"{_f(per_tok / MiB, '{:.0f}')} | {_f(c['peak_rss_b1_mb'], '{:.0f}')} | "
                f"{_f(c['rss_after_load_mb'] - c['rss_after_imports_mb'], '{:.0f}')} / {_f(over, '{:.0f}')} | "
                f"{_f(over * MiB / c['bytes_held'] if c['bytes_held'] else None, '{:.2f}x')} | "
                f"{c['loadavg_start']:.1f}–{c['loadavg_end']:.1f} |"
            )
    sizes = a["batch_sizes"]
    out += ["", "#### Batched decode, tokens/s over all sequences", "",
            "| bits | engine | batch 1 | " + " | ".join(f"batch {b}" for b in sizes) + " | row 0 = batch 1 (tokens) |",
            "|---|---|---|" + "---|" * len(sizes) + "---|"]
    for bits in bits_list:
        for e in engines:
            c = by.get((bits, e))
            if c is None or not _ok(c):
                continue
            bt = c.get("batched", {})
            agree = ", ".join(f"{bt[str(b)]['row0_agrees_with_b1']}" for b in sizes if str(b) in bt)
            cols = [_f(bt.get(str(b), {}).get("decode_tok_s")) for b in sizes]
            if c.get("batched_error"):
                agree = f"error: {c['batched_error']}"
            out.append(f"| {bits} | {e} | {_f(c['b1']['decode_tok_s'])} | " + " | ".join(cols) + f" | {agree} |")
    out += _ratios(by, bits_list, sizes)
    out += _agreement(by, bits_list, engines, a["gen_len"], decode)
    return "\n".join(out) + "\n"


def _ratios(by: dict, bits_list: list[int], sizes: list[int]) -> list[str]:
    out = ["", "#### Ratios (llamaforge / peer, same run; > 1 means llamaforge is faster)", "",
           "| bits | peer | prefill | decode batch 1 | decode batch 1, best | " + " | ".join(f"batch {b}" for b in sizes) +
           " | load (peer s / llamaforge s) |",
           "|---|---|---|---|---|" + "---|" * len(sizes) + "---|"]

    def row(bits, lf, peer, name):
        lb, pb = lf["b1"], peer["b1"]
        cols = [_ratio(lf.get("batched", {}).get(str(b), {}).get("decode_tok_s"),
                       peer.get("batched", {}).get(str(b), {}).get("decode_tok_s")) for b in sizes]
        return (f"| {bits} | {name} | {_ratio(lb['prefill_tok_s'], pb['prefill_tok_s'])} | "
                f"{_ratio(lb['decode_tok_s'], pb['decode_tok_s'])} | "
                f"{_ratio(lb.get('decode_best_tok_s'), pb.get('decode_best_tok_s'))} | " + " | ".join(cols) +
                f" | {_ratio(peer['load_s'], lf['load_s'])} |")

    for bits in bits_list:
        lf = by.get((bits, "llamaforge"))
        if lf is None or not _ok(lf):
            continue
        for peer in ("llama.cpp", "transformers"):
            c = by.get((bits, peer))
            if c is not None and _ok(c):
                out.append(row(bits, lf, c, f"{peer} {bits}-bit"))
    # the headline: llamaforge's default (its lowest width) against transformers' fastest width
    lf_cells = [by[(b, "llamaforge")] for b in bits_list if (b, "llamaforge") in by and _ok(by[(b, "llamaforge")])]
    hf_cells = [by[(b, "transformers")] for b in bits_list if (b, "transformers") in by and _ok(by[(b, "transformers")])]
    if lf_cells and hf_cells:
        best = max(hf_cells, key=lambda c: c["b1"]["decode_tok_s"])
        out.append(row(f"{lf_cells[0]['bits']} vs {best['bits']}", lf_cells[0], best,
                       f"transformers' fastest ({best['dtype']})"))
    return out


def _agreement(by: dict, bits_list: list[int], engines: list[str], n: int, decode) -> list[str]:
    """Each cell vs llamaforge at the same width and vs the fp32 reference: leading greedy tokens shared,
    and the share of positions of a fixed text where the argmax next tokens are equal (teacher forced)."""
    ref_key = next(((32, e) for e in ("transformers", "llamaforge", "llama.cpp") if (32, e) in by and _ok(by[(32, e)])),
                   None)
    ref = by[ref_key] if ref_key else None
    ref_name = f"{ref_key[1]} fp32" if ref_key else "fp32"

    def forced(c, other):
        a, b = c.get("forced_argmax"), (other or {}).get("forced_argmax")
        if not a or not b or c is other:
            return "–"
        return f"{100 * sum(x == y for x, y in zip(a, b)) / len(a):.1f}%"

    def lead(c, other):
        if other is None or c is other:
            return "–"
        toks = c["b1"]["tokens"][0]
        return f"{agreement(toks, other['b1']['tokens'][0])}/{len(toks)}"

    out = ["", f"#### Outputs: greedy (batch 1, {n} new tokens: leading tokens equal) and teacher-forced "
           "(argmax next token equal, every position of a fixed text)", "",
           f"| bits | engine | greedy vs llamaforge | greedy vs {ref_name} | forced vs llamaforge | "
           f"forced vs {ref_name} | greedy continuation (start) |", "|---|---|---|---|---|---|---|"]
    for bits in bits_list:
        lf = by.get((bits, "llamaforge"))
        lf = lf if lf is not None and _ok(lf) else None
        for e in engines:
            c = by.get((bits, e))
            if c is None or not _ok(c):
                continue
            text = decode(c["b1"]["tokens"][0])[:60].replace("|", "\\|").replace("\n", "⏎")
            out.append(f"| {bits} | {e} | {lead(c, lf)} | {lead(c, ref)} | {forced(c, lf)} | {forced(c, ref)} | "
                       f"`{text}` |")
    return out
