"""What a server operator relies on: plain HTTP on the WebSocket port (``/healthz``,
``/metrics``), refusals that say why, auth tokens, origins, TLS and the serve options.

Every test runs a real server on 127.0.0.1, port 0, and talks to it with real sockets.
"""

from __future__ import annotations

import ast
import gc
import hashlib
import shutil
import ssl
import subprocess
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from tests.conftest import serve_process
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from plugin_execution import (
    ChannelSpec,
    ConnectionRegistry,
    ExecutionBackend,
    ExecutionRequest,
    HandlerSpec,
    PluginRegistry,
    WebSocketRouter,
    create_execution_backend,
    mount_websocket_channels,
)
from plugin_execution.channels.http import mount_health_and_metrics
from plugin_execution.channels.router import HandshakeRejected
from plugin_execution.errors import ManifestError
from plugin_execution.manifest import manifest_from_dict
from plugin_execution.serve_config import ConfigError, ServeOptions, build_authorize, load_options

from .conftest import MANIFEST, OPTIONS, PLUGIN_ID

#: The test channels, one that speaks subprotocols, and a handler that sleeps.
OPS_MANIFEST = attrs.evolve(
    MANIFEST,
    handlers=[HandlerSpec(id="sleep", entry="sample:sleep")],
    channels=[
        *MANIFEST.channels,
        ChannelSpec(path="/proto", entry="ws_handlers:info", subprotocols=["chat.v2", "chat.v1"]),
    ],
)


@attrs.frozen
class HTTPReply:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


