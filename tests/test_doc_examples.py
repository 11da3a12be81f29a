"""Every Python block in README.md and docs/ is either a whole program that runs, or marked
as a fragment (a ``<!-- fragment -->`` line just before its fence) that at least parses.

A reader copies a block and runs it: one that raises ``NameError`` is a bug. Whole programs
run here in a fresh interpreter, from a scratch directory, with the project installed.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRAGMENT = "<!-- fragment -->"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[str, str, bool]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            found.append((f"{page.relative_to(ROOT)}:{line}", match.group(1), before == FRAGMENT))
    return found


BLOCKS = _blocks()
PROGRAMS = [(where, code) for where, code, fragment in BLOCKS if not fragment]
FRAGMENTS = [(where, code) for where, code, fragment in BLOCKS if fragment]


def test_there_are_blocks_of_both_kinds() -> None:
    assert len(PROGRAMS) >= 5 and len(FRAGMENTS) >= 5


@pytest.mark.parametrize(("where", "code"), FRAGMENTS, ids=[w for w, _ in FRAGMENTS])
def test_fragment_parses(where: str, code: str) -> None:
    compile(code, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)


@pytest.mark.parametrize(("where", "code"), PROGRAMS, ids=[w for w, _ in PROGRAMS])
def test_program_runs(where: str, code: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{where} failed:\n{done.stderr[-3000:]}"
