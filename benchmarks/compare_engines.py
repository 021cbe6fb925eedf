"""One engine, one weight file, one process: the measuring half of benchmarks/compare.py.

compare.py starts this file once per (engine, weight file) in a fresh interpreter of the benchmark venv,
so that each engine's peak resident memory is its own, and reads back the one line `RESULT {json}` it
prints last. Run by hand for one engine:

    benchmarks/_work/venv/bin/python benchmarks/compare_engines.py '{"engine": "llama.cpp", ...}'

Every engine is driven through the same black box, `gen(prompts, n) -> new token ids per prompt`
(greedy, no stop tokens, prompts of equal length given as token ids), timed with n = 1 and n = N:
    prefill tok/s = batch * prompt_len / T(1)          (one forward over the prompt + one argmax)
    decode  tok/s = batch * (N - 1) / (T(N) - T(1))     (the N - 1 one-token steps that follow)
each T the median of `runs` timings after one warm-up call of each length ("best": the fastest). Engines:
    llamaforge    `Llama.build(file, dtype=...)` + `Llama.generate(..., temperature=0, stop_ids=())`
    llama.cpp     llama-cpp-python: batch 1 through `Llama.generate` (its sampler chain, top_k=1, temp=0),
                  batches through the low-level `llama_batch` API with one sequence id per prompt (as
                  llama.cpp's examples/batched does), greedy argmax of each row's logits in numpy
    transformers  `AutoModelForCausalLM.from_pretrained(folder, gguf_file=..., dtype=...)` + `generate`
                  (do_sample=False, eos disabled), batches as a (B, P) tensor (equal lengths: no padding)
`forced(seq)` gives the argmax next token at every position of a fixed token sequence (one forward with
all logits: teacher forcing), which compare.py compares across engines position by position: unlike the
greedy continuations, one near-tie does not make every later position differ.
Not run by the tests.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

GenFn = Callable[[Sequence[Sequence[int]], int], list]


def import_engine(engine: str) -> None:
    """Import `engine` with its native libraries before its load is timed (import time, as torch's is):
    `import llama_cpp` loads llama.cpp's shared libraries; llamaforge loads its C++ kernels on first use, so
    that use is made here, or the load column would hold one engine's library loading and not the other's."""
    if engine == "llama.cpp":
        import llama_cpp  # noqa: F401
    elif engine == "transformers":
        import transformers  # noqa: F401
    else:
        import llamaforge  # noqa: F401
        from llamaforge.kernels import get_extension

        get_extension()


def rss_mb() -> float:
    """Current resident set size of this process, MiB (from /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB.

    VmHWM of /proc/self/status, which starts afresh at exec; getrusage's ru_maxrss would not do: Linux
    carries it over fork and exec, so it would start at compare.py's own resident size.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gguf_weight_bytes(path: str) -> tuple[int, int]:
    """(bytes read per decoded token, bytes of all tensors) of a GGUF file, as stored.

    Per token a decoder reads every tensor except the input embedding table (one row of it); a tied
    model's output layer is that table, read in full, so it counts then.
    """
    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    total = sum(sizes.values())
    per_token = total - (sizes.get("token_embd.weight", 0) if "output.weight" in sizes else 0)
    return per_token, total


def module_weight_bytes(module) -> tuple[int, int]:
    """(bytes read per decoded token, bytes held) of a torch module's weights.

    Tensors are grouped by storage (tied weights count once); groups whose every name is an input
    embedding are left out of the per-token figure, KV caches and rotary tables out of both.
    """
    groups: dict[tuple[int, int], list] = {}
    for name, t in list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False)
    ):
        low = name.lower()
        if any(k in low for k in ("cache", "freqs", "rope", "rotary", "inv_freq", "mask")):
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        groups.setdefault(key, [t.untyped_storage().nbytes(), []])[1].append(low)
    held = sum(n for n, _ in groups.values())
    embed_only = sum(
        n for n, names in groups.values() if all("tok_embeddings" in x or "embed_tokens" in x for x in names)
    )
    return held - embed_only, held


def _timed(gen: GenFn, prompts: Sequence[Sequence[int]], n: int) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = gen(prompts, n)
    return time.perf_counter() - t0, out


