"""The API reference (docs/reference/, rendered by mkdocstrings) covers every public name."""

from __future__ import annotations

import re
from pathlib import Path

import plugin_execution
from plugin_execution import testing

REFERENCE = Path(__file__).parents[1] / "docs" / "reference"


def _documented() -> set[str]:
    found = set()
    for page in REFERENCE.glob("*.md"):
        found |= set(re.findall(r"^::: plugin_execution\.([\w.]+)$", page.read_text(), re.M))
    return found


def test_every_exported_name_has_a_reference_entry() -> None:
    documented = _documented()
    missing = [
        f"{module}.{name}"
        for name, module in plugin_execution._EXPORTS.items()
        if f"{module}.{name}" not in documented
    ]
    assert not missing, f"add these to a page of docs/reference/: {missing}"


def test_the_testing_kit_is_in_the_reference() -> None:
    documented = _documented()
    public = [n for n in testing.__all__ if n != "DEFAULT_BACKENDS"]
    assert [n for n in public if f"testing.{n}" not in documented] == []


def test_every_reference_entry_names_something_real() -> None:
    import importlib

    for entry in _documented():
        module, _, name = f"plugin_execution.{entry}".rpartition(".")
        assert hasattr(importlib.import_module(module), name), entry
