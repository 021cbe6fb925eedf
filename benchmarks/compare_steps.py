"""One engine, one file, one process: step-timed prefill and decode for `compare.py --shape` and `--matrix`.

Unlike compare_engines.py (which times whole generate calls and takes decode as T(N) - T(1), a difference
that a long prompt's prefill noise swamps), this times the decode steps themselves: after a prefill of P
tokens per row, each of `steps` one-token steps (B rows) is timed on its own; decode tok/s = B / median
step time ("best": B / fastest step). Prefill tok/s = B * P / the prefill's time (fastest of `runs`).
Batch 1 after a short prompt: a warm-up run, then `runs` runs; a batch or a long prompt (whose prefills are
long): one run whose first WARM_STEPS steps are untimed.
Both engines are driven at the same level:
    llamaforge  `Llama.build(file)`, then its model and decode step: `model(tokens (B, P), 0, cache,
                last_only=True)` and `llm.decode_step(next (B, 1), StepInput, cache)` over a `KVCache` (the
                calls `generate` makes; on the CPU the decode step is the fused C++ step)
    llama.cpp   llama-cpp-python's low-level API: one context (`n_seq_max = B`, flash attention as asked),
                the prompt in `llama_batch`es of `n_batch` tokens, then one `llama_decode` of B tokens per
                step, greedy argmax of the rows' logits in numpy
Its environment chooses the instruction sets (`compare.py --cpu avx2`: cpu_mode.py), and `cfg["cpu"]` says which
were asked for: the process checks it runs them. Prints one line `RESULT {json}`. Not run by the tests.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.append(str(Path(__file__).resolve().parent))  # compare_engines' helpers, after the packages
from compare_engines import gguf_weight_bytes, import_engine, module_weight_bytes, peak_rss_mb, rss_mb  # noqa: E402
from cpu_mode import check_isa, isa_of  # noqa: E402


def clocks() -> tuple[float, float]:
    """(wall, process CPU) seconds now."""
    return time.perf_counter(), time.process_time()


def since(t0: tuple[float, float]) -> tuple[float, float]:
    w, c = clocks()
    return w - t0[0], c - t0[1]


def _figures(b: int, p: int, prefill: list[tuple[float, float]], steps: list[tuple[float, float]]) -> dict:
    """Wall-clock figures, and CPU-time ones (`*_cpu`): with one thread, the process's CPU seconds are what the
    work costs, whatever other jobs on a shared machine take of the cores (with more threads they also count
    spinning workers, so only the one-thread CPU figures are comparable across engines)."""
    wall, cpu = [s[0] for s in steps], [s[1] for s in steps]
    return {
        "prefill_tok_s": b * p / min(x[0] for x in prefill),
        "prefill_cpu_tok_s": b * p / max(1e-9, min(x[1] for x in prefill)),
        "prefill_s": prefill,
        "decode_tok_s": b / statistics.median(wall),
        "decode_best_tok_s": b / min(wall),
        "decode_cpu_tok_s": b / max(1e-9, statistics.median(cpu)),
        "step_ms_median": 1e3 * statistics.median(wall),
        "steps": len(steps),
    }


class LlamaforgeSteps:
    def __init__(self, cfg: dict):
        from llamaforge import Llama

        self.max_len = max(cfg["prompt_lens"]) + max(cfg["steps"], cfg["long_steps"]) + WARM_STEPS + 2
        self.llm = Llama.build(cfg["model"], max_seq_len=self.max_len, max_batch_size=max(cfg["batches"]),
                               device="cpu", progress=False, kv_type=cfg.get("kv_type"))
        self.model = self.llm.model

    def run(self, prompts: list[list[int]], steps: int) -> tuple[float, list[float], list[int]]:
        import torch

        from llamaforge.model import StepInput

        b, p = len(prompts), len(prompts[0])
        cache = self.llm.decode_step.new_cache(b, p + steps + 1)  # in the build's KV type (--kv-type)
        with torch.inference_mode():
            t0 = clocks()
            nxt = self.model(torch.tensor(prompts), 0, cache, last_only=True)[:, -1].argmax(-1)  # (B,)
            prefill = since(t0)
            times, row0 = [], [int(nxt[0])]
            for i in range(steps):
                t0 = clocks()
                step = StepInput.make(p + i, b, 1, device=torch.device("cpu"), cache_len=cache.max_seq_len)
                nxt = self.llm.decode_step(nxt.view(b, 1), step, cache)[:, -1].argmax(-1)
                times.append(since(t0))
                row0.append(int(nxt[0]))
        return prefill, times, row0

    def weight_bytes(self) -> tuple[int, int]:
        return module_weight_bytes(self.model)

    def kv_bytes_per_position(self) -> int:  # keys and values in the build's KV type, all layers, one row
        from llamaforge.api import kv_bytes_per_token

        return kv_bytes_per_token(self.model.args, self.llm.kv_type)


class LlamaCppSteps:
    def __init__(self, cfg: dict):
        import llama_cpp

        self.lc = llama_cpp
        self.cfg = cfg
        self.llm = llama_cpp.Llama(model_path=cfg["model"], n_ctx=256, n_threads=cfg["threads"],
                                   n_threads_batch=cfg["threads"], verbose=False)
        self.contexts: dict = {}

    def _context(self, b: int, p: int, steps: int):
        key = (b, p)
        if key not in self.contexts:
            for old in self.contexts.values():  # one context at a time: a 4k context is large
                self.lc.llama_batch_free(old[1])
                self.lc.llama_free(old[0])
            self.contexts.clear()
            lc = self.lc
            params = lc.llama_context_default_params()
            params.n_ctx = b * (p + steps + 2)
            params.n_batch = params.n_ubatch = 512
            params.n_seq_max = b
            params.n_threads = params.n_threads_batch = self.cfg["threads"]
            params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.cfg["flash_attn"] else \
                lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
            params.kv_unified = False  # each sequence its own KV stream, as separate requests
            ctx = lc.llama_init_from_model(self.llm.model, params)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not make a context for {b} x {p + steps} tokens")
            self.contexts[key] = (ctx, lc.llama_batch_init(512, 0, 1))
        return self.contexts[key]

    def run(self, prompts: list[list[int]], steps: int) -> tuple[float, list[float], list[int]]:
        import numpy as np

        lc = self.lc
        b, p = len(prompts), len(prompts[0])
        ctx, batch = self._context(b, p, steps)
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        n_vocab = self.llm.n_vocab()
        rows = [(s, j, int(t), j == p - 1) for s, pr in enumerate(prompts) for j, t in enumerate(pr)]

        def decode(chunk):
            batch.n_tokens = len(chunk)
            for i, (s, pos, tok, logits) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, logits
                batch.seq_id[i][0] = s
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")

        def argmax(i):
            return int(np.argmax(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(n_vocab,))))

        t0 = clocks()
        last = []
        for c in range(0, len(rows), 512):
            chunk = rows[c: c + 512]
            decode(chunk)
            last += [argmax(i) for i, r in enumerate(chunk) if r[3]]
        prefill = since(t0)
        nxt, times, row0 = last, [], [last[0]]
        for i in range(steps):
            t0 = clocks()
            decode([(s, p + i, nxt[s], True) for s in range(b)])
            nxt = [argmax(s) for s in range(b)]
            times.append(since(t0))
            row0.append(nxt[0])
        return prefill, times, row0

    def weight_bytes(self) -> tuple[int, int]:
        return gguf_weight_bytes(self.cfg["model"])

    def kv_bytes_per_position(self) -> int:  # f16 keys and values (llama.cpp's default cache type)
        lc, m = self.lc, self.llm.model
        n_embd, n_head, n_kv = lc.llama_model_n_embd(m), lc.llama_model_n_head(m), lc.llama_model_n_head_kv(m)
        return 2 * lc.llama_model_n_layer(m) * n_kv * (n_embd // n_head) * 2


WARM_STEPS = 2  # untimed steps before the timed ones in a single run


def plan(cfg: dict) -> list[tuple[int, int]]:
    """The (prompt length, batch) measurements of this process: `cfg["plan"]` when given (compare.py --matrix),
    else batch 1 at every prompt length and the batch sizes after the shortest."""
    if cfg.get("plan"):
        return [(int(p), int(b)) for p, b in cfg["plan"]]
    short = min(cfg["prompt_lens"])
    return [(p, b) for p in cfg["prompt_lens"] for b in ([1] + [x for x in cfg["batches"] if x > 1] if p == short
                                                           else [1])]


def run(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    engine = cfg["engine"]
    import_engine(engine)
    res: dict = {"engine": engine, "rss_after_imports_mb": rss_mb(), "loadavg_start": os.getloadavg()[0]}
    t0, c0 = time.perf_counter(), time.process_time()
    eng = LlamaCppSteps(cfg) if engine == "llama.cpp" else LlamaforgeSteps(cfg)
    res["build_s"] = time.perf_counter() - t0
    res["cpu"], res["isa"] = cfg.get("cpu", "native"), isa_of(engine)
    check_isa(res["cpu"], engine, res["isa"])  # --cpu avx2 (cpu_mode.py): nothing AVX-512 may run
    eng.run([cfg["prompts"][str(min(cfg["prompt_lens"]))][:1]], 0)  # what a user waits for: the first token
    res["load_s"], res["load_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    res["bytes_per_token"], res["bytes_held"] = eng.weight_bytes()
    res["kv_bytes_per_position"] = eng.kv_bytes_per_position()
    res["cells"] = {}
    for p, b in plan(cfg):
        prompt = cfg["prompts"][str(p)]
        rows = [prompt[i:] + prompt[:i] for i in range(b)]  # B different rotations of the text
        steps = cfg["steps"] if p <= 512 else cfg["long_steps"]
        pre, times, tokens = [], [], []
        if p <= 512 and b == 1:
            eng.run(rows, 2)  # warm-up (a 4k prefill is its own warm-up)
            for _ in range(cfg["runs"]):
                t_pre, t_steps, tokens = eng.run(rows, steps)
                pre.append(t_pre)
                times += t_steps
        else:  # one run (a batch's or a long prompt's prefill is long); its first WARM_STEPS steps are the warm-up
            t_pre, t_steps, tokens = eng.run(rows, steps + WARM_STEPS)
            pre, times = [t_pre], t_steps[WARM_STEPS:]
        res["cells"][f"{p}x{b}"] = {**_figures(b, p, pre, times), "tokens": tokens, "loadavg": os.getloadavg()[0]}
        print(f"[{engine}] P={p} B={b}: prefill {res['cells'][f'{p}x{b}']['prefill_tok_s']:.1f} tok/s, "
              f"decode {res['cells'][f'{p}x{b}']['decode_tok_s']:.2f} tok/s", file=sys.stderr, flush=True)
    res["peak_rss_mb"] = peak_rss_mb()
    res["loadavg_end"] = os.getloadavg()[0]
    return res


if __name__ == "__main__":
    config = json.loads(sys.argv[1]) if sys.argv[1] != "-" else json.load(sys.stdin)
    try:
        result = run(config)
    except Exception as exc:  # this cell's result, not a crash of the harness
        import traceback

        traceback.print_exc()
        result = {"engine": config.get("engine"), "error": f"{type(exc).__name__}: {exc}"}
    print("RESULT " + json.dumps(result), flush=True)
