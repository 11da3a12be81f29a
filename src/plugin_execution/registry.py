"""PluginRegistry: plugin id -> manifest -> handler import path.

Plugins are discovered from the ``plugin_execution.plugins`` entry-point group, from
``plugin.toml`` files, or registered directly. The registry resolves ids to specs; it does
not import handler code (backends do that where the handler runs).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import attrs

from .errors import HandlerNotFoundError, ManifestError, PluginNotFoundError
from .manifest import (
    ChannelSpec,
    HandlerSpec,
    Permissions,
    PluginManifest,
    load_manifest,
    manifest_from_dict,
)

__all__ = ["ENTRY_POINT_GROUP", "PluginRegistry", "ResolvedHandler"]

ENTRY_POINT_GROUP = "plugin_execution.plugins"

log = logging.getLogger(__name__)


@attrs.frozen
class ResolvedHandler:
    """What a backend needs to run one handler: where it is and what it may do."""

    manifest: PluginManifest
    spec: HandlerSpec | ChannelSpec
    permissions: Permissions

    @property
    def entry(self) -> str:
        return self.spec.entry

    @property
    def root(self) -> str | None:
        return self.manifest.root


class PluginRegistry:
    """The plugins a host knows, by id.

    Broken plugins found during discovery do not stop the host: each is logged and kept in
    :attr:`load_errors` so ``plugin-execution plugins`` can show it.
    """

    def __init__(self, manifests: Iterable[PluginManifest] = ()) -> None:
        self._plugins: dict[str, PluginManifest] = {}
        # resolve() is on every execution's path: remembered until the plugins change.
        self._resolved: dict[tuple[str, str], ResolvedHandler] = {}
        self.load_errors: list[ManifestError] = []
        for manifest in manifests:
            self.register(manifest)

    def register(
        self, manifest: PluginManifest | Mapping[str, Any], *, replace: bool = False
    ) -> PluginManifest:
        """Add a plugin. A mapping is validated like a ``plugin.toml``.

        Raises :class:`ManifestError` when the id is taken (unless ``replace``).
        """
        if not isinstance(manifest, PluginManifest):
            manifest = manifest_from_dict(manifest)
        if manifest.id in self._plugins and not replace:
            raise ManifestError(
                f"plugin {manifest.id!r} is already registered; pass replace=True to replace it",
                plugin_id=manifest.id,
            )
        self._plugins[manifest.id] = manifest
        self._resolved.clear()
        return manifest

    def unregister(self, plugin_id: str) -> None:
        self.get(plugin_id)
        del self._plugins[plugin_id]
        self._resolved.clear()

    def get(self, plugin_id: str) -> PluginManifest:
        """The manifest of ``plugin_id``; raises :class:`PluginNotFoundError`."""
        try:
            return self._plugins[plugin_id]
        except KeyError:
            known = ", ".join(sorted(self._plugins)) or "none"
            raise PluginNotFoundError(
                f"no plugin {plugin_id!r} is registered (known: {known})", plugin_id=plugin_id
            ) from None

    def resolve(self, plugin_id: str, handler_id: str) -> ResolvedHandler:
        """Find a handler; raises :class:`PluginNotFoundError` / :class:`HandlerNotFoundError`."""
        resolved = self._resolved.get((plugin_id, handler_id))
        if resolved is not None:
            return resolved
        manifest = self.get(plugin_id)
        spec = manifest.handler(handler_id)
        if spec is None:
            known = ", ".join(h.id for h in manifest.handlers) or "none"
            raise HandlerNotFoundError(
                f"plugin {plugin_id!r} has no handler {handler_id!r} (it has: {known})",
                plugin_id=plugin_id,
                handler_id=handler_id,
            )
        resolved = ResolvedHandler(manifest, spec, manifest.permissions_for(spec))
        self._resolved[(plugin_id, handler_id)] = resolved
        return resolved

    def __contains__(self, plugin_id: object) -> bool:
        return plugin_id in self._plugins

    def __iter__(self) -> Iterator[PluginManifest]:
        return iter(list(self._plugins.values()))

    def __len__(self) -> int:
        return len(self._plugins)

    def load_path(self, path: str | Path, *, replace: bool = False) -> PluginManifest:
        """Register the plugin described by a ``plugin.toml`` (or a directory holding one)."""
        return self.register(load_manifest(path), replace=replace)

    @classmethod
    def from_paths(cls, *paths: str | Path) -> PluginRegistry:
        """A registry of the ``plugin.toml`` files at ``paths``; errors propagate."""
        registry = cls()
        for path in paths:
            registry.load_path(path)
        return registry

    @classmethod
    def from_entry_points(cls, group: str = ENTRY_POINT_GROUP) -> PluginRegistry:
        """Discover installed plugins from an entry-point group.

        An entry point may name a :class:`PluginManifest`, a mapping, a path to a
        ``plugin.toml``, or a callable returning one of those.
        """
        registry = cls()
        for ep in entry_points(group=group):
            try:
                registry.register(_manifest_of(ep))
            except ManifestError as exc:
                log.warning("skipping plugin entry point %r: %s", ep.name, exc.message)
                registry.load_errors.append(exc)
        return registry


def _manifest_of(ep: EntryPoint) -> PluginManifest:
    try:
        obj = ep.load()
        if callable(obj) and not isinstance(obj, PluginManifest | Mapping):
            obj = obj()
    except Exception as exc:
        raise ManifestError(
            f"entry point {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
        ) from None
    if isinstance(obj, PluginManifest):
        return obj
    if isinstance(obj, Mapping):
        # a relative root is relative to the module that declared the manifest
        module = getattr(ep, "module", "") or ""
        origin = getattr(sys.modules.get(module), "__file__", None)
        return manifest_from_dict(obj, base_dir=Path(origin).parent if origin else None)
    if isinstance(obj, str | Path):
        return load_manifest(obj)
    raise ManifestError(
        f"entry point {ep.name!r} ({ep.value}) gave a {type(obj).__name__}; expected a "
        "PluginManifest, a mapping, or a path to plugin.toml"
    )
