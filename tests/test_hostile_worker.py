"""A hostile worker: a real child process on the real socket that speaks generated frames.

The host must never crash or hang, whatever a worker sends: truncated frames, lengths over
the limit, unknown tags, fields of the wrong type, messages only a host sends, replies to
ids nobody asked about, duplicate results, garbage after a valid frame. The execution
waiting on that worker gets exactly what the stream says first: its answer, or
``WORKER_CRASHED`` naming the protocol error (the worker is declared lost, killed and
reaped); a worker that goes silent gets ``TIMEOUT``. The pool replaces such a worker.

The child (``CHILD``) sends a first part (usually a valid ``hello``), waits for the host's
``execute``, sends the rest in chunks, then exits or lingers until the host closes the
socket or kills it.
"""

from __future__ import annotations

import base64
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import msgpack  # type: ignore[import-untyped,unused-ignore]
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from plugin_execution import ExecutionRequest, ExecutionResult, PluginRegistry
from plugin_execution.backends.base import Job
from plugin_execution.errors import ExecutionError, WorkerCrashedError
from plugin_execution.host import launchers
from plugin_execution.host import process as process_module
from plugin_execution.host.process import open_worker_process
from plugin_execution.protocol import MESSAGE_TYPES, PROTOCOL_VERSION
from plugin_execution.types import ExecutionEvent

PLUGINS = Path(__file__).parent / "plugins"
P = "tests.sample"
OURS = "hostile-execution"
MAX_FRAME = 64 * 1024 * 1024

CHILD = """
import base64, os, sys, time
fd = int(sys.argv[1])
first, rest = (base64.b64decode(part) for part in sys.argv[2:4])
chunk, linger = int(sys.argv[4]), sys.argv[5] == "1"

def send(data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:chunk]):]

try:
    send(first)
    if os.read(fd, 1 << 20):  # the host's execute
        send(rest)
    while linger and os.read(fd, 1 << 20):
        pass
except OSError:
    pass  # the host closed the connection: it saw enough
os._exit(0)
"""


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def message(tag: str, **fields: Any) -> bytes:
    return frame(msgpack.packb({"t": tag, **fields}, use_bin_type=True))


HELLO = message("hello", version=PROTOCOL_VERSION, pid=os.getpid())

# -- strategies -----------------------------------------------------------------------------

names = st.text(st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=12)
other_ids = names.filter(lambda s: s != OURS)
small_ints = st.integers(-1000, 1000)
plain = st.recursive(
    st.none()
    | st.booleans()
    | small_ints
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=8,
)
# An error's wire form as a worker may send it: usually right, sometimes anything at all.
error_dicts = st.one_of(
    st.builds(
        lambda code, message, details: {"code": code, "message": message, "details": details},
        st.sampled_from(["HANDLER_ERROR", "TIMEOUT", "NO_SUCH_CODE"]) | plain,
        st.text(max_size=30) | plain,
        st.dictionaries(names, plain, max_size=3) | plain,
    ),
    st.dictionaries(names, plain, max_size=4),
)


def _ignored_frames() -> st.SearchStrategy[bytes]:
    """Valid messages that concern no caller: the host reads and drops them (or, for a
    platform call of an execution it does not run, refuses it)."""
    return st.one_of(
        st.builds(
            lambda eid, kind, data, ts: message(
                "event", execution_id=eid, kind=kind, data=data, timestamp=ts
            ),
            other_ids | st.just(OURS),
            names,
            plain,
            st.floats(allow_nan=False),
        ),
        st.builds(
            lambda eid, out: message(
                "result", execution_id=eid, output=out, duration_s=0.1, metadata={}
            ),
            other_ids,
            plain,
        ),
        st.builds(
            lambda eid, err: message("error", execution_id=eid, error=err), other_ids, error_dicts
        ),
        st.builds(
            lambda seq: message("pong", seq=seq, rss_bytes=1, uptime_s=1.0, in_flight=0),
            small_ints,
        ),
        st.builds(
            lambda p, h, ok: message("warmed", plugin_id=p, handler_id=h, ok=ok, error=None),
            names,
            names,
            st.booleans(),
        ),
        st.builds(
            lambda c, d: message("ch_data", channel_id=c, data=d), names, st.text() | st.binary()
        ),
        st.builds(
            lambda c, code, r: message("ch_close", channel_id=c, code=code, reason=r),
            names,
            small_ints,
            names,
        ),
        st.builds(lambda c, n: message("ch_credit", channel_id=c, messages=n), names, small_ints),
        st.builds(
            lambda call, eid: message(
                "pcall",
                call_id=call,
                execution_id=eid,
                service="cache",
                method="get",
                args=[],
                kwargs={},
            ),
            st.integers(0, 1000),
            other_ids,
        ),
    )


