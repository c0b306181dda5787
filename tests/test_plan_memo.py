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
    LLMConfig,
    LLMDataDist,
    LLMException,
    LLMRole,
    LLMStatusCode,
    Placement,
    TransferConfig,
)

from .helpers import RecordingSync, raises_llm

CLUSTER = 1
BLOCK = 1024
SUCCESS = LLMStatusCode.LLM_SUCCESS
PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST


@pytest.fixture
def cm():
    dd = LLMDataDist(LLMRole.PROMPT, CLUSTER)
    cfg = LLMConfig()
    cfg.device_id = 0
    cfg.enable_cache_manager = True
    dd.init(cfg.generate_options())
    try:
        yield dd.cache_manager
    finally:
        dd.finalize()


def desc(blocks: int) -> CacheDesc:
    """One layer (K and V) of `blocks` blocks of BLOCK bytes."""
    return CacheDesc(2, [blocks, BLOCK], DataType.DT_UINT8, Placement.DEVICE)


def filled_source(cm, blocks: int = 8, key=None):
    src = cm.allocate_blocks_cache(desc(blocks), key)
    for i, a in enumerate(src.tensor_addrs):
        view = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * (blocks * BLOCK)).from_address(a))
        view[:] = np.arange(blocks * BLOCK, dtype=np.uint64) % 251 + i
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