async def http_get(
    port: int,
    target: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> HTTPReply:
    """One plain HTTP/1.1 request over a raw socket; reads until the server closes."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        with trio.fail_after(20):
            while chunk := await stream.receive_some(65536):
                data += chunk
                if data.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n" in data:
                    break  # an accepted WebSocket stays open: the head is all there is
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    _, status, reason = status_line.split(" ", 2)
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return HTTPReply(int(status), reason, parsed, body)


@attrs.define
class Ops:
    port: int
    backend: ExecutionBackend
    connections: ConnectionRegistry

    def ws(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws/plugins/{PLUGIN_ID}{path}"


@asynccontextmanager
async def ops_server(
    backend_type: str = "in-process", *, authorize: Any = None, **backend_options: Any
) -> AsyncIterator[Ops]:
    plugins = PluginRegistry([OPS_MANIFEST])
    connections = ConnectionRegistry()
    options = {**OPTIONS[backend_type], **backend_options}
    backend = create_execution_backend(type=backend_type, registry=plugins, **options)
    async with backend, trio.open_nursery() as nursery:
        router = WebSocketRouter()
        mount_websocket_channels(
            router, plugins, backend=backend, connection_registry=connections, authorize=authorize
        )
        mount_health_and_metrics(router.http, backend, connections)
        server = await nursery.start(router.serve, "127.0.0.1", 0)
        yield Ops(server.port, backend, connections)
        nursery.cancel_scope.cancel()


# -- /healthz and /metrics ------------------------------------------------------------------


async def test_healthz_is_200_with_the_backends_health_and_503_once_it_shuts_down() -> None:
    import json

    async with ops_server() as ops:
        reply = await http_get(ops.port, "/healthz")
        assert (reply.status, reply.reason) == (200, "OK")
        assert reply.headers["content-type"] == "application/json"
        health = json.loads(reply.body)
        assert health["healthy"] is True and health["backend"] == "in-process"
        assert health["details"]["state"] == "running"
        await ops.backend.shutdown()
        reply = await http_get(ops.port, "/healthz")
        assert (reply.status, reply.reason) == (503, "Service Unavailable")
        assert json.loads(reply.body)["serving"] is False


async def test_healthz_is_503_while_the_pool_is_degraded() -> None:
    """A worker pool whose queue is full reports ``degraded``: still serving, but a load
    balancer should send new clients elsewhere."""
    import json

    async with (
        ops_server("worker-pool", max_workers=1, max_queue=1) as ops,
        trio.open_nursery() as nursery,
    ):
        for _ in range(2):  # one runs, one fills the queue
            request = ExecutionRequest(
                plugin_id=PLUGIN_ID, handler_id="sleep", input={"seconds": 30}
            )
            nursery.start_soon(_execute_quietly, ops.backend, request)
        with trio.fail_after(20):
            while ops.backend.stats().queued < 1:
                await trio.sleep(0.02)
        reply = await http_get(ops.port, "/healthz")
        assert reply.status == 503
        assert json.loads(reply.body)["status"] == "degraded"
        nursery.cancel_scope.cancel()


async def _execute_quietly(backend: ExecutionBackend, request: ExecutionRequest) -> None:
    await backend.execute(request, raise_errors=False)


async def test_metrics_count_executions_by_plugin_handler_backend_and_outcome() -> None:
    async with ops_server() as ops:
        for handler in ("ws.echo", "nope", "nope"):
            await ops.backend.execute(
                ExecutionRequest(plugin_id=PLUGIN_ID, handler_id=handler), raise_errors=False
            )
        async with open_websocket_url(ops.ws("/echo")) as ws:
            await ws.send_message("hi")
            assert await ws.get_message() == "hi"
            reply = await http_get(ops.port, "/metrics")
        assert reply.status == 200
        assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = reply.body.decode()
        want = 'plugin_execution_executions_total{backend="in-process",handler="nope",outcome="HANDLER_NOT_FOUND",plugin="tests.ws"} 2.0'
        assert want in text
        assert (
            'plugin_execution_execution_duration_seconds_bucket{backend="in-process",handler="nope"'
            in text
        )
        assert 'plugin_execution_in_flight{backend="in-process"} 1.0' in text  # the session
        assert 'plugin_execution_queued{backend="in-process"} 0.0' in text
        path = f"/v1/ws/plugins/{PLUGIN_ID}/echo"
        assert f'plugin_execution_ws_connections{{path="{path}"}} 1.0' in text
        assert "plugin_execution_ws_connections_opened_total 1.0" in text


async def test_metrics_show_pool_workers_by_state() -> None:
    async with ops_server("worker-pool") as ops:
        with trio.fail_after(30):
            while not ops.backend.stats().details["workers"].get("idle"):
                await trio.sleep(0.02)
        text = (await http_get(ops.port, "/metrics")).body.decode()
        assert 'plugin_execution_workers{backend="worker-pool",state="idle"} 1.0' in text


async def test_two_servers_keep_their_metrics_apart() -> None:
    """Each server has its own registry: nothing goes to prometheus_client's global one."""
    from prometheus_client import REGISTRY

    async with ops_server() as first, ops_server() as second:
        await first.backend.execute(
            ExecutionRequest(plugin_id=PLUGIN_ID, handler_id="nope"), raise_errors=False
        )
        one = (await http_get(first.port, "/metrics")).body.decode()
        other = (await http_get(second.port, "/metrics")).body.decode()
    assert 'outcome="HANDLER_NOT_FOUND"' in one
    assert 'outcome="HANDLER_NOT_FOUND"' not in other
    assert (
        REGISTRY.get_sample_value("plugin_execution_in_flight", {"backend": "in-process"}) is None
    )


async def test_plain_http_refusals_have_a_reason_phrase_and_say_why() -> None:
    async with ops_server() as ops:
        unknown = await http_get(ops.port, "/nowhere")
        assert (unknown.status, unknown.reason) == (404, "Not Found")
        assert b"Upgrade: websocket" in unknown.body
        post = await http_get(ops.port, "/healthz", method="POST")
        assert (post.status, post.reason) == (405, "Method Not Allowed")
        assert post.headers["allow"] == "GET, HEAD"
        posted = await http_get(
            ops.port,
            "/metrics",
            method="POST",
            headers={"Content-Length": "200000", "Content-Type": "text/plain"},
            body=b"x" * 200_000,  # unread by the server: it must not reset the answer away
        )
        assert posted.status == 405 and b"answers GET only" in posted.body
        head = await http_get(ops.port, "/healthz", method="HEAD")
        assert head.status == 200 and head.body == b""
        # and WebSocket handshakes on the same port still work
        async with open_websocket_url(ops.ws("/echo")) as ws:
            await ws.send_message("still here")
            assert await ws.get_message() == "still here"


# -- who may connect: tokens and origins ----------------------------------------------------


async def handshake(url: str, headers: dict[str, str] | None = None) -> HTTPReply | str:
    """A WebSocket handshake over a raw socket: the refusal, or "accepted" (then closed)."""
    parsed = urllib.parse.urlsplit(url)
    assert parsed.port is not None
    target = parsed.path + (f"?{parsed.query}" if parsed.query else "")
    reply = await http_get(
        parsed.port,
        target,
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
            **(headers or {}),
        },
    )
    return "accepted" if reply.status == 101 else reply


