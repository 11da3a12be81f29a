"""``plugin-execution bench``: a table, JSON and a plot of a handler's figures per backend and
concurrency; failures are counted by code, never fatal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PLUGINS = Path(__file__).parent / "plugins"


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "plugin_execution", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_bench_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    proc = bench(
        "examples.hello", "wordcount", "--input", '{"text": "a b"}',
        "--backends", "in-process,worker-pool", "--executions", "60",
        "--concurrency", "1,4", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["backend", "concurrency", "executions/s"]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["in-process", "1"], ["in-process", "4"], ["worker-pool", "1"], ["worker-pool", "4"],
    ]  # fmt: skip
    assert "worker-pool x4: 60/60 done" in proc.stderr  # progress, not on a terminal
    figures = json.loads(out.read_text())
    assert figures["handler_id"] == "wordcount"
    for cell in figures["cells"]:
        assert cell["ok"] == cell["executions"] == 60 and cell["errors"] == {}
        assert cell["per_s"] > 0 and 0 < cell["p50_ms"] <= cell["p99_ms"]


def test_failures_are_counted_by_code_not_fatal() -> None:
    proc = bench(
        "tests.sample", "fail", "--plugin-path", str(PLUGINS), "--backends", "in-process",
        "--executions", "20", "--concurrency", "2", "--json", "-",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (cell,) = json.loads(proc.stdout.splitlines()[-1])["cells"]
    assert cell["ok"] == 0 and cell["errors"] == {"HANDLER_ERROR": 20}
    assert cell["p50_ms"] is None
    assert "HANDLER_ERROR 20" in proc.stdout


def test_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (the plot extra) is not installed")
    image = tmp_path / "bench.svg"
    proc = bench(
        "examples.hello", "greet", "--backends", "in-process", "--executions", "20",
        "--concurrency", "1,2", "--plot", str(image),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert image.read_text().lstrip().startswith("<?xml")
    assert "throughput" in image.read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["examples.hello", "nope"], "has no handler 'nope'"),
        (["no.such", "x"], "no plugin 'no.such'"),
        (["examples.hello", "greet", "--backends", "fast"], "unknown backend"),
        (["examples.hello", "greet", "--concurrency", "0"], "positive integer"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], message: str) -> None:
    proc = bench(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
