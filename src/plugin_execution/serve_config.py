"""The options of ``plugin-execution serve``: flags, a ``--config`` TOML file, and what they
build (TLS context, bearer-token and origin checks, limits).

A config file holds the same keys as the flags, with ``_`` for ``-`` (``tls_cert``,
``allow_origin`` as a list...); a flag given on the command line wins over the file. See
docs/channels.md, "Running serve in production".
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from trio_websocket import WebSocketRequest

from .channels.router import DEFAULT_MAX_MESSAGE_SIZE, HandshakeRejected

__all__ = ["ConfigError", "OriginPolicy", "ServeOptions", "TokenAuth", "load_options"]


class ConfigError(ValueError):
    """A config file or option that cannot be used; the message says which and why."""


def _positive_or_none(_inst: Any, attr: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not value > 0:
        raise ConfigError(f"{attr.name} must be positive, not {value!r}")


@attrs.frozen(kw_only=True)
class ServeOptions:
    """Everything ``serve`` runs with. Sizes in bytes, times in seconds.

    ``allow_origin``: browser origins (``scheme://host[:port]``) allowed to connect besides
    the server's own; ``*`` allows any. ``max_queue`` applies to the worker-pool backend.
    """

    host: str = "127.0.0.1"
    port: int = 8765
    backend: str = "auto"
    base_path: str = "/v1/ws/plugins"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tokens_file: Path | None = None
    allow_origin: tuple[str, ...] = ()
    max_connections: int | None = attrs.field(default=None, validator=_positive_or_none)
    max_message_size: int = attrs.field(
        default=DEFAULT_MAX_MESSAGE_SIZE, validator=_positive_or_none
    )
    idle_timeout: float | None = attrs.field(default=300.0, validator=_positive_or_none)
    max_queue: int | None = attrs.field(default=None, validator=_positive_or_none)

    def __attrs_post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: give both or neither")
        if self.max_queue is not None and self.backend != "worker-pool":
            raise ConfigError(
                "max_queue applies to the worker-pool backend: add --backend worker-pool"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0-65535, not {self.port}")

    @property
    def scheme(self) -> str:
        return "ws" if self.tls_cert is None else "wss"

    def ssl_context(self) -> ssl.SSLContext | None:
        """A server TLS context from ``tls_cert`` / ``tls_key`` (PEM), or None for plain."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load tls_cert/tls_key: {exc}") from None
        return context


_FIELDS = {field.name: field for field in attrs.fields(ServeOptions)}
_PATHS = {"tls_cert", "tls_key", "tokens_file"}
_INTS = {"port", "max_connections", "max_message_size", "max_queue"}


def load_options(flags: Mapping[str, Any], config: Path | None = None) -> ServeOptions:
    """Options from the ``config`` TOML file, overridden by ``flags`` that are not None.

    Relative paths in the file are relative to the file's directory. Raises
    :class:`ConfigError` for an unreadable file, an unknown key or a bad value.
    """
    values: dict[str, Any] = {}
    if config is not None:
        try:
            data = tomllib.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read the config file {config}: {exc}") from None
        for key, value in data.items():
            if key not in _FIELDS:
                known = ", ".join(sorted(_FIELDS))
                raise ConfigError(f"{config}: unknown key {key!r} (known: {known})")
            if key in _PATHS and isinstance(value, str):
                value = config.parent / value
            values[key] = value
    values.update({key: value for key, value in flags.items() if value is not None})
    return _structure(values)


