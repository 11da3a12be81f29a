"""The host <-> worker protocol: protocol.Connection, and the worker's lean mirror _wire."""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import sys
import types
from collections.abc import Iterable
from typing import Any, Union, get_args, get_origin

import attrs
import msgpack  # type: ignore[import-untyped,unused-ignore]
import pytest
from hypothesis import given
from hypothesis import strategies as st

from plugin_execution import protocol
from plugin_execution.converter import converter
from plugin_execution.errors import HandlerError, HandlerNotFoundError
from plugin_execution.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Batch,
    Cancel,
    ChannelClose,
    ChannelCredit,
    ChannelData,
    ChannelOpen,
    Connection,
    Error,
    Event,
    Execute,
    Hello,
    Message,
    Ping,
    PlatformCall,
    PlatformReply,
    Pong,
    ProtocolError,
    Result,
    Role,
    Shutdown,
    Warmed,
    Warmup,
)
from plugin_execution.worker import _wire

HELLO = Hello(version=PROTOCOL_VERSION, pid=4242)
FROM_HOST: set[type[Message]] = {
    Execute,
    Batch,
    Cancel,
    Ping,
    Shutdown,
    Warmup,
    ChannelOpen,
    ChannelData,
    ChannelClose,
    ChannelCredit,
    PlatformReply,
}
FROM_WORKER: set[type[Message]] = {
    Hello,
    Event,
    Result,
    Error,
    Pong,
    Warmed,
    ChannelData,
    ChannelClose,
    ChannelCredit,
    PlatformCall,
}
PEER: dict[Role, Role] = {"host": "worker", "worker": "host"}

EXECUTE = Execute(
    execution_id="e-1",
    plugin_id="acme.tools",
    handler_id="run",
    entry="acme.tools.handlers:run",
    root="/srv/plugins/acme",
    input={"args": ["--verbose"], "blob": b"\x00\xff", "mixed": [1, 2.5, None, True]},
    context={"host": "cli", "trace": {"id": "t-1"}},
    workspace="/tmp/ws/e-1",
    timeout=30.0,
    warmup=True,
)
RESULT = Result(
    execution_id="e-1",
    output={"text": "héllo ✓", 7: "int keys survive"},
    duration_s=0.25,
    metadata={"warm": False, "pid": 4242},
)
PONG = Pong(seq=7, rss_bytes=50_000_000, uptime_s=12.5, in_flight=2)
SAMPLES: list[Message] = [
    HELLO,
    EXECUTE,
    Batch(
        executes=[
            {**attrs.asdict(EXECUTE), "warmup": False},
            {**attrs.asdict(EXECUTE), "execution_id": "e-2", "input": None, "timeout": 1.5},
        ],
        linger=0.0001,
    ),
    Event(execution_id="e-1", kind="progress", data={"done": 1, "total": 3}, timestamp=1.7e9),
    RESULT,
    Error.from_exception("e-1", HandlerError("boom", details={"remote_type": "ValueError"})),
    Cancel(execution_id="e-1", reason="caller left"),
    Ping(seq=7),
    PONG,
    Shutdown(),
    Warmup(plugin_id="acme.tools", handler_id="run", entry="acme.tools:run", root=None),
    Warmed(
        plugin_id="acme.tools",
        handler_id="run",
        ok=False,
        error=HandlerNotFoundError("no module named acme").to_dict(),
    ),
    ChannelOpen(
        channel_id="c-1",
        execution_id="e-2",
        path="/chat",
        headers={"origin": "https://x.org"},
        window=64,
        principal={"user": "ada"},
    ),
    ChannelData(channel_id="c-1", data="text stays str"),
    ChannelData(channel_id="c-1", data=b"\x00bytes stay bytes"),
    ChannelClose(channel_id="c-1", code=1000, reason="bye"),
    ChannelCredit(channel_id="c-1", messages=32),
    PlatformCall(
        call_id=1,
        execution_id="e-1",
        service="cache",
        method="get",
        args=["key"],
        kwargs={"default": None},
    ),
    PlatformReply(call_id=1, ok=True, value={"v": [1, 2]}, error=None),
]
EVENT = SAMPLES[3]
#: One encoder for every test that uses it: its packer is reused from frame to frame.
SHARED_ENCODER = _wire.FrameEncoder()
SENT = [
    pytest.param(msg, role, id=f"{msg.tag}-from-{role}")
    for msg in SAMPLES
    for role, sent in (("host", FROM_HOST), ("worker", FROM_WORKER))
    if type(msg) in sent
]


def pair(sender_role: Role, *, greet: bool = True) -> tuple[Connection, Connection]:
    """A sender and a receiver, past the handshake when the worker is the sender."""
    sender, receiver = Connection(sender_role), Connection(PEER[sender_role])
    if greet and sender_role == "worker":
        receiver.receive_data(sender.send(HELLO))
        assert receiver.next_message() == HELLO
    return sender, receiver


def host() -> Connection:
    """A host connection that has received its worker's Hello."""
    return pair("worker")[1]


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def packed(obj: Any) -> bytes:
    return frame(msgpack.packb(obj, use_bin_type=True))


def fields_of(msg: Message) -> dict[str, Any]:
    return attrs.asdict(msg, recurse=False)


def receive(conn: Connection, data: bytes) -> list[Message]:
    conn.receive_data(data)
    return list(conn)


def wire_decode(data: bytes, decoder: _wire.FrameDecoder | None = None) -> list[Any]:
    decoder = decoder or _wire.FrameDecoder()
    decoder.feed(data)
    return list(decoder)


# -- every message, both codecs ----------------------------------------------------------


def test_the_samples_cover_every_message_type() -> None:
    assert {type(msg) for msg in SAMPLES} == set(MESSAGE_TYPES.values())
    assert {cls.tag: cls for cls in FROM_HOST | FROM_WORKER} == MESSAGE_TYPES


def test_wire_mirrors_the_protocol_definition() -> None:
    assert _wire.PROTOCOL_VERSION == PROTOCOL_VERSION
    assert _wire.DEFAULT_MAX_FRAME_SIZE == DEFAULT_MAX_FRAME_SIZE
    definition = {
        tag: frozenset(f.name for f in attrs.fields(cls)) for tag, cls in MESSAGE_TYPES.items()
    }
    assert definition == _wire.FIELDS


@pytest.mark.parametrize(("msg", "role"), SENT)
def test_every_message_round_trips_through_connections(msg: Message, role: Role) -> None:
    sender, receiver = pair(role, greet=msg != HELLO)
    assert receive(receiver, sender.send(msg)) == [msg]


