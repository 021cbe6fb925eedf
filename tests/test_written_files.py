"""Files llamaforge writes, as the tools that read them after us see them: permissions and torn writes.

Failed before its fix: safetensors' `save_file` (0.7+) creates its file 0600, so an HF folder or a PEFT
adapter written by `llamaforge convert --to hf` / `train` could not be read by another user (a service
account, a container, a shared model folder) while the GGUF and .pth files beside them were 0644.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llamaforge.checkpoints import load, save_gguf, save_hf, save_meta
from llamaforge.checkpoints.adapters import Adapter, save_peft
from tests.test_checkpoints import random_state_dict, tiny_args


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("shard_bytes", [None, 20_000])
def test_every_file_of_a_written_folder_follows_the_umask(umask_022, tmp_path, shard_bytes):
    args = tiny_args()
    sd = random_state_dict(args)
    hf = save_hf(args, sd, tmp_path / "hf", max_shard_bytes=shard_bytes)
    meta = save_meta(args, sd, tmp_path / "meta")
    gguf = save_gguf(args, sd, tmp_path / "m.gguf")
    assert any(name.endswith(".safetensors") for name in modes(hf))
    for folder in (hf, meta):
        assert set(modes(folder).values()) == {umask_022}, modes(folder)
    assert stat.S_IMODE(gguf.stat().st_mode) == umask_022
    assert stat.S_IMODE(hf.stat().st_mode) == 0o755
    r = 4
    adapter = Adapter({"layers.0.attention.wq": (torch.zeros(r, args.dim), torch.zeros(args.dim, r))}, alpha=8.0, rank=r)
    peft = save_peft(adapter, args, tmp_path / "lora")
    assert set(modes(peft).values()) == {umask_022}, modes(peft)


def test_a_killed_write_leaves_no_file_under_the_final_name(tmp_path):
    """A process killed in the middle of writing a GGUF (SIGKILL: no cleanup runs) leaves at most a hidden
    temporary file beside the target, never a partial file under the target's name; the next write works."""
    out = tmp_path / "m.gguf"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from llamaforge.checkpoints import save_gguf
        from tests.test_checkpoints import random_state_dict, tiny_args
        def killed(*a, **k):  # the last step of an atomic write: die just before it
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace = killed
        args = tiny_args()
        save_gguf(args, random_state_dict(args), {str(out)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not out.exists()
    left = [p.name for p in tmp_path.iterdir()]
    assert all(name.startswith(".m.gguf.") for name in left), left
    args = tiny_args()
    save_gguf(args, random_state_dict(args), out)
    assert load(out).format == "gguf"
