"""``plugin-execution plugins``: the discovered plugins, what each may do, and load errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import attrs

from ..errors import ManifestError
from ..manifest import Permissions, PluginManifest
from ._common import EXIT_FAILED, EXIT_OK, add_plugin_path, dumps, load_registry

__all__ = ["add_parser"]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plugins = commands.add_parser(
        "plugins",
        help="list discovered plugins, their handlers and channels",
        description="List discovered plugins and any that failed to load (exit 1 if any did).",
    )
    add_plugin_path(plugins)
    plugins.add_argument("--json", action="store_true", help="print JSON instead of text")
    plugins.set_defaults(func=_cmd_plugins)


def _cmd_plugins(args: argparse.Namespace) -> int:
    registry = load_registry(args.plugin_path, strict=False)
    manifests = sorted(registry, key=lambda m: m.id)
    if args.json:
        print(
            dumps(
                {
                    "plugins": [_manifest_dict(m) for m in manifests],
                    "errors": [e.to_dict() for e in registry.load_errors],
                },
                indent=2,
            )
        )
    else:
        _print_plugins(manifests, registry.load_errors, sys.stdout)
    return EXIT_FAILED if registry.load_errors else EXIT_OK


def _manifest_dict(manifest: PluginManifest) -> dict[str, Any]:
    return {
        "id": manifest.id,
        "version": manifest.version,
        "description": manifest.description,
        "root": manifest.root,
        "handlers": [
            {
                "id": h.id,
                "entry": h.entry,
                "timeout": h.timeout,
                "warmup": h.warmup,
                # What the handler runs with: its own permissions replace the plugin's.
                "permissions": attrs.asdict(manifest.permissions_for(h)),
                "permissions_overridden": h.permissions is not None,
            }
            for h in manifest.handlers
        ],
        "channels": [
            {"path": c.path, "entry": c.entry, "style": c.style} for c in manifest.channels
        ],
        "permissions": attrs.asdict(manifest.permissions),
    }


def _print_plugins(
    manifests: Sequence[PluginManifest], errors: Sequence[ManifestError], out: TextIO
) -> None:
    if not manifests:
        print("no plugins found", file=out)
    for manifest in manifests:
        title = f"{manifest.id} {manifest.version}"
        if manifest.description:
            title += f" - {manifest.description}"
        print(title, file=out)
        if manifest.root:
            print(f"  root: {manifest.root}", file=out)
        width = max((len(h.id) for h in manifest.handlers), default=0)
        for h in manifest.handlers:
            extra = f" (timeout {h.timeout:g} s)" if h.timeout is not None else ""
            print(f"  handler  {h.id:<{width}}  {h.entry}{extra}", file=out)
            source = "its own" if h.permissions is not None else "the plugin's"
            granted = _grants(manifest.permissions_for(h)) or "nothing beyond the defaults"
            print(f"  {'':<{width + 9}}  may: {granted} ({source} permissions)", file=out)
        for c in manifest.channels:
            print(f"  channel  {c.path}  {c.entry} ({c.style})", file=out)
    if manifests:
        print(
            "\n(every handler may also read its plugin's root and read and write its "
            "workspace; docs/permissions.md)",
            file=out,
        )
    if errors:
        print(f"\n{len(errors)} plugin(s) failed to load:", file=out)
        for error in errors:
            print(f"  {error.message}", file=out)


def _grants(permissions: Permissions) -> str:
    """The non-empty grants of ``permissions`` as ``name=value`` items, e.g.
    ``fs.read=/data/*, platform=cache, quotas.timeout=5``."""

    def flat(prefix: str, value: Any) -> Iterator[str]:
        if isinstance(value, dict):
            for key, inner in value.items():
                yield from flat(f"{prefix}.{key}" if prefix else key, inner)
        elif value not in (None, (), [], ""):
            shown = ",".join(map(str, value)) if isinstance(value, list | tuple) else value
            yield f"{prefix}={shown}"

    return "; ".join(flat("", attrs.asdict(permissions)))
