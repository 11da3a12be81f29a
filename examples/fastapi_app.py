"""A FastAPI application that executes a plugin per request, on plugin_execution.asyncio.

    python examples/fastapi_app.py --port 8000 --backend worker-pool
    python examples/fastapi_app.py --self-test   # serve on a free port, call it, exit

- ``GET /greet/{name}``: runs ``examples.hello/greet``;
- ``POST /run/{plugin_id}/{handler_id}`` (JSON body: the input): runs any handler; a failure
  is answered with the error's ``to_dict()`` and an HTTP status for its code. If the client
  disconnects first, the execution is cancelled (a worker process running it is killed);
- ``GET /stream/{handler_id}?n=3``: the events of ``examples.hello/{handler_id}`` as
  newline-delimited JSON, as they happen: a ``started`` line with the execution id once it
  has begun, then its events, then its result (a disconnect cancels the execution too);
- ``/v1/ws/plugins/examples.chat/echo`` and ``.../room``: the example WebSocket channels.

The backend lives as long as the application (its lifespan); trio runs as a guest on
uvicorn's asyncio loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import uvicorn
from fastapi import Body, FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse

from plugin_execution import ExecutionRequest, PluginRegistry
from plugin_execution.asyncio import ASGIChannels, AsyncioBackend, create_execution_backend

T = TypeVar("T")

#: HTTP status per error code; anything else is a 500.
STATUS = {
    "PLUGIN_NOT_FOUND": 404,
    "HANDLER_NOT_FOUND": 404,
    "INVALID_REQUEST": 400,
    "VALIDATION_ERROR": 422,
    "PERMISSION_DENIED": 403,
    "TIMEOUT": 504,
    "QUEUE_FULL": 503,
    "ACQUIRE_TIMEOUT": 503,
    "PLUGIN_QUARANTINED": 503,
    "BACKEND_CLOSED": 503,
}


def make_app(backend_type: str) -> FastAPI:
    registry = PluginRegistry.from_entry_points()  # installed plugins: examples.hello, .chat

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with create_execution_backend(type=backend_type, registry=registry) as backend:
            app.state.backend = backend
            app.state.channels = ASGIChannels(backend, registry)
            yield

    app = FastAPI(lifespan=lifespan)

    def backend_of(request: Request) -> AsyncioBackend:
        backend: AsyncioBackend = request.app.state.backend
        return backend

    @app.get("/greet/{name}")
    async def greet(name: str, request: Request) -> dict[str, Any]:
        result = await backend_of(request).execute(
            ExecutionRequest(
                plugin_id="examples.hello",
                handler_id="greet",
                input={"name": name},
                context={"host": "rest", "request_id": request.headers.get("x-request-id")},
            )
        )
        return {**result.output, "backend": result.backend}

    @app.post("/run/{plugin_id}/{handler_id}")
    async def run(
        plugin_id: str, handler_id: str, request: Request, input: Annotated[Any, Body()] = None
    ) -> JSONResponse:
        execution = ExecutionRequest(
            plugin_id=plugin_id, handler_id=handler_id, input=input, context={"host": "rest"}
        )
        result = await until_disconnected(
            request, backend_of(request).execute(execution, raise_errors=False)
        )
        if result is None:  # nobody to answer: 499, as nginx logs it
            return JSONResponse({"code": "ABORTED"}, status_code=499)
        if result.error is not None:
            status = STATUS.get(result.error.code, 500)
            return JSONResponse(result.error.to_dict(), status_code=status)
        return JSONResponse({"output": result.output, "duration_s": result.duration_s})

    @app.get("/stream/{handler_id}")
    async def stream(handler_id: str, request: Request, n: int = 3) -> StreamingResponse:
        execution = ExecutionRequest(
            plugin_id="examples.hello", handler_id=handler_id, input={"from": n, "n": n}
        )

        async def lines() -> AsyncIterator[str]:
            # Leaving this block (the client went away, so Starlette stops the stream)
            # cancels the execution.
            async with backend_of(request).open_execution(execution) as running:
                # First line: the execution has begun (a client may leave from here on).
                yield json.dumps({"kind": "started", "id": execution.execution_id}) + "\n"
                async for event in running.events:
                    yield json.dumps({"kind": event.kind, "data": event.data}) + "\n"
                result = await running.result(raise_errors=False)
            yield json.dumps({"ok": result.ok, "output": result.output}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, Any]:
        current = backend_of(request).stats()
        return {"total": current.total, "ok": current.ok, "failed": current.failed_by_code}

    @app.websocket("/v1/ws/plugins/{plugin_id}/{channel}")
    async def channel(websocket: WebSocket) -> None:
        await websocket.app.state.channels.serve(websocket)

    return app


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await ``work``, cancelling it if the client disconnects first (a plain endpoint is
    not cancelled by Starlette when its client goes away); None then."""
    task = asyncio.ensure_future(work)
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if not gone:
            raise  # this request itself was cancelled
        return None  # the execution stopped once the cancellation reached it
    finally:
        watcher.cancel()