@pytest.mark.parametrize(("msg", "role"), SENT)
def test_wire_writes_the_same_bytes_as_the_connection(msg: Message, role: Role) -> None:
    sender, _ = pair(role, greet=msg != HELLO)
    expected = sender.send(msg)
    assert _wire.encode(msg.tag, fields_of(msg)) == expected
    assert SHARED_ENCODER.encode(msg.tag, fields_of(msg)) == expected
    assert SHARED_ENCODER.encode_message({"t": msg.tag, **fields_of(msg)}) == expected


@pytest.mark.parametrize(("msg", "role"), SENT)
def test_wire_reads_what_a_connection_sends(msg: Message, role: Role) -> None:
    sender, _ = pair(role, greet=msg != HELLO)
    assert wire_decode(sender.send(msg)) == [(msg.tag, fields_of(msg))]


@pytest.mark.parametrize(("msg", "role"), SENT)
def test_a_connection_reads_what_wire_sends(msg: Message, role: Role) -> None:
    receiver = Connection(PEER[role]) if msg == HELLO else pair(role)[1]
    assert receive(receiver, _wire.encode(msg.tag, fields_of(msg))) == [msg]


# -- hypothesis: arbitrary messages, chunkings and garbage -------------------------------

plain_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
plain = st.recursive(
    plain_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    if tp is Any:
        return plain
    simple: dict[Any, st.SearchStrategy[Any]] = {
        str: st.text(max_size=12),
        bytes: st.binary(max_size=12),
        int: st.integers(min_value=-(2**63), max_value=2**64 - 1),
        float: st.floats(allow_nan=False),
        bool: st.booleans(),
        type(None): st.none(),
    }
    if tp in simple:
        return simple[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return st.one_of(*map(strategy_for, args))
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=4)
    assert origin is dict, tp
    return st.dictionaries(strategy_for(args[0]), strategy_for(args[1]), max_size=4)


def messages(classes: Iterable[type[Message]]) -> st.SearchStrategy[Message]:
    return st.one_of(
        *(
            st.builds(cls, **{f.name: strategy_for(f.type) for f in attrs.fields(cls)})
            for cls in sorted(classes, key=lambda cls: cls.tag)
        )
    )


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@given(st.data(), st.sampled_from(["host", "worker"]))
def test_any_chunking_of_a_valid_stream_gives_the_same_messages(
    data: st.DataObject, role: Role
) -> None:
    sent = data.draw(st.lists(messages((FROM_HOST if role == "host" else FROM_WORKER) - {Hello})))
    sender, receiver = pair(role)
    stream = b"".join(map(sender.send, sent))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    received: list[Message] = []
    for chunk in split(stream, cuts):
        if chunk:
            received += receive(receiver, chunk)
    received += receive(receiver, b"")  # a clean EOF at a frame boundary
    assert received == sent
    assert receiver.eof_received
    assert receiver.next_message() is None


@given(st.data(), st.sampled_from(["host", "worker"]))
def test_wire_agrees_with_connections_on_arbitrary_messages(
    data: st.DataObject, role: Role
) -> None:
    msg = data.draw(messages((FROM_HOST if role == "host" else FROM_WORKER) - {Hello}))
    sender, receiver = pair(role)
    encoded = _wire.encode(msg.tag, fields_of(msg))
    assert encoded == sender.send(msg)
    assert SHARED_ENCODER.encode(msg.tag, fields_of(msg)) == encoded  # one Packer for all
    assert wire_decode(encoded) == [(msg.tag, fields_of(msg))]
    assert receive(receiver, encoded) == [msg]


def feed_all(conn: Connection, chunks: Iterable[bytes]) -> None:
    """Feed ``chunks`` then EOF, reading everything; only ProtocolError may escape."""
    for chunk in chunks:
        conn.receive_data(chunk)
        for msg in conn:
            assert isinstance(msg, tuple(MESSAGE_TYPES.values()))
    conn.receive_data(b"")
    list(conn)


def wire_feed_all(chunks: Iterable[bytes], max_frame_size: int) -> None:
    decoder = _wire.FrameDecoder(max_frame_size)
    for chunk in [*chunks, b""]:
        decoder.feed(chunk)
        for tag, fields in decoder:
            assert fields.keys() == _wire.FIELDS[tag]


garbage_maps = st.fixed_dictionaries(
    {"t": st.sampled_from(sorted(MESSAGE_TYPES)) | plain_scalars},
    optional={name: plain for name in sorted(set().union(*_wire.FIELDS.values()))},
)
garbage_frames = st.lists(
    st.binary(max_size=40).map(frame) | (garbage_maps | plain).map(lambda obj: packed(obj)),
    max_size=6,
)
max_sizes = st.sampled_from([16, 1024, DEFAULT_MAX_FRAME_SIZE])


@given(st.lists(st.binary(max_size=64), max_size=6), st.sampled_from(["host", "worker"]), max_sizes)
def test_arbitrary_bytes_raise_only_protocol_errors(
    chunks: list[bytes], role: Role, max_frame_size: int
) -> None:
    with contextlib.suppress(ProtocolError):
        feed_all(Connection(role, max_frame_size=max_frame_size), chunks)


@given(garbage_frames, st.sampled_from(["host", "worker"]), st.booleans(), max_sizes)
def test_well_framed_garbage_raises_only_protocol_errors(
    frames: list[bytes], role: Role, greet: bool, max_frame_size: int
) -> None:
    conn = Connection(role, max_frame_size=max_frame_size)
    with contextlib.suppress(ProtocolError):
        feed_all(conn, [_wire.encode("hello", fields_of(HELLO))] * greet + frames)


@given(st.lists(st.binary(max_size=64), max_size=6), max_sizes)
def test_wire_raises_only_wire_errors_on_arbitrary_bytes(
    chunks: list[bytes], max_frame_size: int
) -> None:
    with contextlib.suppress(_wire.WireError):
        wire_feed_all(chunks, max_frame_size)


@given(garbage_frames, max_sizes)
def test_wire_raises_only_wire_errors_on_well_framed_garbage(
    frames: list[bytes], max_frame_size: int
) -> None:
    with contextlib.suppress(_wire.WireError):
        wire_feed_all(frames, max_frame_size)


# -- each named failure ------------------------------------------------------------------


def test_an_oversize_frame_is_refused_from_its_header_alone() -> None:
    conn = Connection("worker", max_frame_size=100)
    conn.receive_data((101).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match=r"frame of 101 bytes, over the 100-byte limit"):
        conn.next_message()


def test_a_frame_of_exactly_the_limit_is_accepted() -> None:
    data = Connection("host").send(Ping(seq=1))
    conn = Connection("worker", max_frame_size=len(data) - 4)
    assert receive(conn, data) == [Ping(seq=1)]
    with pytest.raises(ProtocolError, match="over the"):
        receive(Connection("worker", max_frame_size=len(data) - 5), data)


def counted_host(max_values: int) -> Connection:
    conn = Connection("host", max_frame_values=max_values)
    assert receive(conn, Connection("worker").send(HELLO)) == [HELLO]
    return conn


def result_frame(output: Any) -> bytes:
    return packed(
        {"t": "result", "execution_id": "e", "output": output, "duration_s": 0.0, "metadata": {}}
    )


@pytest.mark.parametrize(
    "output",
    [
        [{}] * 200,  # the bomb: one byte each on the wire, a dict each decoded
        [[[]]] * 100,
        {str(i): [] for i in range(150)},
        ["ab"] * 300,  # a flat array over the bound: refused from its header
        [b"x" * 300],  # (not: few values, many bytes; see below)
    ],
    ids=["empty maps", "nested arrays", "a map of arrays", "a flat array", "control"],
)
def test_a_frame_decodes_to_a_bounded_number_of_values(output: Any) -> None:
    """Values (maps and arrays with their members) decoded from one frame are counted, so
    a small frame of tiny values (~1 byte each, up to ~64 decoded) cannot make the host
    build far more than its size; the frame limit alone would allow ~72 times it."""
    data = result_frame(output)
    conn = counted_host(256)
    if output == [b"x" * 300]:
        assert [m.output for m in receive(conn, data)] == [output]  # type: ignore[attr-defined]
        return
    with pytest.raises(ProtocolError, match="more than 256 values"):
        receive(conn, data)


def test_frames_under_the_value_bound_decode_whatever_they_hold() -> None:
    """A frame of exactly the bound's count decodes; frames of fewer bytes than half the
    bound cannot hold more values, and are not counted (the usual frame costs nothing)."""
    # the result's map (5 members and itself) and metadata (1): 7; the output 124 arrays (1
    # each) and itself (125): 256 in all
    output = [[]] * 124
    assert [m.output for m in receive(counted_host(256), result_frame(output))] == [output]  # type: ignore[attr-defined]
    with pytest.raises(ProtocolError, match="more than 255 values"):
        receive(counted_host(255), result_frame(output))
    small = [{}] * 40  # 2 * its frame's size under the bound: never counted
    assert len(result_frame(small)) * 2 < 256
    assert [m.output for m in receive(counted_host(256), result_frame(small))] == [small]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("cut", "error"),
    [
        (2, r"inside a frame header \(2 of 4 bytes\)"),
        (7, r"inside a frame \(7 of \d+ bytes received\)"),
    ],
)
def test_a_frame_cut_short_by_eof_is_an_error(cut: int, error: str) -> None:
    conn = Connection("worker")
    conn.receive_data(Connection("host").send(Ping(seq=1))[:cut])
    assert conn.next_message() is None  # just incomplete, until EOF
    conn.receive_data(b"")
    with pytest.raises(ProtocolError, match=error):
        conn.next_message()


