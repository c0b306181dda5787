"""Upstream LLM-DataDist behaviours real clients rely on: links between clusters of the same
role (PROMPT-PROMPT, DECODER-DECODER, MIX), a key registered again naming the newest cache (the
last registration wins, here and on linked peers before register_* returns), the lifetime of
caches allocated under CacheKeys (deallocate_cache defers the free until the keys are pulled or
removed), and the surface details clients see (key argument errors, unregister_cache of an
unknown id, unknown keywords, module paths, v2_list, KvCache, TransferConfig.dst_layer_range)."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from llmdist import (
    BlocksCacheKey,
    CacheKey,
    CacheKeyByIdAndIndex,
    LLMClusterInfo,
    LLMException,
    LLMRole,
    LLMStatusCode,
)

from .helpers import free_port, make_desc, raises_llm, wait_for

SUCCESS = LLMStatusCode.LLM_SUCCESS
NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
_ids = itertools.count(900)
# On a device runtime another cluster's memory is reached by device IPC only, which exports
# memory llmdist allocated, not registered memory (see test_pull_push).
HOST_ONLY = pytest.mark.skipif(
    os.environ.get("LLMDIST_RUNTIME") in ("acl", "cuda"),
    reason="registered memory of another cluster is reached by "
    "process reads and writes, which device runtimes do not use",
)


def info(cluster_id, port):
    c = LLMClusterInfo()
    c.remote_cluster_id = cluster_id
    c.append_remote_ip_info("127.0.0.1", port)
    return c


def pair(make_env, role_a, role_b, remote=True):
    """Cluster a listens, cluster b links to it; both remote accessible unless told."""
    port = free_port()
    a = make_env(
        remote=remote,
        role=role_a,
        cluster_id=next(_ids),
        extra_options={"llm.listenIpInfo": f"127.0.0.1:{port}"},
    )
    b = make_env(remote=remote, role=role_b, cluster_id=next(_ids))
    assert b.dd.link_clusters([info(a.cluster_id, port)], 5000) == (SUCCESS, [SUCCESS])
    return a, b


def blocks_of(tc, block, nblocks=8):
    """Block `block` of every tensor of a blocks cache (shape [nblocks, n])."""
    return [tc.tensor(t).reshape(nblocks, -1)[block].copy() for t in range(tc.desc.num_tensors)]


# --------------------------------------------------------------------------------------------
# same-role links
# --------------------------------------------------------------------------------------------
@HOST_ONLY
@pytest.mark.parametrize(
    "roles",
    [
        (LLMRole.PROMPT, LLMRole.PROMPT),
        (LLMRole.DECODER, LLMRole.DECODER),
        (LLMRole.MIX, LLMRole.MIX),
        (LLMRole.MIX, LLMRole.DECODER),
    ],
    ids=["prompt-prompt", "decoder-decoder", "mix-mix", "mix-decoder"],
)
def test_same_role_links_pull_and_push(make_env, roles):
    """Roles do not restrict links (upstream: decode-to-decode and prefill-to-prefill links
    serve migration and prefix sharing): both clusters pull from and push to each other."""
    a, b = pair(make_env, *roles)
    ca = a.registered(4, [8, 64], blocks=True, key=BlocksCacheKey(a.cluster_id, 1))
    cb = b.registered(4, [8, 64], blocks=True, key=BlocksCacheKey(b.cluster_id, 1))
    want = blocks_of(ca, 3)
    b.cm.pull_blocks(BlocksCacheKey(a.cluster_id, 1), cb.cache, [3], [6])
    assert all(np.array_equal(x, y) for x, y in zip(blocks_of(cb, 6), want))
    want = blocks_of(cb, 0)
    b.cm.push_blocks(BlocksCacheKey(a.cluster_id, 1), cb.cache, [0], [5])
    assert all(np.array_equal(x, y) for x, y in zip(blocks_of(ca, 5), want))
    # and from the listening side
    want = blocks_of(cb, 2)
    a.cm.pull_blocks(BlocksCacheKey(b.cluster_id, 1), ca.cache, [2], [7])
    assert all(np.array_equal(x, y) for x, y in zip(blocks_of(ca, 7), want))
    want = blocks_of(ca, 4)
    a.cm.push_blocks(BlocksCacheKey(b.cluster_id, 1), ca.cache, [4], [1])
    assert all(np.array_equal(x, y) for x, y in zip(blocks_of(cb, 1), want))


# --------------------------------------------------------------------------------------------
# a key registered again
# --------------------------------------------------------------------------------------------
@HOST_ONLY
@pytest.mark.parametrize("withdraw_first", [False, True])
def test_blocks_key_reused_last_registration_wins(make_env, withdraw_first):
    """register_blocks_cache with a BlocksCacheKey already in use re-points it (upstream; an
    SGLang fork registers two caches under BlocksCacheKey(0, 0)): a linked peer's pull by the
    key reads the newest cache as soon as register_blocks_cache returned. Withdrawing the cache
    that lost the key leaves the key alone; withdrawing the one holding it ends the key."""
    a, b = pair(make_env, LLMRole.PROMPT, LLMRole.DECODER)
    key = BlocksCacheKey(a.cluster_id, 0)
    old = a.registered(2, [8, 64], blocks=True, key=key)
    dst = b.registered(2, [8, 64], blocks=True)
    b.cm.pull_blocks(key, dst.cache, [1], [1])
    assert all(np.array_equal(x, y) for x, y in zip(blocks_of(dst, 1), blocks_of(old, 1)))
    new = a.registered(2, [8, 64], blocks=True, key=key)
    b.cm.pull_blocks(key, dst.cache, [1], [2])
    assert all(np.array_equal(x, y) for x, y in zip(blocks_of(dst, 2), blocks_of(new, 1)))
    # the owner's own pulls and pushes by the key also reach the new cache
    mine = a.registered(2, [8, 64], blocks=True)
    a.cm.pull_blocks(key, mine.cache, [3], [3])
    assert all(np.array_equal(x, y) for x, y in zip(blocks_of(mine, 3), blocks_of(new, 3)))
    if withdraw_first:
        a.cm.unregister_cache(old.cache.cache_id)
        b.cm.pull_blocks(key, dst.cache, [4], [4])
        assert all(np.array_equal(x, y) for x, y in zip(blocks_of(dst, 4), blocks_of(new, 4)))
        a.cm.unregister_cache(new.cache.cache_id)
    else:
        a.cm.unregister_cache(new.cache.cache_id)
    raises_llm(NOT_EXIST, b.cm.pull_blocks, key, dst.cache, [1], [1])
    raises_llm(NOT_EXIST, a.cm.pull_blocks, key, mine.cache, [1], [1])


def test_cache_key_reused_last_registration_wins(env):
    """register_cache with CacheKeys already in use re-points them; pull_cache by the key
    reads the newest cache's row."""
    key = CacheKey(env.cluster_id, 42)
    env.registered(2, [2, 64], key=[key])
    new = env.registered(2, [2, 64], key=[key])
    dst = env.registered(2, [2, 64])
    env.cm.pull_cache(key, dst.cache, 1)
    for t in range(2):
        assert np.array_equal(dst.tensor(t).reshape(2, -1)[1], new.tensor(t).reshape(2, -1)[0])
    env.cm.remove_cache_key(key)
    raises_llm(NOT_EXIST, env.cm.pull_cache, key, dst.cache, 1)