def tokens_file(tmp_path: Path, *tokens: str) -> Path:
    path = tmp_path / "tokens"
    path.write_text("# operators' tokens\n\n" + "\n".join(f"{t}  # someone" for t in tokens))
    return path


async def test_a_tokens_file_admits_bearer_headers_and_query_tokens_only(tmp_path: Path) -> None:
    options = ServeOptions(tokens_file=tokens_file(tmp_path, "s3cret-one", "s3cret-two"))
    async with ops_server(authorize=build_authorize(options)) as ops:
        headers = {"Authorization": "Bearer s3cret-two"}
        async with open_websocket_url(ops.ws("/info"), extra_headers=list(_b(headers))) as ws:
            info = ast.literal_eval(await ws.get_message())
        assert info["principal"] == {"token": hashlib.sha256(b"s3cret-two").hexdigest()[:12]}
        assert "authorization" not in info["headers"]
        async with open_websocket_url(ops.ws("/info?token=s3cret-one&room=7")) as ws:
            info = ast.literal_eval(await ws.get_message())
        assert info["request_path"].endswith("/info?room=7")  # the token is not the plugin's
        assert "s3cret" not in repr(info)

        missing = await handshake(ops.ws("/echo"))
        assert isinstance(missing, HTTPReply) and missing.status == 401
        assert b"bearer token is required" in missing.body
        for wrong in ({"Authorization": "Bearer s3cret"}, {"Authorization": "Basic s3cret-one"}):
            refused = await handshake(ops.ws("/echo"), wrong)
            assert isinstance(refused, HTTPReply) and refused.status == 401, wrong
        refused = await handshake(ops.ws("/echo?token=s3cret-one-and-more"))
        assert isinstance(refused, HTTPReply) and b"not valid" in refused.body
        assert ops.connections.stats()["rejected"] == {401: 4}


async def test_cross_origin_browser_handshakes_get_403_unless_allowed() -> None:
    allowed = "https://app.example.com"
    async with ops_server(authorize=build_authorize(ServeOptions(allow_origin=(allowed,)))) as ops:
        own = f"http://127.0.0.1:{ops.port}"
        assert await handshake(ops.ws("/echo")) == "accepted"  # not a browser: no Origin
        assert await handshake(ops.ws("/echo"), {"Origin": own}) == "accepted"
        assert await handshake(ops.ws("/echo"), {"Origin": allowed}) == "accepted"
        evil = await handshake(ops.ws("/echo"), {"Origin": "https://evil.example"})
        assert isinstance(evil, HTTPReply) and evil.status == 403
        assert b"the origin https://evil.example is not allowed" in evil.body
    async with ops_server(authorize=build_authorize(ServeOptions(allow_origin=("*",)))) as ops:
        assert await handshake(ops.ws("/echo"), {"Origin": "https://evil.example"}) == "accepted"