def test_a_clean_eof_is_not_an_error() -> None:
    conn = Connection("worker")
    assert not conn.eof_received
    assert receive(conn, Connection("host").send(Ping(seq=1))) == [Ping(seq=1)]
    conn.receive_data(b"")
    assert conn.eof_received
    assert conn.next_message() is None
    with pytest.raises(ProtocolError, match="after EOF"):
        conn.receive_data(b"more")


def test_an_unknown_tag_is_an_error() -> None:
    with pytest.raises(ProtocolError, match=r"unknown message tag 'launch_missiles'"):
        receive(Connection("worker"), packed({"t": "launch_missiles"}))
    with pytest.raises(ProtocolError, match="unknown message tag None"):
        receive(Connection("worker"), packed({"seq": 1}))


def test_a_version_mismatch_names_both_versions() -> None:
    with pytest.raises(ProtocolError, match=r"worker speaks version 2, this host speaks version 1"):
        receive(Connection("host"), packed({"t": "hello", "version": 2, "pid": 1}))


def test_a_host_must_hear_hello_first_and_once() -> None:
    event = {"t": "event", "execution_id": "e", "kind": "log", "data": None, "timestamp": 0.0}
    with pytest.raises(ProtocolError, match=r"must send 'hello' before anything else, not 'event'"):
        receive(Connection("host"), packed(event))
    with pytest.raises(ProtocolError, match="'hello' twice"):
        receive(host(), _wire.encode("hello", fields_of(HELLO)))


def test_messages_travel_one_way_only() -> None:
    execute = next(msg for msg in SAMPLES if isinstance(msg, Execute))
    with pytest.raises(ProtocolError, match="a worker must not send 'execute' messages"):
        receive(host(), _wire.encode("execute", fields_of(execute)))
    with pytest.raises(ProtocolError, match="a host must not send 'pong' messages"):
        receive(Connection("worker"), _wire.encode("pong", fields_of(PONG)))
    with pytest.raises(ProtocolError, match="a host must not send 'result' messages"):
        Connection("host").send(RESULT)
    with pytest.raises(ProtocolError, match="a worker must not send 'ping' messages"):
        pair("worker")[0].send(Ping(seq=1))


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({}, r"required field missing @ \$\.seq"),
        ({"seq": 1, "extra": 2}, r"extra fields found \(extra\) @ \$"),
        ({"seq": "1"}, r"expected int, got str \'1\' @ \$\.seq"),
        ({"seq": True}, r"expected int, got bool True @ \$\.seq"),
        ({"seq": 1.0}, r"expected int, got float 1\.0 @ \$\.seq"),
    ],
)
def test_missing_extra_and_ill_typed_fields_are_errors(fields: dict[str, Any], error: str) -> None:
    with pytest.raises(ProtocolError, match=r"malformed 'ping' message: " + error):
        receive(Connection("worker"), packed({"t": "ping", **fields}))


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("execution_id", 5, r"expected str, got int 5 @ \$\.execution_id"),
        ("root", b"/x", r"expected str \| None, got bytes b\'/x\' @ \$\.root"),
        ("context", [], r"expected dict\[str, Any\], got list \[\] @ \$\.context"),
        ("context", {1: "x"}, r"expected dict\[str, Any\], got dict \{1: \'x\'\} @ \$\.context"),
        ("timeout", "30", r"expected float \| None, got str \'30\' @ \$\.timeout"),
    ],
)
def test_field_types_are_checked_without_coercion(field: str, value: Any, error: str) -> None:
    execute = fields_of(EXECUTE)
    with pytest.raises(ProtocolError, match=error):
        receive(Connection("worker"), packed({"t": "execute", **execute, field: value}))


