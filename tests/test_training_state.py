"""Training checkpoints are atomic: a process killed mid-save, or a save that fails, keeps the last one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from llamaforge.errors import CheckpointError
from llamaforge.training import state as state_module
from llamaforge.training.state import load_state, save_state

KILLED_WRITER = textwrap.dedent("""
    import sys, time, pathlib, torch
    from llamaforge.training import state
    path, ready = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    state.save_state(path, {"version": 1, "step": 1, "model": {"w": torch.ones(4096)}})
    real_save = torch.save
    def slow_save(obj, f, *args, **kwargs):
        f.write(b"PK\\x03\\x04 half of a checkpoint")   # a torn file, as a crash mid-write leaves it
        f.flush()
        ready.touch()
        time.sleep(120)                                  # killed here
    torch.save = slow_save
    state.save_state(path, {"version": 1, "step": 2, "model": {"w": torch.zeros(4096)}})
""")


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    path, ready = tmp_path / "checkpoint.pt", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), str(ready)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if proc.poll() is not None:
                pytest.fail(f"writer exited early: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the writer never reached the middle of its second save")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    strays = list(tmp_path.glob(".checkpoint.pt.*.tmp"))
    assert len(strays) == 1  # the torn write is there, under a temporary name
    state = load_state(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(4096))
    save_state(path, {"version": 1, "step": 3})  # the next save cleans the stray up
    assert not list(tmp_path.glob(".checkpoint.pt.*.tmp")) and load_state(path)["step"] == 3


def test_a_failing_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_state(path, {"version": 1, "step": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(state_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_state(path, {"version": 1, "step": 2})
    monkeypatch.undo()
    assert load_state(path)["step"] == 1
    assert not list(tmp_path.glob(".checkpoint.pt.*.tmp"))


def test_load_state_rejects_damaged_and_foreign_files(tmp_path):
    bad = tmp_path / "torn.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_state(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, other)
    with pytest.raises(CheckpointError, match="not a llamaforge training checkpoint"):
        load_state(other)
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        load_state(tmp_path / "missing.pt")
