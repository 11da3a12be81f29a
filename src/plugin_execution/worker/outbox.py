"""Everything a worker says to its host goes through here: one whole frame at a time.

:class:`FrameWriter` owns the write side of the protocol socket. Several threads write (the
reader answering ``ping``, executor threads finishing, the trio loop's handlers emitting events
and channel messages), so each frame is written under one lock, whole, or not at all once the
socket is closed. :class:`FrameSink` (a context's events) and :class:`CapturedStream` (what a
handler prints) turn what handlers produce into ``event`` frames.

Standard library only at import time: worker children load this module at start-up.
"""

from __future__ import annotations

import os
import threading
import time
from _contextvars import ContextVar  # the C module: a fresh child skips contextvars.py

from ._wire import FrameEncoder, unsent

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Protocol

    from ..types import ExecutionEvent

    class Send(Protocol):
        """:meth:`FrameWriter.send`, as handed to what writes frames."""

        def __call__(self, tag: str, fields: dict[str, Any], big: str | None = None) -> None: ...


__all__ = ["CapturedStream", "FrameSink", "FrameWriter", "current_execution"]

#: The execution whose handler runs in this context (a thread, or a task of the trio loop):
#: where its prints go. Set by the execution runner around each handler call.
current_execution: ContextVar[str | None] = ContextVar("execution", default=None)


class FrameWriter:
    """Writes frames to the protocol socket ``fd``; ``release`` closes it (see :meth:`close`).

    Plain ``os.write`` / ``os.writev``: the ``socket`` module costs a fresh child ~6 ms of
    imports.
    """

    __slots__ = ("_closed", "_encode", "_encode_message", "_fd", "_lock", "_release")

    def __init__(self, fd: int, release: Callable[[], None]) -> None:
        self._fd = fd
        self._release = release
        self._lock = threading.Lock()
        self._closed = False
        encoder = FrameEncoder()
        self._encode = encoder.encode
        self._encode_message = encoder.encode_message

    def send(self, tag: str, fields: dict[str, Any], big: str | None = None) -> None:
        """Write one frame, whole. ``big``: a field that may hold a big ``bytes`` value,
        then written from where it lies (see ``encode_parts``). After :meth:`close` it
        writes nothing: a handler a thread worker abandoned may finish long after, and the
        fd number may belong to another socket or file by then. Never raises for a host
        that is gone (the reader sees EOF and stops the worker); raises ``WireError`` (a
        ``ValueError``) or what msgpack raises for fields it cannot encode."""
        self._write(self._encode(tag, fields, big))

    def send_message(self, message: dict[str, Any], big: str | None = None) -> None:
        """:meth:`send` for a whole message map, ``"t"`` first, whose fields are not checked
        (see ``FrameEncoder.encode_message``): an execution's answer."""
        self._write(self._encode_message(message, big))

    def _write(self, frame: bytes | list[bytes]) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                if isinstance(frame, bytes):  # the usual case: one write takes it all
                    try:
                        sent = os.write(self._fd, frame)
                    except BlockingIOError:
                        sent = 0
                    if sent == len(frame):
                        return
                    parts = unsent([frame], sent)
                else:
                    parts = unsent(frame, 0)
                while parts:
                    try:
                        sent = os.writev(self._fd, parts)
                    except BlockingIOError:  # the loop reads: the fd is non-blocking
                        _wait_writable(self._fd)
                        continue
                    parts = unsent(parts, sent)
            except OSError:
                pass  # the host is gone; the reader sees EOF and stops the worker

    def close(self) -> None:
        """Release the fd, once no frame can be written to it any more. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._release()


def _wait_writable(fd: int) -> None:
    import select

    select.select((), (fd,), ())


class FrameSink:
    """Sends a context's events to the host as ``event`` frames (a context's ``EventSink``)."""

    __slots__ = ("_execution_id", "_send")

    def __init__(self, send: Send, execution_id: str) -> None:
        self._send = send
        self._execution_id = execution_id

    def emit(self, kind: str, data: Any) -> None:
        self._send(
            "event",
            {
                "execution_id": self._execution_id,
                "kind": kind,
                "data": data,
                "timestamp": time.time(),
            },
        )

    def deliver_nowait(self, event: ExecutionEvent) -> None:
        self._send(
            "event",
            {
                "execution_id": self._execution_id,
                "kind": event.kind,
                "data": event.data,
                "timestamp": event.timestamp,
            },
        )

    async def aemit(self, kind: str, data: Any) -> None:
        self.emit(kind, data)


class CapturedStream:
    """A text stream that turns a handler's prints into ``log`` events, line by line.

    The worker's ``sys.stdout`` and ``sys.stderr``; a write outside any execution (the
    runtime's own, or a thread a handler left behind) goes to fd 2 as it is.
    """

    def __init__(self, send: Send, name: str) -> None:
        self._send = send
        self._name = name
        self._partial: dict[str, str] = {}
        self.encoding = "utf-8"

    def write(self, text: str) -> int:
        execution_id = current_execution.get()
        if execution_id is None:
            os.write(2, text.encode("utf-8", "replace"))
            return len(text)
        buffered = self._partial.pop(execution_id, "") + text
        *lines, rest = buffered.split("\n")
        for line in lines:
            self._emit(execution_id, line)
        if rest:
            self._partial[execution_id] = rest
        return len(text)

    def finish(self, execution_id: str) -> None:
        """The execution ended: send its last line even without a newline."""
        rest = self._partial.pop(execution_id, None)
        if rest:
            self._emit(execution_id, rest)

    def _emit(self, execution_id: str, line: str) -> None:
        self._send(
            "event",
            {
                "execution_id": execution_id,
                "kind": "log",
                "data": {"stream": self._name, "message": line},
                "timestamp": time.time(),
            },
        )

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return 2