def test_lenient_where_the_types_allow() -> None:
    # An int is a float; Any takes any plain data; a field with a default may be omitted.
    cancel = receive(Connection("worker"), packed({"t": "cancel", "execution_id": "e"}))
    assert cancel == [Cancel(execution_id="e", reason="")]
    event = {"t": "event", "execution_id": "e", "kind": "k", "data": [{1: b""}], "timestamp": 1}
    assert receive(host(), packed(event)) == [
        Event(execution_id="e", kind="k", data=[{1: b""}], timestamp=1)
    ]


def test_a_payload_that_is_not_a_map_is_an_error() -> None:
    with pytest.raises(ProtocolError, match="a frame holds list, not a map"):
        receive(Connection("worker"), packed(["ping", 1]))


def test_garbage_msgpack_is_an_error() -> None:
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        receive(Connection("worker"), frame(b"\xc1"))
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        receive(Connection("worker"), frame(msgpack.packb({"t": "ping", "seq": 1}) + b"\x00"))


def test_a_failed_connection_stays_failed() -> None:
    conn = Connection("worker")
    conn.receive_data(packed({"t": "nope"}) + Connection("host").send(Ping(seq=1)))
    with pytest.raises(ProtocolError, match="unknown message tag"):
        conn.next_message()
    with pytest.raises(ProtocolError, match="already failed: unknown message tag 'nope'"):
        conn.next_message()


def test_a_worker_must_send_hello_first_and_once() -> None:
    worker = Connection("worker")
    with pytest.raises(ProtocolError, match="must send 'hello' before anything else, not 'pong'"):
        worker.send(PONG)
    worker.send(HELLO)
    with pytest.raises(ProtocolError, match="'hello' only once"):
        worker.send(HELLO)


class Opaque:
    pass


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (Ping(seq=2**64), r"cannot encode 'ping'"),
        (Cancel(execution_id="\ud800"), r"cannot encode 'cancel'"),
        (
            ChannelData(channel_id="c", data=b"x" * 2000),
            r"frame of 2032 bytes is over the 1000-byte limit",
        ),
        (Opaque(), r"not a protocol message"),
    ],
)
def test_what_cannot_be_sent_raises_and_leaves_the_connection_usable(
    message: Any, error: str
) -> None:
    conn = Connection("host", max_frame_size=1000)
    with pytest.raises(ProtocolError, match=error):
        conn.send(message)
    execute = attrs.evolve(EXECUTE, input={"x": Opaque()})
    with pytest.raises(ProtocolError, match=r"cannot encode 'execute': .*Opaque"):
        conn.send(execute)
    assert receive(Connection("worker"), conn.send(Ping(seq=1))) == [Ping(seq=1)]


@attrs.frozen
class Point:
    x: int
    y: int


def test_values_msgpack_cannot_pack_go_through_the_converter() -> None:
    host_conn, worker = pair("host")
    execute = attrs.evolve(EXECUTE, input={"at": Point(1, 2), "tags": frozenset({"a"})})
    (received,) = receive(worker, host_conn.send(execute))
    assert isinstance(received, Execute)
    assert received.input == {"at": {"x": 1, "y": 2}, "tags": ["a"]}


def test_an_error_message_carries_the_exception_back() -> None:
    sent = HandlerError("boom", execution_id="e-1", details={"remote_type": "x.Y"})
    msg = Error.from_exception("e-1", sent)
    worker, host_conn = pair("worker")
    (received,) = receive(host_conn, worker.send(msg))
    assert isinstance(received, Error)
    error = received.exception()
    assert type(error) is HandlerError
    assert error.to_dict() == sent.to_dict()
    assert received.exception() is not error  # a fresh exception for every raise


def test_a_large_frame_in_small_chunks_is_read_in_linear_time() -> None:
    # Quadratic buffering would copy ~8 GiB here; linear buffering copies ~8 MiB.
    blob = bytes(range(256)) * (4 * 1024 * 1024 // 256)
    data = Connection("host").send(ChannelData(channel_id="c", data=blob)) * 2
    conn, decoder = Connection("worker"), _wire.FrameDecoder()
    received: list[Message] = []
    wired: list[Any] = []
    for start in range(0, len(data), 1024):
        received += receive(conn, data[start : start + 1024])
        wired += wire_decode(data[start : start + 1024], decoder)
    assert received == [ChannelData(channel_id="c", data=blob)] * 2
    assert wired == [("ch_data", {"channel_id": "c", "data": blob})] * 2


def test_connection_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="role must be"):
        Connection("client")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_frame_size"):
        Connection("host", max_frame_size=2**32)


# -- the worker's mirror: its own error type ---------------------------------------------


def test_wire_errors_are_value_errors() -> None:
    # The worker runtime turns an unencodable handler output into an error reply by
    # catching what msgpack raises (TypeError, ValueError); WireError must be among them.
    assert issubclass(_wire.WireError, ValueError)


@pytest.mark.parametrize(
    ("tag", "fields", "error"),
    [
        ("launch", {}, r"unknown message tag 'launch'"),
        ("ping", {}, r"'ping' message: missing fields: seq; extra: none"),
        ("ping", {"seq": 1, "x": 2}, r"'ping' message: missing fields: none; extra: 'x'"),
        ("ping", {"seq": Opaque()}, r"cannot encode 'ping': .*Opaque"),
        ("ch_data", {"channel_id": "c", "data": b"x" * 200}, r"over the 100-byte limit"),
    ],
)
def test_wire_refuses_to_encode_bad_messages(tag: str, fields: dict[str, Any], error: str) -> None:
    with pytest.raises(_wire.WireError, match=error):
        _wire.encode(tag, fields, max_frame_size=100)
    with pytest.raises(_wire.WireError, match=error):
        SHARED_ENCODER.encode(tag, fields, max_frame_size=100)
    # Nothing of the refused frame is left in the encoder's packer for the next one.
    assert SHARED_ENCODER.encode("ping", {"seq": 7}) == _wire.encode("ping", {"seq": 7})


