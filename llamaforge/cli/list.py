"""`llamaforge list`: the models in the Hugging Face cache that llamaforge can load (no network)."""

from __future__ import annotations

import argparse

from llamaforge.cli.common import add_json_flag, describe_size, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list downloaded models", description=__doc__)
    add_json_flag(p)  # a list of {name, format, quant, size, path, revision}
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from llamaforge import hub

    models = hub.list_models()
    if args.json:
        print_json([m.to_dict() for m in models])
        return 0
    if not models:
        print(f"no models in {hub.cache_dir()}; get one with `llamaforge pull org/name[:QUANT]`")
        return 0
    rows = [(m.name, m.format, m.quant or "-", describe_size(m.size), str(m.path)) for m in models]
    header = ("NAME", "FORMAT", "QUANT", "SIZE", "WHERE")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    for row in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
    return 0