def _type_text(tp: Any) -> str:
    """A field's annotation as written: ``str | None``, ``dict[str, Any]``."""
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _valid_fields(tag: str) -> dict[str, Any]:
    """Fields of the right types for a message of ``tag`` (what the wrong ones replace)."""
    samples = {"str": "x", "int": 1, "float": 1.0, "bool": True, "dict": {}, "list": []}
    fields = {}
    for field in attrs.fields(MESSAGE_TYPES[tag]):
        text = _type_text(field.type)
        fields[field.name] = next((v for k, v in samples.items() if text.startswith(k)), None)
    return fields


WORKER_TAGS = [
    "event",
    "result",
    "error",
    "pong",
    "warmed",
    "ch_data",
    "ch_close",
    "ch_credit",
    "pcall",
]


@st.composite
def wrong_types(draw: st.DrawFn) -> bytes:
    """A worker's message with one typed field holding a value of another type."""
    tag = draw(st.sampled_from(WORKER_TAGS))
    fields = _valid_fields(tag)
    typed = {f.name: _type_text(f.type) for f in attrs.fields(MESSAGE_TYPES[tag])}
    name = draw(st.sampled_from(sorted(n for n, t in typed.items() if t != "Any")))
    fields[name] = "not a list" if typed[name].startswith("list") else [["wrong"]]
    return message(tag, **fields)


def _violations() -> st.SearchStrategy[bytes]:
    """Complete frames that break the protocol: each must make the host drop the worker."""
    return st.one_of(
        wrong_types(),
        st.builds(
            lambda tag: message(tag, execution_id=OURS),
            names.filter(lambda t: t not in MESSAGE_TYPES),
        ),
        # what only a host sends, and a second hello
        st.sampled_from(
            [
                message("ping", seq=1),
                message("shutdown"),
                message("cancel", execution_id=OURS, reason=""),
                HELLO,
            ]
        ),
        # a field missing, a field too many
        st.just(message("result", execution_id=OURS, output=1, duration_s=0.1)),
        st.just(
            message("result", execution_id=OURS, output=1, duration_s=0.1, metadata={}, extra=1)
        ),
        # not a map, not msgpack, a length over the limit
        st.builds(lambda v: frame(msgpack.packb(v)), st.lists(small_ints) | small_ints | st.text()),
        st.just(frame(b"\xc1")),
        st.just(frame(msgpack.packb({"t": "result"}) + b"trailing bytes")),
        st.integers(MAX_FRAME + 1, 2**32 - 1).map(lambda n: n.to_bytes(4, "big")),
    )


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, drawn with the given weights (the first shrinks best)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


@attrs.frozen
class Answer:
    """A valid answer to our execution: the result's output, or the error's wire form."""

    data: bytes
    output: Any = None
    error: dict[str, Any] | None = None


answers = st.one_of(
    st.builds(
        lambda out: Answer(
            message("result", execution_id=OURS, output=out, duration_s=0.5, metadata={}), out
        ),
        plain,
    ),
    st.builds(
        lambda err: Answer(message("error", execution_id=OURS, error=err), error=err), error_dicts
    ),
)


@attrs.frozen
class Script:
    """What the hostile child sends, and what the host must make of it."""

    first: bytes  # before the execute: a valid hello, or a violation
    frames: list[tuple[str, Any]]  # ("ignored" | "violation", bytes) or ("answer", Answer)
    tail: bytes  # after the frames: nothing, garbage, or a cut frame
    chunk: int
    linger: bool

    @property
    def rest(self) -> bytes:
        parts = [item.data if kind == "answer" else item for kind, item in self.frames]
        return b"".join(parts) + self.tail

    def argv(self, fd: int) -> list[str]:
        encode = lambda data: base64.b64encode(data).decode()  # noqa: E731
        return [
            sys.executable, "-I", "-S", "-c", CHILD, str(fd),
            encode(self.first), encode(self.rest), str(self.chunk), "1" if self.linger else "0",
        ]  # fmt: skip


