"""`compare.py --matrix full`: issue 15's whole shape matrix from one command, the important cells first.

The matrix is shapes (1b, 3b, 8b) x file types x threads (1, 2) x engines (llamaforge; llama.cpp with flash
attention on and off) x measurements; one cell is one engine process (compare_steps.py) on one file:
    batch 1 after a prompt of P tokens (P = 128, 4096): prefill tok/s and decode tok/s at context P
    batches 4 / 16 after the short prompt: decode tok/s of B rows
Cells run in tiers (TIERS), so a run cut short by `--budget-minutes`, a crash or a kill has the cells the
issue's targets are judged on first: 1B and 3B at every type, 2 threads, 128 tokens; then 8B (a few minutes),
the 4k prompts of 1B and 3B, batches (no target), llama.cpp without flash attention, one thread. Each finished
cell is one JSON line appended to benchmarks/_work/results/matrix-<name>.jsonl (fsynced; a torn last line is
ignored), and the markdown (matrix_report.py) is rewritten beside it after every cell; `--resume` skips the
cells already there (failed ones run again). A time estimate per tier is printed before anything runs
(`--plan` stops there); it is scaled, as cells finish, by the ratio of measured to estimated time so far (and
at the start by an earlier run's in the same results file).

Disk: the 3B files take ~23 GB and an 8B Q8_0 7.8 GB; llamaforge's x8 cache (the repacked weights, about a
file's size) goes to a folder of its own beside the shape files, a file's cache is deleted after its last
cell and all of them when the run ends, older caches are evicted when the disk runs short, and none is
written when even then less than X8_RESERVE would stay free. Each cell's file is read through first, untimed,
where it can stay in the page cache (warm_page_cache), so every engine's load starts from the same cache. Not
run by the tests (tests/test_bench_matrix.py checks the pure parts: the cells, their order, the estimates,
resuming, the tables and the page-cache read).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from shapes import FTYPES, SHAPES, cache_dir, tensor_list

MAIN_THREADS = 2  # the thread count issue 15's figures are taken at
TYPES_8B = ("Q4_0", "Q4_K_M", "Q8_0")  # an 8B F16 / BF16 file is 16 GB each: not in the matrix by default
BITS = {"Q4_0": 4.5, "Q4_K_M": 4.9, "Q5_K_M": 5.7, "Q6_K": 6.6, "Q8_0": 8.5, "F16": 16.0, "BF16": 16.0}
VOCAB = 49152  # the default model's vocabulary, which the shape files carry
WARM_STEPS = 2  # compare_steps.WARM_STEPS: untimed steps of a single-run measurement
X8_RESERVE = 3 * 10**9  # bytes of disk to leave free when writing an x8 cache


@dataclass(frozen=True)
class Cell:
    """One engine process: one file, one thread count, one engine setting, one prompt length, its batches."""

    shape: str
    type: str
    threads: int
    engine: str  # "llamaforge" or "llama.cpp"
    flash_attn: bool  # llama.cpp's setting; False for llamaforge (one attention path)
    context: int  # prompt length P
    batches: tuple[int, ...]  # (1,) or the batch sizes > 1 decoded after the short prompt

    @property
    def label(self) -> str:
        """The engine as the tables name it."""
        return self.engine if self.engine != "llama.cpp" else f"llama.cpp FA {'on' if self.flash_attn else 'off'}"

    @property
    def key(self) -> str:
        """A stable name: what --resume matches done cells by."""
        return (f"{self.shape}/{self.type}/t{self.threads}/{self.label.replace(' ', '-')}/p{self.context}/"
                f"b{','.join(map(str, self.batches))}")

    @property
    def plan(self) -> list[tuple[int, int]]:
        """compare_steps.py's (prompt length, batch) measurements for this cell."""
        return [(self.context, b) for b in self.batches]


def _small(c: Cell) -> bool:
    return c.shape in ("1b", "3b")


def _fa_off(c: Cell) -> bool:
    return c.engine == "llama.cpp" and not c.flash_attn


