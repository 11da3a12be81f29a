"""The kernel sandbox of the subprocess backend: layers, detection, and what a child may touch.

Layers, in the order a child applies them (see docs/sandbox.md for what each stops):

- ``process`` and ``rlimits`` (always): own session, no inherited fds, an environment
  allow-list, cwd = the workspace; resource limits from the quotas;
- ``capabilities``: a child of a root host drops every capability (:mod:`.capabilities`);
- ``landlock``: file system, TCP and signal restrictions (:mod:`.landlock`);
- ``bubblewrap``: namespaces around the child's interpreter (:mod:`.bubblewrap`);
- ``seccomp``: no new processes or programs unless ``shell.allow``, no network socket unless
  ``network.connect`` (:mod:`.seccomp`).

:mod:`.launcher` applies the same layers to a command ``ctx.shell`` runs for a plugin.

Names load on first use (PEP 562): a worker child imports ``sandbox.landlock`` through this
package and must not pay for attrs or trio.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .policy import ChildSandbox as ChildSandbox
    from .policy import SandboxPolicy as SandboxPolicy
    from .support import LAYERS as LAYERS
    from .support import OPTIONAL_LAYERS as OPTIONAL_LAYERS
    from .support import LayerStatus as LayerStatus
    from .support import SandboxSupport as SandboxSupport
    from .support import detect as detect

_EXPORTS = {
    "ChildSandbox": "policy",
    "SandboxPolicy": "policy",
    "LAYERS": "support",
    "OPTIONAL_LAYERS": "support",
    "LayerStatus": "support",
    "SandboxSupport": "support",
    "detect": "support",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
