"""Importing `llamaforge.api` freezes the objects imported so far out of the cyclic collector's sight
(api/__init__.py: a full collection over torch's objects fell inside every load), unless LLAMAFORGE_GC_FREEZE=0."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref

import llamaforge.api  # noqa: F401  (the import under test)


def test_the_imports_are_frozen_and_later_cycles_still_collected():
    if os.environ.get("LLAMAFORGE_GC_FREEZE") == "0":
        return
    assert gc.get_freeze_count() > 10_000  # torch's objects at least

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle made after the import: the collector still frees it
    alive = weakref.ref(a)
    del a, b
    gc.collect()
    assert alive() is None


def test_llamaforge_gc_freeze_0_leaves_the_collector_alone():
    code = "import gc, llamaforge.api; print(gc.get_freeze_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LLAMAFORGE_GC_FREEZE": "0"}, check=True)
    assert out.stdout.split()[-1] == "0"
