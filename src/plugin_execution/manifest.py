"""Plugin manifests: what a plugin is, which handlers and channels it has, what it may touch.

A manifest is plain data (attrs frozen classes) so it can be written in Python, in a
``plugin.toml`` file, or returned by an entry point, and validated the same way each time.
A malformed manifest raises :class:`~plugin_execution.errors.ManifestError` naming the key.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs

from .errors import ManifestError
from .grant_patterns import parse_connect_pattern, parse_service_grant, parse_url_pattern

__all__ = [
    "ChannelSpec",
    "EnvPermissions",
    "FsPermissions",
    "HandlerSpec",
    "InvokePermissions",
    "NetworkPermissions",
    "Permissions",
    "PluginManifest",
    "Quotas",
    "ShellPermissions",
    "load_manifest",
    "manifest_from_dict",
]

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_ENTRY = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


def _matches(pattern: re.Pattern[str], what: str) -> Any:
    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, str) or pattern.fullmatch(value) is None:
            raise ValueError(f"{attr.name} {value!r} is not a valid {what}")

    return check


#: An HTTP token (RFC 7230), what a ``Sec-WebSocket-Protocol`` value must be.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")


def _subprotocol(value: str) -> None:
    if _TOKEN.fullmatch(value) is None:
        raise ValueError(f"{value!r} is not a WebSocket subprotocol name (an HTTP token)")


def _positive_or_none(_inst: Any, attr: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attr.name} must be positive, got {value!r}")


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _str_tuple(parse: Callable[[str], object] | None = None) -> Any:
    """A tuple of strings; ``parse``, when given, checks each one (raising ValueError)."""
    validators: list[Any] = [attrs.validators.instance_of(str)]
    if parse is not None:

        def check(_inst: Any, attr: attrs.Attribute[Any], value: str) -> None:
            try:
                parse(value)
            except ValueError as exc:  # cattrs reports the enclosing table: name the key
                raise ValueError(f"{attr.name}: {exc}") from None

        validators.append(check)
    return attrs.field(
        default=(),
        converter=_strings,
        validator=attrs.validators.deep_iterable(attrs.validators.and_(*validators)),
    )


@attrs.frozen
class FsPermissions:
    """Paths or globs a handler may read / write besides its own files and its workspace."""

    read: tuple[str, ...] = _str_tuple()
    write: tuple[str, ...] = _str_tuple()


@attrs.frozen
class NetworkPermissions:
    """``connect``: ``host:port`` patterns (for the kernel sandbox; no ``ctx`` service uses
    them); ``fetch``: URL patterns ``scheme://host[:port][/path-glob]`` for ``ctx.fetch``."""

    connect: tuple[str, ...] = _str_tuple(parse_connect_pattern)
    fetch: tuple[str, ...] = _str_tuple(parse_url_pattern)


@attrs.frozen
class EnvPermissions:
    """Environment variable names (or ``PREFIX*``) a handler may read."""

    read: tuple[str, ...] = _str_tuple()


@attrs.frozen
class ShellPermissions:
    """Commands (argv[0]) a handler may run."""

    allow: tuple[str, ...] = _str_tuple()


@attrs.frozen
class InvokePermissions:
    """Other plugin ids a handler may invoke."""

    allow: tuple[str, ...] = _str_tuple()


@attrs.frozen
class Quotas:
    """Resource caps. ``timeout`` lowers (never raises) a request's timeout."""

    timeout: float | None = attrs.field(default=None, validator=_positive_or_none)
    memory_mb: int | None = attrs.field(default=None, validator=_positive_or_none)
    cpu_s: float | None = attrs.field(default=None, validator=_positive_or_none)


@attrs.frozen
class Permissions:
    """What a plugin's handlers may touch. Secure by default: everything empty.

    Besides what is listed, a handler may always read and write its workspace and read its
    plugin's own files (its ``root``). ``platform`` names services: ``"cache"`` grants the
    plugin's own namespace, ``"cache:shared-*"`` the namespaces matching a pattern
    (likewise ``storage``; for ``events`` the namespace is the topic). See docs/permissions.md.
    """

    fs: FsPermissions = attrs.field(factory=FsPermissions)
    network: NetworkPermissions = attrs.field(factory=NetworkPermissions)
    env: EnvPermissions = attrs.field(factory=EnvPermissions)
    platform: tuple[str, ...] = _str_tuple(parse_service_grant)
    shell: ShellPermissions = attrs.field(factory=ShellPermissions)
    invoke: InvokePermissions = attrs.field(factory=InvokePermissions)
    quotas: Quotas = attrs.field(factory=Quotas)


@attrs.frozen
class HandlerSpec:
    """One handler: ``entry`` is an import path ``"pkg.module:attr"``.

    ``permissions``, when given, replaces the plugin's permissions for this handler.
    ``warmup`` marks the handler for pre-warming by pools with the ``marked`` policy.
    """

    id: str = attrs.field(validator=_matches(_ID, "handler id"))
    entry: str = attrs.field(validator=_matches(_ENTRY, "entry ('package.module:attribute')"))
    timeout: float | None = attrs.field(default=None, validator=_positive_or_none)
    permissions: Permissions | None = None
    warmup: bool = False
    description: str = ""


