"""The grammar of permission grants: ``network.fetch`` URL patterns, ``network.connect``
``host:port`` patterns and ``platform`` service grants.

Parsed twice: when a manifest is loaded (a malformed grant is a :class:`ManifestError` naming
the key, see :mod:`plugin_execution.manifest`) and when a handler's grants are compiled for
checks (:mod:`plugin_execution.permissions`). Pure functions on strings; it depends on neither.
"""

from __future__ import annotations

import fnmatch
import re
from typing import NamedTuple

__all__ = [
    "PLATFORM_SERVICES",
    "UrlPattern",
    "parse_connect_pattern",
    "parse_service_grant",
    "parse_url_pattern",
]

#: Services granted through ``permissions.platform``; the others have keys of their own.
PLATFORM_SERVICES = ("cache", "storage", "events")
_OWN_KEYS = {
    "fs": "fs.read / fs.write",
    "env": "env.read",
    "fetch": "network.fetch",
    "network": "network.fetch / network.connect",
    "shell": "shell.allow",
    "invoke": "invoke.allow",
}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST = re.compile(r"(\*|(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*|\[[0-9A-Fa-f:.]+\])")


def parse_service_grant(entry: str) -> tuple[str, str | None]:
    """``"cache"`` -> ``("cache", None)``; ``"events:orders.*"`` -> ``("events", "orders.*")``.

    Raises ValueError naming the problem: an unknown service, an empty namespace, or a
    service that is granted with a key of its own (``fs``, ``env``, ``shell``...).
    """
    service, sep, namespace = entry.partition(":")
    if service in _OWN_KEYS:
        raise ValueError(
            f"{entry!r}: {service} is not granted through platform; use {_OWN_KEYS[service]}"
        )
    if service not in PLATFORM_SERVICES:
        raise ValueError(
            f"{entry!r}: unknown platform service {service!r} "
            f"(known: {', '.join(PLATFORM_SERVICES)}; add ':namespace' to name a namespace)"
        )
    if sep and (not namespace or namespace != namespace.strip() or "\x00" in namespace):
        raise ValueError(f"{entry!r}: the namespace after ':' must be a non-empty pattern")
    return service, namespace if sep else None


class UrlPattern(NamedTuple):
    """A parsed ``network.fetch`` pattern: ``scheme://host[:port][/path-glob]``.

    ``host`` is exact, ``*.domain`` (any subdomain) or ``*``; ``port`` is ``None`` for any
    port, else a number (the scheme's default when the pattern names none); ``path`` is a
    glob where ``*`` also matches ``/``, or ``None`` for any path.
    """

    scheme: str
    host: str
    port: int | None
    path: str | None

    def matches(self, scheme: str, host: str, port: int, path: str) -> bool:
        if scheme != self.scheme or (self.port is not None and port != self.port):
            return False
        if self.host != "*":
            if self.host.startswith("*."):
                if not host.endswith(self.host[1:]):
                    return False
            elif host != self.host:
                return False
        return self.path is None or fnmatch.fnmatchcase(path, self.path)


def parse_url_pattern(text: str) -> UrlPattern:
    """Parse a ``network.fetch`` pattern; ValueError says what is wrong with it."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in _DEFAULT_PORTS:
        raise ValueError(
            f"{text!r} is not a URL pattern: expected http:// or https:// then a host, "
            "e.g. 'https://api.example.com/v1/*'"
        )
    scheme = scheme.lower()
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        raise ValueError(f"{text!r}: a URL pattern must not contain user info ('@')")
    host, port = _split_port(text, authority, _DEFAULT_PORTS[scheme])
    return UrlPattern(scheme, host, port, ("/" + path) if slash and path not in ("", "*") else None)


def parse_connect_pattern(text: str) -> tuple[str, int | None]:
    """Parse a ``network.connect`` pattern ``host:port`` (either may be ``*``)."""
    if ":" not in text.replace("[", "").replace("]", "") or "/" in text or "@" in text:
        raise ValueError(f"{text!r} is not a 'host:port' pattern, e.g. 'db.internal:5432'")
    return _split_port(text, text, None)


def _split_port(text: str, authority: str, default: int | None) -> tuple[str, int | None]:
    if authority.startswith("["):
        end = authority.find("]")
        host, port_text = authority[: end + 1], authority[end + 2 :] if end > 0 else ""
        has_port = authority[end + 1 : end + 2] == ":"
    else:
        host, has_colon, port_text = authority.rpartition(":")
        has_port = bool(has_colon)
        if not has_colon:
            host = authority
    if not _HOST.fullmatch(host):
        raise ValueError(f"{text!r}: {host!r} is not a host name, '*.domain' or '*'")
    if not has_port:
        if default is None:
            raise ValueError(f"{text!r}: name a port, or '*' for any")
        return host.lower(), default
    if port_text == "*":
        return host.lower(), None
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number in 1..65535 or '*'")
    return host.lower(), int(port_text)
