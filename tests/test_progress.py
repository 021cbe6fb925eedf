"""Progress by bytes: loading, converting and quantizing walk their tensors through `iterate_bytes`."""

from __future__ import annotations

import torch

from llamaforge import checkpoints, progress


def test_loading_and_converting_count_bytes(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY_S", 0)  # show the bar at once (in use, only after a second)
    total = sum(progress.nbytes(v) for v in tiny_checkpoints.state_dict.values())
    checkpoints.load(tiny_checkpoints.hf, progress=True)
    checkpoints.save_gguf(tiny_checkpoints.args, tiny_checkpoints.state_dict, tmp_path / "x.gguf", dtype="q8_0")
    err = capsys.readouterr().err
    assert "loading hf" in err and "B/s]" in err  # a bar counted in bytes
    assert f"writing x.gguf:   0%|          | 0.00/{total / 1024:.0f}k" in err  # of the tensors' bytes (KiB)


def test_iterate_bytes_yields_every_item_and_is_silent_when_disabled(capsys):
    items = [torch.zeros(4), torch.zeros(2, 3, dtype=torch.float16)]
    assert [progress.nbytes(t) for t in items] == [16, 12]
    assert list(progress.iterate_bytes(items, progress.nbytes, "x", enabled=False)) == items
    assert list(progress.iterate_bytes(items, progress.nbytes, "x")) == items
    assert capsys.readouterr().err == ""  # quick work draws no bar
