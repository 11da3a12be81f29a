"""``plugin-execution doctor``: each sandbox layer on this machine, and why one is missing."""

from __future__ import annotations

import json

import pytest

from plugin_execution.cli import main
from plugin_execution.sandbox import LAYERS

from .conftest import SUPPORT


def test_doctor_json(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert list(report["layers"]) == list(LAYERS)
    for name, layer in report["layers"].items():
        assert layer["available"] is SUPPORT[name].available
        assert layer["detail"] == SUPPORT[name].detail
    assert report["machine"]["python"]
    assert status == (0 if all(s.available for s in SUPPORT.layers.values()) else 1)


def test_doctor_text(capsys: pytest.CaptureFixture[str]) -> None:
    main(["doctor"])
    out = capsys.readouterr().out
    for name, status in SUPPORT.layers.items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert ("yes" if status.available else "NO") in line.split()[1]
        assert status.detail in line