async def rejection(url: str, **options: Any) -> tuple[int, bytes | None]:
    """The status and body a handshake is refused with (see conftest.rejected_status on
    why the exception's frames are collected before returning)."""
    try:
        async with open_websocket_url(url, **options):
            pass
    except ConnectionRejected as exc:
        refused = (exc.status_code, exc.body)
    else:
        raise AssertionError(f"the handshake to {url} was accepted")
    gc.collect()
    return refused


async def test_a_refusal_without_a_reason_still_says_why() -> None:
    def authorize(request: Any) -> Any:
        raise HandshakeRejected(429)

    async with ops_server(authorize=authorize) as ops:
        assert await rejection(ops.ws("/echo")) == (429, b"Too Many Requests\n")


def _b(headers: dict[str, str]) -> Iterator[tuple[bytes, bytes]]:
    for name, value in headers.items():
        yield name.encode(), value.encode()


# -- options: flags, a config file, TLS -----------------------------------------------------


def test_a_config_file_sets_the_options_and_flags_win(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(
        'host = "0.0.0.0"\nport = 9000\ntokens_file = "tokens"\n'
        'allow_origin = ["https://a.example/"]\nidle_timeout = 60\nmax_connections = 5\n'
    )
    options = load_options({"port": 9001, "host": None}, config)
    assert (options.host, options.port) == ("0.0.0.0", 9001)
    assert options.tokens_file == tmp_path / "tokens"  # relative to the file
    assert options.allow_origin == ("https://a.example",)
    assert (options.idle_timeout, options.max_connections) == (60, 5)
    assert load_options({}).port == 8765

    config.write_text("max_conections = 5\n")
    with pytest.raises(ConfigError, match="unknown key 'max_conections'"):
        load_options({}, config)
    config.write_text('max_connections = "many"\n')
    with pytest.raises(ConfigError, match="max_connections must be an integer"):
        load_options({}, config)
    with pytest.raises(ConfigError, match="give both or neither"):
        load_options({"tls_cert": "cert.pem"})
    with pytest.raises(ConfigError, match="worker-pool"):
        load_options({"max_queue": 10})
    with pytest.raises(ConfigError, match="holds no token"):
        build_authorize(ServeOptions(tokens_file=tokens_file(tmp_path)))


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a self-signed certificate with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@asynccontextmanager
async def serve_cli(*args: str) -> AsyncIterator[str]:
    """Run ``plugin-execution serve ARGS`` (examples.chat's channels) and yield the URL of
    its echo route; stop it with SIGTERM on the way out."""
    async with serve_process(*args) as (_, words):
        yield next(word for word in words if word.endswith("/echo"))


async def test_serve_cli_over_tls_with_tokens_limits_and_a_config_file(tmp_path: Path) -> None:
    """The real command: wss:// with a self-signed certificate, a token, /healthz over
    https on the same port, and --max-connections from the config file."""
    cert, key = self_signed(tmp_path)
    config = tmp_path / "serve.toml"
    config.write_text(
        f'tls_cert = "{cert.name}"\ntls_key = "{key.name}"\nmax_connections = 1\nport = 1\n'
    )
    tokens = tokens_file(tmp_path, "cli-token")
    options = ["--config", str(config), "--backend", "in-process", "--tokens-file", str(tokens)]
    async with serve_cli(*options) as echo:
        assert echo.startswith("wss://127.0.0.1:")
        port = urllib.parse.urlsplit(echo).port
        assert port is not None
        client = ssl.create_default_context(cafile=str(cert))

        async with open_websocket_url(f"{echo}?token=cli-token", ssl_context=client) as ws:
            await ws.send_message("over tls")
            assert await ws.get_message() == "over tls"
            # the one connection allowed is taken: the next gets 503, saying why
            busy = await rejection(f"{echo}?token=cli-token", ssl_context=client)
            assert busy == (503, b"too many connections\n")
        unauthorized = await rejection(echo, ssl_context=client)
        assert unauthorized[0] == 401 and b"bearer token is required" in unauthorized[1]

        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=client)
        async with stream:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            with trio.fail_after(20):
                try:
                    while chunk := await stream.receive_some(65536):
                        data += chunk
                except trio.BrokenResourceError:
                    pass  # a close without TLS close_notify after the response
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b'"healthy": true' in data


