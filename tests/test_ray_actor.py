"""The worker side of the Ray backend without Ray: its runtime on a thread, over a socketpair.

What an actor does differently from a thread worker is testable here: a workspace whose parent
the node lacks is made under the node's temporary directory and removed after its execution.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import trio
from tests.test_process import job

from plugin_execution import PluginRegistry
from plugin_execution.host.process import serve_worker, worker_socketpair
from plugin_execution.worker.ray_actor import _ActorWorker


class _Thread:
    """A child-like for the actor's runtime on a thread (as worker/in_thread.py)."""

    def __init__(self, worker: _ActorWorker) -> None:
        self.pid = os.getpid()
        self.returncode: int | None = None
        self._ended = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def run() -> None:
            try:
                worker.serve()
            finally:
                token.run_sync_soon(self._end)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def _end(self) -> None:
        self.returncode = 0
        self._ended.set()

    async def wait(self) -> int:
        await self._ended.wait()
        return 0

    def kill(self) -> None:
        pass


async def test_a_workspace_the_node_lacks_is_made_there_and_removed(
    registry: PluginRegistry, tmp_path: Path
) -> None:
    host, actor = worker_socketpair()
    thread = _Thread(_ActorWorker(actor, []))
    elsewhere = tmp_path / "not-on-this-node" / "ws-1"  # its parent does not exist here
    async with serve_worker(thread, host, None, kill=thread.kill) as worker:
        result = await worker.execute(
            job(registry, "use_workspace"), backend="test", workspace=str(elsewhere)
        )
    made = Path(result.output["dir"])
    assert made.name == "ws-1" and made.parent != elsewhere.parent
    assert result.output["mode"] == "0o700"
    assert not made.exists() and not made.parent.exists()  # removed, with the node's root
    assert not elsewhere.parent.exists()


async def test_batch_members_get_the_node_s_workspaces_too(
    registry: PluginRegistry, tmp_path: Path
) -> None:
    host, actor = worker_socketpair()
    thread = _Thread(_ActorWorker(actor, []))
    elsewhere = tmp_path / "not-on-this-node"  # its parent does not exist here
    async with serve_worker(thread, host, None, kill=thread.kill) as worker:
        jobs = [(job(registry, "use_workspace"), str(elsewhere / f"ws-{n}")) for n in range(3)]
        outcomes = await worker.collect_batch(worker.submit_batch(jobs), backend="test")
    made = [Path(outcome.output["dir"]) for outcome in outcomes]  # type: ignore[union-attr]
    assert [path.name for path in made] == ["ws-0", "ws-1", "ws-2"]
    assert all(path.parent != elsewhere for path in made)
    assert not any(path.exists() for path in made)  # each removed after its execution
    assert not elsewhere.exists()