def measure(gen: GenFn, prompts: list[list[int]], gen_len: int, runs: int) -> dict:
    """prefill/decode figures of `gen` on `prompts` (all the same length).

    One warm-up call of each length, then `runs` pairs of timed calls, the short and the long one in
    turn (so a burst of load on the machine falls on both). Figures from the medians, and "best" ones
    from the fastest calls, which a shared machine disturbs least.
    """
    gen(prompts, 1)
    gen(prompts, gen_len)
    t1s, tns, out = [], [], None
    for _ in range(runs):
        t1s.append(_timed(gen, prompts, 1)[0])
        tn, out = _timed(gen, prompts, gen_len)
        tns.append(tn)
    b, p = len(prompts), len(prompts[0])
    t1, tn, t1_min, tn_min = statistics.median(t1s), statistics.median(tns), min(t1s), min(tns)
    return {
        "t1_s": t1,
        "tn_s": tn,
        "t1_all_s": t1s,
        "tn_all_s": tns,
        "prefill_tok_s": b * p / t1,
        "decode_tok_s": b * (gen_len - 1) / (tn - t1) if tn > t1 else float("nan"),
        "prefill_best_tok_s": b * p / t1_min,
        "decode_best_tok_s": b * (gen_len - 1) / (tn_min - t1_min) if tn_min > t1_min else float("nan"),
        "tokens": [list(map(int, row)) for row in out],
    }


# ---------------------------------------------------------------------------------------------- engines


def load_llamaforge(cfg: dict, max_batch: int):
    """Llama.build on the file; returns (gen, the Llama, forced)."""
    from llamaforge import Llama

    dtype = None if cfg["dtype"] in (None, "auto") else cfg["dtype"]
    length = max(cfg["prompt_len"] + cfg["gen_len"], len(cfg.get("forced") or ()))  # the forced text too
    g = Llama.build(cfg["model"], max_seq_len=length, max_batch_size=max_batch,
                    device="cpu", dtype=dtype, progress=False)
    # The timed calls repeat the same prompts: without this the engine would reuse the KV of their whole
    # 64-token chunks from the previous call and time only the last chunk's prefill (as llama.cpp's
    # prefix match would, which load_llama_cpp turns off with llm.reset()).
    g.open_engine(prefix_reuse=False).start()

    def gen(prompts, n):
        tokens, _ = g.generate([list(p) for p in prompts], max_gen_len=n, temperature=0, stop_ids=())
        return tokens

    def forced(seq):
        import torch

        with torch.inference_mode():
            return g.model(torch.tensor([list(seq)], dtype=torch.long))[0].argmax(-1).tolist()

    return gen, g, forced


def load_llama_cpp(cfg: dict, max_batch: int):
    """llama_cpp.Llama on the file (n_threads as asked); batch 1 through its generate, batches low-level.

    Returns (gen, the Llama, forced)."""
    import numpy as np
    import llama_cpp

    ctx_len = cfg["prompt_len"] + cfg["gen_len"]
    llm = llama_cpp.Llama(model_path=cfg["model"], n_ctx=ctx_len, n_batch=512, n_threads=cfg["threads"],
                          n_threads_batch=cfg["threads"], verbose=False, seed=1)

    def gen_one(prompt, n):
        llm.reset()  # no reuse of the previous call's KV cache (generate would match the prefix)
        out = []
        for tok in llm.generate(list(prompt), top_k=1, temp=0.0, reset=True):
            out.append(int(tok))
            if len(out) == n:
                break
        return out

    batched: dict = {}

    def gen_batch(prompts, n):
        b, p = len(prompts), len(prompts[0])
        if b not in batched:  # one context per batch size, made outside the timed calls' loop
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = b * ctx_len
            params.n_batch = max(512, b * p)
            params.n_ubatch = 512
            params.n_seq_max = b
            params.n_threads = params.n_threads_batch = cfg["threads"]
            ctx = llama_cpp.llama_init_from_model(llm.model, params)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not make a context for {b} sequences")
            batched[b] = (ctx, llama_cpp.llama_batch_init(b * p, 0, 1))
        ctx, batch = batched[b]
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        n_vocab = llm.n_vocab()

        def fill(rows):  # rows: (seq, pos, token, wants_logits)
            batch.n_tokens = len(rows)
            for i, (s, pos, tok, logits) in enumerate(rows):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, logits
                batch.seq_id[i][0] = s
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

        def argmax_rows(idx):
            return [int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))))
                    for i in idx]

        fill([(s, j, int(t), j == p - 1) for s, pr in enumerate(prompts) for j, t in enumerate(pr)])
        nxt = argmax_rows([s * p + p - 1 for s in range(b)])
        out = [[t] for t in nxt]
        for step in range(1, n):
            fill([(s, p + step - 1, nxt[s], True) for s in range(b)])
            nxt = argmax_rows(range(b))
            for s in range(b):
                out[s].append(nxt[s])
        return out

    def gen(prompts, n):
        return [gen_one(prompts[0], n)] if len(prompts) == 1 else gen_batch(prompts, n)

    def forced(seq):  # one sequence, logits at every position, in a context of its own
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = 256 * (1 + len(seq) // 256)
        params.n_threads = params.n_threads_batch = cfg["threads"]
        ctx = llama_cpp.llama_init_from_model(llm.model, params)
        batch = llama_cpp.llama_batch_init(len(seq), 0, 1)
        try:
            batch.n_tokens = len(seq)
            for i, tok in enumerate(seq):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(tok), i, 1, True
                batch.seq_id[i][0] = 0
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            n_vocab = llm.n_vocab()
            return [int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))))
                    for i in range(len(seq))]
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(ctx)

    return gen, llm, forced