# (what the tier holds, which cells: a cell goes to the first tier whose test it passes); `short` is the
# shortest prompt length of the run
TIERS: list[tuple[str, Callable[[Cell, int], bool]]] = [
    ("1B and 3B, every type, 2 threads, short prompt, batch 1",
     lambda c, s: c.threads == MAIN_THREADS and _small(c) and not _fa_off(c) and c.context == s and c.batches == (1,)),
    ("8B, 2 threads, short prompt, batch 1",
     lambda c, s: c.threads == MAIN_THREADS and not _fa_off(c) and c.context == s and c.batches == (1,)),
    ("1B and 3B, 2 threads, long prompt (prefill, decode at 4k context)",
     lambda c, s: c.threads == MAIN_THREADS and _small(c) and not _fa_off(c) and c.batches == (1,)),
    ("2 threads, decode at batches 4 / 16 (no target of issue 15's)",
     lambda c, s: c.threads == MAIN_THREADS and not _fa_off(c) and c.batches != (1,)),
    ("llama.cpp with flash attention off, 2 threads",
     lambda c, s: c.threads == MAIN_THREADS and (_small(c) or c.context == s)),
    ("1 thread, short prompt, batch 1",
     lambda c, s: c.threads == 1 and c.context == s and c.batches == (1,)),
    ("the rest (8B long prompts, 1 thread at 4k and batches, ...)", lambda c, s: True),
]


def tier(c: Cell, short: int) -> int:
    """The index in TIERS of the first tier `c` belongs to."""
    return next(i for i, (_, test) in enumerate(TIERS) if test(c, short))


def cells(shapes: Iterable[str], types: list[str], threads_list: list[int], contexts: list[int],
          batches: list[int], flash_attn: list[bool], engines: list[str],
          types_8b: Iterable[str] = TYPES_8B) -> list[Cell]:
    """Every cell of the matrix, in the order they run: by tier, then shape, type, batch 1 before batches,
    prompt length, engine (llamaforge, llama.cpp FA on, FA off: a ratio needs both engines, so they run side by
    side)."""
    short = min(contexts)
    big = tuple(sorted(b for b in batches if b > 1))
    out = []
    for shape in shapes:
        for t in (types if shape != "8b" else [x for x in types if x in set(types_8b)]):
            for thr in threads_list:
                for engine in engines:
                    for fa in (sorted(flash_attn, reverse=True) if engine == "llama.cpp" else [False]):
                        if 1 in batches:
                            out += [Cell(shape, t, thr, engine, fa, p, (1,)) for p in sorted(contexts)]
                        if big:
                            out.append(Cell(shape, t, thr, engine, fa, short, big))
    shape_order = {s: i for i, s in enumerate(SHAPES)}
    type_order = {t: i for i, t in enumerate(types)}
    engine_order = {"llamaforge": 0, "llama.cpp FA on": 1, "llama.cpp FA off": 2}
    return sorted(out, key=lambda c: (tier(c, short), shape_order[c.shape], c.threads != MAIN_THREADS,
                                      type_order[c.type], c.batches != (1,), c.context, engine_order[c.label]))


# ------------------------------------------------------------------------------------------- estimates


def n_params(shape: str) -> int:
    """Weights of a shape file (the embedding table included)."""
    total = 0
    for _, shp in tensor_list(SHAPES[shape], VOCAB):
        n = 1
        for d in shp:
            n *= d
        total += n
    return total


def estimate_s(c: Cell, file_bytes: Optional[int], steps: int, long_steps: int, runs: int) -> float:
    """Rough seconds of one cell on a quiet 2-core AVX2 machine (calibrated on the 1B runs in RESULTS.md: ~140
    tok/s quantized prefill and ~60 at 16 bits per billion weights, decode at ~18 GB/s, one thread at half the
    compute and 0.65 of the bandwidth); `run_matrix` scales it by what the finished cells took."""
    n = n_params(c.shape)
    size = file_bytes or n * BITS[c.type] / 8
    compute = 1.0 if c.threads >= 2 else 0.5
    prefill_rate = (0.6e11 if c.type in ("F16", "BF16") else 1.4e11) * compute / n  # prompt tokens per second
    step_s = size / (18e9 * (1.0 if c.threads >= 2 else 0.65))
    attention = 1 + c.context / 16384  # the prompt's attention grows with its length
    t = 6 + size / 1.5e9  # process start, imports, load, first token
    for b in c.batches:
        if b == 1 and c.context <= 512:  # a warm-up run, then `runs` runs
            prefills, n_steps = runs + 1, WARM_STEPS + runs * steps
        else:
            prefills, n_steps = 1, WARM_STEPS + (steps if c.context <= 512 else long_steps)
        t += prefills * b * c.context * attention / prefill_rate + n_steps * step_s * (1 + 0.35 * (b - 1))
    return t