def test_an_encoder_refuses_what_a_value_raises_while_packed_and_keeps_nothing_of_it() -> None:
    class Hostile(dict[str, Any]):
        def items(self) -> Any:  # msgpack packs a dict subclass through items()
            raise KeyboardInterrupt

    encoder = _wire.FrameEncoder()
    with pytest.raises(KeyboardInterrupt):
        encoder.encode("event", {**fields_of(EVENT), "data": {"a": [1, 2, Hostile(x=1)]}})
    assert encoder.encode("ping", {"seq": 7}) == _wire.encode("ping", {"seq": 7})


def test_an_encoder_in_use_packs_the_usual_way() -> None:
    # A value's own code may send a frame while the value is packed (a handler's print from
    # a dict subclass's items(), say): the inner frame must not mix with the outer one.
    encoder = _wire.FrameEncoder()
    inner: list[bytes] = []

    class Chatty(dict[str, Any]):
        def items(self) -> Any:
            inner.append(encoder.encode("ping", {"seq": 1}))
            return super().items()

    fields = {**fields_of(EVENT), "data": Chatty(a=1)}
    outer = encoder.encode("event", fields)
    assert inner == [_wire.encode("ping", {"seq": 1})]
    assert outer == _wire.encode("event", {**fields, "data": {"a": 1}})
    assert encoder.encode("ping", {"seq": 2}) == _wire.encode("ping", {"seq": 2})


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ((101).to_bytes(4, "big"), r"announced a frame of 101 bytes, over the 100-byte limit"),
        (packed({"t": "launch"}), r"unknown message tag 'launch'"),
        (packed({"t": "ping"}), r"missing fields: seq"),
        (packed({"t": "ping", "seq": 1, 2: 3}), r"extra: 2"),
        (packed([1]), r"a frame holds list, not a map"),
        (frame(b"\xc1"), r"not valid msgpack"),
    ],
)
def test_wire_refuses_bad_frames(data: bytes, error: str) -> None:
    decoder = _wire.FrameDecoder(max_frame_size=100)
    with pytest.raises(_wire.WireError, match=error):
        wire_decode(data, decoder)
    with pytest.raises(_wire.WireError, match="already failed"):
        next(decoder)


@pytest.mark.parametrize(
    ("cut", "error"), [(3, r"inside a frame header"), (6, r"inside a frame \(6 of")]
)
def test_wire_refuses_a_frame_cut_short_by_eof(cut: int, error: str) -> None:
    decoder = _wire.FrameDecoder()
    assert wire_decode(_wire.encode("ping", {"seq": 1})[:cut], decoder) == []
    decoder.feed(b"")
    with pytest.raises(_wire.WireError, match=error):
        next(decoder)


def test_wire_imports_no_heavy_dependencies() -> None:
    # A worker child starts on _wire; attrs/cattrs/trio would cost it ~100 ms each. This
    # includes the plugin_execution and plugin_execution.worker packages it imports first.
    code = "import sys, plugin_execution.worker._wire; print(*sorted(sys.modules))"
    run = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    )
    loaded = set(run.stdout.split())
    assert "plugin_execution.worker._wire" in loaded
    heavy = {"attr", "attrs", "cattrs", "trio", "plugin_execution.protocol"}
    assert not {name for name in loaded if name.split(".")[0] in heavy or name in heavy}


# -- the host's lean paths: send_execute, and decoding without cattrs ---------------------

EXECUTE_FIELDS = {f: v for f, v in fields_of(EXECUTE).items() if f != "warmup"}


def test_send_execute_writes_the_bytes_send_would() -> None:
    conn = Connection("host")
    data = conn.send_execute(**EXECUTE_FIELDS)
    assert type(data) is bytes
    assert data == conn.send(Execute(**EXECUTE_FIELDS, warmup=False))
    assert receive(Connection("worker"), data) == [attrs.evolve(EXECUTE, warmup=False)]


execute_fields = st.fixed_dictionaries(
    {
        "execution_id": st.text(max_size=12),
        "plugin_id": st.text(max_size=12),
        "handler_id": st.text(max_size=12),
        "entry": st.text(max_size=12),
        "root": st.none() | st.text(max_size=12),
        "input": plain,
        "context": st.dictionaries(st.text(max_size=8), plain, max_size=4),
        "workspace": st.none() | st.text(max_size=12),
        "timeout": st.none() | st.floats(allow_nan=False) | st.integers(0, 2**31),
    }
)


def _member(fields: dict[str, Any]) -> dict[str, Any]:
    """A batch member: an execute's fields, in the order the host packs them."""
    return {**fields, "warmup": False, "linger": 0.0}


@given(st.lists(execute_fields, max_size=20), st.floats(0, 1))
def test_send_batch_writes_the_bytes_send_would(
    members: list[dict[str, Any]], linger: float
) -> None:
    conn = Connection("host")
    executes = [_member(fields) for fields in members]
    data = conn.send_batch([msgpack.packb(m, use_bin_type=True) for m in executes], linger)
    assert data == conn.send(Batch(executes=executes, linger=linger))
    assert receive(Connection("worker"), data) == [Batch(executes=executes, linger=linger)]
    assert wire_decode(data) == [("batch", {"executes": executes, "linger": linger})]


def test_send_batch_refuses_a_frame_over_the_limit() -> None:
    member = msgpack.packb(_member({**EXECUTE_FIELDS, "input": b"x" * 600}), use_bin_type=True)
    conn = Connection("host", max_frame_size=1000)
    assert len(conn.send_batch([member])) < 1000
    with pytest.raises(ProtocolError, match="over the 1000-byte limit"):
        conn.send_batch([member, member])


@given(execute_fields)
def test_send_execute_agrees_with_send_on_arbitrary_plain_fields(fields: dict[str, Any]) -> None:
    conn = Connection("host")
    data = conn.send_execute(**fields)
    assert data == conn.send(Execute(**fields, warmup=False))
    assert receive(Connection("worker"), data) == [Execute(**fields, warmup=False)]