# --------------------------------------------------------------------------------------------
# CacheKey lifetimes (allocate_cache with CacheKeys, deprecated upstream but still used)
# --------------------------------------------------------------------------------------------
def rows_of(tc, row, nrows=2):
    return [tc.tensor(t).reshape(nrows, -1)[row].copy() for t in range(tc.desc.num_tensors)]


def test_deallocate_waits_for_the_keys_to_be_pulled(make_env):
    """deallocate_cache of a cache with CacheKeys defers the free: the decode still pulls each
    key's row afterwards; a pull releases its key (a second pull by it is
    LLM_KV_CACHE_NOT_EXIST); once the last key is pulled the memory is freed."""
    a, b = pair(make_env, LLMRole.PROMPT, LLMRole.DECODER, remote=False)
    k0, k1 = CacheKey(a.cluster_id, 1), CacheKey(a.cluster_id, 2)
    src = a.allocated(2, [2, 64], key=[k0, k1])
    want0, want1 = rows_of(src, 0), rows_of(src, 1)
    before = len(a.cm.entries())
    a.cm.deallocate_cache(src.cache)
    raises_llm(NOT_EXIST, a.cm.deallocate_cache, src.cache)
    assert len(a.cm.entries()) == before
    dst = b.registered(2, [2, 64])
    b.cm.pull_cache(k1, dst.cache, 0)
    assert all(np.array_equal(x, y) for x, y in zip(rows_of(dst, 0), want1))
    raises_llm(NOT_EXIST, b.cm.pull_cache, k1, dst.cache, 0)
    assert wait_for(lambda: a.cm._mem.find(k1)[0] is None, 5.0)
    assert len(a.cm.entries()) == before  # k0 still names it
    b.cm.pull_cache(k0, dst.cache, 1)
    assert all(np.array_equal(x, y) for x, y in zip(rows_of(dst, 1), want0))
    assert wait_for(lambda: not src.cache._valid, 5.0)
    assert len(a.cm.entries()) == before - 1


