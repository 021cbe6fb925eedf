"""`llamaforge show REF`: what `info` prints, for a model reference (fetched first if not cached)."""

from __future__ import annotations

import argparse
from pathlib import Path

from llamaforge.cli.common import add_json_flag, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="describe a model by reference", description=__doc__)
    p.add_argument("ref", metavar="REF", help="org/name[:QUANT][@REVISION], an alias, or a path")
    add_json_flag(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from llamaforge import hub
    from llamaforge.cli import info

    path = hub.resolve_model(args.ref)
    ref = None if Path(args.ref).expanduser().exists() else hub.parse_ref(args.ref)
    if args.json:
        described = info.describe(str(path))
        described["reference"] = str(ref) if ref else None
        print_json(described)
        return 0
    if ref is not None:
        print(f"reference:   {ref}" + (f" (alias {ref.alias})" if ref.alias else ""))
    return info.run(argparse.Namespace(model=str(path), tokenizer_path=None, json=False))