@attrs.frozen
class ChannelSpec:
    """A WebSocket channel: ``path`` under the plugin's base route, handled by ``entry``.

    ``subprotocols``: the WebSocket subprotocols the channel speaks (``Sec-WebSocket-
    Protocol`` tokens), most preferred first; when given, a client must propose one of
    them, and the one agreed is ``ctx.context["subprotocol"]``.
    """

    path: str = attrs.field(validator=_matches(re.compile(r"/[\w./-]*"), "channel path"))
    entry: str = attrs.field(validator=_matches(_ENTRY, "entry ('package.module:attribute')"))
    style: Literal["session", "events"] = attrs.field(
        default="session", validator=attrs.validators.in_(("session", "events"))
    )
    permissions: Permissions | None = None
    subprotocols: tuple[str, ...] = _str_tuple(_subprotocol)


def _unique(what: str, key: str) -> Any:
    def check(_inst: Any, _attr: attrs.Attribute[Any], items: tuple[Any, ...]) -> None:
        seen: set[str] = set()
        for item in items:
            value = getattr(item, key)
            if value in seen:
                raise ValueError(f"duplicate {what} {value!r}")
            seen.add(value)

    return check


def _handler_tuple(handlers: Iterable[HandlerSpec]) -> tuple[HandlerSpec, ...]:
    return tuple(handlers)


def _channel_tuple(channels: Iterable[ChannelSpec]) -> tuple[ChannelSpec, ...]:
    return tuple(channels)


@attrs.frozen
class PluginManifest:
    """A plugin: its id, version, handlers, channels and permissions.

    ``root`` is a directory holding the plugin's own modules; workers put it on ``sys.path``
    before importing the plugin's entries, so a plugin need not be installed to run.
    """

    id: str = attrs.field(validator=_matches(_ID, "plugin id"))
    version: str = "0"
    handlers: tuple[HandlerSpec, ...] = attrs.field(
        default=(), converter=_handler_tuple, validator=_unique("handler id", "id")
    )
    channels: tuple[ChannelSpec, ...] = attrs.field(
        default=(), converter=_channel_tuple, validator=_unique("channel path", "path")
    )
    permissions: Permissions = attrs.field(factory=Permissions)
    root: str | None = None
    description: str = ""

    def handler(self, handler_id: str) -> HandlerSpec | None:
        """The handler spec with this id, or None."""
        for spec in self.handlers:
            if spec.id == handler_id:
                return spec
        return None

    def permissions_for(self, spec: HandlerSpec | ChannelSpec) -> Permissions:
        """The permissions in force for one handler or channel."""
        return spec.permissions if spec.permissions is not None else self.permissions


_strict = cattrs.Converter(forbid_extra_keys=True)


def _structure_strings(value: Any, _: Any) -> tuple[str, ...]:
    """A string is one pattern (not its characters); every item must be a string.

    Raises ValueError, as every other manifest check does, so load errors are uniform.
    """
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list | tuple):
        raise ValueError(  # noqa: TRY004
            f"expected a string or a list of strings, got {type(value).__name__}"
        )
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"expected strings, got {item!r} ({type(item).__name__})")  # noqa: TRY004
    return tuple(value)


_strict.register_structure_hook_func(lambda t: t == tuple[str, ...], _structure_strings)


def _keyed_list(value: Any) -> Any:
    """Accept ``[handlers.greet] entry = ...`` (a table keyed by id) as well as a list."""
    if isinstance(value, Mapping):
        items = []
        for key, body in value.items():
            if isinstance(body, Mapping):
                if body.get("id", key) != key:
                    raise ManifestError(
                        f"handler table [handlers.{key}] sets a different id {body['id']!r}"
                    )
                body = {**body, "id": key}
            items.append(body)
        return items
    return value


def _describe(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        keys = [field.name for field in attrs.fields(exc.cl)]
        return "; ".join(_unknown_key(extra, keys) for extra in sorted(exc.extra_fields))
    if str(exc):
        return str(exc)
    return cattrs.v.format_exception(exc, type_)


def _unknown_key(key: str, keys: list[str]) -> str:
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r} ({hint}keys here: {', '.join(keys)})"


def manifest_from_dict(data: Mapping[str, Any], *, base_dir: Path | None = None) -> PluginManifest:
    """Validate plain data (from TOML, JSON, an entry point) into a :class:`PluginManifest`.

    A relative ``root`` is resolved against ``base_dir``. Raises :class:`ManifestError`
    listing every problem with the path of its key, e.g. ``handlers[0].entry``.
    """
    if not isinstance(data, Mapping):
        raise ManifestError(f"a manifest must be a table/mapping, got {type(data).__name__}")
    try:
        data = {**data, "handlers": _keyed_list(data.get("handlers", ()))}
        manifest = _strict.structure(data, PluginManifest)
    except Exception as exc:
        problems = "; ".join(
            cattrs.transform_error(exc, path="manifest", format_exception=_describe)
        )
        plugin = data.get("id") if isinstance(data.get("id"), str) else None
        raise ManifestError(f"invalid plugin manifest: {problems}", plugin_id=plugin) from None
    if manifest.root is not None and base_dir is not None:
        manifest = attrs.evolve(manifest, root=str((base_dir / manifest.root).resolve()))
    return manifest


def load_manifest(path: str | Path) -> PluginManifest:
    """Load a ``plugin.toml`` file (or a directory holding one).

    ``root`` defaults to the file's directory, so a plugin can sit next to its manifest.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "plugin.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"no plugin manifest at {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ManifestError(f"cannot read plugin manifest {path}: {exc}") from None
    data.setdefault("root", ".")
    try:
        return manifest_from_dict(data, base_dir=path.parent)
    except ManifestError as exc:
        exc.message = f"{path}: {exc.message}"
        raise