@pytest.mark.parametrize(
    "fields",
    [
        {"input": Point(1, 2)},
        {"input": {"at": Point(1, 2), "tags": frozenset({"a"})}},
        {"input": [{1, 2}]},
        {"input": {"x": Opaque()}},
        {"input": 2**70},
        {"context": {"trace": Point(3, 4)}},
    ],
    ids=["attrs", "nested", "set-in-list", "object", "int-too-big", "context"],
)
def test_send_execute_refuses_what_is_not_plain_data(fields: dict[str, Any]) -> None:
    # The hot path packs plain data only; what the converter could make plain is the
    # caller's to send the general way (send(Execute(...))), or to refuse.
    conn = Connection("host")
    with pytest.raises(ProtocolError, match=r"cannot encode 'execute'"):
        conn.send_execute(**{**EXECUTE_FIELDS, **fields})
    # Nothing was emitted; the connection stays usable.
    assert conn.send_execute(**EXECUTE_FIELDS) == conn.send(attrs.evolve(EXECUTE, warmup=False))


def test_what_send_execute_refuses_the_general_path_converts() -> None:
    # How a worker process sends a context holding values the converter makes plain.
    execute = Execute(**{**EXECUTE_FIELDS, "context": {"at": Point(3, 4)}}, warmup=False)
    (received,) = receive(Connection("worker"), Connection("host").send(execute))
    assert isinstance(received, Execute)
    assert received.context == {"at": converter.unstructure(Point(3, 4))}
    assert received.context == {"at": {"x": 3, "y": 4}}


def test_send_execute_refuses_a_frame_over_the_limit() -> None:
    fields = {**EXECUTE_FIELDS, "input": b"x" * 2000}
    with pytest.raises(ProtocolError, match=r"over the 1000-byte limit"):
        Connection("host", max_frame_size=1000).send_execute(**fields)
    # ... and exactly at the limit, it is taken, as send takes it.
    size = len(Connection("host").send_execute(**fields)) - 4
    data = Connection("host", max_frame_size=size).send_execute(**fields)
    assert data == Connection("host", max_frame_size=size).send(Execute(**fields, warmup=False))
    assert len(data) == size + 4
    with pytest.raises(ProtocolError, match=rf"frame of {size} bytes is over the {size - 1}-byte"):
        Connection("host", max_frame_size=size - 1).send_execute(**fields)


def cattrs_structure(tag: str, fields: dict[str, Any]) -> Message:
    codec = protocol._codec.CODECS[tag]
    return codec.structure(dict(fields), codec.cls)


def same_message(a: Message, b: Message) -> bool:
    """Equal, and every field of the same type (an int stays an int in a float field)."""
    return a == b and all(
        type(getattr(a, f.name)) is type(getattr(b, f.name)) for f in attrs.fields(type(a))
    )


@pytest.mark.parametrize(("msg", "role"), SENT)
def test_decoding_builds_what_cattrs_would(msg: Message, role: Role) -> None:
    sender, receiver = pair(role, greet=msg != HELLO)
    fields = fields_of(msg)
    assert protocol._codec.fast_structure(protocol._codec.CODECS[msg.tag], dict(fields)) is not None
    (received,) = receive(receiver, sender.send(msg))
    assert same_message(received, cattrs_structure(msg.tag, fields))


@pytest.mark.parametrize(
    "fields",
    [
        {"t": "result", "execution_id": "e", "output": [1], "duration_s": 1, "metadata": {}},
        {"t": "pong", "seq": 1, "rss_bytes": 2, "uptime_s": 3, "in_flight": 0},
        {"t": "event", "execution_id": "e", "kind": "k", "data": {1: b""}, "timestamp": 4},
        {"t": "warmed", "plugin_id": "p", "handler_id": "h", "ok": True, "error": None},
        {"t": "error", "execution_id": "e", "error": {"code": "X", "nested": {"a": [1]}}},
    ],
    ids=["result-int-duration", "pong-int-uptime", "event-int-timestamp", "warmed", "error"],
)
def test_a_decoded_worker_message_is_what_cattrs_builds(fields: dict[str, Any]) -> None:
    (received,) = receive(host(), packed(fields))
    expected = cattrs_structure(fields["t"], {k: v for k, v in fields.items() if k != "t"})
    assert same_message(received, expected)  # an int in a float field stays an int


@given(st.data())
def test_the_fast_path_agrees_with_cattrs_on_any_map(data: st.DataObject) -> None:
    # Well-formed maps (from the field types) and garbage maps alike: the fast path either
    # builds exactly what cattrs builds, or declines and leaves the verdict to cattrs.
    tag = data.draw(st.sampled_from(sorted(MESSAGE_TYPES)))
    cls = MESSAGE_TYPES[tag]
    fields = data.draw(
        st.builds(fields_of, messages([cls]))
        | st.fixed_dictionaries(
            {},
            optional={
                **{f.name: strategy_for(f.type) | plain for f in attrs.fields(cls)},
                "extra": plain,
            },
        )
    )
    fast = protocol._codec.fast_structure(protocol._codec.CODECS[tag], dict(fields))
    try:
        slow = cattrs_structure(tag, fields)
    except Exception:
        assert fast is None
    else:
        assert fast is None or same_message(fast, slow)


@given(st.data())
def test_the_result_fast_path_agrees_with_cattrs_on_any_map(data: st.DataObject) -> None:
    # The host's inlined decoding of a worker's Result (structure_result): on well-formed
    # and garbage maps alike, exactly what cattrs builds, or None (cattrs decides).
    fields = data.draw(
        st.builds(fields_of, messages([Result]))
        | st.fixed_dictionaries(
            {},
            optional={
                **{f.name: strategy_for(f.type) | plain for f in attrs.fields(Result)},
                "extra": plain,
                7: plain,
            },
        )
    )
    tag = data.draw(st.sampled_from(["result", "result", "event", 1]))
    fast = protocol._codec.structure_result({"t": tag, **fields})
    try:
        slow = cattrs_structure("result", fields)
    except Exception:
        assert fast is None
    else:
        assert fast is None if tag != "result" else same_message(fast, slow)
    assert fast is None or type(fast) is Result
    if fast is not None:  # and the host's decoding of the frame takes it
        assert same_message(receive(host(), packed({"t": "result", **fields}))[0], fast)


