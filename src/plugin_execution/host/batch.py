"""Batched dispatch: several executions to one worker in one frame (``protocol.Batch``).

``backend.map`` sends a worker its executions a batch at a time. The batch costs the host
one write and one frame instead of one per execution, and the worker one read; the worker
runs the members one after another and writes each answer before it starts the next, so
the host reads many answers per wake-up and, should the worker be lost, knows that the
members after the first unanswered one never started (``NOT_STARTED``: they can run again
elsewhere). Every member keeps its own deadline, cancellation and events, as in
:meth:`Calls.submit <plugin_execution.host.calls.Calls.submit>`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import msgpack  # type: ignore[import-untyped,unused-ignore]
import trio

from ..converter import converter
from ..errors import ExecutionError, InvalidRequestError
from ..protocol import ProtocolError
from ..types import ExecutionResult, check_serializable
from .calls import LOST, Pending, execute_fields

if TYPE_CHECKING:
    from ..backends.job import Job
    from ..protocol import Connection
    from .calls import Calls

__all__ = ["NOT_STARTED", "Outcome", "SubmittedBatch", "collect_batch", "submit_batch"]


class _NotStarted:
    def __repr__(self) -> str:
        return "NOT_STARTED"


#: A member the worker never started: it was behind the member running when the worker was
#: lost. Nothing of it ran, so it may run again elsewhere.
NOT_STARTED: Final = _NotStarted()

Outcome = ExecutionResult | ExecutionError | _NotStarted


class SubmittedBatch:
    """A batch sent (or being sent) to one worker: a :class:`Pending` per member, in order,
    ``sent`` saying which went in the frame; ``unsent`` what the socket has still to take;
    ``lost_at``, once collected: the member running when the worker was lost (None: not lost
    while the batch ran)."""

    __slots__ = ("lost_at", "pendings", "sent", "unsent")

    def __init__(self) -> None:
        self.lost_at: int | None = None
        self.pendings: list[Pending] = []
        self.sent: list[bool] = []
        self.unsent: tuple[list[memoryview], bool] | None = None


def _pack(protocol: Connection, fields: dict[str, Any]) -> bytes:
    """A member's msgpack map (an ``execute``'s fields, in the order ``Execute`` has them);
    a context holding values the converter makes plain takes the general path, as
    ``Connection.send`` does. Raises ``InvalidRequestError``."""
    try:
        return protocol.pack_plain(fields)
    except (TypeError, ValueError, OverflowError):
        check_serializable(fields["input"], "input")  # input must be plain data everywhere
    try:
        packed: bytes = msgpack.packb(fields, use_bin_type=True, default=converter.unstructure)
    except Exception as exc:
        raise InvalidRequestError(f"the request cannot be sent: {exc}") from None
    return packed


def submit_batch(
    calls: Calls,
    jobs: list[tuple[Job, str | None]],
    *,
    cancel_grace: float = 1.0,
    linger: float = 0.0,
) -> SubmittedBatch:
    """Send ``jobs`` (each with its workspace) to the worker in one ``Batch`` frame, without
    waiting; pair with :func:`collect_batch`. A member that cannot be sent (not plain data,
    or too big for the frame with the others) fails alone, with ``InvalidRequestError``, or
    comes back ``NOT_STARTED`` (see :func:`collect_batch`); one already past its deadline
    is not sent (``TIMEOUT``). No checkpoint."""
    if calls.lost.is_set():
        raise calls.connection.crash_error()
    connection = calls.connection
    protocol = connection.protocol
    room = protocol.max_frame_size - 64
    now = trio.current_time()
    batch = SubmittedBatch()
    members: list[bytes] = []
    pendings, sent = batch.pendings, batch.sent
    tracked: list[Pending] = []
    for job, workspace in jobs:
        pending = Pending(job, cancel_grace, 0.0)
        pendings.append(pending)
        sent.append(False)
        if job.deadline <= now:  # it waited in the queue past its deadline: never starts
            pending.finish(error=job.timeout_error(" while waiting for a worker"))
            continue
        fields = execute_fields(job, workspace, now)
        fields["warmup"] = False
        fields["linger"] = 0.0
        try:
            member = _pack(protocol, fields)
        except InvalidRequestError as exc:
            pending.finish(error=exc)
            continue
        if len(member) > room:
            if not members:  # too big even alone
                size = connection.protocol.max_frame_size
                pending.finish(
                    error=InvalidRequestError(
                        f"the request cannot be sent: its frame of over {len(member)} bytes "
                        f"is over the {size}-byte limit"
                    )
                )
            continue  # not sent: NOT_STARTED, to run again
        room -= len(member)
        members.append(member)
        sent[-1] = True
        tracked.append(pending)
    calls.track_all(tracked)
    if members:
        try:
            frame = connection.protocol.send_batch(members, linger)
        except ProtocolError as exc:  # cannot happen with the room kept above; say so
            raise InvalidRequestError(f"the batch cannot be sent: {exc}") from None
        batch.unsent = connection.write_now(frame)
    return batch


async def collect_batch(calls: Calls, batch: SubmittedBatch, *, backend: str) -> list[Outcome]:
    """Wait for every member of a :func:`submit_batch` and return what came of each, in
    order: its result, its error (``TIMEOUT`` past its deadline), or :data:`NOT_STARTED`.
    When the worker is lost, the first member without an answer gets the crash error (it
    was running) and those after it ``NOT_STARTED``; members not sent are ``NOT_STARTED``.
    Cancellation stops every member still in flight (``Cancel``; a kill after the cancel
    grace), then re-raises."""
    connection = calls.connection
    tracked = [p for p, sent in zip(batch.pendings, batch.sent, strict=True) if sent]
    try:
        if batch.unsent is not None:
            unsent, batch.unsent = batch.unsent, None
            try:
                with trio.CancelScope(shield=True):  # never half a frame: it would end the worker
                    await connection.send_rest(*unsent)
            except ExecutionError:
                pass  # the worker is lost: the first member gets the crash, as below
        sent_now = True
        for pending in tracked:
            if not pending.done:  # answered already (read with an earlier one): no wait
                await connection.wait_for(pending, sent=sent_now)
            sent_now = False
    except trio.Cancelled:
        with trio.CancelScope(shield=True):
            await _stop_all(calls, tracked)
        raise
    finally:
        answers = [(p.job, *calls.untrack(p)) for p in tracked]
    outcomes: list[Outcome] = []
    lost_at: int | None = None  # the member running when the worker was lost
    answered = iter(answers)
    for index, (pending, sent) in enumerate(zip(batch.pendings, batch.sent, strict=True)):
        if not sent:
            outcomes.append(pending.error if pending.error is not None else NOT_STARTED)
            continue
        job, value, error = next(answered)
        assert job is not None
        if value is LOST or not pending.done:  # no answer: the worker was lost first
            if lost_at is not None:
                outcomes.append(NOT_STARTED)
                continue
            lost_at = index
        outcomes.append(calls.outcome(pending, job, value, error, backend))
    batch.lost_at = lost_at
    return outcomes


async def _stop_all(calls: Calls, pendings: list[Pending]) -> None:
    """Stop the members still in flight, together (see ``Calls.stop_execution``)."""
    async with trio.open_nursery() as nursery:
        for pending in pendings:
            if not pending.done and pending.job is not None:
                execution_id = pending.job.request.execution_id
                nursery.start_soon(
                    calls.stop_execution, execution_id, pending, pending.cancel_grace
                )
