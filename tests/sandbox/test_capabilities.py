"""Dropping capabilities: a child of a root host cannot raise its limits back."""

from __future__ import annotations

import pytest

from plugin_execution.sandbox import capabilities

from .conftest import needs, run_in_child


@needs("capabilities")
def test_drop_all() -> None:
    if not capabilities.has_any():
        pytest.skip("this process holds no capabilities: nothing to drop")
    result = run_in_child(
        """
        import resource
        from plugin_execution.sandbox import capabilities
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        capabilities.drop_all()
        status = dict(line.split(":\\t") for line in open("/proc/self/status").read().splitlines()
                      if line.startswith("Cap") or line.startswith("NoNewPrivs"))
        def lift():
            resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
        try:
            lift()
            raised = "raised"
        except ValueError as exc:
            raised = str(exc)
        result = {"status": status, "raise": raised}
        """
    )
    status = result["status"]
    for field in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):
        assert int(status[field], 16) == 0, field
    assert status["NoNewPrivs"] == "1"
    assert result["raise"] == "not allowed to raise maximum limit"
