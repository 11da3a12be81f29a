"""The chaos soak (benchmarks/soak.py), short: a few hundred executions per process backend.

Every execution must end with exactly one outcome of its kind, no process, fd or workspace
directory may outlive the block, and the workers alive at once must stay within the bound,
while handlers crash, hang, fork and blow their quotas and a saboteur kills workers.

The runs are short, so the saboteur strikes twice as often as the soak's default (every
0.5 s on average): about as many faults from outside as a run of 1,000 executions gets. With
the fixed seed, 400 executions plan every kind (and 6-7 crashes and as many memory kills,
past the crash breaker's threshold of 5 in a row, so its quarantine usually comes into play
too); the spawned children of ``--start-method spawn`` cost the most, so that run plans 200
(every kind again). The long soak stays ``benchmarks/soak.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


# --fault-interval: mean seconds between the saboteur's strikes (the soak's default is 1).
FAULT_INTERVAL = "0.5"
EVERY_KIND = {"echo", "sleep", "raise", "bad_str", "cancel", "crash", "timeout", "memory", "fork"}


def _soak(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(SOAK), "--json", "--fault-interval", FAULT_INTERVAL, *args],
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
        ("subprocess", ["--concurrency", "8", "--start-method", "spawn", "--executions", "200"]),
    ],
)
def test_soak_runs_clean(backend: str, extra: list[str]) -> None:
    report = _soak("--backend", backend, "--executions", "400", *extra)
    assert set(report["per_kind"]) == EVERY_KIND
    assert sum(report["faults_from_outside"].values()) > 0  # the saboteur did strike
    assert 0 < report["peak_live_workers"] <= report["worker_bound"]


def test_soak_through_map_runs_clean() -> None:
    """map's batches on the pool under the same faults: every request one right outcome."""
    report = _soak(
        "--backend", "worker-pool", "--via", "map", "--executions", "400", "--concurrency", "32"
    )
    assert set(report["per_kind"]) == EVERY_KIND - {"cancel"}
    assert sum(report["faults_from_outside"].values()) > 0
    assert 0 < report["peak_live_workers"] <= report["worker_bound"]


def test_soak_in_process_runs_clean() -> None:
    report = _soak("--backend", "in-process", "--executions", "500", "--concurrency", "16")
    assert report["per_kind"]["echo"].get("ok", 0) > 0