def plan_summary(todo: list[Cell], estimates: dict[str, float], short: int, scale: float = 1.0) -> str:
    """One line per tier: cells, estimated minutes, cumulative minutes."""
    lines, total = [], 0.0
    for i, (what, _) in enumerate(TIERS):
        mine = [c for c in todo if tier(c, short) == i]
        if not mine:
            continue
        m = scale * sum(estimates[c.key] for c in mine) / 60
        total += m
        lines.append(f"  tier {i}: {what}: {len(mine)} cells, ~{m:.0f} min (cumulative ~{total:.0f} min)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- the results file


def read_results(path: Path) -> tuple[list[dict], dict[str, dict]]:
    """(run records, the latest record of each cell key) of a results file; lines that do not parse (a
    write cut by a kill) are skipped. Each cell record gets `run_bandwidth`, the memory probe of the run it
    was measured in (the run record before it in the file): its share of bandwidth is rated against that."""
    runs, done = [], {}
    if not path.exists():
        return runs, done
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        if rec.get("kind") == "run":
            runs.append(rec)
        elif rec.get("kind") == "cell" and isinstance(rec.get("cell"), dict):
            rec["run_bandwidth"] = runs[-1].get("bandwidth", {}) if runs else {}
            done[rec["key"]] = rec
    return runs, done


def append(path: Path, record: dict) -> None:
    """One JSON line, flushed to disk before the next cell starts."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def pending(plan: list[Cell], done: dict[str, dict]) -> list[Cell]:
    """The cells of `plan` without a successful record (failed and timed-out cells run again)."""
    return [c for c in plan if c.key not in done or "error" in done[c.key].get("result", {"error": "none"})]


def set_aside(path: Path) -> Optional[Path]:
    """Move an earlier results file out of the way of a fresh run (nothing is overwritten); its new name."""
    if not path.exists():
        return None
    stamp = _dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
    new = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
    path.rename(new)
    return new


# ------------------------------------------------------------------------------------------- x8 caches


class X8Caches:
    """llamaforge's x8 caches of the matrix's files, in a folder of their own ($LLAMAFORGE_X8_CACHE for the
    cells): one written before a file's first cell, deleted after its last; others evicted when disk is short,
    and none written (the cells repack at load, "off") when even then the disk would keep less than X8_RESERVE."""

    def __init__(self, folder: Path, timeout: int):
        self.folder, self.timeout, self.state = folder, timeout, {}
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, gguf: Path) -> Path:
        from llamaforge.runtime.x8_cache import cache_path

        return cache_path(gguf, self.folder)

    def use(self, gguf: Path) -> bool:
        """Make room, load `gguf` once (writes its cache, brings the file into the page cache) and point the
        cells at the folder; False (and the cells' cache off) when there is no room."""
        from compare_shapes import prime_x8_cache

        if gguf not in self.state:
            need = gguf.stat().st_size + X8_RESERVE
            mine = self._path(gguf)
            for old in sorted(self.folder.glob("*.x8"), key=lambda f: f.stat().st_mtime):
                if shutil.disk_usage(self.folder).free >= need:
                    break
                if old != mine:
                    old.unlink(missing_ok=True)
            self.state[gguf] = mine.exists() or shutil.disk_usage(self.folder).free >= need
            os.environ["LLAMAFORGE_X8_CACHE"] = str(self.folder) if self.state[gguf] else "off"
            if not self.state[gguf]:
                print(f"[matrix] no disk for the x8 cache of {gguf.name}: its llamaforge cells repack at load",
                      flush=True)
            try:
                prime_x8_cache([gguf], self.timeout)
            except (subprocess.SubprocessError, OSError) as exc:  # the cell then writes it (and its load says so)
                print(f"[matrix] priming the x8 cache of {gguf.name} failed ({exc}); the cell runs anyway", flush=True)
        os.environ["LLAMAFORGE_X8_CACHE"] = str(self.folder) if self.state[gguf] else "off"  # the cells inherit it
        return self.state[gguf]

    def drop(self, gguf: Path) -> None:
        self._path(gguf).unlink(missing_ok=True)
        self.state.pop(gguf, None)

    def clear(self) -> None:
        """Delete every cache (and a killed writer's temporary file) in the folder: a run ends without leaving
        gigabytes behind; `--resume` writes them again."""
        for f in [*self.folder.glob("*.x8"), *self.folder.glob(".*.x8.*.tmp")]:
            f.unlink(missing_ok=True)
        self.state.clear()


# --------------------------------------------------------------------------------------------- the run


def run_matrix(args, command: str, src: Path, text: str, bandwidth, machine) -> None:
    """Plan, estimate, then run the pending cells in order, one JSON line and a fresh markdown after each."""
    from compare_shapes import long_prompt, run_cell
    from matrix_report import render
    from shapes import shape_files

    plan = cells(args.shapes, args.types, args.threads_list, args.contexts, args.batches, args.flash_attn,
                 args.engines, args.types_8b)
    short = min(args.contexts)
    name = args.matrix if args.cpu == ["native"] else f"{args.matrix}-{args.cpu[0]}"  # --cpu avx2: a file of its own
    path = args.out or Path(__file__).resolve().parent / "_work" / "results" / f"matrix-{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    _, earlier = read_results(path)  # the cells of an earlier run also calibrate the estimates
    if not args.resume and not args.plan:
        moved = set_aside(path)
        if moved:
            print(f"[matrix] an earlier results file was moved to {moved} (--resume continues one)", flush=True)
    done = earlier if args.resume else {}
    todo = pending(plan, done)
    files = {}
    for shape in args.shapes:
        types = sorted({c.type for c in todo if c.shape == shape})
        files[shape] = shape_files(shape, types, src, MAIN_THREADS, make=args.make_files) if types else {}
    missing = sorted({(c.shape, c.type) for c in todo if c.type not in files[c.shape]})
    todo = [c for c in todo if c.type in files[c.shape]]
    sizes = {(c.shape, c.type): files[c.shape][c.type].stat().st_size for c in todo}
    estimates = {c.key: estimate_s(c, sizes[(c.shape, c.type)], args.steps, args.long_steps, args.runs) for c in todo}
    # what the cells measured so far took against their estimates: the scale of the estimates from here on
    timed = [r for r in earlier.values() if "error" not in r.get("result", {}) and r.get("estimate_s")]
    spent, estimated = sum(r["wall_s"] for r in timed), sum(r["estimate_s"] for r in timed)
    how = f"x {scale_of(spent, estimated):.2f}, from the {len(timed)} cells measured" if timed else "quiet machine"
    print(f"[matrix] {len(plan)} cells in the matrix, {len(plan) - len(pending(plan, done))} done in {path}, "
          f"{len(todo)} to run, estimated ({how}):\n"
          f"{plan_summary(todo, estimates, short, scale_of(spent, estimated))}", flush=True)
    for shape, t in missing:
        print(f"[matrix] skipped: {shape} {t} is not made; make it with `python benchmarks/shapes.py {shape} "
              f"--types {t}` (or pass --make-files)", flush=True)
    if args.plan or not todo:
        return
    bw = {str(thr): bandwidth(thr) for thr in sorted(set(args.threads_list))}
    print("[matrix] memory bandwidth: " + ", ".join(f"{t} thr {b['roofline_gbs']:.1f} GB/s" for t, b in bw.items()),
          flush=True)
    started = time.time()
    append(path, {"kind": "run", "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "command": command,
                  "machine": machine(), "bandwidth": bw, "loadavg": os.getloadavg()[0],
                  "settings": {"steps": args.steps, "long_steps": args.long_steps, "runs": args.runs,
                               "kv_type": args.kv_type, "contexts": args.contexts, "batches": args.batches}})
    from llamaforge.tokenizer import Tokenizer

    tok = Tokenizer.from_file(src)
    prompts = {str(p): long_prompt(tok, text, p) for p in args.contexts}
    x8 = X8Caches(cache_dir() / "x8-matrix", args.timeout)
    last_use = {files[c.shape][c.type]: i for i, c in enumerate(todo)}
    try:
        for i, c in enumerate(todo):
            scale = scale_of(spent, estimated)
            if args.budget_minutes and time.time() - started + scale * estimates[c.key] > 60 * args.budget_minutes:
                rest = scale * sum(estimates[x.key] for x in todo[i:]) / 60
                print(f"[matrix] --budget-minutes {args.budget_minutes} reached: {len(todo) - i} cells left "
                      f"(~{rest:.0f} min); `--resume` runs them", flush=True)
                break
            f = files[c.shape][c.type]
            print(f"[matrix] {i + 1}/{len(todo)} {c.key} (~{scale * estimates[c.key]:.0f} s) load avg "
                  f"{os.getloadavg()[0]:.1f} ...", end=" ", flush=True)
            rec = run_one(c, f, x8 if c.engine == "llamaforge" else None, prompts[str(c.context)], args, run_cell)
            rec["estimate_s"] = estimates[c.key]
            spent, estimated = spent + rec["wall_s"], estimated + estimates[c.key]
            append(path, rec)
            if last_use[f] == i:
                x8.drop(f)
            write_markdown(path, render)
    finally:
        x8.clear()
    print("\n" + write_markdown(path, render), flush=True)
    print(f"[matrix] results in {path} and {path.with_suffix('.md')}", flush=True)


def warm_page_cache(f: Path, available: Optional[int]) -> str:
    """Read `f` through once, untimed, so each engine's load starts from the page cache: cells run llamaforge
    first on each file, and a file that had fallen out of the cache was read from disk on llamaforge's load
    clock, then found cached by llama.cpp's (3B BF16 3.8-4.8 s against 0.5 s in the fifteenth session). A file
    larger than half the `available` bytes of memory is left alone (it could not stay cached: the 8B files on
    23 GiB). Returns what was done, for the cell's record."""
    if available is None:
        return "not read (available memory unknown)"
    size = f.stat().st_size
    if size > available // 2:
        return f"not read ({size / 2**30:.1f} GiB > half of {available / 2**30:.1f} GiB available)"
    with open(f, "rb", buffering=0) as fh:
        while fh.read(1 << 24):
            pass
    return "read"


def run_one(c: Cell, f: Path, x8: Optional[X8Caches], prompt: list[int], args, run_cell) -> dict:
    """One cell's engine process (through compare_shapes.run_cell); its record for the results file."""
    import torch
    from llamaforge.devices import available_memory_bytes

    x8_on = x8.use(f) if x8 is not None else None
    page_cache = warm_page_cache(f, available_memory_bytes(torch.device("cpu")))
    cfg = {"engine": c.engine, "model": str(f), "threads": c.threads, "prompt_lens": [c.context],
           "prompts": {str(c.context): prompt}, "batches": list(c.batches), "plan": c.plan, "steps": args.steps,
           "long_steps": args.long_steps, "runs": args.runs, "flash_attn": c.flash_attn, "kv_type": args.kv_type,
           "cpu": args.cpu[0]}
    t0 = time.time()
    res = run_cell(cfg, args.timeout)
    wall = time.time() - t0
    print(res["error"] if "error" in res else f"{wall:.0f} s", flush=True)
    return {"kind": "cell", "key": c.key, "cell": asdict(c), "file": f.name, "wall_s": wall, "steps": args.steps,
            "long_steps": args.long_steps, "time": _dt.datetime.now().strftime("%H:%M:%S"), "x8_cache": x8_on,
            "page_cache": page_cache, "result": res}


def scale_of(spent: float, estimated: float) -> float:
    """Measured over estimated seconds of the cells so far (1 before any), kept within 0.3-5."""
    return min(5.0, max(0.3, spent / estimated)) if estimated > 0 else 1.0


def write_markdown(path: Path, render) -> str:
    """The tables of a results file, rewritten beside it (atomic); their text."""
    runs, done = read_results(path)
    text = render(runs, list(done.values()))
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path.with_suffix(".md"))
    return text


def check_types(types: list[str]) -> None:
    unknown = [t for t in types if t not in FTYPES]
    if unknown:
        sys.exit(f"--types: unknown {unknown}; choose from {','.join(FTYPES)}")
