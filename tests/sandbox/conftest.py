"""Helpers for the sandbox tests: run code in a fresh child, skip when a layer is missing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from plugin_execution.sandbox import detect

SUPPORT = detect()


def needs(*layers: str, abi: int = 1) -> pytest.MarkDecorator:
    """Skip unless this machine has ``layers`` (and a Landlock ABI >= ``abi``)."""
    missing = [f"{name}: {SUPPORT[name].detail}" for name in layers if not SUPPORT[name].available]
    version = SUPPORT["landlock"].version
    if "landlock" in layers and not missing and isinstance(version, int) and version < abi:
        missing.append(f"landlock: ABI {version} < {abi}")
    return pytest.mark.skipif(bool(missing), reason="this machine lacks " + "; ".join(missing))


def run_in_child(code: str, **variables: Any) -> Any:
    """Run ``code`` in a fresh ``python -I`` (a sandbox can only be undone by exiting) and
    return what it assigned to ``result``; ``variables`` are defined for it first.

    ``attempt(fn)`` is defined too: ``fn()``'s value, or the name of the exception it raised
    with its errno, e.g. ``"PermissionError:EACCES"``.
    """
    prelude = textwrap.dedent(
        """
        import errno, json, os, sys

        def attempt(fn):
            try:
                return fn()
            except OSError as exc:
                return f"{type(exc).__name__}:{errno.errorcode.get(exc.errno, exc.errno)}"
        """
    )
    assign = "".join(f"{name} = {value!r}\n" for name, value in variables.items())
    script = prelude + assign + textwrap.dedent(code) + "\nprint(json.dumps(result))\n"
    done = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])
