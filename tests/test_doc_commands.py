"""The command lines and manifests the docs show are ones the CLI and the loader accept.

tests/test_doc_examples.py runs the Python blocks; a reader also copies the ``sh`` blocks
(``plugin-execution run ... --backend subprocess``) and the ``toml`` manifests. Each command
line here is parsed by the CLI's own parser (nothing is run), each TOML block that is a
plugin manifest (a top-level ``id``, or ``[permissions]`` tables alone) is loaded as one, and
the ``serve --config`` example is loaded as serve's options.
"""

from __future__ import annotations

import io
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from plugin_execution.cli import build_parser
from plugin_execution.manifest import manifest_from_dict

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(language: str) -> list[tuple[str, str]]:
    fence = re.compile(rf"^```(?:{language})\n(.*?)^```", re.S | re.M)
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in fence.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{page.relative_to(ROOT)}:{line}", match.group(1)))
    return found


def _command_lines() -> list[tuple[str, list[str]]]:
    found = []
    for where, block in _blocks("sh|bash"):
        for line in block.splitlines():
            for part in re.split(r"&&|\|", line.split(" #", 1)[0]):
                words = shlex.split(part)
                if words and words[0].endswith("plugin-execution"):
                    found.append((where, words[1:]))
    return found


COMMANDS = _command_lines()
TOML = [(where, block, tomllib.loads(block)) for where, block in _blocks("toml")]
# a whole manifest, or a part of one: [permissions] tables, with handlers perhaps
MANIFESTS = [
    (where, data if "id" in data else {"id": "doc.example", **data})
    for where, _, data in TOML
    if "id" in data or ("permissions" in data and set(data) <= {"permissions", "handlers"})
]
SERVE_CONFIGS = [(where, block) for where, block, _ in TOML if block.startswith("# serve.toml")]


def test_the_docs_show_commands_manifests_and_a_serve_config() -> None:
    assert len(COMMANDS) >= 10 and len(MANIFESTS) >= 5 and len(SERVE_CONFIGS) == 1


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_line_parses(
    where: str, argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("{}"))  # for --input -
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's way of refusing
        pytest.fail(f"{where}: plugin-execution {shlex.join(argv)} is refused (exit {exc.code})")


@pytest.mark.parametrize(("where", "data"), MANIFESTS, ids=[w for w, _ in MANIFESTS])
def test_documented_manifest_loads(where: str, data: dict[str, object]) -> None:
    manifest_from_dict(data)


@pytest.mark.parametrize(("where", "text"), SERVE_CONFIGS, ids=[w for w, _ in SERVE_CONFIGS])
def test_documented_serve_config_loads(where: str, text: str, tmp_path: Path) -> None:
    from plugin_execution.serve_config import load_options

    config = tmp_path / "serve.toml"
    config.write_text(text)
    load_options({}, config=config)
