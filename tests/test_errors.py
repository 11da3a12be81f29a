"""The error hierarchy: stable codes and a lossless wire form."""

from __future__ import annotations

import pickle

import pytest

import plugin_execution
from plugin_execution import errors
from plugin_execution.errors import ExecutionError

#: The table in DESIGN.md, plus the base class and the manifest error.
CODES = {
    "PluginNotFoundError": "PLUGIN_NOT_FOUND",
    "HandlerNotFoundError": "HANDLER_NOT_FOUND",
    "ExecutionTimeoutError": "TIMEOUT",
    "PermissionDeniedError": "PERMISSION_DENIED",
    "QueueFullError": "QUEUE_FULL",
    "WorkerCrashedError": "WORKER_CRASHED",
    "HandlerError": "HANDLER_ERROR",
    "InvalidRequestError": "INVALID_REQUEST",
    "BackendClosedError": "BACKEND_CLOSED",
    "ValidationError": "VALIDATION_ERROR",
    "HandlerContractError": "HANDLER_CONTRACT_ERROR",
    "AbortedError": "ABORTED",
    "WorkspaceError": "WORKSPACE_ERROR",
    "AcquireTimeoutError": "ACQUIRE_TIMEOUT",
    "WorkerUnhealthyError": "WORKER_UNHEALTHY",
    "PluginQuarantinedError": "PLUGIN_QUARANTINED",
}
ALL = sorted(CODES)


@pytest.mark.parametrize("name", ALL)
def test_class_exists_with_its_code_and_is_public(name: str) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, ExecutionError)
    assert cls.code == CODES[name]
    assert getattr(plugin_execution, name) is cls


def test_codes_are_distinct() -> None:
    codes = [getattr(errors, name).code for name in ALL]
    assert len(set(codes)) == len(codes)
    assert ExecutionError.code == "UNKNOWN_ERROR"
    assert "UNKNOWN_ERROR" not in codes


@pytest.mark.parametrize("name", ALL)
def test_to_dict_from_dict_round_trip(name: str) -> None:
    cls = getattr(errors, name)
    err = cls(
        "something happened",
        execution_id="e1",
        plugin_id="org.plugin",
        handler_id="run",
        details={"exit_code": 3, "nested": {"a": [1, 2]}},
    )
    data = err.to_dict()
    assert data == {
        "code": CODES[name],
        "message": "something happened",
        "execution_id": "e1",
        "plugin_id": "org.plugin",
        "handler_id": "run",
        "details": {"exit_code": 3, "nested": {"a": [1, 2]}},
    }
    back = ExecutionError.from_dict(data)
    assert type(back) is cls
    assert back.to_dict() == data
    assert (back.message, back.execution_id, back.plugin_id, back.handler_id) == (
        "something happened",
        "e1",
        "org.plugin",
        "run",
    )


def test_to_dict_is_a_copy() -> None:
    err = errors.HandlerError("x", details={"remote_type": "builtins.ValueError"})
    err.to_dict()["details"]["remote_type"] = "changed"
    assert err.remote_type == "builtins.ValueError"


def test_detail_attributes_read_details() -> None:
    err = ExecutionError.from_dict(
        {
            "code": "WORKER_CRASHED",
            "message": "died",
            "details": {"exit_code": -9, "signal": 9, "stderr_tail": "boom"},
        }
    )
    assert isinstance(err, errors.WorkerCrashedError)
    assert (err.exit_code, err.signal, err.stderr_tail) == (-9, 9, "boom")
    assert errors.QueueFullError("full", details={"capacity": 4}).capacity == 4
    assert errors.QueueFullError("full").queue_size is None


def test_unknown_code_keeps_its_code() -> None:
    data = {"code": "FROM_THE_FUTURE", "message": "new", "execution_id": "e9", "details": {"k": 1}}
    err = ExecutionError.from_dict(data)
    assert type(err) is ExecutionError
    assert err.code == "FROM_THE_FUTURE"
    assert ExecutionError.code == "UNKNOWN_ERROR"  # the class attribute is untouched
    assert err.to_dict()["code"] == "FROM_THE_FUTURE"
    assert err.details == {"k": 1}
    assert "FROM_THE_FUTURE" in str(err)


def test_missing_fields_default() -> None:
    err = ExecutionError.from_dict({})
    assert type(err) is ExecutionError
    assert err.code == "UNKNOWN_ERROR"
    assert (err.message, err.execution_id, err.details) == ("", None, {})


def test_timeout_error_is_a_builtin_timeout_error() -> None:
    err = errors.ExecutionTimeoutError("too slow", details={"timeout_s": 0.5})
    assert isinstance(err, TimeoutError)
    assert err.timeout_s == 0.5
    with pytest.raises(TimeoutError):
        raise err
    assert isinstance(ExecutionError.from_dict(err.to_dict()), TimeoutError)


@pytest.mark.parametrize("name", ALL)
def test_pickle_round_trip(name: str) -> None:
    cls = getattr(errors, name)
    err = cls("pickled", execution_id="e2", plugin_id="p", handler_id="h", details={"x": 1})
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert back.to_dict() == err.to_dict()