def test_remove_cache_key_and_finalize_free_a_deferred_cache(env):
    """remove_cache_key of the last key frees a deferred cache at once (a key that no longer
    exists is no error, as upstream); a pull on the own cluster releases its key too; finalize
    frees what is still deferred."""
    k0, k1, k2 = (CacheKey(env.cluster_id, r) for r in (5, 6, 7))
    c1 = env.allocated(2, [2, 64], key=[k0])
    c2 = env.allocated(2, [2, 64], key=[k1, k2])
    n = len(env.cm.entries())
    env.cm.deallocate_cache(c1.cache)
    env.cm.remove_cache_key(k0)
    assert len(env.cm.entries()) == n - 1 and not c1.cache._valid
    env.cm.remove_cache_key(k0)  # gone already: no error
    dst = env.registered(2, [2, 64])
    env.cm.deallocate_cache(c2.cache)
    want = rows_of(c2, 1)
    env.cm.pull_cache(k2, dst.cache, 0)
    assert all(np.array_equal(x, y) for x, y in zip(rows_of(dst, 0), want))
    raises_llm(NOT_EXIST, env.cm.pull_cache, k2, dst.cache, 0)
    assert c2.cache._valid  # k1 still names it
    env.dd.finalize()
    assert not c2.cache._valid and env.cm.entries() == []


# --------------------------------------------------------------------------------------------
# surface details clients see
# --------------------------------------------------------------------------------------------
UPSTREAM_V2_LIST = [
    "LLMClusterInfo",
    "LLMStatusCode",
    "LLMException",
    "LLMRole",
    "LlmConfig",
    "LLMConfig",
    "DataType",
    "Status",
    "CacheDesc",
    "CacheKey",
    "CacheKeyByIdAndIndex",
    "KvCache",
    "Cache",
    "BlocksCacheKey",
    "LLMDataDist",
    "Placement",
    "RegisterMemStatus",
    "LayerSynchronizer",
    "TransferConfig",
    "CacheTask",
    "TransferWithCacheKeyConfig",
    "Memtype",
    "MemInfo",
]


@pytest.mark.parametrize(
    "make",
    [
        lambda: CacheKey("1", 2),
        lambda: CacheKey(1, -2),
        lambda: CacheKey(1),
        lambda: BlocksCacheKey(2**64),
        lambda: BlocksCacheKey(1, unknown=2),
        lambda: CacheKeyByIdAndIndex(1, 2, -1),
    ],
)
def test_key_argument_errors_are_param_invalid(make):
    """As upstream, a bad key argument raises LLMException(LLM_PARAM_INVALID); it is also the
    TypeError / ValueError Python code expects."""
    with pytest.raises(LLMException) as ei:
        make()
    assert ei.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    assert isinstance(ei.value, (TypeError, ValueError))


def test_unregister_unknown_cache_is_not_an_error(env):
    c = env.registered(2, [2, 64])
    env.cm.unregister_cache(c.cache.cache_id)
    env.cm.unregister_cache(c.cache.cache_id)  # already gone: no error, as upstream
    env.cm.unregister_cache(12345)
    allocated = env.allocated(2, [2, 64])
    raises_llm(LLMStatusCode.LLM_PARAM_INVALID, env.cm.unregister_cache, allocated.cache.cache_id)