async def test_serve_cli_limits_reach_the_backend_and_the_connections() -> None:
    """--max-queue reaches the pool, --max-message-size closes with 1009, and
    --idle-timeout closes with 1001 even while the client pings (pings are not activity)."""
    import json

    options = ["--backend", "worker-pool", "--max-queue", "7", "--max-message-size", "1000"]
    async with serve_cli(*options, "--idle-timeout", "1") as echo:
        port = urllib.parse.urlsplit(echo).port
        assert port is not None
        health = json.loads((await http_get(port, "/healthz")).body)
        assert health["details"]["max_queue"] == 7

        async with open_websocket_url(echo) as ws:
            await ws.send_message("x" * 1001)
            with pytest.raises(ConnectionClosed) as too_big:
                await ws.get_message()
        assert too_big.value.reason.code == 1009
        del too_big  # its frames hold the client's socket

        async with open_websocket_url(echo) as ws:
            with trio.fail_after(30), pytest.raises(ConnectionClosed) as idle:
                while True:
                    await ws.ping()
                    await trio.sleep(0.2)
        reason = idle.value.reason
        del idle
        assert reason.code == 1001 and "idle" in (reason.reason or "")
        gc.collect()


def test_bad_serve_options_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from plugin_execution import cli

    assert cli.main(["serve", "--tls-cert", str(tmp_path / "c.pem")]) == cli.EXIT_USAGE
    assert "give both or neither" in capsys.readouterr().err
    missing = tmp_path / "nope.toml"
    assert cli.main(["serve", "--config", str(missing)]) == cli.EXIT_USAGE
    assert "cannot read the config file" in capsys.readouterr().err
    files = ["--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")]
    assert cli.main(["serve", *files]) == cli.EXIT_USAGE
    assert "cannot load tls_cert/tls_key" in capsys.readouterr().err


# -- subprotocols -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["in-process", "worker-pool"])
async def test_a_channel_agrees_on_its_most_preferred_subprotocol(kind: str) -> None:
    async with ops_server(kind) as ops:
        async with open_websocket_url(ops.ws("/proto"), subprotocols=["chat.v1", "chat.v2"]) as ws:
            assert ws.subprotocol == "chat.v2"
            info = ast.literal_eval(await ws.get_message())
        assert info["context"]["subprotocol"] == "chat.v2"
        async with open_websocket_url(ops.ws("/proto"), subprotocols=["chat.v1", "x"]) as ws:
            assert ws.subprotocol == "chat.v1"
        none = await rejection(ops.ws("/proto"))
        assert none[0] == 400
        assert b"speaks the subprotocols chat.v2, chat.v1" in (none[1] or b"")
        assert (await rejection(ops.ws("/proto"), subprotocols=["chat.v3"]))[0] == 400
        async with open_websocket_url(ops.ws("/echo"), subprotocols=["chat.v1"]) as ws:
            assert ws.subprotocol is None  # a channel that declares none agrees on none


def test_subprotocols_are_validated_in_the_manifest() -> None:
    channel = {"path": "/c", "entry": "m:f", "subprotocols": ["graphql-ws", "v1.chat"]}
    manifest = manifest_from_dict({"id": "p", "channels": [channel]})
    assert manifest.channels[0].subprotocols == ("graphql-ws", "v1.chat")
    for bad in (["two words"], ["a,b"], [""], [7]):
        with pytest.raises(ManifestError, match="subprotocol"):
            manifest_from_dict({"id": "p", "channels": [{**channel, "subprotocols": bad}]})
