"""Upstream LLM-DataDist behaviours real clients rely on: links between clusters of the same
role (PROMPT-PROMPT, DECODER-DECODER, MIX), a key registered again naming the newest cache (the
last registration wins, here and on linked peers before register_* returns), and the lifetime
of caches allocated under CacheKeys (deallocate_cache defers the free until the keys are pulled
or removed)."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from llmdist import (BlocksCacheKey, CacheKey, CacheKeyByIdAndIndex, LLMClusterInfo, LLMRole,
                     LLMStatusCode)

from helpers import free_port, raises_llm

SUCCESS = LLMStatusCode.LLM_SUCCESS
NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
_ids = itertools.count(900)


def info(cluster_id, port):
    c = LLMClusterInfo()
    c.remote_cluster_id = cluster_id
    c.append_remote_ip_info("127.0.0.1", port)
    return c


def pair(make_env, role_a, role_b, remote=True):
    """Cluster a listens, cluster b links to it; both remote accessible unless told."""
    port = free_port()
    a = make_env(remote=remote, role=role_a, cluster_id=next(_ids),
                 extra_options={"llm.listenIpInfo": f"127.0.0.1:{port}"})
    b = make_env(remote=remote, role=role_b, cluster_id=next(_ids))
    assert b.dd.link_clusters([info(a.cluster_id, port)], 5000) == (SUCCESS, [SUCCESS])
    return a, b


def blocks_of(tc, block, nblocks=8):
    """Block `block` of every tensor of a blocks cache (shape [nblocks, n])."""
    return [tc.tensor(t).reshape(nblocks, -1)[block].copy() for t in range(tc.desc.num_tensors)]


# --------------------------------------------------------------------------------------------
# same-role links
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("roles", [(LLMRole.PROMPT, LLMRole.PROMPT),
                                   (LLMRole.DECODER, LLMRole.DECODER),
                                   (LLMRole.MIX, LLMRole.MIX),
                                   (LLMRole.MIX, LLMRole.DECODER)],
                         ids=["prompt-prompt", "decoder-decoder", "mix-mix", "mix-decoder"])
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
def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


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
    wait_for(lambda: a.cm._mem.find(k1)[0] is None)
    assert len(a.cm.entries()) == before           # k0 still names it
    b.cm.pull_cache(k0, dst.cache, 1)
    assert all(np.array_equal(x, y) for x, y in zip(rows_of(dst, 1), want0))
    wait_for(lambda: not src.cache._valid)
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
    env.cm.remove_cache_key(k0)                     # gone already: no error
    dst = env.registered(2, [2, 64])
    env.cm.deallocate_cache(c2.cache)
    want = rows_of(c2, 1)
    env.cm.pull_cache(k2, dst.cache, 0)
    assert all(np.array_equal(x, y) for x, y in zip(rows_of(dst, 0), want))
    raises_llm(NOT_EXIST, env.cm.pull_cache, k2, dst.cache, 0)
    assert c2.cache._valid                          # k1 still names it
    env.dd.finalize()
    assert not c2.cache._valid and env.cm.entries() == []
