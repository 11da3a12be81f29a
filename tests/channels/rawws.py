"""A raw WebSocket client for hostile-client tests: hand-made handshakes and frames over TCP.

trio-websocket's client (built on wsproto) only ever speaks valid WebSocket; an attacker does
not. :class:`RawClient` writes whatever bytes a test gives it (unmasked frames, 2-byte
fragments, a request line of HTTP/1.0, a key header twice...) and reads the server's answer
frame by frame, so a test can assert what the server sent and when it closed the socket.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from types import TracebackType

import attrs
import trio

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_value(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server owes for ``key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def request(
    path: str,
    *,
    host: str = "127.0.0.1",
    key: str | None = None,
    version: str = "HTTP/1.1",
    extra: list[tuple[str, str]] = (),  # type: ignore[assignment]
    omit: tuple[str, ...] = (),
) -> bytes:
    """An opening handshake; ``extra`` headers are appended, ``omit`` names ones left out."""
    headers = [
        ("Host", host),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key if key is not None else new_key()),
        ("Sec-WebSocket-Version", "13"),
    ]
    lines = [f"GET {path} {version}"]
    lines += [f"{name}: {value}" for name, value in headers if name.lower() not in omit]
    lines += [f"{name}: {value}" for name, value in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    mask: bytes | None = None,
) -> bytes:
    """One frame, minimal length encoding; ``masked=False`` makes the unmasked frame a
    client must never send."""
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode])
    length = len(payload)
    bit = 0x80 if masked else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    if not masked:
        return head + payload
    key = mask if mask is not None else os.urandom(4)
    return head + key + _mask(payload, key)


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


def _mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    whole = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(whole, "big")).to_bytes(
        len(payload), "big"
    )


@attrs.frozen
class Frame:
    """A frame the server sent (servers never mask)."""

    fin: bool
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        if self.opcode != OP_CLOSE or len(self.payload) < 2:
            return None
        code: int = struct.unpack("!H", self.payload[:2])[0]
        return code

    @property
    def text(self) -> str:
        return self.payload.decode()


class RawClient:
    """One TCP connection speaking whatever a test writes. ``async with`` closes it."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self.eof = False
        self.status: int | None = None
        self.body = bytearray()  # what came after the last frame read, up to EOF

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        return cls(await trio.open_tcp_stream(host, port))

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_quietly(self, data: bytes) -> bool:
        """Send, or return False when the server already closed the connection."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def _fill(self) -> bool:
        """Read more into the buffer; False at EOF (or a reset)."""
        if self.eof:
            return False
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.eof = True
            return False
        self._buffer += data
        return True

    async def handshake(self, data: bytes) -> tuple[int, dict[str, str]]:
        """Send an opening handshake; the response's status and headers (names lower-case)."""
        await self.send(data)
        while b"\r\n\r\n" not in self._buffer:
            if not await self._fill():
                raise EOFError(f"the server closed during the handshake: {bytes(self._buffer)!r}")
        head, _, rest = bytes(self._buffer).partition(b"\r\n\r\n")
        self._buffer = bytearray(rest)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.status = int(status_line.split()[1])
        return self.status, headers

    async def open(self, path: str, **options: object) -> None:
        """A valid handshake to ``path``; fails unless it is accepted."""
        key = new_key()
        status, headers = await self.handshake(request(path, key=key, **options))  # type: ignore[arg-type]
        assert status == 101, f"handshake to {path} got {status}"
        assert headers.get("sec-websocket-accept") == accept_value(key)

    async def next_frame(self, timeout: float = 30.0) -> Frame | None:
        """The next frame from the server, or None at EOF; fails after ``timeout``."""
        with trio.fail_after(timeout):
            while True:
                parsed = self._parse()
                if parsed is not None:
                    return parsed
                if not await self._fill():
                    return None

    def _parse(self) -> Frame | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        length, offset = buf[1] & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return None
            length, offset = struct.unpack("!H", buf[2:4])[0], 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length, offset = struct.unpack("!Q", buf[2:10])[0], 10
        if len(buf) < offset + length:
            return None
        result = Frame(bool(buf[0] & 0x80), buf[0] & 0x0F, bytes(buf[offset : offset + length]))
        del buf[: offset + length]
        return result

    async def message(self) -> Frame:
        """The next data frame (ping/pong skipped); fails at EOF or on a close."""
        while True:
            got = await self.next_frame()
            assert got is not None, "the server closed the connection"
            assert got.opcode != OP_CLOSE, (
                f"the server closed: {got.close_code} {got.payload[2:]!r}"
            )
            if got.opcode in (OP_TEXT, OP_BINARY, OP_CONT):
                return got

    async def closing(self) -> Frame | None:
        """Read up to the server's close frame and return it (None when TCP ended without
        one)."""
        while True:
            got = await self.next_frame()
            if got is None or got.opcode == OP_CLOSE:
                return got

    async def until_eof(self) -> None:
        """Read until the server ends the TCP connection (kept in ``body``, up to 64 KiB)."""
        while True:
            if len(self.body) < 65536:
                self.body += self._buffer
            self._buffer.clear()
            if not await self._fill():
                return
