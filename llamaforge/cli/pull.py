"""`llamaforge pull REF`: download a model by reference into the Hugging Face cache (only missing files)."""

from __future__ import annotations

import argparse

from llamaforge.cli.common import add_json_flag, describe_size, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="download a model (org/name[:QUANT][@REVISION] or an alias)", description=__doc__)
    p.add_argument("ref", metavar="REF", help="org/name[:QUANT][@REVISION], e.g. bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M")
    add_json_flag(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from llamaforge import hub

    pulled = hub.pull(args.ref, progress=not (args.quiet or args.json))
    if args.json:
        print_json({"ref": str(pulled.ref), "path": str(pulled.path), "format": pulled.format, "quant": pulled.quant,
                    "commit": pulled.commit, "downloaded": pulled.downloaded, "files": [str(f) for f in pulled.files]})
        return 0
    size = sum(f.stat().st_size for f in pulled.files)
    fetched = f"downloaded {describe_size(pulled.downloaded)}" if pulled.downloaded else "already up to date"
    print(f"{pulled.ref}: {pulled.format}{' ' + pulled.quant if pulled.quant else ''}, {describe_size(size)}, "
          f"commit {pulled.commit[:12]} ({fetched})")
    print(pulled.path)
    return 0
