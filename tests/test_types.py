"""The value types: validation at the edge, and lossless round trips through the converter."""

from __future__ import annotations

import math
import operator
import os
import string
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from plugin_execution import errors
from plugin_execution.converter import dumps, loads
from plugin_execution.errors import ExecutionError, InvalidRequestError
from plugin_execution.types import (
    ExecutionEvent,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStats,
    HealthStatus,
    LatencySummary,
    new_execution_id,
)

# -- strategies -------------------------------------------------------------------------------

# msgpack carries 64-bit ints, finite and infinite floats (NaN is not equal to itself, so it
# cannot be compared), str, bytes, lists and str-keyed maps. It turns tuples into lists, so
# only lists are generated.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
data = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), data, max_size=4)
_ALNUM = string.ascii_letters + string.digits


def _ids(more: str, max_size: int) -> st.SearchStrategy[str]:
    """Strings matching the id patterns of types.py: an alphanumeric, then ``more``."""
    return st.builds(
        operator.add, st.sampled_from(_ALNUM), st.text(_ALNUM + more, max_size=max_size)
    )


ids = _ids("._:@-", 20)
execution_ids = _ids("_-", 40)
timeouts = st.none() | st.floats(min_value=1e-6, max_value=1e6)
counts = st.integers(min_value=0, max_value=2**63 - 1)
seconds = st.floats(min_value=0, max_value=1e9)

requests = st.builds(
    ExecutionRequest,
    plugin_id=ids,
    handler_id=ids,
    input=data,
    context=json_objects,
    execution_id=execution_ids,
    timeout=timeouts,
)
error_classes = st.sampled_from(
    [
        ExecutionError,
        *(getattr(errors, name) for name in errors.__all__ if name != "ExecutionError"),
    ]
)


@st.composite
def execution_errors(draw: st.DrawFn) -> ExecutionError:
    cls = draw(error_classes)
    return cls(  # type: ignore[no-any-return]
        draw(st.text(max_size=30)),
        execution_id=draw(st.none() | execution_ids),
        plugin_id=draw(st.none() | ids),
        handler_id=draw(st.none() | ids),
        details=draw(json_objects),
    )


results = st.builds(
    ExecutionResult,
    execution_id=execution_ids,
    ok=st.booleans(),
    output=data,
    error=st.none() | execution_errors(),
    duration_s=seconds,
    backend=st.sampled_from(["in-process", "worker-pool", "subprocess"]),
    worker_id=st.none() | st.text(max_size=10),
    metadata=json_objects,
)
events = st.builds(
    ExecutionEvent,
    execution_id=execution_ids,
    kind=st.text(min_size=1, max_size=10),
    data=data,
    timestamp=seconds,
)
healths = st.builds(
    HealthStatus,
    healthy=st.booleans(),
    backend=st.text(max_size=10),
    status=st.sampled_from(["healthy", "degraded", "unhealthy"]),
    details=json_objects,
)
latencies = st.builds(
    LatencySummary,
    count=counts,
    avg=seconds,
    p50=seconds,
    p95=seconds,
    p99=seconds,
    max=seconds,
)
stats = st.builds(
    ExecutionStats,
    backend=st.text(max_size=10),
    total=counts,
    ok=counts,
    failed=counts,
    failed_by_code=st.dictionaries(st.text(max_size=16), counts, max_size=4),
    in_flight=counts,
    queued=counts,
    queue_full_rejections=counts,
    acquire_timeouts=counts,
    worker_crashes=counts,
    workers_recycled=counts,
    permission_denials=counts,
    latency=latencies,
    queue_wait=latencies,
    details=json_objects,
)


# -- round trips ------------------------------------------------------------------------------


@given(requests)
def test_request_round_trip(request: ExecutionRequest) -> None:
    assert loads(dumps(request), ExecutionRequest) == request


@given(results)
def test_result_round_trip(result: ExecutionResult) -> None:
    back = loads(dumps(result), ExecutionResult)
    assert back == result  # ``error`` is excluded from equality: compared below
    if result.error is None:
        assert back.error is None
    else:
        assert type(back.error) is type(result.error)
        assert back.error.to_dict() == result.error.to_dict()


@given(events)
def test_event_round_trip(event: ExecutionEvent) -> None:
    assert loads(dumps(event), ExecutionEvent) == event


@given(healths)
def test_health_round_trip(health: HealthStatus) -> None:
    assert loads(dumps(health), HealthStatus) == health


@given(stats)
def test_stats_round_trip(value: ExecutionStats) -> None:
    back = loads(dumps(value), ExecutionStats)
    assert back == value
    assert isinstance(back.latency, LatencySummary)


@given(latencies)
def test_latency_round_trip(value: LatencySummary) -> None:
    assert loads(dumps(value), LatencySummary) == value