scripts = st.builds(
    Script,
    first=weighted(
        (8, st.just(HELLO)),
        (1, st.just(message("hello", version=PROTOCOL_VERSION + 1, pid=1))),
        (1, _violations()),
        (1, _ignored_frames()),  # a valid message, but before the hello
    ),
    frames=st.lists(
        weighted(
            (3, st.tuples(st.just("ignored"), _ignored_frames())),
            (1, st.tuples(st.just("violation"), _violations())),
            (2, st.tuples(st.just("answer"), answers)),
        ),
        max_size=5,
    ),
    tail=st.one_of(
        st.just(b""),
        st.binary(min_size=1, max_size=40),
        st.builds(
            lambda n, part: n.to_bytes(4, "big") + part[: n - 1],
            st.integers(2, 100),
            st.binary(max_size=50),
        ),
    ),
    chunk=st.sampled_from([1, 3, 7, 64, 1 << 20]),
    linger=st.sampled_from([False, False, False, True]),
)

# -- the host against it ----------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.events: list[ExecutionEvent] = []

    def deliver_nowait(self, event: ExecutionEvent) -> None:
        self.events.append(event)


def make_job(registry: PluginRegistry, timeout: float) -> Job:
    request = ExecutionRequest(plugin_id=P, handler_id="echo", input=1, execution_id=OURS)
    return Job(
        request,
        registry.resolve(P, "echo"),
        timeout,
        trio.current_time() + timeout,
        Sink(),
        time.perf_counter(),
    )


@asynccontextmanager
async def hostile_worker_argv(
    monkeypatch: pytest.MonkeyPatch, script: Script
) -> AsyncIterator[None]:
    """``open_worker_process`` starts the hostile child instead of a worker."""
    with monkeypatch.context() as patch:
        patch.setattr(
            process_module, "worker_argv", lambda limits, fd, sandbox=None: script.argv(fd)
        )
        yield


def expected(script: Script) -> tuple[str, Any]:
    """What the caller must get: ("result", output), ("error", code), ("crash", why) or
    ("silence", None) (no word on our execution: it times out, or the worker's end is seen)."""
    if script.first != HELLO:
        return "crash", ("protocol error",)
    for kind, item in script.frames:
        if kind == "violation":
            return "crash", ("protocol error",)
        if kind == "answer":
            if item.error is None:
                return "result", item.output
            return "error", ExecutionError.from_dict(item.error).code
    if script.tail and not script.linger:
        # Garbage, or a frame cut short by the exit. A child that exits leaving bytes from
        # the host unread (a reply to its platform call) resets the connection instead:
        # read after the bytes it sent, the reset is the end the host sees.
        return "crash", ("protocol error", "connection lost: [Errno 104]")
    return "silence", None


def check(script: Script, outcome: ExecutionResult | ExecutionError) -> None:
    kind, value = expected(script)
    code = getattr(outcome, "code", None)
    event(f"expected {kind}; got {code or 'a result'}")
    if code == "TIMEOUT" and (kind, value) != ("error", "TIMEOUT"):
        # a lingering worker may stay silent, or be slow to answer on a loaded machine
        assert script.linger, (kind, value)
    elif kind == "result":
        assert isinstance(outcome, ExecutionResult), outcome
        assert outcome.output == value
    elif kind == "error":
        assert isinstance(outcome, ExecutionError) and outcome.code == value, outcome
    elif kind == "crash":
        assert isinstance(outcome, WorkerCrashedError), outcome
        assert any(why in outcome.message for why in value), outcome.message
    else:  # it closed the connection without a word on our execution (or sent garbage)
        assert isinstance(outcome, WorkerCrashedError), outcome


@pytest.fixture(scope="module")
def sample_registry() -> PluginRegistry:
    return PluginRegistry.from_paths(PLUGINS)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=scripts)
