"""What a training run shows and leaves behind: JSONL logs and the loss-curve PNG.

`RunLog` appends one JSON object per line to `log.jsonl` (training steps, validation, samples, events)
and flushes each line, so the log survives a killed run. `plot_losses` draws the training and
validation loss against the step with matplotlib's Agg backend (no display needed) and writes the
PNG atomically. When a run resumes, steps after the checkpoint are run again and logged again: readers
keep the last record of each step.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional


class RunLog:
    """Append-only JSONL log (emptied first when `fresh`); a no-op when `path` is None (non-zero ranks)."""

    def __init__(self, path: Optional[Path], fresh: bool = False):
        self.path = path
        self._f = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "w" if fresh else "a", encoding="utf-8")

    def write(self, **record: Any) -> None:
        if self._f is None:
            return
        record.setdefault("time", round(time.time(), 3))
        self._f.write(json.dumps(record, default=_plain) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _plain(x: Any) -> Any:
    return float(x) if hasattr(x, "__float__") else str(x)


def read_log(path: Path) -> list[dict[str, Any]]:
    """All records of a log.jsonl (a torn last line of a killed run is skipped)."""
    out = []
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def loss_curves(records: list[dict[str, Any]]) -> tuple[dict[int, float], dict[int, float]]:
    """(train loss by step, validation loss by step), the last record of each step winning."""
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    for r in records:
        if "loss" in r and "step" in r:
            train[int(r["step"])] = float(r["loss"])
        if "val_loss" in r and "step" in r:
            val[int(r["step"])] = float(r["val_loss"])
    return train, val


def plot_losses(log_path: Path, png_path: Path, title: str = "training") -> Optional[Path]:
    """Draw log.jsonl's losses into png_path; returns None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train, val = loss_curves(read_log(log_path))
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    if train:
        steps = sorted(train)
        ax.plot(steps, [train[s] for s in steps], label="train loss", linewidth=1, alpha=0.8)
    if val:
        steps = sorted(val)
        ax.plot(steps, [val[s] for s in steps], "o-", label="validation loss", linewidth=2)
        best = min(val.values())
        ax.set_title(f"{title}: best validation loss {best:.3f} (perplexity {math.exp(min(best, 50)):.1f})")
    else:
        ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