RESULT_FIELDS = {"t": "result", **fields_of(RESULT)}
PONG_FIELDS = {"t": "pong", **fields_of(PONG)}
EVENT_FIELDS = {"t": "event", "execution_id": "e", "kind": "k", "data": None, "timestamp": 1.0}


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        pytest.param(
            {**RESULT_FIELDS, "duration_s": "0.25"},
            r"expected float, got str '0\.25' @ \$\.duration_s",
            id="result-str-duration",
        ),
        pytest.param(
            {**RESULT_FIELDS, "duration_s": True},
            r"expected float, got bool True @ \$\.duration_s",
            id="result-bool-duration",
        ),
        pytest.param(
            {**RESULT_FIELDS, "execution_id": None},
            r"expected str, got NoneType None @ \$\.execution_id",
            id="result-none-id",
        ),
        pytest.param(
            {**RESULT_FIELDS, "metadata": {1: 2}},
            r"expected dict\[str, Any\], got dict \{1: 2\} @ \$\.metadata",
            id="result-int-metadata-key",
        ),
        pytest.param(
            {**RESULT_FIELDS, "extra": 1},
            r"extra fields found \(extra\) @ \$",
            id="result-extra-key",
        ),
        pytest.param(
            {**RESULT_FIELDS, 7: 1},
            # cattrs cannot format this one (it sorts the extra keys): still a ProtocolError,
            # not the TypeError its formatting raises.
            r".+",
            id="result-extra-int-key",
        ),
        pytest.param(
            {k: v for k, v in RESULT_FIELDS.items() if k != "metadata"},
            r"required field missing @ \$\.metadata",
            id="result-missing-key",
        ),
        pytest.param(
            {**RESULT_FIELDS, "execution_id": "e" * 257},
            r"expected an id of at most 256 characters, got 257 @ \$\.execution_id",
            id="result-long-id",
        ),
        pytest.param(
            {**RESULT_FIELDS, "t": "result", "metadata": []},
            r"expected dict\[str, Any\], got list \[\] @ \$\.metadata",
            id="result-list-metadata",
        ),
        pytest.param(
            {"t": "error", "execution_id": "e", "error": "boom"},
            r"expected dict\[str, Any\], got str 'boom' @ \$\.error",
            id="error-str-error",
        ),
        pytest.param(
            {**PONG_FIELDS, "in_flight": True},
            r"expected int, got bool True @ \$\.in_flight",
            id="pong-bool-int",
        ),
        pytest.param(
            {**PONG_FIELDS, "uptime_s": None},
            r"expected float, got NoneType None @ \$\.uptime_s",
            id="pong-none-float",
        ),
        pytest.param(
            {"t": "warmed", "plugin_id": "p", "handler_id": "h", "ok": 1, "error": None},
            r"expected bool, got int 1 @ \$\.ok",
            id="warmed-int-bool",
        ),
        pytest.param(
            {**EVENT_FIELDS, "timestamp": "now"},
            r"expected float, got str 'now' @ \$\.timestamp",
            id="event-str-timestamp",
        ),
    ],
)
def test_malformed_worker_messages_are_explained(fields: dict[Any, Any], error: str) -> None:
    # These skip the fast path (wrong type, extra or missing key): cattrs says what is wrong.
    conn = host()
    with pytest.raises(ProtocolError, match=rf"malformed '{fields['t']}' message: {error}"):
        receive(conn, packed(fields))
    with pytest.raises(ProtocolError, match="already failed"):
        conn.next_message()


# -- big frames: written from where the value lies, read straight into a buffer -----------

