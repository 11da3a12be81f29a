"""The command lines and manifests the docs show are ones the CLI and the loader accept.

tests/test_doc_examples.py runs the Python blocks; a reader also copies the ``sh`` blocks
(``plugin-execution run ... --backend subprocess``) and the ``toml`` manifests. Each command
line here is parsed by the CLI's own parser (nothing is run), each TOML block that is a
plugin manifest (a top-level ``id``, or ``[permissions]`` tables alone) is loaded as one, and
the ``serve --config`` example is loaded as serve's options.
"""

from __future__ import annotations

import ast
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


def _documented_options() -> list[tuple[str, dict[str, object]]]:
    """The options docs/backends.md lists, by backend type, with the defaults it gives.

    In-process and subprocess: the ``| option | default | meaning |`` table of their section;
    the worker pool: the keywords of the ``create_execution_backend(type="worker-pool", ...)``
    call its section shows.
    """
    text = (ROOT / "docs" / "backends.md").read_text()
    sections = dict(re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, re.S | re.M))
    found = []
    for title, backend_type in [("In-process", "in-process"), ("Subprocess", "subprocess")]:
        rows = re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", sections[title], re.M)
        found.append((backend_type, {name: ast.literal_eval(default) for name, default in rows}))
    call = re.search(r"^create_execution_backend\(\n(.*?)^\)", sections["Worker pool"], re.S | re.M)
    assert call is not None
    keywords = ast.parse(f"f({call.group(1)})").body[0].value.keywords  # type: ignore[attr-defined]
    options = {k.arg: ast.literal_eval(k.value) for k in keywords if k.arg not in ("registry",)}
    found.append(("worker-pool", {k: v for k, v in options.items() if k != "type"}))
    return found


@pytest.mark.parametrize(("backend_type", "documented"), _documented_options())
def test_documented_backend_options_are_the_real_ones(
    backend_type: str, documented: dict[str, object]
) -> None:
    from plugin_execution.factory import _backend_class, _options

    real = _options(_backend_class(backend_type))
    real.pop(
        "max_event_bytes"
    )  # every backend's, documented once under "What every backend shares"
    assert set(documented) <= set(real), (
        f"documented, but not an option: {set(documented) - set(real)}"
    )
    wrong = {
        name: (value, real[name].default)
        for name, value in documented.items()
        if real[name].default != value
    }
    assert wrong == {}, f"documented default != real default: {wrong}"
    assert set(real) - set(documented) == set(), "options missing from docs/backends.md"
