"""``plugin-execution bench``: measure your own handler on every backend and concurrency.

Each (backend, concurrency) cell runs ``executions`` executions of one handler with one input
through ``backend.map`` and records, per execution, the duration the backend reports, and its
outcome. A cell's figures are throughput (executions per second of wall time), p50 / p99 of
the successful executions' durations, and errors counted by code: a failing execution is a
figure, never the end of the bench. Progress is a live bar on a terminal (rich) and a line per
cell otherwise; the results come as a table, as JSON for harnesses, and as a plot (matplotlib,
the ``plot`` extra).
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import attrs
import trio

from .factory import create_execution_backend
from .registry import PluginRegistry
from .types import ExecutionRequest

__all__ = ["BenchCell", "measure", "plot", "render_table"]


@attrs.frozen
class BenchCell:
    """The figures of one backend at one concurrency."""

    backend: str
    concurrency: int
    executions: int
    elapsed_s: float
    ok: int
    errors: dict[str, int]
    durations_s: tuple[float, ...] = attrs.field(repr=False)  # successful ones, sorted

    @property
    def per_s(self) -> float:
        return self.executions / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile(self, q: float) -> float | None:
        if not self.durations_s:
            return None
        index = min(len(self.durations_s) - 1, max(0, math.ceil(q * len(self.durations_s)) - 1))
        return self.durations_s[index]

    def to_dict(self) -> dict[str, Any]:
        p50, p99 = self.percentile(0.5), self.percentile(0.99)
        return {
            "backend": self.backend,
            "concurrency": self.concurrency,
            "executions": self.executions,
            "elapsed_s": self.elapsed_s,
            "per_s": self.per_s,
            "ok": self.ok,
            "errors": self.errors,
            "p50_ms": None if p50 is None else p50 * 1000,
            "p99_ms": None if p99 is None else p99 * 1000,
        }


Progress = Callable[[str, int, int], None]  # (cell label, done, total)


async def measure_cell(
    registry: PluginRegistry,
    backend_type: str,
    request: Callable[[], ExecutionRequest],
    executions: int,
    concurrency: int,
    progress: Progress,
) -> BenchCell:
    """One cell: a fresh backend (its start-up not timed), a warm-up call, then the map."""
    label = f"{backend_type} x{concurrency}"
    durations: list[float] = []
    errors: Counter[str] = Counter()
    async with create_execution_backend(type=backend_type, registry=registry) as backend:
        await backend.execute(request(), raise_errors=False)  # workers up, handler imported

        def requests() -> Iterator[ExecutionRequest]:
            for _ in range(executions):
                yield request()

        done = 0
        started = time.perf_counter()
        async with backend.map(requests(), concurrency=concurrency) as results:
            async for result in results:
                if result.error is None:
                    durations.append(result.duration_s)
                else:
                    errors[result.error.code] += 1
                done += 1
                if done % max(1, executions // 100) == 0 or done == executions:
                    progress(label, done, executions)
        elapsed = time.perf_counter() - started
    return BenchCell(
        backend=backend_type,
        concurrency=concurrency,
        executions=executions,
        elapsed_s=elapsed,
        ok=len(durations),
        errors=dict(errors),
        durations_s=tuple(sorted(durations)),
    )


async def measure(
    registry: PluginRegistry,
    request: Callable[[], ExecutionRequest],
    *,
    backends: Sequence[str],
    concurrency: Sequence[int],
    executions: int,
    progress: Progress,
) -> list[BenchCell]:
    """Every (backend, concurrency) cell, one after the other."""
    return [
        await measure_cell(registry, backend, request, executions, level, progress)
        for backend in backends
        for level in concurrency
    ]


def render_table(cells: Sequence[BenchCell], out: TextIO) -> None:
    """The figures as a table: rich's on a terminal, aligned plain text otherwise."""
    header = ("backend", "concurrency", "executions/s", "p50 ms", "p99 ms", "ok", "errors")
    rows = []
    for cell in cells:
        figures = cell.to_dict()
        rows.append(
            (
                cell.backend,
                str(cell.concurrency),
                f"{cell.per_s:,.0f}",
                "-" if figures["p50_ms"] is None else f"{figures['p50_ms']:.3f}",
                "-" if figures["p99_ms"] is None else f"{figures['p99_ms']:.3f}",
                str(cell.ok),
                ", ".join(f"{code} {n}" for code, n in sorted(cell.errors.items())) or "-",
            )
        )
    if out.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*header)
        for row in rows:
            table.add_row(*row)
        Console(file=out).print(table)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for row in (header, *rows):
        padded = (value.ljust(width) for value, width in zip(row, widths, strict=True))
        print("  ".join(padded).rstrip(), file=out)


def plot(cells: Sequence[BenchCell], path: str) -> None:
    """Throughput against concurrency per backend, and each backend's latency distribution
    at its highest concurrency, into ``path`` (``.svg`` or ``.png``). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'plugin-execution[plot]'") from None
    backends = list(dict.fromkeys(cell.backend for cell in cells))
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backend in backends:
        mine = [cell for cell in cells if cell.backend == backend]
        left.plot([c.concurrency for c in mine], [c.per_s for c in mine], marker="o", label=backend)
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("concurrency")
    left.set_ylabel("executions / s")
    left.set_title("throughput")
    left.legend()
    samples, labels = [], []
    for backend in backends:
        top = max((c for c in cells if c.backend == backend), key=lambda c: c.concurrency)
        if top.durations_s:
            samples.append([d * 1000 for d in top.durations_s])
            labels.append(f"{backend}\nx{top.concurrency}")
    if samples:
        right.boxplot(samples, tick_labels=labels, showfliers=False)
    right.set_yscale("log")
    right.set_ylabel("duration, ms")
    right.set_title("latency (successful executions)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def progress_reporter(out: TextIO) -> tuple[Progress, Callable[[], None]]:
    """A live rich progress bar on a terminal, else one line per finished cell; returns the
    callback and a function to call at the end."""
    if out.isatty():
        from rich.console import Console
        from rich.progress import Progress as Bar

        bar = Bar(transient=True, console=Console(file=out))
        bar.start()
        tasks: dict[str, Any] = {}

        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done)

        return update, bar.stop

    def line(label: str, done: int, total: int) -> None:
        if done == total:
            print(f"{label}: {done}/{total} done", file=out, flush=True)

    return line, lambda: None


def run_bench(
    registry: PluginRegistry,
    request: Callable[[], ExecutionRequest],
    *,
    backends: Sequence[str],
    concurrency: Sequence[int],
    executions: int,
) -> list[BenchCell]:
    """:func:`measure` in a trio run of its own, with progress on stderr."""
    update, finish = progress_reporter(sys.stderr)
    try:
        return trio.run(
            lambda: measure(
                registry,
                request,
                backends=backends,
                concurrency=concurrency,
                executions=executions,
                progress=update,
            )
        )
    finally:
        finish()
