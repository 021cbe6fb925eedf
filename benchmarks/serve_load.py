"""Load benchmark of `llamaforge serve`, side by side with llama.cpp's `llama-server`, loopback only, bounded.

    python benchmarks/serve_load.py                    # starts llamaforge on 127.0.0.1, N = 1, 4, 16
    python benchmarks/serve_load.py --engines llamaforge,llama-server --levels 1,4,16,32 --threads 2
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --levels 1,4

`llama-server` is llama.cpp's own server, built by benchmarks/build_llama_cpp_tools.sh from the llama.cpp
source that the pinned llama-cpp-python sdist vendors (or `--llama-server PATH`). Both servers get the same
GGUF file, the same number of threads and parallel slots, the same context per slot and the same requests.

For each N it sends N different greedy streaming completions at once (N = 1: each prompt alone, one
after another, which also gives the reference outputs) and reports the total generated tokens per
second (all tokens / wall time), time to first token and per-token latency (the gaps between a
stream's tokens) percentiles. It then checks that every concurrent output equals the same request run
alone: batching may change speed, never results. Exit status 1 if any output differs.

With `--loras K` the started llamaforge serves K random LoRA adapters (rank 8 on every projection, PEFT
folders written to a temporary directory) and request i names adapter i mod K, so requests with
different adapters share each batch; compare with a run without it for the cost of the adapters.

With `--json-schema` the requests are chat completions, each level run twice in a row: unconstrained, then
with `response_format` json_schema (`JSON_SCHEMA`), and the table gives both and their ratio.

`--in-process` measures the engine itself in CPU time, alternating variants in one process (no HTTP; see
benchmarks/engine_ab.py): `--variants base,loras,json-free,json --streams 16 --loras 8 --repeats 3`.

Every request goes to 127.0.0.1 (a --url elsewhere is refused), the number of requests is fixed by
--levels and --max-tokens, and the whole run stops after --deadline seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import httpx

PROMPTS = [
    "The history of the city of Rome begins",
    "Here is a simple recipe for bread. First,",
    "The three laws of motion, as described by Newton, are",
    "Once upon a time, in a small village by the sea, there lived",
    "Python is a programming language that",
    "The main causes of the French Revolution were",
    "To plant a tree, you should",
    "The solar system consists of the Sun and",
    "My favourite book is about a detective who",
    "In mathematics, a prime number is",
    "The best way to learn a new language is",
    "Photosynthesis is the process by which plants",
    "A good cup of coffee needs",
    "The ocean covers most of the Earth and",
    "During the winter, many animals",
    "The internet was invented to",
]


@dataclass
class Stream:
    prompt: str
    sent: float = 0.0
    token_times: list[float] = field(default_factory=list)
    text: str = ""
    completion_tokens: int = 0
    error: Optional[str] = None


JSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "summary": {"type": "string"}}, "required": ["name", "age", "summary"]}


def one_request(base: str, prompt: str, max_tokens: int, headers: dict, timeout: float,
                model: Optional[str] = None, fmt: Optional[str] = None) -> Stream:
    """A greedy streaming completion; every chunk with text is one arrival time.

    fmt: None (a plain completion), "text" (a chat completion) or "json_schema" (a chat completion with
    response_format json_schema JSON_SCHEMA)."""
    s = Stream(prompt)
    body = {"max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if fmt is None:
        body["prompt"], path = prompt, "/v1/completions"
    else:
        body["messages"], path = [{"role": "user", "content": f"Answer as JSON with name, age, summary: {prompt}"}], \
            "/v1/chat/completions"
        if fmt == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "r", "schema": JSON_SCHEMA}}
    if model is not None:
        body["model"] = model
    s.sent = time.perf_counter()
    try:
        with httpx.stream("POST", base + path, json=body, headers=headers, timeout=timeout) as resp:
            if resp.status_code != 200:
                s.error = f"HTTP {resp.status_code}: {resp.read().decode()[:200]}"
                return s
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    s.error = chunk["error"]["message"]
                    return s
                if chunk.get("usage"):
                    s.completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    text = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if text:
                        s.token_times.append(time.perf_counter())
                        s.text += text
    except httpx.HTTPError as exc:
        s.error = f"{type(exc).__name__}: {exc}"
    if not s.completion_tokens:  # a server that sends no usage chunk: one token per text chunk (llama-server)
        s.completion_tokens = len(s.token_times)
    return s


def run_level(base: str, prompts: list[str], max_tokens: int, headers: dict, timeout: float,
              models: Optional[list] = None, fmt: Optional[str] = None) -> tuple[list[Stream], float]:
    """Send all prompts at once (prompt i to model i, when given); return the streams and the wall time."""
    results: list[Optional[Stream]] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def work(i: int) -> None:
        barrier.wait()
        results[i] = one_request(base, prompts[i], max_tokens, headers, timeout, models[i] if models else None, fmt)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start  # type: ignore[return-value]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarise(n: int, streams: list[Stream], wall: float) -> dict:
    tokens = sum(s.completion_tokens for s in streams)
    ttft = [s.token_times[0] - s.sent for s in streams if s.token_times]
    gaps = [b - a for s in streams for a, b in zip(s.token_times, s.token_times[1:])]
    return {
        "n": n, "requests": len(streams), "tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_p50_ms": round(1000 * percentile(ttft, 0.5), 1), "ttft_p90_ms": round(1000 * percentile(ttft, 0.9), 1),
        "ttft_max_ms": round(1000 * max(ttft), 1) if ttft else None,
        "itl_p50_ms": round(1000 * percentile(gaps, 0.5), 1), "itl_p90_ms": round(1000 * percentile(gaps, 0.9), 1),
        "itl_p99_ms": round(1000 * percentile(gaps, 0.99), 1),
        "errors": [s.error for s in streams if s.error],
    }


def write_random_lora(model: str, folder: Path, seed: int, rank: int = 8, scale: float = 0.02,
                      dtype: str = "float32") -> str:
    """A PEFT LoRA folder of random weights (rank `rank` on every projection, saved in `dtype`) for the GGUF `model`."""
    import torch
    from safetensors.torch import save_file

    from llamaforge import checkpoints

    args = checkpoints.load(Path(model), keep_quantized=True).args
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes = {"self_attn.q_proj": (q, args.dim), "self_attn.k_proj": (kv, args.dim), "self_attn.v_proj": (kv, args.dim),
              "self_attn.o_proj": (args.dim, q), "mlp.gate_proj": (args.hidden_dim, args.dim),
              "mlp.up_proj": (args.hidden_dim, args.dim), "mlp.down_proj": (args.dim, args.hidden_dim)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(args.n_layers):
        for name, (out_f, in_f) in shapes.items():
            stem = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{stem}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) * scale).to(getattr(torch, dtype))
            tensors[f"{stem}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * scale).to(getattr(torch, dtype))
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank,
                                                            "target_modules": sorted(n.split(".")[1] for n in shapes)}))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return str(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, base: str, what: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{what} did not start within 300 s")


def start_llamaforge(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llamaforge", "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
           "--max-seq-len", str(args.max_seq_len), "--max-batch-size", str(max(args.levels)),
           "--max-queue", str(2 * max(args.levels)), "--log-level", "warning"]
    if not args.prefix_reuse:
        cmd.append("--no-prefix-reuse")
    if args.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    for i, folder in enumerate(args.lora_dirs):
        cmd += ["--lora", f"lora{i}={folder}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base, "llamaforge serve")
    return proc, base


def start_llama_server(args) -> tuple[subprocess.Popen, str]:
    exe = args.llama_server or str(Path(__file__).parent / "_work" / "llama.cpp" / "bin" / "llama-server")
    if not Path(exe).is_file():
        raise SystemExit(f"no llama-server at {exe}: run benchmarks/build_llama_cpp_tools.sh or pass --llama-server")
    port = free_port()
    slots = max(args.levels)
    cmd = [exe, "-m", args.model, "--host", "127.0.0.1", "--port", str(port), "--parallel", str(slots),
           "-c", str(args.max_seq_len * slots), "--threads", str(args.threads or os.cpu_count()),
           "--threads-batch", str(args.threads or os.cpu_count()), "--no-webui", "--log-disable"]
    if args.max_num_batched_tokens:  # llama-server's logical batch: the tokens of one llama_decode
        cmd += ["--batch-size", str(args.max_num_batched_tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base, "llama-server")
    return proc, base


def measure(base: str, args, headers: dict, started: float,
            fmt: Optional[str] = None) -> tuple[list[dict], list, list[Stream]]:
    """Every level against one server: the rows, the (N, i) whose output differs from alone, the solo streams.

    fmt: the kind of request (see `one_request`)."""
    one_request(base, "Warm-up:", 4, headers, 120)
    need = max(args.levels)
    # N = 1: every prompt alone, one after another; these are also the reference outputs.
    solo, solo_wall = [], 0.0
    models = [f"lora{i % args.loras}" for i in range(need)] if args.loras else None
    for i, prompt in enumerate(PROMPTS[:need]):
        if time.monotonic() - started > args.deadline:
            raise SystemExit("deadline reached")
        streams, wall = run_level(base, [prompt], args.max_tokens, headers, args.deadline,
                                  models[i:i + 1] if models else None, fmt)
        solo += streams
        solo_wall += wall
    rows = []
    if 1 in args.levels:
        rows.append(summarise(1, solo, solo_wall))
    mismatches = []
    for n in args.levels:
        if n == 1:
            continue
        if time.monotonic() - started > args.deadline:
            raise SystemExit("deadline reached")
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        streams, wall = run_level(base, prompts, args.max_tokens, headers, args.deadline,
                                  models[:n] if models else None, fmt)
        rows.append(summarise(n, streams, wall))
        mismatches += [(n, i) for i, s in enumerate(streams) if s.text != solo[i % len(solo)].text]
    return rows, mismatches, solo


def print_rows(engine: str, rows: list[dict]) -> None:
    base_rate = rows[0]["tokens_per_s"] if rows and rows[0]["n"] == 1 else None
    print(f"\n### {engine}\n")
    print("| N | requests | tokens | wall s | tokens/s | speed-up | TTFT p50 / p90 / max ms | per-token p50 / p90 / p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = f"{r['tokens_per_s'] / base_rate:.1f}x" if base_rate else "-"
        print(f"| {r['n']} | {r['requests']} | {r['tokens']} | {r['wall_s']} | {r['tokens_per_s']} | {speed} | "
              f"{r['ttft_p50_ms']} / {r['ttft_p90_ms']} / {r['ttft_max_ms']} | "
              f"{r['itl_p50_ms']} / {r['itl_p90_ms']} / {r['itl_p99_ms']} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server on 127.0.0.1 (default: start each of --engines)")
    p.add_argument("--engines", default="llamaforge", help="servers to start: llamaforge, llama-server (comma list)")
    p.add_argument("--model", help="GGUF file both servers load (default: the default model)")
    p.add_argument("--llama-server", help="the llama-server binary (default benchmarks/_work/llama.cpp/bin)")
    p.add_argument("--threads", type=int, default=2, help="threads of each server (default 2)")
    p.add_argument("--levels", default="1,4,16", help="concurrency levels (default 1,4,16)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    p.add_argument("--max-seq-len", type=int, default=256, help="context per slot of the started servers")
    p.add_argument("--prefix-reuse", action="store_true", help="let the started servers reuse cached prefixes")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per engine step of the started servers (llama-server: --batch-size; default: "
                        "each server's own, 256 and 2048)")
    p.add_argument("--api-key", help="API key of the --url server")
    p.add_argument("--deadline", type=float, default=1800, help="stop after this many seconds (default 1800)")
    p.add_argument("--loras", type=int, default=0, help="serve this many random LoRA adapters, request i on i mod K")
    p.add_argument("--lora-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the dtype the random adapters are saved in (PEFT saves the training dtype)")
    p.add_argument("--json-schema", action="store_true",
                   help="chat completions, each level unconstrained and then with response_format json_schema")
    p.add_argument("--in-process", action="store_true",
                   help="A/B the engine in CPU time in this process (benchmarks/engine_ab.py), no HTTP")
    p.add_argument("--variants", default="base,loras,json-free,json", help="--in-process: variants to alternate")
    p.add_argument("--streams", type=int, default=16, help="--in-process: requests at once (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="--in-process: runs of each variant (default 3)")
    p.add_argument("--json", help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")]
    if min(args.levels) < 1 or max(args.levels) > 64:
        raise SystemExit("levels must be between 1 and 64")
    if not args.model:
        from llamaforge.default_model import default_model_path

        args.model = str(default_model_path())
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.in_process:
        import engine_ab  # beside this file

        return engine_ab.main(args, PROMPTS, write_random_lora)
    if args.loras and (args.url or args.engines != "llamaforge"):
        raise SystemExit("--loras starts llamaforge itself: leave out --url and other --engines")
    tmp = tempfile.TemporaryDirectory(prefix="serve_load_loras_")
    args.lora_dirs = [write_random_lora(args.model, Path(tmp.name) / f"lora{i}", seed=i, dtype=args.lora_dtype)
                      for i in range(args.loras)]
    started = time.monotonic()
    results: dict[str, dict] = {}
    if args.url:
        if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("this benchmark only talks to a server on this machine (127.0.0.1)")
        for fmt in ("text", "json_schema") if args.json_schema else (None,):
            rows, mismatches, _ = measure(args.url.rstrip("/"), args, headers, started, fmt)
            results["server at " + args.url + (f" ({fmt})" if fmt else "")] = {"rows": rows, "mismatches": mismatches}
    for engine in ([] if args.url else args.engines.split(",")):
        start = {"llamaforge": start_llamaforge, "llama-server": start_llama_server}.get(engine)
        if start is None:
            raise SystemExit(f"unknown engine {engine!r}: llamaforge or llama-server")
        proc, base = start(args)
        try:
            for fmt in ("text", "json_schema") if args.json_schema else (None,):
                rows, mismatches, solo = measure(base, args, headers, started, fmt)
                results[engine + (f" ({fmt})" if fmt else "")] = {"rows": rows, "mismatches": mismatches,
                                                                 "solo_texts": [s.text for s in solo]}
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"model {args.model}, {max(args.levels)} slots of {args.max_seq_len} positions, {args.threads} threads, "
          f"{args.max_tokens} greedy tokens per streaming completion, prefix reuse "
          f"{'on' if args.prefix_reuse else 'off'}" + (f", {args.loras} LoRA adapters (request i on i mod {args.loras})"
                                                       if args.loras else ""))
    failed = False
    for engine, r in results.items():
        print_rows(engine, r["rows"])
        errors = [e for row in r["rows"] for e in row["errors"]]
        print(f"\nconcurrent greedy outputs equal to the same requests alone: "
              f"{'yes' if not r['mismatches'] else 'NO ' + str(r['mismatches'])}; errors: {errors or 'none'}")
        failed |= bool(errors) or (engine.startswith("llamaforge") and bool(r["mismatches"]))
    if "llamaforge" in results and "llama-server" in results:
        print("\n### llamaforge / llama-server\n")
        print("| N | tokens/s | TTFT p50 (lower is better) | per-token p50 |")
        print("|---|---|---|---|")
        for a, b in zip(results["llamaforge"]["rows"], results["llama-server"]["rows"]):
            print(f"| {a['n']} | {a['tokens_per_s'] / b['tokens_per_s']:.2f}x | "
                  f"{a['ttft_p50_ms']} vs {b['ttft_p50_ms']} ms | {a['itl_p50_ms']} vs {b['itl_p50_ms']} ms |")
        same = sum(x == y for x, y in zip(results["llamaforge"]["solo_texts"], results["llama-server"]["solo_texts"]))
        print(f"\nsolo answers identical across the two servers: {same} of {len(results['llamaforge']['solo_texts'])}")
    if args.json_schema:
        for engine in ([] if args.url else args.engines.split(",")):
            free, constrained = results.get(engine + " (text)"), results.get(engine + " (json_schema)")
            print(f"\n### {engine}: json_schema / unconstrained tokens/s\n")
            for a, b in zip(constrained["rows"], free["rows"]):
                print(f"| {a['n']} | {a['tokens_per_s']} vs {b['tokens_per_s']} | {a['tokens_per_s'] / b['tokens_per_s']:.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "results": results}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