BIG_INPUT = bytes(range(256)) * (_wire.BIG // 256 * 3)  # 192 KiB


def test_a_big_bytes_input_is_sent_in_pieces_that_decode_as_one_frame() -> None:
    fields = {**EXECUTE_FIELDS, "input": BIG_INPUT}
    parts = Connection("host").send_execute(**fields)
    assert isinstance(parts, list) and parts[1] is BIG_INPUT  # the value itself, not a copy
    data = b"".join(parts)
    expected = Execute(**fields, warmup=False)
    assert len(data) == len(Connection("host").send(expected))  # the same map, reordered
    assert receive(Connection("worker"), data) == [expected]
    assert wire_decode(data) == [("execute", {**fields, "warmup": False})]


def test_a_big_result_from_the_worker_decodes_on_the_host() -> None:
    fields = {"execution_id": "e", "output": BIG_INPUT, "duration_s": 0.5, "metadata": {"a": 1}}
    parts = _wire.encode_parts("result", fields, "output")
    assert isinstance(parts, list) and parts[1] is BIG_INPUT
    host = Connection("host")
    host.receive_data(_wire.encode("hello", {"version": PROTOCOL_VERSION, "pid": 1}))
    assert [type(m) for m in host] == [Hello]
    assert receive(host, b"".join(parts)) == [Result(**fields)]
    # Small values, and maps too wide for the trick, are packed the usual way.
    assert _wire.encode_parts("result", {**fields, "output": b"x"}, "output") == _wire.encode(
        "result", {**fields, "output": b"x"}
    )
    assert _wire.pack_parts({str(i): i for i in range(15)} | {"v": BIG_INPUT}, "v") is None
    # The worker's encoder: the same pieces, the big value not copied; small ones packed.
    encoder = _wire.FrameEncoder()
    for value in (BIG_INPUT, b"x"):
        message = {"t": "result", **fields, "output": value}
        expected = _wire.encode_parts("result", {**fields, "output": value}, "output")
        assert encoder.encode("result", {**fields, "output": value}, "output") == expected
        assert encoder.encode_message(message, "output") == expected
    assert encoder.encode_message({"t": "result", **fields}, "output")[1] is BIG_INPUT


def test_big_frames_read_into_their_buffer_in_any_pieces() -> None:
    """Reads straight into ``big_view``, reads through ``receive_data``, or both, mixed; two
    big frames in a row (the second smaller: the kept buffer is longer than it) and a small
    one after them."""
    first = Connection("host").send(ChannelData(channel_id="a", data=BIG_INPUT))
    second = Connection("host").send(ChannelData(channel_id="b", data=BIG_INPUT[:-1000]))
    small = Connection("host").send(ChannelData(channel_id="c", data=b"tail"))
    stream = first + second + small
    for direct in (0, 1, 2):  # never / always / every other read into the view
        conn, decoder = Connection("worker"), _wire.FrameDecoder()
        got: list[Message] = []
        wired: list[Any] = []
        pos, n = 0, 0
        while pos < len(stream):
            n += 1
            use_view = direct == 1 or (direct == 2 and n % 2)
            views = conn.big_view(), decoder.big_view()
            if use_view and views[0] is not None and views[1] is not None:
                count = min(len(views[0]), 50_000, len(stream) - pos)
                assert len(views[1]) == len(views[0])
                views[0][:count] = views[1][:count] = stream[pos : pos + count]
                conn.big_filled(count)
                decoder.big_filled(count)
            else:
                count = min(70_000, len(stream) - pos)
                conn.receive_data(stream[pos : pos + count])
                decoder.feed(stream[pos : pos + count])
            pos += count
            got += list(conn)
            wired += list(decoder)
        assert got == [
            ChannelData(channel_id="a", data=BIG_INPUT),
            ChannelData(channel_id="b", data=BIG_INPUT[:-1000]),
            ChannelData(channel_id="c", data=b"tail"),
        ]
        assert [fields["channel_id"] for _, fields in wired] == ["a", "b", "c"]


def test_eof_inside_a_big_frame_is_an_error() -> None:
    data = Connection("host").send(ChannelData(channel_id="a", data=BIG_INPUT))
    conn, decoder = Connection("worker"), _wire.FrameDecoder()
    conn.receive_data(data[:1000])
    decoder.feed(data[:1000])
    assert list(conn) == [] and list(decoder) == []
    view = conn.big_view()
    assert view is not None
    view[:500] = data[1000:1500]
    conn.big_filled(500)
    conn.big_filled(0)  # EOF
    decoder.big_filled(0)
    with pytest.raises(ProtocolError, match=rf"inside a frame \(1496 of {len(data) - 4} bytes"):
        list(conn)
    with pytest.raises(_wire.WireError, match=rf"inside a frame \(996 of {len(data) - 4} bytes"):
        list(decoder)


def test_send_execute_refuses_a_big_frame_over_the_limit() -> None:
    fields = {**EXECUTE_FIELDS, "input": BIG_INPUT}
    with pytest.raises(ProtocolError, match=r"over the 100000-byte limit"):
        Connection("host", max_frame_size=100_000).send_execute(**fields)
    result = {"execution_id": "e", "output": BIG_INPUT, "duration_s": 0.0, "metadata": {}}
    with pytest.raises(_wire.WireError, match=r"over the 100000-byte limit"):
        _wire.encode_parts("result", result, "output", max_frame_size=100_000)
    with pytest.raises(_wire.WireError, match=r"'result': its frame of .* 100000-byte limit"):
        _wire.FrameEncoder().encode("result", result, "output", max_frame_size=100_000)
    with pytest.raises(_wire.WireError, match=r"'result': its frame of .* 100-byte limit"):
        _wire.FrameEncoder().encode_message(
            {"t": "result", **result, "output": b"x" * 200}, "output", max_frame_size=100
        )
    with pytest.raises(_wire.WireError, match=r"cannot encode 'result': .*Opaque"):
        _wire.FrameEncoder().encode_message(
            {"t": "result", **result, "metadata": {"x": Opaque()}}, "output"
        )


@pytest.mark.parametrize("data", ["text", b"\x00bytes", "", b"x" * 70_000])
def test_send_channel_data_writes_the_bytes_send_would(data: str | bytes) -> None:
    conn = Connection("host")
    frame = conn.send_channel_data("c-1", data)
    assert frame == conn.send(ChannelData(channel_id="c-1", data=data))
    assert receive(Connection("worker"), frame) == [ChannelData(channel_id="c-1", data=data)]


def test_send_channel_data_refuses_what_a_websocket_cannot_carry() -> None:
    conn = Connection("host", max_frame_size=100)
    with pytest.raises(ProtocolError, match=r"data str or bytes, not str and int"):
        conn.send_channel_data("c", 7)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match=r"over the 100-byte limit"):
        conn.send_channel_data("c", b"x" * 200)
    assert conn.send_channel_data("c", "ok") == conn.send(ChannelData(channel_id="c", data="ok"))


def test_frames_are_read_where_a_read_put_them_and_a_split_one_is_kept_in_order() -> None:
    """One read holding whole frames is decoded in place (no copy into the buffer); a frame
    it holds only part of moves to the buffer, ahead of what the next read brings."""
    pings = [Connection("host").send(Ping(seq=i)) for i in range(4)]
    data = b"".join(pings)
    cut = len(pings[0]) + len(pings[1]) + 3
    conn, decoder = Connection("worker"), _wire.FrameDecoder()
    conn.receive_data(data[:cut])
    decoder.feed(data[:cut])
    assert list(conn) == [Ping(seq=0), Ping(seq=1)]
    assert [f["seq"] for _, f in decoder] == [0, 1]
    conn.receive_data(data[cut:])
    decoder.feed(data[cut:])
    assert list(conn) == [Ping(seq=2), Ping(seq=3)]
    assert [f["seq"] for _, f in decoder] == [2, 3]
    # A read that announces a frame over the limit is refused from its header, as buffered.
    small = Connection("worker", max_frame_size=10)
    small.receive_data(pings[0])
    with pytest.raises(ProtocolError, match=r"over the 10-byte limit"):
        small.next_message()


@given(st.lists(st.binary(max_size=40), max_size=5), st.data())
def test_unsent_is_what_follows_the_bytes_written(parts: list[bytes], data: st.DataObject) -> None:
    """Both ends finish a partly written frame with ``_wire.unsent``: whatever the split,
    the rest is exactly the frame's bytes after those written, with no empty piece."""
    whole = b"".join(parts)
    sent = data.draw(st.integers(0, len(whole)))
    rest = _wire.unsent(parts, sent)
    assert b"".join(rest) == whole[sent:]
    assert all(len(piece) for piece in rest)


def _held_after(pack: Any) -> int:
    """Bytes still allocated after ``pack()`` ran and its result was dropped."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        pack()
        gc.collect()
        return tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def test_a_big_frame_leaves_no_big_packer_buffer_behind() -> None:
    """A kept msgpack Packer holds its buffer at about twice the largest payload it packed:
    one 4 MiB input would cost its connection 8 MiB for good (a worker's, for the life of
    the worker). After a big payload, host connections and workers' encoders take a new one."""
    host = Connection("host")
    encoder = _wire.FrameEncoder()
    big = {"blob": bytes(4 << 20)}  # a dict: packed whole by the kept packer
    senders = {
        "execute": lambda: host.send_execute(
            execution_id="e",
            plugin_id="p",
            handler_id="h",
            entry="m:f",
            root=None,
            input=big,
            context={},
            workspace=None,
            timeout=None,
        ),
        "ch_data": lambda: host.send_channel_data("c", big["blob"].decode("latin-1")),
        "worker frame": lambda: encoder.encode_message({"t": "result", "output": big}),
    }
    for name, send in senders.items():
        assert _held_after(send) < 1 << 20, name