def _structure(values: dict[str, Any]) -> ServeOptions:
    for key, value in values.items():
        if key in _PATHS:
            if not isinstance(value, str | Path):
                raise ConfigError(f"{key} must be a path, not {value!r}")
            values[key] = Path(value)
        elif key == "allow_origin":
            origins = [value] if isinstance(value, str) else value
            if not isinstance(origins, list | tuple) or not all(
                isinstance(o, str) for o in origins
            ):
                raise ConfigError(f"allow_origin must be a list of origins, not {value!r}")
            values[key] = tuple(o.rstrip("/") for o in origins)
        elif key in _INTS and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{key} must be an integer, not {value!r}")
        elif key == "idle_timeout" and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            raise ConfigError(f"idle_timeout must be a number of seconds, not {value!r}")
        elif key in {"host", "backend", "base_path"} and not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, not {value!r}")
    try:
        return ServeOptions(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


# -- who may connect ------------------------------------------------------------------------


def _header(request: WebSocketRequest, name: bytes) -> str | None:
    for key, value in request.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


@attrs.frozen
class OriginPolicy:
    """Refuses (403) a handshake whose ``Origin`` header is neither the server's own origin
    nor in ``allowed``; ``*`` allows any.

    Browsers always send ``Origin`` with a WebSocket handshake and let any page open one
    (no same-origin policy applies), so without this check any web page a user visits
    could talk to the server with the user's cookies and network position. A client that
    sends no ``Origin`` (not a browser) is not concerned.
    """

    allowed: tuple[str, ...] = ()

    def check(self, request: WebSocketRequest) -> None:
        origin = _header(request, b"origin")
        if origin is None or "*" in self.allowed or origin.rstrip("/") in self.allowed:
            return
        parsed = urllib.parse.urlsplit(origin)
        # wsproto keeps the Host header out of request.headers: read it from its event.
        host = getattr(getattr(request, "_event", None), "host", None)
        if parsed.netloc and host is not None and parsed.netloc.lower() == host.lower():
            return  # the server's own origin
        raise HandshakeRejected(403, f"the origin {origin} is not allowed (see --allow-origin)")


class TokenAuth:
    """Bearer tokens from a file: one per line, ``#`` starts a comment, blank lines ignored.

    A handshake presents its token as ``Authorization: Bearer TOKEN`` or, for browsers
    (which cannot set headers on a WebSocket), as ``?token=TOKEN``. Tokens are compared in
    constant time. The principal a channel sees is ``{"token": ID}``, ``ID`` the first 12
    hex digits of the token's SHA-256 (never the token itself).
    """

    def __init__(self, tokens: list[str]) -> None:
        if not tokens:
            raise ConfigError("the tokens file holds no token")
        self._tokens = [token.encode() for token in tokens]

    @classmethod
    def from_file(cls, path: Path) -> TokenAuth:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the tokens file {path}: {exc}") from None
        lines = (line.partition("#")[0].strip() for line in text.splitlines())
        return cls([line for line in lines if line])

    def principal(self, request: WebSocketRequest) -> dict[str, str]:
        """The principal of a valid token; raises :class:`HandshakeRejected` (401) else."""
        presented = _bearer(request)
        if presented is None:
            raise HandshakeRejected(
                401, "a bearer token is required (Authorization: Bearer TOKEN, or ?token=TOKEN)"
            )
        candidate = presented.encode()
        valid = False
        for token in self._tokens:  # no early exit: the time does not tell which matched
            valid |= hmac.compare_digest(candidate, token)
        if not valid:
            raise HandshakeRejected(401, "the bearer token is not valid")
        return {"token": hashlib.sha256(candidate).hexdigest()[:12]}


def _bearer(request: WebSocketRequest) -> str | None:
    header = _header(request, b"authorization")
    if header is not None:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    query = urllib.parse.parse_qs(request.path.partition("?")[2])
    tokens = query.get("token")
    return tokens[0] if tokens else None


def build_authorize(options: ServeOptions) -> Any:
    """The ``authorize`` hook of ``mount_websocket_channels`` for ``options``: the origin
    check, then the token check when a tokens file is given."""
    origins = OriginPolicy(options.allow_origin)
    tokens = TokenAuth.from_file(options.tokens_file) if options.tokens_file else None

    def authorize(request: WebSocketRequest) -> Any:
        origins.check(request)
        return tokens.principal(request) if tokens is not None else True

    return authorize
