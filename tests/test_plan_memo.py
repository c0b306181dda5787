"""The planner's memo of local configs (llmdist/plan_memo.py): a repeated call reuses what the
same config resolved to, and any change of the cluster's caches, keys or registered memory
makes the next call resolve again, with the error a first call would get."""

from __future__ import annotations

import numpy as np
import pytest

from llmdist import (
    BlocksCacheKey,
    CacheDesc,
    DataType,
    LLMException,
    LLMStatusCode,
    Placement,
    TransferConfig,
    _core,
)

from .decode_procs import cluster_info
from .helpers import Env, RecordingSync, assert_mem_equal, raises_llm, wait_for
from .pull_push_routes import FP16, LINK_MS, _seeds, expect_blocks, link_to, peer_proc

CLUSTER = 1
BLOCK = 1024
SUCCESS = LLMStatusCode.LLM_SUCCESS
PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST


@pytest.fixture
def cm():
    env = Env(cluster_id=CLUSTER)
    try:
        yield env.cm
    finally:
        env.close()


def desc(blocks: int) -> CacheDesc:
    """One layer (K and V) of `blocks` blocks of BLOCK bytes."""
    return CacheDesc(2, [blocks, BLOCK], DataType.DT_UINT8, Placement.DEVICE)


def filled_source(cm, blocks: int = 8, key=None):
    src = cm.allocate_blocks_cache(desc(blocks), key)
    for i in range(2):
        tensor(src, i, blocks)[:] = np.arange(blocks * BLOCK, dtype=np.uint64) % 251 + i
    return src


def tensor(cache, i: int, blocks: int) -> np.ndarray:
    return np.ctypeslib.as_array(
        (np.ctypeslib.ctypes.c_uint8 * (blocks * BLOCK)).from_address(cache.tensor_addrs[i])
    )


def send(cm, src, cfg, si, di):
    """transfer_cache_async with every layer ready, waited for; its status."""
    return cm.transfer_cache_async(src, RecordingSync(), [cfg], si, di).synchronize()


def refusal(fn, *args) -> LLMException:
    with pytest.raises(LLMException) as ei:
        fn(*args)
    return ei.value


def same_refusal(cm, src, cfg, si, di) -> LLMException:
    """The refusal of the memoised config equals that of a config seen for the first time."""
    again = refusal(cm.transfer_cache_async, src, RecordingSync(), [cfg], si, di)
    fresh_cfg = TransferConfig(cfg.dst_cluster_id, cfg.dst_addrs, cfg.src_layer_range)
    fresh = refusal(cm.transfer_cache_async, src, RecordingSync(), [fresh_cfg], si, di)
    assert (type(again), again.status_code, str(again)) == (
        type(fresh),
        fresh.status_code,
        str(fresh),
    )
    return again


def test_repeated_config_reuses_its_plan_and_moves_the_bytes(cm):
    src = filled_source(cm)
    dst = cm.allocate_blocks_cache(desc(8))
    tensor(dst, 0, 8)[:] = 0
    tensor(dst, 1, 8)[:] = 0
    cfg = TransferConfig(CLUSTER, list(dst.tensor_addrs))
    assert send(cm, src, cfg, [0, 1], [2, 3]) == SUCCESS
    first = cm.transfers.memo.get(next(iter(cm.transfers.memo._entries)))
    assert send(cm, src, cfg, [4, 5], [6, 7]) == SUCCESS
    assert cm.transfers.memo.get(next(iter(cm.transfers.memo._entries))) is first
    for t in range(2):
        d, s = tensor(dst, t, 8), tensor(src, t, 8)
        for sb, db in ((0, 2), (1, 3), (4, 6), (5, 7)):
            assert (d[db * BLOCK : (db + 1) * BLOCK] == s[sb * BLOCK : (sb + 1) * BLOCK]).all()
        assert not d[: 2 * BLOCK].any() and not d[4 * BLOCK : 6 * BLOCK].any()


