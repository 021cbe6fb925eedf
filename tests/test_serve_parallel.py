"""`torchrun --nproc_per_node 2 -m llamaforge.cli.main serve`: one tensor-parallel model, served by rank 0.

Two CPU processes over gloo answer the same greedy requests (alone and concurrently, so prefill and
decode steps are batched) with the same text as one process serving the same checkpoint. Tolerance:
identical text (greedy; the row-parallel sums differ in the last bits, the tiny model's peaked
distributions keep choices far from ties).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

PROMPTS = ["the llama model is", "hello world", "café 日本 theory of relativity states that"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def complete(base: str, prompt: str) -> str:
    r = httpx.post(f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": 10, "temperature": 0},
                   timeout=120, trust_env=False)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_two_gloo_ranks_serve_the_answers_of_one(tiny_checkpoints, tmp_path):
    from starlette.testclient import TestClient

    from llamaforge import Llama
    from llamaforge.server.app import create_app

    one = Llama.build(tiny_checkpoints.meta, max_seq_len=64, max_batch_size=3, device="cpu")
    with TestClient(create_app(one, model_name="tiny", prefix_reuse=False)) as c:
        want = []
        for p in PROMPTS:
            r = c.post("/v1/completions", json={"prompt": p, "max_tokens": 10, "temperature": 0})
            want.append(r.json()["choices"][0]["text"])

    port = free_port()
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    log = open(tmp_path / "torchrun.log", "w+")
    proc = subprocess.Popen(
        [exe, "--standalone", "--nproc_per_node=2", "-m", "llamaforge.cli.main", "serve", str(tiny_checkpoints.meta),
         "--port", str(port), "--max-seq-len", "64", "--max-batch-size", "3", "--device", "cpu",
         "--no-prefix-reuse", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parent.parent, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # /health answers once rank 0 serves: readiness, as a load balancer checks it
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "torchrun.log").read_text()[-4000:]
            try:
                if httpx.get(f"{base}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        alone = [complete(base, p) for p in PROMPTS]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(lambda p: complete(base, p), PROMPTS))
        assert alone == want
        assert together == want
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: rank 0 shuts down and ends the follower
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
