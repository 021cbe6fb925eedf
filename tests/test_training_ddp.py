"""`torchrun --nproc_per_node 2 ... train` over gloo equals one process with twice the accumulation.

The two-process run goes through the real command line under torchrun (DDP, and FSDP as an option);
the one-process run is the Python API with grad_accum doubled. Each step reads the same windows either
way (data.BatchOrder), so losses and weights agree to float rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from llamaforge.training import train
from llamaforge.training.state import load_state
from tests.test_training_support import TINY_ARGS, workspace


def _toml(path, out_dir, data_dir, grad_accum, extra=""):
    ws = workspace()
    args = "\n".join(f"{k} = {v}" for k, v in TINY_ARGS.items())
    path.write_text(
        f'data = ["{ws / "corpus.txt"}"]\ntokenizer = "{ws / "tok.model"}"\nout_dir = "{out_dir}"\n'
        f'data_dir = "{data_dir}"\nseq_len = 32\nbatch_size = 2\ngrad_accum = {grad_accum}\nmax_steps = 4\n'
        f"lr = 3e-3\nwarmup_steps = 1\neval_every = 2\neval_batches = 2\nsave_every = 2\nprogress = false\n"
        f"plot = false\nseed = 3\n{extra}\n[model_args]\n{args}\n"
    )
    return path


def _losses(out_dir):
    return [r["loss"] for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_gloo_processes_equal_one_process_with_twice_the_accumulation(tmp_path, fsdp):
    extra = "fsdp = true" if fsdp else ""
    two = _toml(tmp_path / "two.toml", tmp_path / "two", tmp_path / "data", grad_accum=1, extra=extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "llamaforge.cli.main", "train", str(two)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    # torchrun ends stderr with its own summary: show the start too, where a worker's traceback is.
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[:4000] + "\n...\n" + proc.stderr[-2000:]
    assert "trained steps 0 -> 4" in proc.stdout

    one_cfg = _toml(tmp_path / "one.toml", tmp_path / "one", tmp_path / "data", grad_accum=2, extra=extra)
    from llamaforge.training import TrainConfig

    one = train(TrainConfig.from_toml(one_cfg))
    assert _losses(tmp_path / "two") == pytest.approx(one.losses, rel=0, abs=1e-5)
    a, b = load_state(tmp_path / "two" / "checkpoint.pt"), load_state(tmp_path / "one" / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-5)
    # both exported the same model, loadable anywhere
    for k, v in torch.load(tmp_path / "one" / "model" / "consolidated.00.pth", weights_only=True).items():
        other = torch.load(tmp_path / "two" / "model" / "consolidated.00.pth", weights_only=True)[k]
        torch.testing.assert_close(other, v, rtol=0, atol=1e-5)