def test_unregistered_destination_is_refused_after_a_transfer_to_it(cm):
    src = filled_source(cm)
    mem = [np.zeros(8 * BLOCK, np.uint8) for _ in range(2)]
    addrs = [m.ctypes.data for m in mem]
    dst = cm.register_blocks_cache(desc(8), addrs, BlocksCacheKey(CLUSTER, 3))
    cfg = TransferConfig(CLUSTER, addrs)
    assert send(cm, src, cfg, [0], [1]) == SUCCESS
    assert (mem[0][BLOCK : 2 * BLOCK] == tensor(src, 0, 8)[:BLOCK]).all()
    cm.unregister_cache(dst.cache_id)
    mem[0][:] = 0
    mem[1][:] = 0
    exc = same_refusal(cm, src, cfg, [0], [1])
    assert exc.status_code == PARAM_INVALID
    assert "is not inside memory registered or allocated on cluster 1" in str(exc)
    assert not mem[0].any() and not mem[1].any()


def test_smaller_registration_at_the_same_addresses_bounds_the_next_transfer(cm):
    src = filled_source(cm)
    mem = [np.zeros(8 * BLOCK, np.uint8) for _ in range(2)]
    addrs = [m.ctypes.data for m in mem]
    dst = cm.register_blocks_cache(desc(8), addrs)
    cfg = TransferConfig(CLUSTER, addrs)
    assert send(cm, src, cfg, [0], [6]) == SUCCESS
    cm.unregister_cache(dst.cache_id)
    cm.register_blocks_cache(desc(4), addrs)  # only blocks 0-3 are registered now
    mem[0][:] = 0
    mem[1][:] = 0
    exc = same_refusal(cm, src, cfg, [0], [6])
    assert exc.status_code == PARAM_INVALID
    assert not mem[0].any() and not mem[1].any()
    assert send(cm, src, cfg, [0], [3]) == SUCCESS
    assert (mem[1][3 * BLOCK : 4 * BLOCK] == tensor(src, 1, 8)[:BLOCK]).all()


def test_blocks_past_the_resolved_window_get_the_full_check(cm):
    src = filled_source(cm, blocks=16)
    mem = [np.zeros(8 * BLOCK, np.uint8) for _ in range(2)]
    addrs = [m.ctypes.data for m in mem]
    cm.register_blocks_cache(desc(8), addrs)
    cfg = TransferConfig(CLUSTER, addrs)
    assert send(cm, src, cfg, [0, 1], [2, 3]) == SUCCESS
    exc = same_refusal(cm, src, cfg, [0], [8])
    assert exc.status_code == PARAM_INVALID
    assert "layer 0 K destination" in str(exc)


def test_deallocated_destination_is_refused(cm):
    src = filled_source(cm)
    dst = cm.allocate_blocks_cache(desc(8))
    cfg = TransferConfig(CLUSTER, list(dst.tensor_addrs))
    assert send(cm, src, cfg, [0], [1]) == SUCCESS
    cm.deallocate_blocks_cache(dst)
    exc = same_refusal(cm, src, cfg, [0], [1])
    assert exc.status_code == PARAM_INVALID


def test_pull_after_the_source_goes_is_refused(cm):
    key = BlocksCacheKey(CLUSTER, 7)
    src = filled_source(cm, key=key)
    dst = cm.allocate_blocks_cache(desc(8))
    cm.pull_blocks(key, dst, [1], [2])
    assert (tensor(dst, 1, 8)[2 * BLOCK : 3 * BLOCK] == tensor(src, 1, 8)[BLOCK : 2 * BLOCK]).all()
    cm.deallocate_blocks_cache(src)
    exc = raises_llm(NOT_EXIST, cm.pull_blocks, key, dst, [1], [2])
    assert str(exc) == f"no cache for {key!r} on cluster {CLUSTER}"


def test_pull_after_the_key_is_removed_is_refused(cm):
    key = BlocksCacheKey(CLUSTER, 7)
    filled_source(cm, key=key)
    dst = cm.allocate_blocks_cache(desc(8))
    cm.pull_blocks(key, dst, [1], [2])
    cm.remove_cache_key(key)
    exc = raises_llm(NOT_EXIST, cm.pull_blocks, key, dst, [1], [2])
    assert str(exc) == f"no cache for {key!r} on cluster {CLUSTER}"


def test_pull_reads_the_cache_a_key_names_now(cm):
    key = BlocksCacheKey(CLUSTER, 7)
    first = filled_source(cm, key=key)
    dst = cm.allocate_blocks_cache(desc(8))
    cm.pull_blocks(key, dst, [1], [2])
    second = cm.allocate_blocks_cache(desc(8), key)  # the key moves to the new cache
    tensor(second, 0, 8)[:] = 200
    tensor(second, 1, 8)[:] = 201
    cm.pull_blocks(key, dst, [1], [2])
    assert (tensor(dst, 0, 8)[2 * BLOCK : 3 * BLOCK] == 200).all()
    assert (tensor(dst, 1, 8)[2 * BLOCK : 3 * BLOCK] == 201).all()
    assert (tensor(first, 0, 8) != 200).any()


