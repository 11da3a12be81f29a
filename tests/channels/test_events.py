"""The pieces of the events style and of close frames that need no server."""

from __future__ import annotations

import json

import pytest
from trio_websocket import open_websocket_url

from plugin_execution import ChannelClosed, ChannelSpec, PluginManifest, envelope
from plugin_execution.channels.channel import check_message, clip_reason
from plugin_execution.channels.events import encode_message, parse_envelope
from plugin_execution.channels.websocket import channel_route

from .conftest import PLUGINS, serving
from .test_websocket import closed_with


def test_parse_envelope_fills_in_what_is_missing() -> None:
    message, error = parse_envelope('{"type": "say", "payload": [1, "two"]}')
    assert error is None and message is not None
    assert message["type"] == "say" and message["payload"] == [1, "two"]
    assert isinstance(message["message_id"], str) and isinstance(message["timestamp"], float)
    kept, _ = parse_envelope('{"type": "x", "message_id": "m-1", "timestamp": 5}')
    assert kept is not None and kept["message_id"] == "m-1" and kept["timestamp"] == 5
    assert kept["payload"] is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{oops", "not JSON"),
        ("[]", "JSON object, not list"),
        ('{"payload": 1}', "no 'type'"),
        ('{"type": ""}', "no 'type'"),
        ('{"type": "x", "message_id": 7}', "'message_id' must be a string"),
        ('{"type": "x", "timestamp": true}', "'timestamp' must be a number"),
    ],
)
def test_parse_envelope_names_what_is_wrong(text: str, problem: str) -> None:
    message, error = parse_envelope(text)
    assert message is None and error is not None and problem in error


def test_messages_are_sent_as_they_are_or_as_json() -> None:
    assert encode_message("text") == "text" and encode_message(b"\x00") == b"\x00"
    sent = encode_message(envelope("said", {"a": 1}, reply_to="m-1"))
    assert isinstance(sent, str)
    decoded = json.loads(sent)
    assert decoded["type"] == "said" and decoded["reply_to"] == "m-1"
    with pytest.raises(TypeError, match="as JSON"):
        encode_message({"not": {1, 2}})
    with pytest.raises(TypeError, match=r"str .* or bytes"):
        check_message(3)


def test_close_reasons_fit_a_close_frame() -> None:
    assert clip_reason("short") == "short"
    long = clip_reason("é" * 200)
    assert len(long.encode()) <= 123 and long.endswith("...")
    assert str(ChannelClosed(1000, "bye")) == "the channel is closed with code 1000: bye"


def test_routes_are_under_the_base_path() -> None:
    spec = ChannelSpec(path="/chat/room", entry="a:b")
    assert channel_route("acme.x", spec, "/v1/ws/plugins/") == "/v1/ws/plugins/acme.x/chat/room"


@pytest.mark.parametrize("kind", ["in-process", "worker-pool"])
async def test_a_sync_session_handler_is_a_contract_error(kind: str) -> None:
    manifest = PluginManifest(
        id="tests.ws",
        root=str(PLUGINS),
        channels=[ChannelSpec(path="/sync", entry="ws_handlers:not_async")],
    )
    async with (
        serving(kind, manifest=manifest) as served,
        open_websocket_url(served.url("/sync")) as ws,
    ):
        code, reason = await closed_with(ws)
    assert code == 1011
    assert reason is not None and reason.startswith("HANDLER_CONTRACT_ERROR")
