"""The chaos soak (benchmarks/soak.py), short: ~1,000 executions per process backend.

Every execution must end with exactly one outcome of its kind, no process, fd or workspace
directory may outlive the block, and the workers alive at once must stay within the bound,
while handlers crash, hang, fork and blow their quotas and a saboteur kills workers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


def _soak(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(SOAK), "--json", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.stdout.strip(), done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["clean"], json.dumps(report, indent=1) + done.stderr[-4000:]
    assert done.returncode == 0
    return report


@pytest.mark.parametrize(
    ("backend", "extra"),
    [
        ("worker-pool", ["--concurrency", "16"]),
        ("worker-pool", ["--concurrency", "16", "--sandbox"]),
        ("subprocess", ["--concurrency", "8", "--start-method", "zygote"]),
        ("subprocess", ["--concurrency", "8", "--start-method", "spawn", "--executions", "300"]),
    ],
)
def test_soak_runs_clean(backend: str, extra: list[str]) -> None:
    report = _soak("--backend", backend, "--executions", "1000", *extra)
    every_kind = report["per_kind"]
    assert {"echo", "crash", "timeout", "memory", "bad_str", "fork", "cancel"} <= set(every_kind)
    assert sum(report["faults_from_outside"].values()) > 0  # the saboteur did strike
    assert 0 < report["peak_live_workers"] <= report["worker_bound"]


def test_soak_through_map_runs_clean() -> None:
    """map's batches on the pool under the same faults: every request one right outcome."""
    report = _soak(
        "--backend", "worker-pool", "--via", "map", "--executions", "1500", "--concurrency", "32"
    )
    assert {"echo", "crash", "timeout", "memory", "fork"} <= set(report["per_kind"])
    assert "cancel" not in report["per_kind"]
    assert sum(report["faults_from_outside"].values()) > 0
    assert 0 < report["peak_live_workers"] <= report["worker_bound"]


def test_soak_in_process_runs_clean() -> None:
    report = _soak("--backend", "in-process", "--executions", "500", "--concurrency", "16")
    assert report["per_kind"]["echo"].get("ok", 0) > 0
