"""Testing kit for plugin authors: fixtures and helpers to test a plugin as the host runs it.

Installed as a pytest plugin (entry point ``pytest11``), so with pytest-trio in
``trio_mode`` a plugin's own tests can simply ask for the fixtures::

    # pyproject.toml of the plugin
    [tool.pytest.ini_options]
    trio_mode = true
    plugin_execution_manifests = ["plugin.toml"]   # or an entry-point name, or a dict in code

    # test_plugin.py
    async def test_greets(execution_backend):          # runs once per backend
        result = await execution_backend.execute(
            ExecutionRequest(plugin_id="acme.hello", handler_id="greet", input={"name": "x"})
        )
        assert result.output == "hello x"

What is here:

- :func:`load_registry`: a :class:`PluginRegistry` from paths, dicts, manifests or entry-point
  names, without installing anything;
- :class:`RecordingPlatform`: a :class:`Platform` that records every ``ctx.*`` service call
  a handler makes (on every backend: worker processes proxy their calls to the host);
- :func:`run_handler`: one execution in one line, on a backend made for it;
- fixtures ``plugin_registry``, ``recording_platform`` and ``execution_backend`` (an entered
  backend, parametrised over ``--execution-backends`` or the ``execution_backends`` marker).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import pytest

from .errors import ExecutionError, ManifestError
from .factory import create_execution_backend
from .manifest import PluginManifest
from .platform import Platform
from .registry import ENTRY_POINT_GROUP, PluginRegistry
from .types import ExecutionRequest, ExecutionResult

if TYPE_CHECKING:
    from .platform.session import PlatformSession

__all__ = [
    "DEFAULT_BACKENDS",
    "PlatformCall",
    "RecordingPlatform",
    "load_registry",
    "run_handler",
]

DEFAULT_BACKENDS = ("in-process", "worker-pool", "subprocess")

ManifestSource = str | Path | Mapping[str, Any] | PluginManifest


def load_registry(*sources: ManifestSource, base_dir: str | Path | None = None) -> PluginRegistry:
    """A registry of the given plugins, none of which need be installed.

    Each source is a :class:`PluginManifest`, a mapping (validated like a ``plugin.toml``),
    a path to a ``plugin.toml`` or to the directory holding one, or the name of an entry
    point of the ``plugin_execution.plugins`` group (a name that is no such file or
    directory). A relative path is taken from
    ``base_dir`` (default: the working directory). Raises :class:`ManifestError` naming the
    source that could not be loaded.
    """
    registry = PluginRegistry()
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    for source in sources:
        if isinstance(source, PluginManifest | Mapping):
            registry.register(source)
            continue
        path = Path(source)
        path = path if path.is_absolute() else base / path
        if path.is_file() or (path / "plugin.toml").is_file():
            registry.load_path(path)
        elif isinstance(source, str):
            registry.register(_entry_point_manifest(source))
        else:
            raise ManifestError(f"no plugin.toml at {path}")
    return registry


def _entry_point_manifest(name: str) -> PluginManifest:
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        raise ManifestError(
            f"{name!r} is neither a path to a plugin.toml nor an entry point of the "
            f"{ENTRY_POINT_GROUP!r} group"
        )
    # Entry points may name a manifest, a mapping, a path or a callable: discovery's rules.
    from .registry import _manifest_of

    return _manifest_of(found[0])


@attrs.frozen
class PlatformCall:
    """One ``ctx.<service>.<method>(...)`` call a handler made, and how it ended."""

    plugin_id: str
    handler_id: str
    execution_id: str
    service: str
    method: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    result: Any = None
    error: BaseException | None = None

    @property
    def name(self) -> str:
        """``"service.method"``, e.g. ``"cache.set"``."""
        return f"{self.service}.{self.method}"


class RecordingPlatform(Platform):
    """A :class:`Platform` that records the service calls handlers make, in order.

    Takes :class:`Platform`'s options. Calls are recorded when they end, whether they
    returned or raised (``PermissionDeniedError`` included): assert on ``calls`` or on
    ``names()`` after the execution.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.calls: list[PlatformCall] = []

    def names(self) -> list[str]:
        """The calls as ``"service.method"`` strings, in the order they ended."""
        return [call.name for call in self.calls]

    async def dispatch(
        self,
        session: PlatformSession,
        service: str,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
    ) -> Any:
        def record(result: Any = None, error: BaseException | None = None) -> None:
            self.calls.append(
                PlatformCall(
                    plugin_id=session.plugin_id,
                    handler_id=session.handler_id,
                    execution_id=session.execution_id,
                    service=service,
                    method=method,
                    args=tuple(args),
                    kwargs=dict(kwargs),
                    result=result,
                    error=error,
                )
            )

        try:
            result = await super().dispatch(session, service, method, args, kwargs)
        except Exception as exc:
            record(error=exc)
            raise
        record(result=result)
        return result


