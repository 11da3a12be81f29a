"""Without Ray installed, type="ray" says which extra to install (and the demo skips it)."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from plugin_execution import InvalidRequestError, PluginRegistry, create_execution_backend
from plugin_execution.cli._demo import _demo


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec

    def without_ray(name: str, *args: Any) -> Any:
        return None if name == "ray" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_ray)


def test_the_error_names_the_extra(no_ray: None) -> None:
    with pytest.raises(InvalidRequestError, match=r"pip install 'plugin-execution\[ray\]'"):
        create_execution_backend(type="ray", registry=PluginRegistry())


async def test_the_demo_lists_ray_as_unavailable(no_ray: None) -> None:
    rows, unavailable = await _demo(PluginRegistry(), ["ray"])
    assert rows == []
    assert [kind for kind, _ in unavailable] == ["ray"]
    assert "plugin-execution[ray]" in unavailable[0][1]
