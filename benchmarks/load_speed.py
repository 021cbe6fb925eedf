"""Load time as a user waits for it: a fresh process, the model built, the first token's logits ready.

    python benchmarks/load_speed.py --shape 1b --types Q4_K_M,Q4_0,Q8_0,F16 --repeats 5 [--baseline ../main]

For each repeat and type, one fresh process per variant, in turn (so a burst of load on a shared machine
falls on all of them):
    llama.cpp           llama_cpp.Llama(file, n_ctx=256), then one token evaluated (its logits)
    llamaforge          Llama.build(file) with the x8 cache off (LLAMAFORGE_X8_CACHE=off: every weight repacked)
    llamaforge cached   Llama.build(file) with the x8 cache written by an earlier run (runtime/x8_cache.py)
    baseline            (--baseline PATH) as "llamaforge cached", with the llamaforge checkout at PATH and an x8
                        cache folder of its own (CACHE/baseline: the same kernels name the same file)
then one token through the model (its logits). Each process reports the seconds (wall, and its CPU seconds:
on a loaded machine the CPU figure is the robust one) from before the constructor to the first logits,
the import time apart, the CPU seconds of the full garbage collections inside it, and its peak RSS
(VmHWM) over the RSS after imports. Threads: --threads (1 by default: the CPU seconds are then what the work
costs). The files are the shapes compare.py --shape makes
(benchmarks/shapes.py, cached under ~/.cache/llamaforge/bench-shapes). Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("llama.cpp", "llamaforge", "llamaforge cached")


def child(cfg: dict) -> dict:
    """Runs in the fresh process: imports, then the timed load up to the first token's logits."""
    t = time.perf_counter()
    if cfg["variant"] == "llama.cpp":
        import llama_cpp
    else:
        import torch

        torch.set_num_threads(cfg["threads"])
        from llamaforge import Llama
        from llamaforge.kernels import get_extension

        get_extension()  # built once beforehand: importing it is import time, as torch's is
    sys.path.append(str(HERE))
    from compare_engines import peak_rss_mb, rss_mb

    res = {"import_s": time.perf_counter() - t, "rss_after_imports_mb": rss_mb()}
    import gc

    full: list[float] = []  # CPU seconds of each full (generation 2) collection during the load
    gc.callbacks.append(lambda phase, info: info["generation"] == 2 and full.append(
        (-1 if phase == "start" else 1) * time.process_time()))
    w0, c0 = time.perf_counter(), time.process_time()
    if cfg["variant"] == "llama.cpp":
        llm = llama_cpp.Llama(model_path=cfg["model"], n_ctx=256, n_threads=cfg["threads"],
                              n_threads_batch=cfg["threads"], verbose=False)
        res["build_s"] = time.perf_counter() - w0
        llm.eval([1])
        first = float(llm.scores[0].max())
    else:
        llm = Llama.build(cfg["model"], max_seq_len=256, max_batch_size=1, device="cpu", progress=False)
        res["build_s"] = time.perf_counter() - w0
        with torch.inference_mode():
            first = float(llm.model(torch.tensor([[1]]), 0)[0, -1].max())
    res.update(load_s=time.perf_counter() - w0, load_cpu_s=time.process_time() - c0, peak_rss_mb=peak_rss_mb(),
               first_logit_max=first, full_gcs=len(full) // 2, full_gc_s=sum(full[: len(full) // 2 * 2]))
    return res


def run(variant: str, model: Path, threads: int, cache: Path, baseline: Path | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "LLAMAFORGE_X8_CACHE": str(cache) if variant == "llamaforge cached" else "off"}
    if variant == "baseline":  # another checkout of llamaforge, as it loads, with a cache folder of its own (the
        env["PYTHONPATH"] = str(baseline)  # same kernels name the same file, which one checkout's use must not touch)
        env["LLAMAFORGE_X8_CACHE"] = str(cache / "baseline")
    cfg = {"variant": variant, "model": str(model), "threads": threads}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                          env=env, timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        sys.exit(f"{variant} on {model.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1b", choices=("1b", "3b", "8b"))
    p.add_argument("--types", type=lambda s: s.split(","), default=["Q4_K_M", "Q4_0", "Q8_0", "F16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    p.add_argument("--cache", type=Path, help="x8 cache folder (default: a temporary one, primed first)")
    p.add_argument("--baseline", type=Path, help="also load with the llamaforge checkout at this path, x8 cache "
                   "on (variant 'baseline', e.g. the code before a change)")
    p.add_argument("--model", type=Path, action="append", help="a GGUF file to load instead of the shapes (repeatable; "
                   "'default' for the default model)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(json.loads(a.child))), flush=True)
        return
    from compare_shapes import shape_files  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)

    from llamaforge.default_model import default_model_path

    if a.model:
        files = {m.name if str(m) != "default" else "default": default_model_path() if str(m) == "default" else m
                 for m in a.model}
        a.types = list(files)
    else:
        files = shape_files(a.shape, a.types, default_model_path(), a.threads)
    cache = a.cache or Path(tempfile.mkdtemp(prefix="x8-cache-"))
    if a.baseline:
        a.variants.append("baseline")
    for v in ("llamaforge cached", "baseline"):
        for t in a.types if v in a.variants else ():  # the first load writes the cache file (each build its own)
            run(v, files[t], a.threads, cache, a.baseline)
    results: dict = {}
    for r in range(a.repeats):
        for t in a.types:
            for v in a.variants:
                res = run(v, files[t], a.threads, cache, a.baseline)
                results.setdefault((t, v), []).append(res)
                print(f"[load] {r + 1}/{a.repeats} {t:<7} {v:<18} load {res['load_s']:.2f} s "
                      f"(CPU {res['load_cpu_s']:.2f}, of it {res['full_gcs']} full GCs {res['full_gc_s']:.2f}), "
                      f"peak RSS {res['peak_rss_mb']:.0f} MiB, "
                      f"load avg {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\n{a.shape} shape, {a.threads} thread(s), median of {a.repeats} fresh processes per cell; load = "
          "constructor + first token's logits (imports apart); RSS over imports = peak - after imports; load "
          f"average at the end {os.getloadavg()[0]:.1f}\n")
    print("| type | engine | load s | load CPU s | of it full GCs s | build s | imports s | peak RSS MiB | "
          "RSS over imports MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in a.types:
        for v in a.variants:
            rs = results[(t, v)]
            med = {k: statistics.median(x.get(k, 0) for x in rs) for k in
                   ("load_s", "load_cpu_s", "full_gc_s", "build_s", "import_s", "peak_rss_mb", "rss_after_imports_mb")}
            print(f"| {t} | {v} | {med['load_s']:.2f} | {med['load_cpu_s']:.2f} | {med['full_gc_s']:.2f} | "
                  f"{med['build_s']:.2f} | "
                  f"{med['import_s']:.2f} | {med['peak_rss_mb']:.0f} | "
                  f"{statistics.median(x['peak_rss_mb'] - x['rss_after_imports_mb'] for x in rs):.0f} |")


if __name__ == "__main__":
    main()