def test_pull_blocks_past_the_source_get_the_full_check(cm):
    key = BlocksCacheKey(CLUSTER, 7)
    filled_source(cm, blocks=4, key=key)
    dst = cm.allocate_blocks_cache(desc(4))
    cm.pull_blocks(key, dst, [1], [2])
    exc = raises_llm(PARAM_INVALID, cm.pull_blocks, key, dst, [4], [2])
    assert str(exc) == "src_blocks has block 4, but the source cache has 4 blocks"


def test_pull_into_a_deallocated_destination_is_refused(cm):
    key = BlocksCacheKey(CLUSTER, 7)
    filled_source(cm, key=key)
    dst = cm.allocate_blocks_cache(desc(8))
    cm.pull_blocks(key, dst, [1], [2])
    cm.deallocate_blocks_cache(dst)
    raises_llm(NOT_EXIST, cm.pull_blocks, key, dst, [1], [2])


def test_pull_within_one_cache_checks_overlap_on_every_call(cm):
    key = BlocksCacheKey(CLUSTER, 7)
    src = filled_source(cm, key=key)
    cm.pull_blocks(key, src, [0, 1], [4, 5])  # disjoint blocks of one cache: resolved, kept
    before = [tensor(src, t, 8).copy() for t in range(2)]
    exc = raises_llm(PARAM_INVALID, cm.pull_blocks, key, src, [0, 1], [1, 2])
    assert str(exc).startswith("pull_blocks: src_blocks and dst_blocks: ") and "overlap" in str(exc)
    assert all((tensor(src, t, 8) == before[t]).all() for t in range(2))


def test_repeated_local_pull_runs_compiled_and_refuses_as_the_full_path(cm):
    """A pull_blocks shape pulled before runs as one LocalPull; arguments it doubts go to the
    full path, which refuses them as for a first call, with nothing copied."""
    key = BlocksCacheKey(CLUSTER, 7)
    src = filled_source(cm, key=key)
    dst = cm.allocate_blocks_cache(desc(8))
    tensor(dst, 0, 8)[:] = 0
    tensor(dst, 1, 8)[:] = 0
    assert cm.transfers.memo.local_pull(key, dst, None, None, 2) is None
    cm.pull_blocks(key, dst, [1], [2])
    local = cm.transfers.memo.local_pull(key, dst, None, None, 2)
    assert isinstance(local, _core.LocalPull)
    assert cm.transfers.memo.local_pull(key, dst, None, None, 1) is None  # another shape
    assert cm.transfers.memo.local_pull(key, dst, None, None, True) is None  # not an int
    assert local.run([3, 0], [4, 7]) is True
    for t in range(2):
        d, s = tensor(dst, t, 8), tensor(src, t, 8)
        for sb, db in ((1, 2), (3, 4), (0, 7)):
            assert (d[db * BLOCK : (db + 1) * BLOCK] == s[sb * BLOCK : (sb + 1) * BLOCK]).all()
    before = [tensor(dst, t, 8).copy() for t in range(2)]
    refused = {
        "dst_blocks has block 8, but dst_cache has 8 blocks": ([1], [8]),
        "src_blocks has block 8, but the source cache has 8 blocks": ([8], [1]),
        "dst_blocks: destination block 1 is written twice": ([2, 3], [1, 1]),
        "src_blocks and dst_blocks must have the same length, got 2 and 1": ([2, 3], [1]),
        "dst_blocks must not be empty": ([], []),
    }
    for message, (si, di) in refused.items():
        assert local.run(si, di) is False
        assert str(raises_llm(PARAM_INVALID, cm.pull_blocks, key, dst, si, di)) == message
    assert local.run("01", [1]) is False
    with pytest.raises(TypeError, match="src_blocks only support"):
        cm.pull_blocks(key, dst, "01", [1])
    assert all((tensor(dst, t, 8) == before[t]).all() for t in range(2))
    cm.deallocate_blocks_cache(src)  # a new generation of the memory: nothing runs compiled
    assert local.run([1], [2]) is False
    raises_llm(NOT_EXIST, cm.pull_blocks, key, dst, [1], [2])


