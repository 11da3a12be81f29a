"""What hostile WebSocket clients cost a ``plugin-execution serve`` process (issue 23).

Runs ``plugin-execution serve`` (the bundled ``examples.chat`` channels) as a child process
on 127.0.0.1 and measures, from outside:

- **memory per message**: the server's peak RSS growth (``VmHWM`` over the ``VmRSS`` before)
  while one connection sends a ``--mib`` MiB binary message as 1-byte and as 2-byte
  fragments (echoed back: it is within the 1 MiB limit), and a text message of 4-byte
  characters one character over the limit, as 4-byte fragments (closed with 1009). Each
  attack runs against a fresh server, so the peaks do not hide one another;
- **echo latency under attack**: a normal client's round trip (100-byte echo, ``--echoes``
  of them) with no other client, then while ``--hostile`` connections are open: half of
  them half-open handshakes (slowloris), half open WebSockets each holding an unfinished
  64 KiB fragmented message. Reports p50 / p99 and the ratio to the calm run.

Run: ``python benchmarks/bench_hostile_ws.py [--backend in-process] [--hostile 500]
[--mib 1] [--json]``. The figures are ratios to the same run's calm baseline; absolute
numbers depend on the machine (see README.md).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio
from trio_websocket import open_websocket_url

ROOT = Path(__file__).resolve().parents[1]
ECHO = "/v1/ws/plugins/examples.chat/echo"


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame (mask key 0: the payload goes out as it is)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + b"\0\0\0\0" + payload


def fragments(opcode: int, data: bytes, size: int) -> bytes:
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    last = len(pieces) - 1
    return b"".join(frame(opcode if i == 0 else 0, p, fin=i == last) for i, p in enumerate(pieces))


def handshake(path: str = ECHO, *, partial: bool = False) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    text = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    )
    return text.encode() if partial else (text + "\r\n").encode()


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


class Server:
    """``plugin-execution serve`` as a child; ``port`` and ``pid`` once it listens."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.process: trio.Process | None = None
        self.port = 0

    async def __aenter__(self) -> Server:
        argv = [sys.executable, "-m", "plugin_execution", "serve", "--port", "0"]
        self.process = await trio.lowlevel.open_process(
            [*argv, "--backend", self.backend],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        output = b""
        with trio.fail_after(60):
            while b"\n" not in output:
                chunk = await self.process.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError("serve exited before listening")
                output += chunk
        url = next(u for u in output.decode().split() if u.rstrip(",").endswith(ECHO))
        self.port = int(url.split(":")[2].split("/")[0])
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def __aexit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        with trio.move_on_after(20):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        assert self.process.stdout is not None
        await self.process.stdout.aclose()


async def open_raw(port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(handshake())
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise RuntimeError("closed during the handshake")
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 101"), answer[:40]
    return stream


async def memory_attack(backend: str, wire: bytes, expect: int) -> dict[str, Any]:
    """Peak RSS growth of a fresh server while one connection sends ``wire``; ``expect``:
    how many payload bytes come back (0: a close is expected instead)."""
    async with Server(backend) as server:
        await trio.sleep(0.5)
        before = status_kib(server.pid, "VmRSS")
        started = time.perf_counter()
        stream = await open_raw(server.port)
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, wire)
            received = 0
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                received += len(chunk)
                if expect and received >= expect:
                    break
            nursery.cancel_scope.cancel()
        elapsed = time.perf_counter() - started
        peak = status_kib(server.pid, "VmHWM")
        return {
            "wire_bytes": len(wire),
            "rss_before_mib": before / 1024,
            "peak_growth_mib": (peak - before) / 1024,
            "seconds": elapsed,
        }


async def echo_latencies(port: int, count: int) -> list[float]:
    url = f"ws://127.0.0.1:{port}{ECHO}"
    times = []
    async with open_websocket_url(url) as ws:
        for _ in range(20):  # warm-up
            await ws.send_message(b"x" * 100)
            await ws.get_message()
        for _ in range(count):
            start = time.perf_counter()
            await ws.send_message(b"x" * 100)
            await ws.get_message()
            times.append(time.perf_counter() - start)
    return times


async def latency_under_attack(backend: str, hostile: int, count: int) -> dict[str, Any]:
    async with Server(backend) as server:
        calm = await echo_latencies(server.port, count)
        streams: list[trio.SocketStream] = []
        try:
            for i in range(hostile):
                if i % 2:  # slowloris: a handshake that never ends
                    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                    await stream.send_all(handshake(partial=True))
                else:  # an open WebSocket holding an unfinished 64 KiB message
                    stream = await open_raw(server.port)
                    await stream.send_all(frame(0x2, b"h" * 65536, fin=False))
                streams.append(stream)
            await trio.sleep(0.5)
            rss = status_kib(server.pid, "VmRSS") / 1024
            attacked = await echo_latencies(server.port, count)
        finally:
            for stream in streams:
                await stream.aclose()

    def summary(times: list[float]) -> dict[str, float]:
        ordered = sorted(times)
        return {
            "p50_us": statistics.median(ordered) * 1e6,
            "p99_us": ordered[int(len(ordered) * 0.99) - 1] * 1e6,
        }

    calm_s, attacked_s = summary(calm), summary(attacked)
    return {
        "hostile_connections": hostile,
        "server_rss_mib_under_attack": rss,
        "calm": calm_s,
        "under_attack": attacked_s,
        "p50_ratio": attacked_s["p50_us"] / calm_s["p50_us"],
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    size = int(args.mib * (1 << 20))
    data = b"m" * size
    clef = "\U0001d11e".encode()
    text = clef * (size // 4 + 1)  # one character over the limit, in bytes
    results: dict[str, Any] = {"backend": args.backend, "message_bytes": size}
    results["binary_1_byte_fragments"] = await memory_attack(
        args.backend, fragments(0x2, data, 1), size
    )
    results["binary_2_byte_fragments"] = await memory_attack(
        args.backend, fragments(0x2, data, 2), size
    )
    results["text_4_byte_chars_over_limit"] = await memory_attack(
        args.backend, fragments(0x1, text, 4), 0
    )
    results["latency"] = await latency_under_attack(args.backend, args.hostile, args.echoes)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="in-process")
    parser.add_argument("--hostile", type=int, default=500)
    parser.add_argument("--echoes", type=int, default=2000)
    parser.add_argument("--mib", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    figures = trio.run(main, options)
    print(json.dumps(figures, indent=None if options.json else 2))
