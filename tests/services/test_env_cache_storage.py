"""ctx.env, ctx.cache and ctx.storage, straight against a session."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugin_execution import InvalidRequestError, PermissionDeniedError, Permissions
from plugin_execution.manifest import EnvPermissions
from plugin_execution.platform import MemoryCache

from .conftest import Harness

# -- env ------------------------------------------------------------------------------------------


async def test_env_granted_names_and_prefixes(harness: Harness) -> None:
    env = harness.ctx(Permissions(env=EnvPermissions(read=("APP_*", "UNSET_BUT_GRANTED")))).env
    assert await env.get("APP_TOKEN") == "t0k"
    assert await env.get("UNSET_BUT_GRANTED", "fallback") == "fallback"


async def test_env_denied_whether_set_or_not(harness: Harness) -> None:
    env = harness.ctx(Permissions(env=EnvPermissions(read=("APP_*",)))).env
    for name in ("SECRET", "NOT_SET_ANYWHERE"):
        with pytest.raises(PermissionDeniedError) as info:
            await env.get(name)
        assert (info.value.permission, info.value.resource) == ("env.read", name)
    assert harness.denials == 2


# -- cache ----------------------------------------------------------------------------------------


async def test_cache_round_trip_and_copies(harness: Harness) -> None:
    cache = harness.ctx(Permissions(platform=("cache",))).cache
    value = {"list": [1, 2], "bytes": b"\x00"}
    await cache.set("k", value)
    value["list"].append(3)  # the cache kept a copy
    assert await cache.get("k") == {"list": [1, 2], "bytes": b"\x00"}
    got = await cache.get("k")
    got["list"].clear()
    assert (await cache.get("k"))["list"] == [1, 2]
    assert await cache.get("missing", "dflt") == "dflt"
    assert await cache.delete("k") and not await cache.delete("k")


async def test_cache_is_namespaced_per_plugin(harness: Harness) -> None:
    grant = Permissions(platform=("cache",))
    await harness.ctx(grant, plugin_id="tests.a").cache.set("k", "a's")
    assert await harness.ctx(grant, plugin_id="tests.b").cache.get("k") is None
    assert await harness.ctx(grant, plugin_id="tests.a").cache.get("k") == "a's"


async def test_cache_shared_namespaces_need_their_grant(harness: Harness) -> None:
    shared = Permissions(platform=("cache:shared-*",))
    await harness.ctx(shared, plugin_id="tests.a").cache.set("k", 1, namespace="shared-x")
    assert await harness.ctx(shared, plugin_id="tests.b").cache.get("k", namespace="shared-x") == 1
    with pytest.raises(PermissionDeniedError) as info:
        await harness.ctx(shared).cache.get("k")  # its own namespace: needs bare "cache"
    assert info.value.permission == "platform.cache"
    with pytest.raises(PermissionDeniedError) as info:
        await harness.ctx(Permissions(platform=("cache",))).cache.get("k", namespace="other")
    assert info.value.permission == "platform.cache:other"
    assert info.value.resource == "cache namespace other"


async def test_cache_denied_by_default(harness: Harness) -> None:
    with pytest.raises(PermissionDeniedError) as info:
        await harness.ctx().cache.set("k", 1)
    assert info.value.details == {
        "permission": "platform.cache",
        "resource": "cache namespace tests.p",
    }


async def test_cache_rejects_non_plain_values_and_bad_ttl(harness: Harness) -> None:
    cache = harness.ctx(Permissions(platform=("cache",))).cache
    with pytest.raises(InvalidRequestError, match="plain data"):
        await cache.set("k", object())
    with pytest.raises(InvalidRequestError, match="ttl"):
        await cache.set("k", 1, ttl=-1)


async def test_memory_cache_ttl_and_bound() -> None:
    now = [100.0]
    cache = MemoryCache(max_entries=2, clock=lambda: now[0])
    await cache.set("ns", "a", b"1", ttl=5)
    await cache.set("ns", "b", b"2", ttl=None)
    assert await cache.get("ns", "a") == b"1"
    now[0] += 5
    assert await cache.get("ns", "a") is None  # expired
    await cache.set("ns", "c", b"3", ttl=None)
    await cache.set("ns", "d", b"4", ttl=None)  # evicts the least recently used: b
    assert await cache.get("ns", "b") is None and len(cache) == 2


# -- storage --------------------------------------------------------------------------------------


async def test_storage_round_trip(harness: Harness, tmp_path: Path) -> None:
    storage = harness.ctx(Permissions(platform=("storage",))).storage
    await storage.put("reports/2024/q1.txt", "quarter")
    await storage.put("raw.bin", b"\x00\x01")
    assert await storage.get("reports/2024/q1.txt") == b"quarter"
    assert await storage.list() == ["raw.bin", "reports/2024/q1.txt"]
    assert await storage.list("reports/") == ["reports/2024/q1.txt"]
    assert await storage.exists("raw.bin") and not await storage.exists("nope")
    assert await storage.delete("raw.bin") and await storage.get("raw.bin") is None
    assert (tmp_path / "storage/tests.p/reports/2024/q1.txt").read_bytes() == b"quarter"


@pytest.mark.parametrize(
    "key", ["../escape", "/abs", "a/../../b", "a//b", "./a", "a/", "\uff0e\uff0e/x", "a\x00"]
)
async def test_storage_bad_keys(harness: Harness, key: str) -> None:
    with pytest.raises(InvalidRequestError):
        await harness.ctx(Permissions(platform=("storage",))).storage.put(key, b"x")


async def test_storage_denied_and_namespaced(harness: Harness) -> None:
    with pytest.raises(PermissionDeniedError) as info:
        await harness.ctx().storage.get("k")
    assert info.value.permission == "platform.storage"
    grant = Permissions(platform=("storage",))
    await harness.ctx(grant, plugin_id="tests.a").storage.put("k", b"a")
    assert await harness.ctx(grant, plugin_id="tests.b").storage.get("k") is None