@HOST_ONLY
def test_pull_and_push_ignore_unknown_keywords(make_env):
    """Keyword arguments llmdist does not know are ignored (with a warning), as upstream."""
    a, b = pair(make_env, LLMRole.PROMPT, LLMRole.DECODER)
    ca = a.registered(2, [8, 64], blocks=True, key=BlocksCacheKey(a.cluster_id, 1))
    cb = b.registered(2, [8, 64], blocks=True)
    with pytest.warns(UserWarning, match="ignores the keyword arguments"):
        b.cm.pull_blocks(BlocksCacheKey(a.cluster_id, 1), cb.cache, [2], [3], timeout=5)
    assert all(np.array_equal(x, y) for x, y in zip(blocks_of(cb, 3), blocks_of(ca, 2)))
    with pytest.warns(UserWarning, match="ignores the keyword arguments"):
        b.cm.push_blocks(BlocksCacheKey(a.cluster_id, 1), cb.cache, [0], [6], req_id=7)
    assert all(np.array_equal(x, y) for x, y in zip(blocks_of(ca, 6), blocks_of(cb, 0)))


def test_upstream_module_paths_and_v2_list():
    """The module paths clients import from (llm_datadist.status, .configs, .data_type,
    .v2.llm_types, .v2.llm_datadist, .v2.cache_manager) exist under llmdist, and v2_list is
    upstream's."""
    import llmdist
    from llmdist import configs, data_type, status
    from llmdist.v2 import cache_manager, llm_datadist, llm_types

    assert configs.LLMConfig is llmdist.LLMConfig and configs.LLMRole is llmdist.LLMRole
    assert data_type.DataType is llmdist.DataType and status.LLMException is llmdist.LLMException
    assert llm_types.KvCache is llmdist.KvCache and llm_types.Cache is llmdist.Cache
    assert llm_datadist.LLMDataDist is llmdist.LLMDataDist
    assert cache_manager.CacheManager is llmdist.CacheManager
    assert llmdist.v2_list == UPSTREAM_V2_LIST
    assert all(hasattr(llmdist, name) for name in llmdist.v2_list)


def test_kv_cache_and_transfer_config_fields():
    from llmdist import CacheDesc, DataType, KvCache, Placement, TransferConfig

    desc = CacheDesc(2, [4, 8], DataType.DT_FLOAT16, Placement.HOST)
    kv = KvCache.create_cpu_cache(desc, [0x1000, 0x2000])
    assert kv.cache_id == -1 and kv.per_device_tensor_addrs == [[0x1000, 0x2000]]
    assert KvCache.create_cpu_cache(desc, [[1, 2], [3, 4]]).per_device_tensor_addrs == [
        [1, 2],
        [3, 4],
    ]
    with pytest.raises(LLMException):
        KvCache.create_cpu_cache(CacheDesc(2, [4, 8], DataType.DT_FLOAT16), [1, 2])
    with pytest.raises(LLMException):
        KvCache.create_cpu_cache(desc, [1])
    cfg = TransferConfig(3, [0x1000, 0x2000])
    assert cfg.dst_layer_range is None


class OverlapRefusingEngine:
    """Stands in for Mooncake Transfer Engine's registration: it refuses a region overlapping
    one registered, as Mooncake does."""

    def __init__(self):
        self.regions = {}  # start -> length

    def register(self, addr, length):
        for s, n in self.regions.items():
            if addr < s + n and s < addr + length:
                raise LLMException(
                    f"overlaps [{s:#x}, +{n})", status_code=LLMStatusCode.LLM_PARAM_INVALID
                )
        self.regions[addr] = length

    def unregister(self, addr):
        del self.regions[addr]

    def close(self):
        pass


def test_engine_registration_of_overlapping_caches(env):
    """With the engine started, a cache over tensors already registered (omni-npu's layer
    group) is counted against their registration, not registered again, and withdrawing either
    cache keeps the memory the other needs registered; a tensor that overlaps a registered one
    only in part cannot be registered with the engine, which leaves the cache usable here."""
    node = env.dd._node
    engine = node.engine = OverlapRefusingEngine()
    full = env.registered(4, [8, 64], blocks=True)
    addrs = full.cache.tensor_addrs
    assert sorted(engine.regions) == sorted(addrs)
    group = env.cm.register_blocks_cache(full.desc, addrs[2:] + addrs[:2])
    assert sorted(engine.regions) == sorted(addrs)
    env.cm.unregister_cache(full.cache.cache_id)
    assert sorted(engine.regions) == sorted(addrs)  # the group still uses them
    part = env.cm.register_blocks_cache(make_desc(1, [8, 64]), [addrs[0] + 64])
    assert sorted(engine.regions) == sorted(addrs)  # refused there, logged
    env.cm.unregister_cache(group.cache_id)
    assert engine.regions == {}
    env.cm.unregister_cache(part.cache_id)
    assert engine.regions == {}