def test_result_error_keeps_subclass_and_unwrap_raises_it() -> None:
    error = errors.HandlerError(
        "handler raised ValueError: x",
        execution_id="e1",
        details={"remote_type": "builtins.ValueError", "remote_traceback": "Traceback..."},
    )
    result = ExecutionResult(execution_id="e1", ok=False, error=error, backend="in-process")
    back = loads(dumps(result), ExecutionResult)
    assert isinstance(back.error, errors.HandlerError)
    assert back.error.remote_type == "builtins.ValueError"
    with pytest.raises(errors.HandlerError, match="ValueError: x"):
        back.unwrap()
    assert ExecutionResult(execution_id="e1", ok=True, output=[1]).unwrap() == [1]


def test_bytes_and_large_ints_survive() -> None:
    request = ExecutionRequest(
        plugin_id="p",
        handler_id="h",
        input={"blob": b"\x00\xff", "big": 2**64 - 1, "inf": -math.inf},
    )
    back = loads(dumps(request), ExecutionRequest)
    assert back.input == {"blob": b"\x00\xff", "big": 2**64 - 1, "inf": -math.inf}
    assert isinstance(back.input["blob"], bytes)


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["", " x", "a/b", "../etc", "x" * 129, "-leading", "sp ace", 7, None, "é"]
)
@pytest.mark.parametrize("field", ["plugin_id", "handler_id"])
def test_bad_ids_are_rejected(field: str, bad: object) -> None:
    fields: dict[str, Any] = {"plugin_id": "p", "handler_id": "h", field: bad}
    with pytest.raises(InvalidRequestError, match=field):
        ExecutionRequest(**fields)


@pytest.mark.parametrize("bad", ["", "a.b", "a:b", "../x", "x" * 129, "_x"])
def test_bad_execution_ids_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidRequestError, match="execution_id"):
        ExecutionRequest(plugin_id="p", handler_id="h", execution_id=bad)


def test_good_ids_are_accepted() -> None:
    request = ExecutionRequest(
        plugin_id="my-org.my_plugin@1:x", handler_id="H1", execution_id="A" * 128
    )
    assert request.plugin_id == "my-org.my_plugin@1:x"
    assert request.execution_id == "A" * 128


@pytest.mark.parametrize("bad", [0, -1, -0.5, math.nan, True, "1", [1]])
def test_bad_timeouts_are_rejected(bad: object) -> None:
    with pytest.raises(InvalidRequestError, match="timeout"):
        ExecutionRequest(plugin_id="p", handler_id="h", timeout=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("good", [None, 0.001, 1, 30.0])
def test_good_timeouts_are_accepted(good: float | None) -> None:
    assert ExecutionRequest(plugin_id="p", handler_id="h", timeout=good).timeout == good


@pytest.mark.parametrize("bad", [[("a", 1)], "host=cli", 3, object()])
def test_context_must_be_a_mapping(bad: object) -> None:
    with pytest.raises(InvalidRequestError, match="context must be a mapping"):
        ExecutionRequest(plugin_id="p", handler_id="h", context=bad)  # type: ignore[arg-type]


def test_context_is_copied_into_a_dict() -> None:
    source = {"host": "cli"}
    request = ExecutionRequest(plugin_id="p", handler_id="h", context=MappingProxyType(source))
    assert type(request.context) is dict
    assert request.context == {"host": "cli"}
    source["host"] = "changed"
    assert request.context == {"host": "cli"}
    assert ExecutionRequest(plugin_id="p", handler_id="h", context=None).context == {}  # type: ignore[arg-type]


def test_execution_id_generated_and_unique() -> None:
    generated = {ExecutionRequest(plugin_id="p", handler_id="h").execution_id for _ in range(2000)}
    assert len(generated) == 2000
    sample = next(iter(generated))
    assert len(sample) == 32 and int(sample, 16) >= 0
    assert new_execution_id() not in generated


def test_execution_ids_are_never_handed_out_twice_across_threads() -> None:
    with ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(lambda _: [new_execution_id() for _ in range(3000)], range(8)))
    ids = [execution_id for batch in batches for execution_id in batch]
    assert len(set(ids)) == len(ids) == 24000
    assert all(len(execution_id) == 32 and int(execution_id, 16) >= 0 for execution_id in ids)


def test_a_forked_child_does_not_reuse_its_parents_execution_ids() -> None:
    new_execution_id()  # the parent holds ids not handed out yet
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write, "".join(new_execution_id() for _ in range(4)).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        child = os.read(read, 1024).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert len(child) == 4 * 32
    ours = {new_execution_id() for _ in range(4)}
    assert not ours & {child[i : i + 32] for i in range(0, len(child), 32)}


def test_retry_of_same_request_gets_a_new_execution_id() -> None:
    context = {"request_id": "r1"}
    first = ExecutionRequest(plugin_id="p", handler_id="h", context=context)
    retry = ExecutionRequest(plugin_id="p", handler_id="h", context=context)
    assert first.execution_id != retry.execution_id
    assert first.context["request_id"] == retry.context["request_id"]


def test_types_are_frozen_and_keyword_only() -> None:
    request = ExecutionRequest(plugin_id="p", handler_id="h")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        request.plugin_id = "q"  # type: ignore[misc]
    with pytest.raises(TypeError):
        ExecutionRequest("p", "h")  # type: ignore[misc]
    assert request.timeout is None and request.input is None