def test_local_pull_is_not_kept_where_every_call_needs_the_overlap_check(cm):
    key = BlocksCacheKey(CLUSTER, 7)
    src = filled_source(cm, key=key)
    cm.pull_blocks(key, src, [0, 1], [4, 5])
    assert cm.transfers.memo.local_pull(key, src, None, None, 2) is None


def test_local_pull_past_the_wait_time_is_a_timeout():
    """The compiled step reports a pull that ran past llm.SyncKvCacheWaitTime as the full path
    does (LLM_TIMEOUT), and gives its task slot back."""
    env = Env(cluster_id=CLUSTER, extra_options={"llm.SyncKvCacheWaitTime": "1"})
    try:
        cm = env.cm
        key = BlocksCacheKey(CLUSTER, 7)
        big = CacheDesc(2, [64, 1 << 20], DataType.DT_UINT8, Placement.DEVICE)  # 64 MiB each
        cm.allocate_blocks_cache(big, key)
        dst = cm.allocate_blocks_cache(big)
        blocks = list(range(64))
        for _ in range(2):
            exc = raises_llm(
                LLMStatusCode.LLM_TIMEOUT, cm.pull_blocks, key, dst, blocks, blocks[::-1]
            )
            assert "did not finish within 1 ms" in str(exc)
            assert cm.transfers.memo.local_pull(key, dst, None, None, 2) is not None
        assert not cm.transfers.inflight
        assert cm.transfers.slots.acquire(0) and (cm.transfers.slots.release() is None)
    finally:
        env.close()


# --------------------------------------------------------------------------------------------
# a peer's memory: pulls on the host runtime's direct path are kept per peer and generation
# of the peer's caches


@pytest.mark.parametrize("mem", ["allocated", "registered"], ids=["mapped", "process"])
def test_peer_pull_follows_the_peers_caches_and_the_link(cleanup, local, mem):
    p = peer_proc(cleanup, "direct")
    model = next(_seeds)
    key_args = ("blocks", model)
    src = cleanup.dcache(p, mem, 2, [8, 128], blocks=True, key=key_args, seed=model)
    d = local()
    dst = d.registered(2, [8, 128], dtype=FP16, blocks=True)
    link_to(d, p)
    key = BlocksCacheKey(p.cluster_id, model)
    layers = range(2)

    def pull_and_check(source, pairs) -> None:
        before = dst.snapshot()
        d.cm.pull_blocks(key, dst.cache, [s for s, _ in pairs], [b for _, b in pairs])
        want = expect_blocks(
            before,
            dst.tensors,
            256,
            source.initial,
            source.tensors,
            256,
            layers,
            layers,
            1,
            pairs=pairs,
        )
        assert_mem_equal(dst.mem(), want, "pulled blocks")

    pull_and_check(src, [(1, 2)])
    pull_and_check(src, [(3, 4), (5, 6)])  # the same key, caches and layers: kept
    # the peer withdraws the cache: refused as a key no cache holds
    p.call("release", src.name)
    cleanup.caches.remove(src)
    exc = raises_llm(NOT_EXIST, d.cm.pull_blocks, key, dst.cache, [1], [2])
    assert str(exc) == f"no cache for {key!r} on cluster {p.cluster_id}"
    # another cache under the same key: its bytes arrive
    other = cleanup.dcache(p, mem, 2, [8, 128], blocks=True, key=key_args, seed=model + 100)
    assert wait_for(lambda: _pulls(d, key, dst))
    pull_and_check(other, [(0, 7)])
    # unlinked: refused as not linked; linked again: the pull works through the new link
    assert d.dd.unlink_clusters([cluster_info(p.cluster_id)], LINK_MS) == (SUCCESS, [SUCCESS])
    raises_llm(LLMStatusCode.LLM_NOT_YET_LINK, d.cm.pull_blocks, key, dst.cache, [1], [2])
    link_to(d, p)
    pull_and_check(other, [(2, 3)])


def _pulls(d, key, dst) -> bool:
    """Whether a pull by key succeeds (the peer's announcement may still be on its way)."""
    try:
        d.cm.pull_blocks(key, dst.cache, [0], [7])
    except LLMException as exc:
        assert exc.status_code == NOT_EXIST, exc
        return False
    return True
