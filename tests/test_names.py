"""No undefined name in the package, the benchmarks or the scripts, found statically (pyflakes), so that a path no
test runs (a benchmark's default mode, an error branch) does not die with a NameError when someone runs it:
`benchmarks/compare.py`'s default run did, after a refactor moved an import into another function."""

from pathlib import Path

import pytest

pyflakes_api = pytest.importorskip("pyflakes.api")
from pyflakes import messages  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# names that are undefined where they are used: what pyflakes reports and Python would raise NameError for
FATAL = (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport)


class _Collect:
    def __init__(self):
        self.found: list[str] = []

    def flake(self, message) -> None:
        if isinstance(message, FATAL):
            self.found.append(str(message))

    def unexpectedError(self, filename, msg) -> None:
        self.found.append(f"{filename}: {msg}")

    def syntaxError(self, filename, msg, lineno, offset, text) -> None:
        self.found.append(f"{filename}:{lineno}: {msg}")


def python_files() -> list[Path]:
    files = [p for d in ("llamaforge", "benchmarks", "scripts", "examples") for p in (ROOT / d).rglob("*.py")]
    return sorted(p for p in files if "_work" not in p.parts)


def test_python_files_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in python_files()}
    assert "llamaforge/api/llama.py" in names and "benchmarks/compare.py" in names


def test_no_undefined_names():
    report = _Collect()
    for path in python_files():
        pyflakes_api.check(path.read_text(), str(path.relative_to(ROOT)), report)
    assert not report.found, "\n".join(report.found)


def test_the_check_sees_an_undefined_name():
    report = _Collect()
    pyflakes_api.check("def f():\n    return describe(1)\n", "example.py", report)
    assert len(report.found) == 1 and "describe" in report.found[0]