async def run_handler(
    registry: PluginRegistry | ManifestSource,
    plugin_id: str,
    handler_id: str,
    input: Any = None,
    *,
    context: Mapping[str, Any] | None = None,
    backend: str = "in-process",
    platform: Platform | None = None,
    timeout: float | None = None,
    raise_errors: bool = True,
    **backend_options: Any,
) -> ExecutionResult:
    """Run one handler once, on a backend made (and closed) for it.

    ``registry`` may be a :class:`PluginRegistry` or any source :func:`load_registry` takes.
    Raises the execution's :class:`ExecutionError` unless ``raise_errors=False``, in which
    case the result says ``ok=False``. Cancellation propagates and stops the execution.
    """
    if not isinstance(registry, PluginRegistry):
        registry = load_registry(registry)
    request = ExecutionRequest(
        plugin_id=plugin_id, handler_id=handler_id, input=input, context=dict(context or {})
    )
    async with create_execution_backend(
        type=backend, registry=registry, platform=platform, **backend_options
    ) as running:
        return await running.execute(request, timeout=timeout, raise_errors=raise_errors)


# -- the pytest plugin ---------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("plugin-execution")
    group.addoption(
        "--execution-backends",
        default=None,
        help="comma-separated backends the execution_backend fixture runs on "
        f"(default: {','.join(DEFAULT_BACKENDS)})",
    )
    parser.addini(
        "plugin_execution_manifests",
        type="linelist",
        default=[],
        help="plugin.toml paths (relative to the rootdir) or entry-point names that the "
        "plugin_registry fixture loads",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "execution_backends(*names): the backends the execution_backend fixture runs on",
    )
    config.addinivalue_line(
        "markers",
        "plugin_manifests(*sources): what the plugin_registry fixture loads for this test "
        "(paths, dicts, manifests or entry-point names), instead of the ini setting",
    )


def _backends(config: pytest.Config, marker: pytest.Mark | None) -> Sequence[str]:
    if marker is not None:
        return tuple(marker.args)
    option = config.getoption("--execution-backends")
    if option:
        return tuple(name.strip() for name in option.split(",") if name.strip())
    return DEFAULT_BACKENDS


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "execution_backend" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("execution_backends")
        names = _backends(metafunc.config, marker)
        metafunc.parametrize("execution_backend", names, indirect=True, ids=list(names))


@pytest.fixture
def plugin_registry(request: pytest.FixtureRequest) -> PluginRegistry:
    """The plugins under test: the ``plugin_manifests`` marker's sources if the test has
    one, else the ``plugin_execution_manifests`` ini setting (paths from the rootdir)."""
    marker = request.node.get_closest_marker("plugin_manifests")
    sources: Iterable[ManifestSource]
    sources = (
        marker.args if marker is not None else request.config.getini("plugin_execution_manifests")
    )
    return load_registry(*sources, base_dir=request.config.rootpath)


@pytest.fixture
def recording_platform() -> RecordingPlatform:
    """A :class:`RecordingPlatform`; ``execution_backend`` uses it, so a test can ask for
    both and assert on ``recording_platform.calls``."""
    return RecordingPlatform()


@pytest.fixture
async def execution_backend(
    request: pytest.FixtureRequest,
    plugin_registry: PluginRegistry,
    recording_platform: RecordingPlatform,
    tmp_path: Path,
) -> AsyncIterator[Any]:
    """An entered backend over ``plugin_registry``, once per selected backend (see
    ``--execution-backends`` and the ``execution_backends`` marker); closed after the test,
    and its workspaces must be gone by then. Needs pytest-trio."""
    name = getattr(request, "param", DEFAULT_BACKENDS[0])
    root = tmp_path / "plugin-execution-workspaces"
    try:
        backend = create_execution_backend(
            type=name, registry=plugin_registry, platform=recording_platform, workspace=root
        )
    except ExecutionError as exc:
        pytest.fail(f"cannot make the {name} backend: {exc}")
    async with backend:
        yield backend
    # The manager keeps one directory per host under the root; workspaces live inside it.
    leftovers = [p for p in root.rglob("*") if p.is_dir() and p.parent != root]
    assert not leftovers, f"workspaces left behind by the {name} backend: {leftovers}"
