"""``ctx.fetch``: HTTP requests to the URLs a handler was granted (``network.fetch``).

httpx runs on trio (through anyio), imported the first time a handler fetches. The URL is
parsed by httpx itself, so what is checked is what is requested: ``http://good@evil/`` is a
request to ``evil``. Redirects are followed by hand, checking every hop. Paths are compared
percent-decoded, and dot segments or encoded slashes in them are refused. The environment's
proxy settings and ``.netrc`` are ignored (``trust_env=False``).

Headers that tell a server or a shared reverse proxy which host to route to are checked like
the URL, at every hop: ``Host``, ``X-Forwarded-Host``, ``X-Host``, ``X-Original-Host`` and
``X-Forwarded-Server`` must name a host that ``network.fetch`` grants for this scheme, port
and path; ``Forwarded``, ``X-Original-URL`` and ``X-Rewrite-URL`` (which route by a URL or
path the host cannot check) are refused outright. A name is compared with ``_`` read as
``-`` (``X_Forwarded_Host``), as CGI and WSGI servers read it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import trio

from ..errors import ExecutionTimeoutError, InvalidRequestError
from . import _args

if TYPE_CHECKING:
    import httpx

    from .session import PlatformSession

__all__ = ["FetchService"]

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_REDIRECTS = 10
#: Headers that name the host to route to: allowed when the grants allow that host.
_HOST_HEADERS = frozenset(
    {"host", "x-forwarded-host", "x-host", "x-original-host", "x-forwarded-server"}
)
#: Headers that route by a URL or forwarding record: never set by a plugin.
_ROUTING_HEADERS = frozenset({"forwarded", "x-original-url", "x-rewrite-url"})
_DEFAULT_TIMEOUT_S = 30.0


class FetchService:
    """Host side of ``ctx.fetch``. One pooled ``httpx.AsyncClient`` per platform, made on
    first use and closed by :meth:`aclose`."""

    def __init__(self, *, max_bytes: int, transport: httpx.AsyncBaseTransport | None) -> None:
        self.max_bytes = max_bytes
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(
                transport=self._transport, trust_env=False, follow_redirects=False
            )
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with trio.CancelScope(shield=True):
                await client.aclose()

    def _check(
        self, session: PlatformSession, url: httpx.URL, headers: list[tuple[str, str]]
    ) -> None:
        shown = str(url)
        scheme = url.scheme
        if scheme not in _DEFAULT_PORTS:
            session.deny("network.fetch", shown, "only http and https URLs can be fetched")
        decoded = unquote(url.raw_path.decode("ascii").partition("?")[0])
        segments = decoded.split("/")
        if "%2f" in url.raw_path.decode("ascii").lower() or "\\" in decoded:
            session.deny("network.fetch", shown, "encoded slashes are not allowed in paths")
        if any(part in (".", "..") for part in segments):
            session.deny("network.fetch", shown, "dot segments are not allowed in paths")
        port = url.port if url.port is not None else _DEFAULT_PORTS[scheme]
        if not session.grants.url(scheme, url.host.lower(), port, decoded):
            session.deny("network.fetch", shown)
        for name, value in headers:
            # CGI and WSGI servers (and frameworks on them) read X_Forwarded_Host as
            # X-Forwarded-Host: one header to them, so one here.
            key = name.strip().lower().replace("_", "-")
            if key in _ROUTING_HEADERS:
                session.deny(
                    "network.fetch",
                    f"{shown} with header {key}",
                    "headers that route the request elsewhere cannot be set by a plugin",
                )
            if key in _HOST_HEADERS and not self._host_granted(session, value, scheme, decoded):
                session.deny(
                    "network.fetch",
                    f"{shown} with header {key}: {value[:200]}",
                    "a host header must name a host the grant allows",
                )

    @staticmethod
    def _host_granted(session: PlatformSession, value: str, scheme: str, path: str) -> bool:
        """Whether ``value`` (``host[:port]``) names a host the grants allow at ``path``."""
        import httpx

        text = value.strip()
        if not text or any(char in text for char in "/?#@\\ \t"):
            return False
        try:
            named = httpx.URL(f"{scheme}://{text}/")
        except (httpx.InvalidURL, ValueError):
            return False
        if not named.host:
            return False
        port = named.port if named.port is not None else _DEFAULT_PORTS[scheme]
        return session.grants.url(scheme, named.host.lower(), port, path)

    async def request(
        self,
        session: PlatformSession,
        url: Any,
        method: Any = "GET",
        headers: Any = None,
        body: Any = None,
        timeout: Any = None,
    ) -> dict[str, Any]:
        import httpx

        text = _args.text(url, "url", limit=8192)
        verb = method.upper() if type(method) is str else method
        if verb not in _METHODS:
            raise InvalidRequestError(f"method must be one of {', '.join(sorted(_METHODS))}")
        pairs = _headers(headers)
        content = None if body is None else _args.data_bytes(body, "body")
        seconds = _args.optional_seconds(timeout, "timeout") or _DEFAULT_TIMEOUT_S
        seconds = min(seconds, max(0.0, session.remaining()))
        try:
            target = httpx.URL(text)
        except (httpx.InvalidURL, ValueError) as exc:
            raise InvalidRequestError(f"not a URL: {text!r}: {exc}") from None
        with trio.move_on_after(seconds) as scope:
            for _ in range(_MAX_REDIRECTS + 1):
                self._check(session, target, pairs)
                response = await self._send(verb, target, pairs, content)
                if response.get("next") is None:
                    return response
                target = response.pop("next")
                if response["status"] == 303 or (
                    response["status"] in (301, 302) and verb == "POST"
                ):
                    verb, content = "GET", None
            raise InvalidRequestError(f"more than {_MAX_REDIRECTS} redirects from {text!r}")
        assert scope.cancelled_caught
        raise ExecutionTimeoutError(
            f"fetch of {text!r} took longer than {seconds:g} s",
            details={"timeout_s": seconds},
        )

    async def _send(
        self, method: str, url: httpx.URL, headers: list[tuple[str, str]], body: bytes | None
    ) -> dict[str, Any]:
        import httpx

        client = self._http()
        request = client.build_request(method, url, headers=headers, content=body)
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise ConnectionError(f"fetch of {str(url)!r} failed: {exc}") from None
        try:
            if response.is_redirect and "location" in response.headers:
                return {
                    "status": response.status_code,
                    "next": url.join(response.headers["location"]),
                }
            chunks = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > self.max_bytes:
                    raise InvalidRequestError(
                        f"the response of {str(url)!r} is over the {self.max_bytes}-byte limit"
                    )
                chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise ConnectionError(f"fetch of {str(url)!r} failed: {exc}") from None
        finally:
            await response.aclose()
        return {
            "status": response.status_code,
            "headers": [[k, v] for k, v in response.headers.multi_items()],
            "body": b"".join(chunks),
            "url": str(url),
        }


def _headers(value: Any) -> list[tuple[str, str]]:
    if value is None:
        return []
    items = value.items() if isinstance(value, dict) else value
    pairs = []
    try:
        for name, text in items:
            if type(name) is not str or type(text) is not str:
                raise TypeError
            pairs.append((name, text))
    except (TypeError, ValueError):
        raise InvalidRequestError("headers must map strings to strings") from None
    return pairs
