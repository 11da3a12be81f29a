"""WorkerHandle and WorkerLauncher: what the backends need of a worker, whatever it is.

A *worker handle* is the host's grip on one worker that speaks the worker protocol: a child
process (spawned, or forked by a zygote), a thread of the host, or (later) a remote actor.
The pool and the subprocess backend see workers only through it: they submit executions and
collect their results, ping, warm up, bridge channels, cancel, kill, wait for the end, and
ask why a worker died (:attr:`WorkerHandle.exit_cause`, :meth:`WorkerHandle.crash_error`).

A *launcher* starts handles of one kind: ``async with launcher.open() as handle`` yields a
handle that completed its handshake, and when the block exits the worker has been stopped
and reaped. Its background ``run`` keeps what its handles share (the pool's zygote).

Types only: this module imports nothing at run time beyond ``typing``, so anything may name
these interfaces without an import cycle.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import select

    import trio

    from ..backends.job import Job
    from ..errors import ExecutionError
    from ..protocol import ChannelClose, ChannelCredit, ChannelData, Pong
    from ..types import ExecutionResult

__all__ = ["ChannelEndpoint", "ExitCause", "Submitted", "WorkerHandle", "WorkerLauncher"]

#: Why a worker ended (``None`` while it runs):
#:
#: - ``"killed"``: the host killed it (:meth:`WorkerHandle.kill`: a timeout, a quota, a failed
#:   health check, a shutdown);
#: - ``"orphaned"``: killed because what started it (its zygote) died: not its work's doing;
#: - ``"outside"``: SIGKILLed by someone else (an operator, the kernel's OOM killer): whose
#:   fault it was is unknown;
#: - ``"closed"``: it exited when the host asked it to (:meth:`WorkerHandle.aclose`);
#: - ``"exited"``: it ended on its own (a crash, an exit status, a closed connection).
ExitCause = Literal["killed", "orphaned", "outside", "closed", "exited"]


class Submitted(Protocol):
    """An execution submitted to a worker, to be collected (opaque to the caller)."""


class ChannelEndpoint(Protocol):
    """The host's side of one channel bridged to a worker (``channels/bridge.py``): the
    worker's channel messages for it are handed to ``on_message`` as they are read."""

    channel_id: str

    def on_message(self, msg: ChannelData | ChannelCredit | ChannelClose) -> None: ...


class WorkerHandle(Protocol):
    """One started worker. See the module docstring; :class:`~.process.WorkerProcess` is the
    implementation for every worker that speaks the protocol over a socket."""

    #: A name for logs and results (``ExecutionResult.worker_id``).
    worker_id: str
    #: Set once the worker is gone: every request waiting on it has failed.
    lost: trio.Event
    #: Channel sessions bridged to the worker, by channel id (``channels/bridge.py``).
    channels: dict[str, ChannelEndpoint]
    #: Plugin ids of what it ran when it was lost: non-empty when the work is the likely cause.
    lost_running: tuple[str, ...]

    @property
    def pid(self) -> int | None:
        """Its OS process id; None when there is no process the host can see (a thread)."""

    @property
    def executions(self) -> int:
        """Executions submitted to it so far."""

    @property
    def in_flight(self) -> int:
        """Executions it is running now."""

    @property
    def alive(self) -> bool:
        """False once it is lost, killed, or said it is exiting: give it no work."""

    @property
    def killed(self) -> bool:
        """True once the host killed it."""

    @property
    def exiting(self) -> bool:
        """True once it reported an execution failed with ``WORKER_CRASHED``: it exits."""

    @property
    def exit_cause(self) -> ExitCause | None:
        """Why it ended (see :data:`ExitCause`); None while it runs."""

    @property
    def spin_ok(self) -> bool:
        """Whether polling for its answers pays (a CPU of its own, no GIL shared)."""

    def crash_error(self) -> ExecutionError:
        """A fresh error saying why it was lost (or that it is not available)."""

    def stderr_tail(self, lines: int = 20) -> str:
        """The last lines it wrote to its stderr ("" when it has none the host sees)."""

    def submit(
        self,
        job: Job,
        *,
        workspace: str | None = None,
        cancel_grace: float = 1.0,
        linger: float = 0.0,
    ) -> Submitted:
        """Send ``job`` now without waiting; pair with :meth:`collect`. No checkpoint."""

    def collect(
        self, pending: Any, *, backend: str, sent_now: bool = True
    ) -> Awaitable[ExecutionResult]:
        """Wait for a submission's result. Cancellation stops the execution (``Cancel``,
        then a kill after the cancel grace) and re-raises."""

    def submit_batch(
        self, jobs: list[tuple[Job, str | None]], *, cancel_grace: float = 1.0, linger: float = 0.0
    ) -> Any:
        """Send ``jobs`` (with their workspaces) in one frame, run one after another; pair
        with :meth:`collect_batch`. No checkpoint (see ``host/batch.py``)."""

    def collect_batch(self, batch: Any, *, backend: str) -> Awaitable[list[Any]]:
        """Wait for a batch's outcomes, in order: a result, an error, or ``NOT_STARTED``."""

    def execute(
        self,
        job: Job,
        *,
        backend: str,
        workspace: str | None = None,
        cancel_grace: float = 1.0,
        spin: float = 0.0,
    ) -> Awaitable[ExecutionResult]:
        """:meth:`submit` then :meth:`collect`."""

    async def ping(self) -> Pong:
        """Round trip to the worker; raises ``WorkerCrashedError`` when it dies first."""

    async def warmup(self, plugin_id: str, handler_id: str, entry: str, root: str | None) -> None:
        """Import a handler and run its ``warmup()`` hook in the worker."""

    async def send(self, msg: Any) -> None:
        """Send one protocol message (a channel's open or credit)."""

    def send_channel_data(self, channel_id: str, data: str | bytes) -> Awaitable[None]:
        """Send one ``ChannelData`` (the bridge's pump)."""

    def channel_sent(self, bridge: ChannelEndpoint, now: float, window: float) -> bool:
        """Note a channel's message out; True when no other channel sent within ``window``."""

    def read_for_reader(self, seconds: float) -> None:
        """Poll briefly for an answer on behalf of the parked reader (no checkpoint)."""

    def spin_with(self, peers: select.poll) -> None:
        """Join a pool's poll set: a caller polling here gives way to another's answer."""

    def spin_alone(self) -> None:
        """Leave the poll set of :meth:`spin_with`."""

    def kill(self, error: ExecutionError | None = None) -> None:
        """Stop the worker by force; what it runs fails with ``error`` (default: crashed)."""

    async def aclose(self, grace: float = 2.0) -> None:
        """Ask it to exit, kill it after ``grace``, wait for its end. Shielded."""

    async def wait(self) -> None:
        """Wait until it is lost (exited, killed or its connection broke)."""


class WorkerLauncher(Protocol):
    """Starts worker handles of one kind (process, thread...)."""

    #: The kind of worker it starts (``"process"``, ``"thread"``).
    kind: str

    def open(self) -> AbstractAsyncContextManager[WorkerHandle]:
        """Start a worker; yield its handle once it is ready; stop and reap it on exit.
        Raises ``WorkerCrashedError`` when it fails to start."""

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Keep what the handles share (a zygote) until cancelled; ``task_status.started()``
        once the first is up; returns at once when there is nothing to keep."""

    def health_details(self) -> Mapping[str, Any]:
        """What the backend's ``health()`` shows of the launcher."""
