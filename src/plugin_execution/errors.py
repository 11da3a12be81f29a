"""Structured execution errors with stable codes and a lossless wire form.

Every failure a caller can see is an :class:`ExecutionError` subclass carrying a stable
``code``, the ids of the execution it belongs to, a human message and free-form ``details``
(exit codes, queue sizes, remote tracebacks...). ``to_dict()`` / ``ExecutionError.from_dict()``
round-trip an error across a process boundary to the same subclass.

Reporting a failure never fails: :func:`handler_error` turns whatever a handler raised into a
``HANDLER_ERROR`` even when the exception's ``__str__``/``__repr__`` raise or its traceback
cannot be formatted, and :func:`plain_error` gives an error's wire form as bounded plain data
(messages over :data:`MAX_MESSAGE_CHARS` and texts over :data:`MAX_TEXT_CHARS` are cut in
the middle).

This module imports only the standard library: worker children load it at start-up.
``__all__`` lists the error classes; the rendering helpers and limits are imported by name.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar

__all__ = [
    "AbortedError",
    "AcquireTimeoutError",
    "BackendClosedError",
    "ExecutionError",
    "ExecutionTimeoutError",
    "HandlerContractError",
    "HandlerError",
    "HandlerNotFoundError",
    "InvalidRequestError",
    "ManifestError",
    "PermissionDeniedError",
    "PluginNotFoundError",
    "PluginQuarantinedError",
    "QueueFullError",
    "ValidationError",
    "WorkerCrashedError",
    "WorkerUnhealthyError",
    "WorkspaceError",
]

#: The longest error message carried across a process boundary, in characters: a handler's
#: 10 MB message is cut in the middle to this (the cut says how much went).
MAX_MESSAGE_CHARS = 16 * 1024
#: The same for a traceback and any other text in an error's details.
MAX_TEXT_CHARS = 64 * 1024
#: The longest code, and the longest id (the protocol's ``MAX_ID_LENGTH``), an error keeps.
MAX_CODE_CHARS = 64
MAX_ID_CHARS = 256

_BY_CODE: dict[str, type[ExecutionError]] = {}


class ExecutionError(Exception):
    """Base of every error an execution can end with.

    ``code`` is stable and safe to branch on; ``message`` is for humans; ``details`` holds
    the error-specific fields (also reachable as attributes on the subclasses).
    """

    code: ClassVar[str] = "UNKNOWN_ERROR"

    def __init__(
        self,
        message: str,
        *,
        execution_id: str | None = None,
        plugin_id: str | None = None,
        handler_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.execution_id = execution_id
        self.plugin_id = plugin_id
        self.handler_id = handler_id
        self.details: dict[str, Any] = dict(details) if details else {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            _BY_CODE[cls.code] = cls

    def __str__(self) -> str:
        where = "/".join(p for p in (self.plugin_id, self.handler_id) if p)
        return f"[{self.code}] {self.message}" + (f" ({where})" if where else "")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, execution_id={self.execution_id!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (ExecutionError.from_dict, (self.to_dict(),))

    def with_ids(
        self, *, execution_id: str | None, plugin_id: str | None, handler_id: str | None
    ) -> ExecutionError:
        """Fill in ids that are still missing (errors raised deep inside know none)."""
        self.execution_id = self.execution_id or execution_id
        self.plugin_id = self.plugin_id or plugin_id
        self.handler_id = self.handler_id or handler_id
        return self

    def to_dict(self) -> dict[str, Any]:
        """The wire form: plain data that any serializer carries."""
        return {
            "code": self.code,
            "message": self.message,
            "execution_id": self.execution_id,
            "plugin_id": self.plugin_id,
            "handler_id": self.handler_id,
            "details": dict(self.details),
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ExecutionError:
        """Rebuild an error from :meth:`to_dict` output, as the subclass its code names.

        An unknown code (a newer peer) gives a plain ``ExecutionError`` that keeps the code.
        Never raises: what is not of its type (a peer's bug, or a hostile worker) is made
        text, and details that are not a mapping are kept as text under ``"malformed"``.
        Bounded as :func:`plain_error` bounds what goes on the wire, whoever made ``data``
        (a plugin can write its own frames on its worker's socket): the code cut to
        :data:`MAX_CODE_CHARS`, ids to :data:`MAX_ID_CHARS`, the message to
        :data:`MAX_MESSAGE_CHARS`, the details to plain data of about 1 MiB.
        """
        code = data.get("code") or ExecutionError.code
        if type(code) is not str:
            code = safe_text(code, MAX_CODE_CHARS)
        code = code[:MAX_CODE_CHARS]
        cls = _BY_CODE.get(code, ExecutionError)
        err = cls.__new__(cls)
        details = data.get("details") or {}
        if isinstance(details, dict):
            details = _plain_dict(details, 0, [_DETAILS_BUDGET])
        else:
            details = {"malformed": safe_text(details, MAX_TEXT_CHARS)}
        ExecutionError.__init__(
            err,
            safe_text(data.get("message", ""), MAX_MESSAGE_CHARS),
            execution_id=_text_or_none(data.get("execution_id")),
            plugin_id=_text_or_none(data.get("plugin_id")),
            handler_id=_text_or_none(data.get("handler_id")),
            details=details,
        )
        if cls is ExecutionError and code != ExecutionError.code:
            err.code = code  # type: ignore[misc]
        return err


# -- rendering: reporting a failure must not fail ---------------------------------------------


def _text_or_none(value: object) -> str | None:
    if value is None:
        return None
    if type(value) is str:
        return value[:MAX_ID_CHARS]
    return safe_text(value, 200)


def known_code(code: str) -> bool:
    """Whether ``code`` is the code of an error class this process defines."""
    return code in _BY_CODE


def clip_text(text: str, limit: int) -> str:
    """``text``, or when longer than ``limit`` characters its head and tail around a note
    of how much was cut (both ends: a message's start and a traceback's last lines matter)."""
    if len(text) <= limit:
        return text
    note = f"\n... [{len(text) - limit} characters cut] ...\n"
    keep = max(limit - len(note), 0)
    head = keep // 2
    return text[:head] + note + text[len(text) - (keep - head) :]


def _type_name(value: object, qualified: bool = False) -> str:
    kind = type(value)
    try:
        name = kind.__qualname__
        if qualified:
            name = f"{kind.__module__}.{name}"
        if type(name) is str:
            return name
    except BaseException:  # a hostile metaclass
        pass
    return "<unnamed type>"


def safe_text(value: object, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``str(value)``, else ``repr(value)``, else a placeholder naming its type: never raises
    (whatever ``__str__``/``__repr__`` raise, ``BaseException`` included), at most ``limit``
    characters (see :func:`clip_text`)."""
    for render in (str, repr):
        try:
            text = render(value)
            return clip_text(str.__str__(text), limit)  # a str subclass's methods: not called
        except BaseException:
            continue
    return f"<{_type_name(value)} object: str() and repr() failed>"


def format_traceback(
    exc: BaseException, limit: int = MAX_TEXT_CHARS, *, trim_runtime: bool = False
) -> str:
    """The traceback text of ``exc`` (its chain included), at most ``limit`` characters.

    With ``trim_runtime``, each traceback of the chain starts at the plugin's own code: the
    frames before its first plugin frame that belong to the runtime (see :func:`_is_runtime`)
    are dropped and a first line says how many. A traceback with no plugin frame at all (an
    import that failed in importlib, say) is kept whole; frames after the first plugin frame
    (the standard library, a ``ctx`` service) always stay.

    Never raises: when :mod:`traceback` fails (a frame whose source lookup raises, say), the
    frames are listed without source lines and the failure is named.
    """
    import traceback

    try:
        report = traceback.TracebackException(type(exc), exc, exc.__traceback__, compact=True)
        omitted = _trim_runtime_frames(report) if trim_runtime else 0
        return clip_text(_omitted_note(omitted) + "".join(report.format()), limit)
    except BaseException as failure:
        why = f"{_type_name(failure)}: {safe_text(failure, 200)}"
    lines = ["Traceback (most recent call last):\n"]
    try:
        frames: list[tuple[str, int, str]] = []
        tb = exc.__traceback__
        while tb is not None and len(frames) < 1000:
            code = tb.tb_frame.f_code
            frames.append((code.co_filename, tb.tb_lineno, code.co_name))
            tb = tb.tb_next
        skip = _runtime_prefix([name for name, _, _ in frames]) if trim_runtime else 0
        if skip:
            lines.insert(0, _omitted_note(skip))
        lines += [f'  File "{f}", line {n}, in {name}\n' for f, n, name in frames[skip:]]
    except BaseException:
        lines.append("  <the frames could not be listed>\n")
    lines.append(f"{_type_name(exc)}: {safe_text(exc)}\n")
    lines.append(f"(the traceback module failed on this exception: {why})\n")
    return clip_text("".join(lines), limit)


def _omitted_note(count: int) -> str:
    if not count:
        return ""
    return f"({count} frame{'s' if count != 1 else ''} of the plugin-execution runtime omitted)\n"


#: The standard library's dirs, and the bundled example plugins' dir: computed on first use.
_STDLIB_PATHS: tuple[tuple[str, ...], str] | None = None


def _runtime_paths() -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """(the runtime's package dirs, the standard library's dirs, the bundled examples' dir).

    The packages are looked up each time, as loaded now: a worker may load trio late."""
    import os
    import sys

    global _STDLIB_PATHS
    if _STDLIB_PATHS is None:
        import sysconfig

        paths = sysconfig.get_paths()
        stdlib = {os.path.join(paths[key], "") for key in ("stdlib", "platstdlib") if key in paths}
        examples = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "")
        _STDLIB_PATHS = (tuple(stdlib), examples)
    packages = []
    for name in ("plugin_execution", "trio", "outcome", "sniffio"):
        for path in getattr(sys.modules.get(name), "__path__", None) or ():
            packages.append(os.path.join(os.path.abspath(path), ""))
    return tuple(packages), *_STDLIB_PATHS


def _is_runtime(filename: str) -> bool:
    """Whether a frame of ``filename`` is the runtime's rather than the plugin's: this
    package (but its bundled example plugins), trio and its helpers, importlib's frozen
    modules and the standard library (but what is installed in its site-packages)."""
    packages, stdlib, examples = _runtime_paths()
    if filename.startswith("<frozen "):
        return True
    if filename.startswith(examples):
        return False
    if filename.startswith(packages):
        return True
    return (
        filename.startswith(stdlib)
        and "/site-packages/" not in filename
        and "/dist-packages/" not in filename
    )


def _runtime_prefix(filenames: list[str]) -> int:
    """How many leading frames to drop: the runtime's before the first plugin frame, none
    when there is no plugin frame."""
    for index, filename in enumerate(filenames):
        if not _is_runtime(filename):
            return index
    return 0


def _trim_runtime_frames(report: Any) -> int:
    """Drop the leading runtime frames of each traceback in ``report`` (a
    ``traceback.TracebackException``: its causes, contexts and group members too); return
    how many were dropped."""
    from traceback import StackSummary

    omitted = 0
    pending: list[Any] = [report]
    seen: set[int] = set()
    while pending and len(seen) < 1000:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        skip = _runtime_prefix([frame.filename for frame in node.stack])
        if skip:
            node.stack = StackSummary.from_list(list(node.stack)[skip:])
            omitted += skip
        pending += [node.__cause__, node.__context__, *(getattr(node, "exceptions", None) or ())]
    return omitted


def handler_error(exc: BaseException, what: str = "handler raised") -> HandlerError:
    """``HANDLER_ERROR`` for what a handler raised: its type's qualified name, its message
    and its traceback text from the plugin's first frame on (see :func:`format_traceback`),
    each as far as it can be rendered. Never raises."""
    name = _type_name(exc)
    return HandlerError(
        f"{what} {name}: {safe_text(exc)}",
        details={
            "remote_type": _type_name(exc, qualified=True),
            "remote_traceback": format_traceback(exc, trim_runtime=True),
        },
    )


_MAX_PLAIN_DEPTH = 16
#: About how much of an error's details goes on the wire (texts count their length, other
#: values 8): a few of the longest texts, or many small values, never a frame's worth.
_DETAILS_BUDGET = 1 << 20


def _plain(value: object, depth: int, budget: list[int]) -> object:
    """``value`` as msgpack-safe plain data: containers copied, texts clipped, anything
    else (or nested too deep) rendered as text. Charges ``budget[0]`` what it keeps."""
    if type(value) is str:
        value = clip_text(value, MAX_TEXT_CHARS)
        budget[0] -= len(value)
        return value
    if type(value) is bytes:
        value = value[:MAX_TEXT_CHARS]
        budget[0] -= len(value)
        return value
    budget[0] -= 8
    if type(value) is int:
        return value if -(2**63) <= value < 2**64 else safe_text(value, 200)
    if value is None or type(value) is bool or type(value) is float:
        return value
    if depth < _MAX_PLAIN_DEPTH:
        if type(value) is list or type(value) is tuple:
            items: list[object] = []
            for item in value:
                if budget[0] <= 0:
                    items.append(f"... {len(value) - len(items)} more items cut")
                    break
                items.append(_plain(item, depth + 1, budget))
            return items
        if type(value) is dict:
            return _plain_dict(value, depth, budget)
    text = safe_text(value, min(MAX_TEXT_CHARS, max(budget[0], 200)))
    budget[0] -= len(text)
    return text


def _plain_dict(value: dict[Any, Any], depth: int, budget: list[int]) -> dict[str, object]:
    plain: dict[str, object] = {}
    for key, item in value.items():
        if budget[0] <= 0:
            plain["..."] = f"{len(value) - len(plain)} more entries cut"
            break
        plain[key if type(key) is str else safe_text(key, 200)] = _plain(item, depth + 1, budget)
    return plain


def plain_error(error: ExecutionError) -> dict[str, Any]:
    """``error.to_dict()`` fit for the wire whatever the error holds: plain data only (other
    values become their text), the message cut to :data:`MAX_MESSAGE_CHARS`, every text in
    the details to :data:`MAX_TEXT_CHARS`, about 1 MiB of details in all. Never raises: an error
    whose ``to_dict`` fails is reported as the ``HANDLER_ERROR`` of that failure."""
    try:
        data = error.to_dict()
        code = data.get("code")
        details = data.get("details")
        return {
            "code": code if type(code) is str else safe_text(code, 200),
            "message": safe_text(data.get("message"), MAX_MESSAGE_CHARS),
            "execution_id": _text_or_none(data.get("execution_id")),
            "plugin_id": _text_or_none(data.get("plugin_id")),
            "handler_id": _text_or_none(data.get("handler_id")),
            "details": _plain_dict(dict(details), 0, [_DETAILS_BUDGET])
            if isinstance(details, dict)
            else {"malformed": safe_text(details, MAX_TEXT_CHARS)},
        }
    except BaseException as exc:
        return plain_error(handler_error(exc, "reporting the error failed:"))


def _detail(name: str, doc: str) -> property:
    return property(lambda self: self.details.get(name), doc=doc)


class PluginNotFoundError(ExecutionError):
    """No plugin with the requested id is registered."""

    code = "PLUGIN_NOT_FOUND"


class HandlerNotFoundError(ExecutionError):
    """The plugin has no such handler, or its entry does not import."""

    code = "HANDLER_NOT_FOUND"
    entry = _detail("entry", "The import path that was tried, when there was one.")


class ExecutionTimeoutError(ExecutionError, TimeoutError):
    """The execution's time limit passed; the work was stopped."""

    code = "TIMEOUT"
    timeout_s = _detail("timeout_s", "The limit that was exceeded, in seconds.")


class PermissionDeniedError(ExecutionError):
    """The handler asked for something its manifest does not grant."""

    code = "PERMISSION_DENIED"
    permission = _detail("permission", "The permission that would be needed, e.g. 'fs.read'.")
    resource = _detail("resource", "What was asked for: a path, a host, a name.")


class QueueFullError(ExecutionError):
    """The pool's queue is at capacity; the request was rejected without running."""

    code = "QUEUE_FULL"
    queue_size = _detail("queue_size", "Requests waiting when this one arrived.")
    capacity = _detail("capacity", "The queue's capacity.")


class WorkerCrashedError(ExecutionError):
    """The worker thread or process died while running the execution."""

    code = "WORKER_CRASHED"
    exit_code = _detail("exit_code", "The process exit status, when it exited.")
    signal = _detail("signal", "The number of the signal that killed it, when one did.")
    stderr_tail = _detail("stderr_tail", "The last lines the process wrote to stderr.")


class HandlerError(ExecutionError):
    """The handler raised an exception."""

    code = "HANDLER_ERROR"
    remote_type = _detail("remote_type", "Qualified name of the exception the handler raised.")
    remote_traceback = _detail(
        "remote_traceback",
        "The handler's traceback, as text, from the plugin's first frame on (see "
        "format_traceback).",
    )


class InvalidRequestError(ExecutionError):
    """The request is malformed: bad ids, unserializable input, bad options."""

    code = "INVALID_REQUEST"


class BackendClosedError(ExecutionError):
    """The backend is not running (never entered, shutting down, or closed)."""

    code = "BACKEND_CLOSED"


class ValidationError(ExecutionError):
    """Input or output does not match the handler's declared types."""

    code = "VALIDATION_ERROR"
    field = _detail("field", "The offending field, when one could be named.")


class HandlerContractError(ExecutionError):
    """The entry imports but is not a callable handler (or has no ``execute``)."""

    code = "HANDLER_CONTRACT_ERROR"


class AbortedError(ExecutionError):
    """The execution was cancelled by its caller: the wire form of a cancellation."""

    code = "ABORTED"


class WorkspaceError(ExecutionError):
    """A workspace directory could not be leased or released."""

    code = "WORKSPACE_ERROR"


class AcquireTimeoutError(ExecutionError):
    """No worker became free within the pool's acquire timeout."""

    code = "ACQUIRE_TIMEOUT"


class WorkerUnhealthyError(ExecutionError):
    """The worker failed its health check (hung, over memory) and was replaced."""

    code = "WORKER_UNHEALTHY"


class ManifestError(ExecutionError):
    """A plugin manifest is malformed; raised when it is loaded, naming the bad key."""

    code = "INVALID_MANIFEST"


class PluginQuarantinedError(ExecutionError):
    """The plugin's executions kept killing their workers: its crash breaker is open and
    it is refused, without running, until the cool-down ends (see docs/backends.md)."""

    code = "PLUGIN_QUARANTINED"
    retry_after_s = _detail("retry_after_s", "Seconds until the plugin is tried again.")
