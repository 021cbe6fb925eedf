"""Tensor parallelism on the CPU: 2 processes over gloo give the same tokens as 1 process.

Tolerance: greedy and seeded-sampled tokens identical; logprobs within 1e-4 (the row-parallel sums are
added in a different order).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamaforge import Llama
from llamaforge.errors import ConfigError
from llamaforge.parallel import local_args, shard_for_rank


def torchrun(tmp_path: Path, ckpt: Path, nproc: int) -> dict:
    out = tmp_path / f"out{nproc}.json"
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [exe, "--standalone", f"--nproc_per_node={nproc}", str(Path(__file__).with_name("tp_worker.py")), str(ckpt), str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parent.parent,
    )
    # torchrun ends stderr with its own summary: show the start too, where a worker's traceback is.
    assert proc.returncode == 0, proc.stderr[:4000] + "\n...\n" + proc.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("source", ["meta", "meta_mp2"])
def test_two_gloo_processes_equal_one(tiny_checkpoints, tmp_path, source):
    ckpt = getattr(tiny_checkpoints, source)
    two = torchrun(tmp_path, ckpt, 2)
    assert two["world"] == 2 and two["local_heads"] == tiny_checkpoints.args.n_heads // 2
    one = Llama.build(ckpt, max_seq_len=64, max_batch_size=3, device="cpu")  # seed=1, as in the workers
    prompts = ["the llama model is", "hello world", "café 日本 theory of relativity states that"]
    tokens = [one.tokenizer.encode(p, bos=True) for p in prompts]
    greedy, logprobs = one.generate(tokens, 10, temperature=0, logprobs=True)
    sampled, _ = one.generate(tokens, 10, temperature=1.0, top_p=0.9)
    assert two["greedy"] == greedy
    for a, b in zip(two["logprobs"], logprobs):
        assert a == pytest.approx(b, abs=1e-4)
    assert two["sampled"] == sampled


def test_shards_of_a_rank_reassemble_the_model(tiny_checkpoints):
    sd, args = tiny_checkpoints.state_dict, tiny_checkpoints.args
    parts = [shard_for_rank(sd, r, 2) for r in range(2)]
    for key in sd:
        if key.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")):
            assert torch.equal(torch.cat([p[key] for p in parts], 0), sd[key])
        elif key.endswith(("wo.weight", "w2.weight")):
            assert torch.equal(torch.cat([p[key] for p in parts], 1), sd[key])
        else:
            assert parts[1][key] is sd[key]
    assert local_args(args, 2).head_dim == args.head_dim


def test_world_size_that_does_not_divide_the_heads_is_a_clear_error(tiny_checkpoints):
    with pytest.raises(ConfigError, match="n_kv_heads=2 is not divisible by 4"):
        local_args(tiny_checkpoints.args, 4)
    with pytest.raises(ConfigError, match="model_parallel_size=2"):
        Llama.build(tiny_checkpoints.meta, model_parallel_size=2)