async def serve(app: FastAPI, sock: socket.socket) -> uvicorn.Server:
    config = uvicorn.Config(app, log_level="warning", ws="wsproto", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.task = asyncio.create_task(server.serve(sockets=[sock]))  # type: ignore[attr-defined]
    while not server.started:
        if server.task.done():  # type: ignore[attr-defined]
            await server.task  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)
    return server


async def self_test(backend_type: str) -> None:
    import httpx

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = make_app(backend_type)
    server = await serve(app, sock)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            greeting = (await http.get("/greet/asyncio")).json()
            where = "this process" if greeting["pid"] == os.getpid() else "another process"
            print(f"greet: {greeting['greeting']} ({greeting['backend']}, {where})")

            missing = await http.post("/run/examples.hello/nope", json={})
            print(f"error: {missing.status_code} {missing.json()['code']}")

            words = await http.post("/run/examples.hello/wordcount", json={"text": "a b a"})
            print(f"wordcount: {words.json()['output']}")

            async with http.stream("GET", "/stream/countdown", params={"n": 3}) as response:
                lines = [json.loads(line) async for line in response.aiter_lines() if line]
            kinds = [line.get("kind", "result") for line in lines]
            print(f"stream: {kinds.count('tick')} ticks, then {lines[-1]['output']}")

            try:  # a client that gives up: the server cancels the execution
                await http.post("/run/examples.hello/fib", json={"n": 60}, timeout=1.0)
            except httpx.TimeoutException:
                pass
            print(f"client gave up on fib: {await aborted(http, 1)} execution aborted")
            # The same while streaming: the client leaves once the execution has begun (its
            # first line); Starlette cancels the stream, and with it the execution.
            async with http.stream("GET", "/stream/fib", params={"n": 60}) as response:
                async for _line in response.aiter_lines():
                    break
            print(f"client left the fib stream: {await aborted(http, 2)} executions aborted")
        print(f"websocket: echoed {await websocket_echo(port, 'hello')!r}")
    finally:
        server.should_exit = True
        await server.task  # type: ignore[attr-defined]


async def aborted(http: Any, expected: int) -> int:
    """The server's count of ABORTED executions, once it reached ``expected`` (or 10 s)."""
    for _ in range(500):
        count: int = (await http.get("/stats")).json()["failed"].get("ABORTED", 0)
        if count >= expected:
            break
        await asyncio.sleep(0.02)
    return count


async def websocket_echo(port: int, text: str) -> str:
    """A minimal WebSocket client (wsproto over asyncio streams): send ``text``, return
    the reply, close."""
    from wsproto import WSConnection
    from wsproto.connection import ConnectionType
    from wsproto.events import AcceptConnection, CloseConnection, Message, Request, TextMessage

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ws = WSConnection(ConnectionType.CLIENT)
    path = "/v1/ws/plugins/examples.chat/echo"
    writer.write(ws.send(Request(host=f"127.0.0.1:{port}", target=path)))
    reply = ""
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    writer.write(ws.send(TextMessage(data=text)))
                elif isinstance(event, Message):
                    reply += str(event.data)
                    if event.message_finished:
                        writer.write(ws.send(CloseConnection(code=1000)))
                elif isinstance(event, CloseConnection):
                    return reply
            await writer.drain()
    finally:
        writer.close()
        await writer.wait_closed()
    return reply


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--backend", default="worker-pool", choices=("in-process", "worker-pool", "subprocess")
    )
    parser.add_argument("--self-test", action="store_true")
    args = parser.parse_args()
    if args.self_test:
        asyncio.run(self_test(args.backend))
    else:
        uvicorn.run(make_app(args.backend), host="127.0.0.1", port=args.port, ws="wsproto")
