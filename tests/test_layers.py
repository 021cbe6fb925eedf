"""The layering contracts of pyproject.toml ([tool.importlinter]), checked with import-linter.

The real package must keep them; a copy of it with one import that goes the wrong way (the model importing
quantize, as it once did) must break them, so the check is known to be able to fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pyproject.toml"


def lint(package_parent: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run the contracts of pyproject.toml over the `llamaforge` package found in `package_parent`."""
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        f"sys.exit(lint_imports(config_filename={str(CONFIG)!r}, no_cache=True, no_logo=True))"
    )
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_package_keeps_its_layers(tmp_path):
    result = lint(ROOT, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_import_against_the_layers_breaks_the_contract(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "llamaforge", copy / "llamaforge", ignore=shutil.ignore_patterns("__pycache__", "*.cpp",
                                                                                          "*.h", "static"))
    layers = copy / "llamaforge" / "model" / "layers.py"
    layers.write_text(layers.read_text() + "\nfrom llamaforge.quantize import QuantizedLinear  # noqa: E402\n")
    result = lint(copy, tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert "llamaforge.model.layers -> llamaforge.quantize" in result.stdout