def test_pickle_keeps_unknown_code() -> None:
    err = ExecutionError.from_dict({"code": "NEWER", "message": "m"})
    back = pickle.loads(pickle.dumps(err))
    assert back.code == "NEWER"


def test_str_and_repr_are_informative() -> None:
    err = errors.PluginNotFoundError(
        "no plugin 'x' is registered", execution_id="e3", plugin_id="x", handler_id="run"
    )
    text = str(err)
    assert "PLUGIN_NOT_FOUND" in text
    assert "no plugin 'x' is registered" in text
    assert "x/run" in text
    assert str(errors.BackendClosedError("closed")) == "[BACKEND_CLOSED] closed"
    assert repr(err) == "PluginNotFoundError(\"no plugin 'x' is registered\", execution_id='e3')"


def test_with_ids_fills_only_missing_ids() -> None:
    err = errors.HandlerError("boom", plugin_id="mine")
    same = err.with_ids(execution_id="e4", plugin_id="other", handler_id="h")
    assert same is err
    assert (err.execution_id, err.plugin_id, err.handler_id) == ("e4", "mine", "h")


def test_manifest_error_has_its_own_code() -> None:
    err = errors.ManifestError("bad key")
    assert err.code == "INVALID_MANIFEST"
    assert type(ExecutionError.from_dict(err.to_dict())) is errors.ManifestError


# -- rendering never fails (issue 14, item 4) -----------------------------------------------


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise SystemExit(1)

    def __repr__(self) -> str:
        raise KeyboardInterrupt


def test_safe_text_falls_back_from_str_to_repr_to_a_placeholder() -> None:
    class ReprOnly:
        def __str__(self) -> str:
            raise ValueError

        def __repr__(self) -> str:
            return "ReprOnly()"

    assert errors.safe_text(ValueError("plain")) == "plain"
    assert errors.safe_text(ReprOnly()) == "ReprOnly()"
    assert errors.safe_text(_Unprintable()) == "<_Unprintable object: str() and repr() failed>"


def test_clip_text_keeps_both_ends_and_says_what_went() -> None:
    text = "a" * 500 + "b" * 500
    clipped = errors.clip_text(text, 200)
    assert len(clipped) <= 200
    assert clipped.startswith("aaa") and clipped.endswith("bbb")
    assert f"[{1000 - 200} characters cut]" in clipped
    assert errors.clip_text("short", 200) == "short"


def test_handler_error_of_the_unprintable() -> None:
    try:
        raise _Unprintable()
    except _Unprintable as exc:
        error = errors.handler_error(exc)
    assert error.code == "HANDLER_ERROR"
    assert error.message == (
        "handler raised _Unprintable: <_Unprintable object: str() and repr() failed>"
    )
    assert error.details["remote_type"].endswith("test_errors._Unprintable")
    assert "raise _Unprintable()" in error.details["remote_traceback"]


def test_plain_error_is_plain_and_bounded() -> None:
    deep: list[object] = []
    for _ in range(40):
        deep = [deep]
    error = errors.ValidationError(
        "m" * (errors.MAX_MESSAGE_CHARS * 2),
        execution_id=7,  # type: ignore[arg-type]
        details={
            "object": object(),
            "set": {1},
            1: "int key",
            "big_int": 2**70,
            "text": "t" * (errors.MAX_TEXT_CHARS * 2),
            "bytes": b"b" * (errors.MAX_TEXT_CHARS * 2),
            "deep": deep,
            "many": list(range(500_000)),
        },
    )
    wire = errors.plain_error(error)
    assert wire["code"] == "VALIDATION_ERROR" and wire["execution_id"] == "7"
    assert len(wire["message"]) <= errors.MAX_MESSAGE_CHARS
    details = wire["details"]
    assert details["object"].startswith("<object object at") and details["set"] == "{1}"
    assert details["1"] == "int key" and details["big_int"] == str(2**70)
    assert len(details["text"]) <= errors.MAX_TEXT_CHARS
    assert len(details["bytes"]) == errors.MAX_TEXT_CHARS
    assert "more items cut" in details["many"][-1] and len(details["many"]) < 200_000
    assert isinstance(pickle.dumps(wire), bytes)  # plain data all the way down


def test_plain_error_of_an_error_whose_to_dict_raises() -> None:
    class Broken(errors.HandlerError):
        def to_dict(self) -> dict[str, object]:
            raise _Unprintable()

    wire = errors.plain_error(Broken("x"))
    assert wire["code"] == "HANDLER_ERROR"
    assert wire["message"].startswith("reporting the error failed: _Unprintable: <_Unprintable")


@pytest.mark.parametrize(
    "data",
    [
        {"code": 5, "message": ["not", "text"], "details": 5},
        {"code": None, "message": None, "details": "abc", "execution_id": 1},
        {"details": [1, 2]},
        {},
    ],
)
def test_from_dict_never_raises_on_a_malformed_wire_form(data: dict[str, object]) -> None:
    error = ExecutionError.from_dict(data)
    assert isinstance(error.code, str) and isinstance(error.message, str)
    assert isinstance(error.details, dict)
    assert error.execution_id is None or isinstance(error.execution_id, str)