async def test_the_host_survives_any_frames_a_worker_sends(
    script: Script, sample_registry: PluginRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker that lingers may be left waiting on: a short deadline then; otherwise the
    # answer is sure to come, and a generous one keeps a loaded machine from mattering.
    timeout = 1.0 if script.linger else 60.0
    outcome: ExecutionResult | ExecutionError
    with trio.fail_after(120):  # the host never hangs
        async with hostile_worker_argv(monkeypatch, script):
            try:
                async with open_worker_process(start_timeout=60, close_grace=0.5) as worker:
                    job = make_job(sample_registry, timeout)
                    try:
                        outcome = await worker.execute(job, backend="test", cancel_grace=0.2)
                    except ExecutionError as exc:
                        outcome = exc
                    await _then_lost_if_it_broke_the_protocol(script, worker, outcome)
            except ExecutionError as exc:  # the handshake failed
                outcome = exc
        check(script, outcome)


async def _then_lost_if_it_broke_the_protocol(
    script: Script, worker: Any, outcome: ExecutionResult | ExecutionError
) -> None:
    """A worker that sent a bad frame, even after its answer, is dropped by the next use."""
    if not any(kind == "violation" for kind, _ in script.frames):
        return
    with trio.move_on_after(30):
        with pytest.raises(WorkerCrashedError):
            await worker.ping()  # the fake never answers a ping: only the loss ends this
        assert worker.lost.is_set()
        if not isinstance(outcome, ExecutionError) or outcome.code != "TIMEOUT":
            assert "protocol error" in worker.crash_error().message  # not killed: dropped
        return
    raise AssertionError("a worker that broke the protocol was not dropped")


# -- the pool replaces it -------------------------------------------------------------------

RESULT = message(
    "result", execution_id=OURS, output="from the hostile worker", duration_s=0.1, metadata={}
)
POOL_SCRIPTS = {
    "a field of the wrong type": (
        message("result", execution_id=OURS, output=1, duration_s="1", metadata={}),
        True,
    ),
    "an unknown tag": (message("resultat", execution_id=OURS), True),
    "a length over the limit": ((MAX_FRAME + 1).to_bytes(4, "big"), True),
    "a message only a host sends": (message("execute", execution_id=OURS), True),
    "garbage after a valid result": (RESULT + b"\x00\x00\x00\x02\xc1\xc1", True),
    "a duplicate result and one for nobody, then its exit": (
        RESULT
        + RESULT
        + message("result", execution_id="nobody", output=0, duration_s=0.1, metadata={}),
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(POOL_SCRIPTS))
async def test_the_pool_replaces_a_worker_that_breaks_the_protocol(
    name: str, monkeypatch: pytest.MonkeyPatch, sample_registry: PluginRegistry, tmp_path: Path
) -> None:
    from plugin_execution import create_execution_backend

    rest, linger = POOL_SCRIPTS[name]
    script = Script(first=HELLO, frames=[], tail=rest, chunk=1 << 20, linger=linger)
    hostile: list[int] = []  # the fd the hostile child got: the pool's first worker
    real_argv, real_open = process_module.worker_argv, launchers.open_worker_process

    def argv(limits: Any, fd: int, sandbox: Any = None) -> list[str]:
        if hostile:
            return real_argv(limits, fd, sandbox)
        hostile.append(fd)
        return script.argv(fd)

    def open_worker(**options: Any) -> Any:
        if not hostile:
            options["zygote"] = None  # spawned, so through worker_argv
        return real_open(**options)

    monkeypatch.setattr(process_module, "worker_argv", argv)
    monkeypatch.setattr(launchers, "open_worker_process", open_worker)
    async with create_execution_backend(
        type="worker-pool",
        registry=sample_registry,
        workspace=tmp_path / "workspaces",
        min_workers=1,
        max_workers=1,
    ) as backend:
        with trio.fail_after(60):
            request = ExecutionRequest(plugin_id=P, handler_id="echo", input=1, execution_id=OURS)
            first = await backend.execute(request, raise_errors=False)
            if name.startswith(("garbage", "a duplicate")):
                assert first.ok and first.output == "from the hostile worker"
                hostile_pid = int(str(first.worker_id).rpartition("-")[2])
            else:
                assert first.error is not None and first.error.code == "WORKER_CRASHED"
                assert "protocol error" in first.error.message
                hostile_pid = first.error.details["pid"]
            assert hostile, "the first worker was not the hostile one"
            # the hostile worker is gone: the next caller is served by its replacement. (One
            # that exits right after its answer may be handed the next caller before its
            # exit is seen: that caller gets WORKER_CRASHED, as with any worker dying idle.)
            whoami = ExecutionRequest(plugin_id=P, handler_id="whoami")
            after = await backend.execute(whoami, raise_errors=False)
            if not linger and after.error is not None:
                assert after.error.code == "WORKER_CRASHED", after.error
                after = await backend.execute(whoami, raise_errors=False)
            assert after.ok and after.output["pid"] != hostile_pid, after
            assert (await backend.health()).healthy