def load_transformers(cfg: dict, max_batch: int):
    """AutoModelForCausalLM from the GGUF file in the asked torch dtype; returns (gen, model, forced)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(cfg["model"])
    dtype = getattr(torch, cfg["dtype"])
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None  # no early stop: every engine makes exactly n tokens
    model.generation_config.pad_token_id = 0
    for attr in ("top_k", "top_p", "temperature"):
        setattr(model.generation_config, attr, None)

    def gen(prompts, n):
        ids = torch.tensor([list(p) for p in prompts], dtype=torch.long)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False)
        return out[:, ids.shape[1]:].tolist()

    def forced(seq):
        with torch.inference_mode():
            return model(torch.tensor([list(seq)], dtype=torch.long)).logits[0].argmax(-1).tolist()

    return gen, model, forced


LOADERS = {"llamaforge": load_llamaforge, "llama.cpp": load_llama_cpp, "transformers": load_transformers}


def run(cfg: dict) -> dict:
    """Load, measure batch 1, then the batched sizes; see the module docstring."""
    import torch

    torch.set_num_threads(cfg["threads"])
    engine = cfg["engine"]
    import_engine(engine)
    res: dict = {"engine": engine, "rss_after_imports_mb": rss_mb(), "loadavg_start": os.getloadavg()[0]}
    t0 = time.perf_counter()
    gen, handle, forced = LOADERS[engine](cfg, 1)
    res["build_s"] = time.perf_counter() - t0
    gen([cfg["prompts"][0][:1]], 1)  # what a user waits for: a fresh process up to its first token
    res["load_s"] = time.perf_counter() - t0
    res["rss_after_load_mb"] = rss_mb()
    if engine == "llama.cpp":
        res["bytes_per_token"], res["bytes_held"] = gguf_weight_bytes(cfg["model"])
    else:
        res["bytes_per_token"], res["bytes_held"] = module_weight_bytes(handle.model if engine == "llamaforge" else handle)
    prompts = cfg["prompts"]
    res["b1"] = measure(gen, [prompts[0]], cfg["gen_len"], cfg["runs"])
    res["peak_rss_b1_mb"] = peak_rss_mb()
    if cfg.get("forced"):
        res["forced_argmax"] = forced(cfg["forced"])
    res["batched"] = {}
    sizes = cfg.get("batch_sizes") or []
    try:
        if sizes and engine == "llamaforge":  # the batch-1 build's KV cache has room for one sequence
            del gen, handle, forced
            gen, handle, _ = load_llamaforge(cfg, max(sizes))
        for b in sizes:
            r = measure(gen, prompts[:b], cfg["batch_gen_len"], cfg["batch_runs"])
            same = sum(1 for _ in _common_prefix(r.pop("tokens")[0], res["b1"]["tokens"][0]))
            res["batched"][str(b)] = {**r, "row0_agrees_with_b1": same}
    except Exception as exc:  # keep the batch-1 figures
        import traceback

        traceback.print_exc()
        res["batched_error"] = f"{type(exc).__name__}: {exc}"
    res["peak_rss_mb"] = peak_rss_mb()
    res["loadavg_end"] = os.getloadavg()[0]
    res["versions"] = _versions(engine)
    return res


def _common_prefix(a: Sequence[int], b: Sequence[int]):
    for x, y in zip(a, b):
        if x != y:
            return
        yield x


def _versions(engine: str) -> dict:
    from importlib.metadata import version

    dist = {"llamaforge": "llamaforge", "llama.cpp": "llama_cpp_python", "transformers": "transformers"}[engine]
    import torch

    return {dist: version(dist), "torch": torch.__version__, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    # benchmarks/ (this file's folder, sys.path[0]) holds a kernels.py that would shadow the `kernels`
    # package transformers looks for; this process imports nothing from beside it
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    config = json.loads(sys.argv[1]) if sys.argv[1] != "-" else json.load(sys.stdin)
    try:
        result = run(config)
    except Exception as exc:  # reported to compare.py as this cell's result, not a crash of the harness
        import traceback

        traceback.print_exc()
        result = {"engine": config.get("engine"), "error": f"{type(exc).__name__}: {exc}"}
    print("RESULT " + json.dumps(result), flush=True)
