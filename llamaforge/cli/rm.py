"""`llamaforge rm REF`: delete a model from the Hugging Face cache.

`org/name` removes the whole repository (every quant and revision), `org/name:QUANT` that quant's
files only, `@REVISION` limits either to one revision. Asks first unless --yes.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rm", help="delete a downloaded model", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref", metavar="REF", help="org/name[:QUANT][@REVISION] or an alias")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from llamaforge import hub
    from llamaforge.cli.common import describe_size

    removal = hub.plan_removal(args.ref)
    print(f"will delete {describe_size(removal.freed)}:")
    for line in removal.description:
        print(f"  {line}")
    if not args.yes:
        if not sys.stdin.isatty():
            print("error: not deleting without confirmation; pass --yes (-y) to delete non-interactively",
                  file=sys.stderr)
            return 1
        if input("delete? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    removal.execute()
    print(f"deleted {args.ref}")
    return 0
