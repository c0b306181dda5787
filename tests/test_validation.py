"""Validation of transfer_cache_async (spec 5.3, points 1-11, in order) and of the CacheManager
calls that make caches (register/allocate). Each test asserts the exception type and, for an
LLMException, its status code. A rejected call creates no task and writes nothing."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmdist import (
    BlocksCacheKey,
    CacheDesc,
    CacheKey,
    CacheKeyByIdAndIndex,
    DataType,
    LLMDataDist,
    LLMException,
    LLMRole,
    LLMStatusCode,
    Placement,
    TransferConfig,
    TransferWithCacheKeyConfig,
)

from . import reference
from .helpers import (
    OTHER_CLUSTER,
    OWN_CLUSTER,
    SUCCESS,
    Env,
    RecordingSync,
    assert_mem_equal,
    env_ctx,
    make_desc,
    raises_llm,
    wait_results,
)

# every test runs on each runtime (runtime_params.py)
pytestmark = pytest.mark.all_runtimes

PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
NOT_YET_LINK = LLMStatusCode.LLM_NOT_YET_LINK
DEV, HOST = Placement.DEVICE, Placement.HOST
DEVICE_RUNTIME = os.environ.get("LLMDIST_RUNTIME") in ("acl", "cuda")


def tc(addrs, rng=None, batch=0, cluster=OWN_CLUSTER):
    return TransferConfig(cluster, list(addrs), rng, batch)


class Case:
    """A valid C2C / B2B setup to break one piece at a time. 2 layers, rows/blocks of 16 bytes."""

    def __init__(self, env: Env):
        self.env = env
        self.cm = env.cm
        self.src = env.registered(4, [4, 16])
        self.dst = env.registered(4, [4, 16])
        self.bsrc = env.registered(4, [6, 16], blocks=True)
        self.bdst = env.registered(4, [8, 16], blocks=True)
        self.sync = RecordingSync()

    def good(self):
        return tc(self.dst.addrs)

    def call(self, *args, **kwargs):
        return self.cm.transfer_cache_async(*args, **kwargs)

    def check_nothing_happened(self, before):
        assert self.sync.calls == []
        assert_mem_equal(self.dst.mem(), before["dst"], "dst after a rejected call")
        assert_mem_equal(self.bdst.mem(), before["bdst"], "bdst after a rejected call")

    def snapshot(self):
        return {"dst": self.dst.snapshot(), "bdst": self.bdst.snapshot()}


@pytest.fixture
def case(env):
    return Case(env)


def test_baseline_case_is_valid(case):
    """The unbroken setups succeed, so every rejection below is due to the one broken piece."""
    t = case.call(case.src.cache, case.sync, [case.good()])
    assert wait_results(t) == [SUCCESS]
    t = case.call(case.bsrc.cache, RecordingSync(), [tc(case.bdst.addrs)], [0, 5], [7, 0])
    assert wait_results(t) == [SUCCESS]
    t = case.call(case.src.cache, RecordingSync(), [tc(case.bdst.addrs)], None, [3], 16)
    assert wait_results(t) == [SUCCESS]
    t = case.call(case.src.cache, RecordingSync(), [case.good()], None, None, 0)
    assert wait_results(t) == [SUCCESS]  # dst_block_memory_size 0 == omitted


# ------------------------------------------------------------------------- 1. src_cache
@pytest.mark.parametrize("bad", [None, 0, "cache", [1, 2], object()])
def test_1_src_cache_type(case, bad):
    with pytest.raises(TypeError, match="src_cache"):
        case.call(bad, case.sync, [case.good()])


def test_1_src_cache_deallocated(case):
    env = case.env
    src = env.allocated(4, [4, 16])
    env.cm.deallocate_cache(src.cache)
    before = case.snapshot()
    raises_llm(NOT_EXIST, case.call, src.cache, case.sync, [case.good()])
    case.check_nothing_happened(before)


def test_1_src_cache_unregistered(case):
    case.cm.unregister_cache(case.src.cache.cache_id)
    raises_llm(NOT_EXIST, case.call, case.src.cache, case.sync, [case.good()])


def test_1_src_blocks_cache_deallocated(case):
    src = case.env.allocated(4, [6, 16], blocks=True)
    case.cm.deallocate_blocks_cache(src.cache)
    raises_llm(NOT_EXIST, case.call, src.cache, case.sync, [tc(case.bdst.addrs)], [0], [0])


def test_1_src_cache_of_another_manager(case, make_env):
    other = make_env(cluster_id=OWN_CLUSTER + 1)
    foreign = other.registered(4, [4, 16])
    e = raises_llm(NOT_EXIST, case.call, foreign.cache, case.sync, [case.good()])
    assert e is not None


def test_1_before_2(case):
    src = case.env.allocated(4, [4, 16])
    case.cm.deallocate_cache(src.cache)
    raises_llm(NOT_EXIST, case.call, src.cache, case.sync, [case.good()], "x", "y", "z")


# ------------------------------------------------------------------------- 2. index types
@pytest.mark.parametrize("which", ["src", "dst"])
@pytest.mark.parametrize(
    "bad,exc",
    [
        ("0,1", TypeError),
        ({0, 1}, TypeError),
        (range(2), TypeError),
        (np.array([0, 1]), TypeError),
        ([0, 1.0], TypeError),
        ([0, "1"], TypeError),
        ([True, 0], TypeError),
        ([0, None], TypeError),
        ([0, -1], ValueError),
        ([2**64, 0], ValueError),
    ],
)
def test_2_block_index_list_types(case, which, bad, exc):
    sb, db = ([0, 1], [0, 1])
    if which == "src":
        sb = bad
    else:
        db = bad
    with pytest.raises(exc):
        case.call(case.bsrc.cache, case.sync, [tc(case.bdst.addrs)], sb, db)
    assert case.sync.calls == []


@pytest.mark.parametrize(
    "bad,exc",
    [
        ("16", TypeError),
        (16.0, TypeError),
        (True, TypeError),
        ([16], TypeError),
        (-1, ValueError),
        (2**64, ValueError),
    ],
)
def test_2_dst_block_memory_size_type(case, bad, exc):
    with pytest.raises(exc):
        case.call(case.src.cache, case.sync, [tc(case.bdst.addrs)], None, [0, 1], bad)


def test_2_tuples_accepted(case):
    t = case.call(case.bsrc.cache, case.sync, (tc(case.bdst.addrs),), (1, 2), (3, 4))
    assert wait_results(t) == [SUCCESS]


def test_2_before_3(case):
    with pytest.raises(ValueError):
        case.call(case.bsrc.cache, case.sync, [tc(case.bdst.addrs)], [-1], None)


# ------------------------------------------------------------------------- 3. source blocks
def test_3_src_blocks_without_dst_blocks(case):
    before = case.snapshot()
    raises_llm(
        PARAM_INVALID, case.call, case.bsrc.cache, case.sync, [tc(case.bdst.addrs)], [0, 1], None
    )
    case.check_nothing_happened(before)


def test_3_src_blocks_with_empty_dst_blocks(case):
    raises_llm(
        PARAM_INVALID, case.call, case.bsrc.cache, case.sync, [tc(case.bdst.addrs)], [0, 1], []
    )


@pytest.mark.parametrize("sb,db", [([0, 1], [0]), ([0], [0, 1]), ([0, 1, 2], [3, 4])])
def test_3_index_lists_of_different_length(case, sb, db):
    raises_llm(PARAM_INVALID, case.call, case.bsrc.cache, case.sync, [tc(case.bdst.addrs)], sb, db)


@pytest.mark.parametrize("sb", [[6], [0, 6], [2**40]])
def test_3_src_block_index_out_of_range(case, sb):
    db = list(range(len(sb)))
    before = case.snapshot()
    raises_llm(PARAM_INVALID, case.call, case.bsrc.cache, case.sync, [tc(case.bdst.addrs)], sb, db)
    case.check_nothing_happened(before)


def test_3_before_6(case):
    raises_llm(PARAM_INVALID, case.call, case.bsrc.cache, None, [tc(case.bdst.addrs)], [0], None)


# ------------------------------------------------------------------------- 4. C2B block size
@pytest.mark.parametrize("size", [None, 0])
def test_4_dst_blocks_only_need_block_memory_size(case, size):
    raises_llm(
        PARAM_INVALID,
        case.call,
        case.src.cache,
        case.sync,
        [tc(case.bdst.addrs)],
        None,
        [0, 1],
        size,
    )


# ------------------------------------------------------------------------- 5. size w/o blocks
@pytest.mark.parametrize("size", [1, 16, 64])
def test_5_block_memory_size_without_dst_blocks(case, size):
    raises_llm(PARAM_INVALID, case.call, case.src.cache, case.sync, [case.good()], None, None, size)


def test_5_before_6(case):
    raises_llm(PARAM_INVALID, case.call, case.src.cache, None, [case.good()], None, None, 16)


# ----------------------------------------------- 5.2 block-size rules (B2B == stride, C2B count)
@pytest.mark.parametrize("size", [8, 32, 17])
def test_b2b_block_size_must_equal_stride(case, size):
    raises_llm(
        PARAM_INVALID, case.call, case.bsrc.cache, case.sync, [tc(case.bdst.addrs)], [0], [0], size
    )


@pytest.mark.parametrize("size,n", [(16, 2), (5, 5), (8, 3), (20, 2)])
def test_c2b_more_indices_than_chunks(case, size, n):
    # stride 16: ceil(16/size) chunks at most
    raises_llm(
        PARAM_INVALID,
        case.call,
        case.src.cache,
        case.sync,
        [tc(case.bdst.addrs)],
        None,
        list(range(n)),
        size,
    )


# ------------------------------------------------------------------------- 6. synchronizer
class Duck:
    def synchronize_layer(self, layer_index, timeout_in_millis):
        return True


@pytest.mark.parametrize("bad", [None, Duck(), lambda i, t: True, RecordingSync])
def test_6_layer_synchronizer_type(case, bad):
    with pytest.raises(TypeError, match="layer_synchronizer"):
        case.call(case.src.cache, bad, [case.good()])


def test_6_before_7(case):
    with pytest.raises(TypeError, match="layer_synchronizer"):
        case.call(case.src.cache, None, None)


# ------------------------------------------------------------------------- 7. configs
def _gen(cfg):
    yield cfg


@pytest.mark.parametrize(
    "make_bad",
    [
        lambda c: None,
        lambda c: c,
        lambda c: _gen(c),
        lambda c: {0: c},
        lambda c: "configs",
        lambda c: [c, None],
        lambda c: [c, 3],
        lambda c: [[c]],
    ],
)
def test_7_transfer_configs_type(case, make_bad):
    before = case.snapshot()
    with pytest.raises(TypeError):
        case.call(case.src.cache, case.sync, make_bad(case.good()))
    case.check_nothing_happened(before)


def test_7_keyed_config_without_remote_cache_access(case):
    key = BlocksCacheKey(OWN_CLUSTER, 0)
    with pytest.raises(TypeError):
        case.call(
            case.src.cache, case.sync, [TransferWithCacheKeyConfig(key, range(0, 1), range(0, 1))]
        )
    with pytest.raises(TypeError):
        case.call(
            case.src.cache,
            case.sync,
            [case.good(), TransferWithCacheKeyConfig(key, range(0, 1), range(0, 1))],
        )


def test_7_transfer_config_with_remote_cache_access(env_remote):
    env = env_remote
    src = env.registered(4, [4, 16])
    key = BlocksCacheKey(OWN_CLUSTER, 0)
    dst = env.registered(4, [4, 16], blocks=True, key=key)
    sync = RecordingSync()
    with pytest.raises(TypeError):
        env.cm.transfer_cache_async(src.cache, sync, [TransferConfig(OWN_CLUSTER, dst.addrs)])
    with pytest.raises(TypeError):
        env.cm.transfer_cache_async(
            src.cache,
            sync,
            [
                TransferWithCacheKeyConfig(key, range(0, 2), range(0, 2)),
                TransferConfig(OWN_CLUSTER, dst.addrs),
            ],
        )
    assert sync.calls == []


def test_7_before_8(case):
    with pytest.raises(TypeError):
        case.call(case.src.cache, case.sync, [tc(case.dst.addrs[:2], range(0, 5)), "x"])


# ------------------------------------------------------------------------- 8. layers, batch
def test_8_odd_num_tensors(case):
    src = case.env.registered(3, [4, 16])
    raises_llm(
        PARAM_INVALID, case.call, src.cache, case.sync, [tc(case.dst.addrs[:2], range(0, 1))]
    )


@pytest.mark.parametrize("rng", [range(0, 3), range(2, 3), range(1, 100)])
def test_8_layer_range_outside_source(case, rng):
    addrs = [case.dst.addrs[0]] * (2 * len(rng)) if len(rng) < 10 else case.dst.addrs
    raises_llm(PARAM_INVALID, case.call, case.src.cache, case.sync, [case.good(), tc(addrs, rng)])


@pytest.mark.parametrize(
    "n,rng", [(2, None), (6, None), (4, range(1, 2)), (0, range(0, 1)), (3, range(0, 2))]
)
def test_8_dst_addrs_count(case, n, rng):
    addrs = (case.dst.addrs * 2)[:n]
    before = case.snapshot()
    raises_llm(PARAM_INVALID, case.call, case.src.cache, case.sync, [tc(addrs, rng)])
    case.check_nothing_happened(before)


def test_8_batch_index_with_source_blocks(case):
    raises_llm(
        PARAM_INVALID,
        case.call,
        case.bsrc.cache,
        case.sync,
        [tc(case.bdst.addrs, None, 1)],
        [0],
        [0],
    )


@pytest.mark.parametrize("batch", [4, 5, 2**32 - 1])
def test_8_batch_index_outside_source(case, batch):
    raises_llm(
        PARAM_INVALID, case.call, case.src.cache, case.sync, [tc(case.dst.addrs, None, batch)]
    )


def test_8_batch_index_outside_source_c2b(case):
    raises_llm(
        PARAM_INVALID,
        case.call,
        case.src.cache,
        case.sync,
        [tc(case.bdst.addrs, None, 4)],
        None,
        [0],
        16,
    )


def test_8_keyed_ranges_outside(env_remote):
    env = env_remote
    src = env.registered(4, [4, 16])  # 2 layers
    dst = env.registered(4, [4, 16])  # 2 layers
    sync = RecordingSync()
    k = CacheKeyByIdAndIndex(OWN_CLUSTER, dst.cache.cache_id, 0)
    for s_rng, d_rng in [
        (range(1, 3), range(0, 2)),
        (range(0, 2), range(1, 3)),
        (range(0, 1), range(2, 3)),
    ]:
        raises_llm(
            PARAM_INVALID,
            env.cm.transfer_cache_async,
            src.cache,
            sync,
            [TransferWithCacheKeyConfig(k, s_rng, d_rng)],
        )
    raises_llm(
        PARAM_INVALID,
        env.cm.transfer_cache_async,
        src.cache,
        sync,
        [TransferWithCacheKeyConfig(k, range(0, 1), range(0, 1), 4)],
    )
    assert sync.calls == []


def test_8_before_10(case):
    raises_llm(
        PARAM_INVALID,
        case.call,
        case.src.cache,
        case.sync,
        [tc(case.dst.addrs, range(0, 3), 0, OTHER_CLUSTER)],
    )


# ------------------------------------------------------------------------- 9. placements
@pytest.mark.parametrize("dst_allocated", [False, True])
def test_9_host_source_to_device_destination(case, dst_allocated):
    env = case.env
    for src_alloc in (False, True):
        src = env.cache(src_alloc, 4, [4, 16], placement=HOST)
        dst = env.cache(dst_allocated, 4, [4, 16], placement=DEV)
        before = dst.snapshot()
        raises_llm(PARAM_INVALID, case.call, src.cache, case.sync, [tc(dst.addrs)])
        assert_mem_equal(dst.mem(), before)


def test_9_host_source_to_device_destination_keyed(env_remote):
    env = env_remote
    src = env.allocated(4, [4, 16], placement=HOST, blocks=True)
    key = BlocksCacheKey(OWN_CLUSTER, 1)
    env.registered(4, [4, 16], placement=DEV, blocks=True, key=key)
    raises_llm(
        PARAM_INVALID,
        env.cm.transfer_cache_async,
        src.cache,
        RecordingSync(),
        [TransferWithCacheKeyConfig(key, range(0, 2), range(0, 2))],
        [0],
        [1],
    )


@pytest.mark.parametrize("src_placement", [DEV, HOST])
def test_9_host_destination_must_be_allocated(case, src_placement):
    """A registered HOST destination: written on the host runtime (a serving engine's CPU
    tensors); refused on a device runtime, whose asynchronous copies need page-locked memory."""
    src = case.env.cache(src_placement == HOST, 4, [4, 16], placement=src_placement)
    dst = case.env.registered(4, [4, 16], placement=HOST)
    before = dst.snapshot()
    if not DEVICE_RUNTIME:
        t = case.call(src.cache, case.sync, [tc(dst.addrs)])
        assert wait_results(t) == [SUCCESS]
        # C2C of row 0 into row 0 of every tensor
        assert [bytes(b[:16]) for b in dst.tensor_bytes()] == [
            bytes(b[:16]) for b in src.tensor_bytes()
        ]
        return
    raises_llm(PARAM_INVALID, case.call, src.cache, case.sync, [tc(dst.addrs)])
    assert_mem_equal(dst.mem(), before)


def test_9_host_destination_registered_blocks(case):
    dst = case.env.registered(4, [8, 16], placement=HOST, blocks=True)
    if not DEVICE_RUNTIME:
        t = case.call(case.bsrc.cache, case.sync, [tc(dst.addrs)], [0], [0])
        assert wait_results(t) == [SUCCESS]
        assert all(
            bytes(d[:16]) == bytes(s[:16])
            for d, s in zip(dst.tensor_bytes(), case.bsrc.tensor_bytes())
        )
        return
    raises_llm(PARAM_INVALID, case.call, case.bsrc.cache, case.sync, [tc(dst.addrs)], [0], [0])


def test_9_pa_source_to_non_pa_keyed_destination(env_remote):
    env = env_remote
    src = env.registered(4, [6, 16], blocks=True)
    dst = env.registered(4, [8, 16])  # not a blocks cache
    key = CacheKeyByIdAndIndex(OWN_CLUSTER, dst.cache.cache_id, 0)
    before = dst.snapshot()
    raises_llm(
        PARAM_INVALID,
        env.cm.transfer_cache_async,
        src.cache,
        RecordingSync(),
        [TransferWithCacheKeyConfig(key, range(0, 2), range(0, 2))],
        [0, 1],
        [2, 3],
    )
    assert_mem_equal(dst.mem(), before)


def test_9_cache_on_another_device(case, make_env):
    """One process drives one device: caches of an LLMDataDist bound to device 1 in the same
    process are neither a valid source nor valid destination memory for this one."""
    if os.environ.get("LLMDIST_RUNTIME") in ("acl", "cuda"):
        # A device runtime refuses to drive a second device from one process at init.
        with pytest.raises(LLMException) as info:
            make_env(cluster_id=OWN_CLUSTER + 2, extra_options={"ge.exec.deviceId": "1"})
        assert info.value.status_code in (PARAM_INVALID, LLMStatusCode.LLM_FEATURE_NOT_ENABLED)
        return
    other = make_env(cluster_id=OWN_CLUSTER + 2, extra_options={"ge.exec.deviceId": "1"})
    foreign_src = other.registered(4, [4, 16])
    foreign_dst = other.registered(4, [4, 16])
    raises_llm(NOT_EXIST, case.call, foreign_src.cache, case.sync, [case.good()])
    before = foreign_dst.snapshot()
    raises_llm(PARAM_INVALID, case.call, case.src.cache, case.sync, [tc(foreign_dst.addrs)])
    assert_mem_equal(foreign_dst.mem(), before)


# ------------------------------------------------------------------------- 10. linked cluster
def test_10_not_linked_cluster(case):
    before = case.snapshot()
    raises_llm(
        NOT_YET_LINK,
        case.call,
        case.src.cache,
        case.sync,
        [tc(case.dst.addrs, None, 0, OTHER_CLUSTER)],
    )
    raises_llm(
        NOT_YET_LINK,
        case.call,
        case.src.cache,
        case.sync,
        [case.good(), tc(case.dst.addrs, None, 0, OTHER_CLUSTER)],
    )
    case.check_nothing_happened(before)


def test_10_not_linked_cluster_keyed(env_remote):
    env = env_remote
    src = env.registered(4, [4, 16], blocks=True)
    key = BlocksCacheKey(OTHER_CLUSTER, 0)
    raises_llm(
        NOT_YET_LINK,
        env.cm.transfer_cache_async,
        src.cache,
        RecordingSync(),
        [TransferWithCacheKeyConfig(key, range(0, 2), range(0, 2))],
        [0],
        [0],
    )
    k2 = CacheKeyByIdAndIndex(OTHER_CLUSTER, 1, 0)
    src = env.registered(4, [4, 16])
    raises_llm(
        NOT_YET_LINK,
        env.cm.transfer_cache_async,
        src.cache,
        RecordingSync(),
        [TransferWithCacheKeyConfig(k2, range(0, 2), range(0, 2))],
    )


def test_10_before_11(case):
    stray = np.zeros(64, np.uint8)
    raises_llm(
        NOT_YET_LINK,
        case.call,
        case.src.cache,
        case.sync,
        [tc([stray.ctypes.data] * 4, None, 0, OTHER_CLUSTER)],
    )


# ------------------------------------------------------------------------- 11. bounds
def _msg_ok(e: LLMException):
    text = str(e).lower()
    assert "layer" in text, str(e)


def test_11_range_past_end_of_registered_tensor(case):
    d = case.dst  # tensors of 64 bytes, C2C writes 16
    addrs = d.addrs
    addrs[3] = d.addr_of(3, 64 - 16 + 1)  # one byte past the end
    before = case.snapshot()
    e = raises_llm(PARAM_INVALID, case.call, case.src.cache, case.sync, [case.good(), tc(addrs)])
    _msg_ok(e)
    case.check_nothing_happened(before)


def test_11_range_ending_exactly_at_end_is_fine(case):
    d = case.dst
    addrs = [d.addr_of(i, 64 - 16) for i in range(4)]
    assert wait_results(case.call(case.src.cache, case.sync, [tc(addrs)])) == [SUCCESS]


def test_11_range_before_start(case):
    addrs = case.dst.addrs
    addrs[0] -= 1
    e = raises_llm(PARAM_INVALID, case.call, case.src.cache, case.sync, [tc(addrs)])
    _msg_ok(e)


def test_11_range_crossing_into_next_tensor(case):
    """Tensors registered back to back: a range spanning two tensors is still rejected."""
    d = case.env.registered(4, [4, 16], contiguous=True)
    addrs = d.addrs
    addrs[0] = d.addr_of(0, 64 - 8)
    raises_llm(PARAM_INVALID, case.call, case.src.cache, case.sync, [tc(addrs)])


def test_11_unregistered_memory(case):
    stray = np.zeros(4 * 64, np.uint8)
    addrs = [stray[i * 64 :].ctypes.data for i in range(4)]
    raises_llm(PARAM_INVALID, case.call, case.src.cache, case.sync, [tc(addrs)])
    assert not stray.any()


def test_11_memory_of_unregistered_and_deallocated_caches(case):
    env = case.env
    d = env.registered(4, [4, 16])
    env.cm.unregister_cache(d.cache.cache_id)
    before = d.snapshot()
    raises_llm(
        PARAM_INVALID,
        case.call,
        case.src.cache,
        case.sync,
        [tc([a for a in (d.buffers[k][o:].ctypes.data for k, o in d.tensors)])],
    )
    assert_mem_equal(d.mem(), before)
    a = env.allocated(4, [4, 16])
    addrs = a.addrs
    env.cm.deallocate_cache(a.cache)
    raises_llm(PARAM_INVALID, case.call, case.src.cache, case.sync, [tc(addrs)])


@pytest.mark.parametrize("db", [[8], [0, 8], [2**20]])
def test_11_b2b_dst_block_past_end(case, db):
    sb = list(range(len(db)))
    before = case.snapshot()
    raises_llm(PARAM_INVALID, case.call, case.bsrc.cache, case.sync, [tc(case.bdst.addrs)], sb, db)
    case.check_nothing_happened(before)


def test_11_c2b_dst_block_past_end(case):
    # bdst tensors: 8 blocks of 16 = 128 bytes; with B = 32, block 4 starts at byte 128
    raises_llm(
        PARAM_INVALID, case.call, case.src.cache, case.sync, [tc(case.bdst.addrs)], None, [4], 32
    )
    # block 3 with B = 48 ends at 3*48 + 16 = 160 > 128
    raises_llm(
        PARAM_INVALID, case.call, case.src.cache, case.sync, [tc(case.bdst.addrs)], None, [3], 48
    )
    # but the short last chunk is accounted exactly: B = 112, block 1 -> bytes 112..128 fits
    t = case.call(case.src.cache, case.sync, [tc(case.bdst.addrs)], None, [1], 112)
    assert wait_results(t) == [SUCCESS]


@pytest.mark.parametrize("batch_index", [3, 4, 2**32 - 1])
def test_11_keyed_batch_index_past_end(env_remote, batch_index):
    env = env_remote
    src = env.registered(4, [4, 16])
    dst = env.registered(4, [3, 16])
    key = CacheKeyByIdAndIndex(OWN_CLUSTER, dst.cache.cache_id, batch_index)
    before = dst.snapshot()
    raises_llm(
        PARAM_INVALID,
        env.cm.transfer_cache_async,
        src.cache,
        RecordingSync(),
        [TransferWithCacheKeyConfig(key, range(0, 2), range(0, 2))],
    )
    assert_mem_equal(dst.mem(), before)


def test_11_keyed_source_row_wider_than_destination_row(env_remote):
    env = env_remote
    src = env.registered(4, [2, 32])
    dst = env.registered(4, [2, 16])  # 32 bytes per tensor, remote stride 16
    key = CacheKeyByIdAndIndex(OWN_CLUSTER, dst.cache.cache_id, 1)  # 16 + 32 > 32
    raises_llm(
        PARAM_INVALID,
        env.cm.transfer_cache_async,
        src.cache,
        RecordingSync(),
        [TransferWithCacheKeyConfig(key, range(0, 2), range(0, 2))],
    )


def test_11_keyed_blocks_past_end(env_remote):
    env = env_remote
    src = env.registered(4, [6, 16], blocks=True)
    key = BlocksCacheKey(OWN_CLUSTER, 0)
    env.registered(4, [4, 16], blocks=True, key=key)
    raises_llm(
        PARAM_INVALID,
        env.cm.transfer_cache_async,
        src.cache,
        RecordingSync(),
        [TransferWithCacheKeyConfig(key, range(0, 2), range(0, 2))],
        [0, 1],
        [3, 4],
    )


@pytest.mark.parametrize(
    "make_key",
    [
        lambda dst: BlocksCacheKey(OWN_CLUSTER, 99),
        lambda dst: CacheKeyByIdAndIndex(OWN_CLUSTER, 10**6, 0),
    ],
)
def test_keyed_unknown_cache(env_remote, make_key):
    env = env_remote
    src = env.registered(4, [4, 16], blocks=True)
    dst = env.registered(4, [4, 16], blocks=True, key=BlocksCacheKey(OWN_CLUSTER, 0))
    with pytest.raises(LLMException) as ei:
        env.cm.transfer_cache_async(
            src.cache,
            RecordingSync(),
            [TransferWithCacheKeyConfig(make_key(dst), range(0, 2), range(0, 2))],
            [0],
            [0],
        )
    # the spec names no code for an unknown key; either "no such cache" or "invalid" is fair
    assert ei.value.status_code in (NOT_EXIST, PARAM_INVALID)


def test_keyed_cache_unregistered_before_call(env_remote):
    env = env_remote
    src = env.registered(4, [4, 16], blocks=True)
    key = BlocksCacheKey(OWN_CLUSTER, 0)
    dst = env.registered(4, [4, 16], blocks=True, key=key)
    env.cm.unregister_cache(dst.cache.cache_id)
    with pytest.raises(LLMException) as ei:
        env.cm.transfer_cache_async(
            src.cache,
            RecordingSync(),
            [TransferWithCacheKeyConfig(key, range(0, 2), range(0, 2))],
            [0],
            [0],
        )
    assert ei.value.status_code in (NOT_EXIST, PARAM_INVALID)


def test_rejected_call_is_all_or_nothing(case):
    """A later invalid config rejects the whole call: the valid first config writes nothing."""
    bad = case.dst.addrs
    bad[1] += 64
    before = case.snapshot()
    raises_llm(PARAM_INVALID, case.call, case.src.cache, case.sync, [case.good(), tc(bad)])
    case.check_nothing_happened(before)


# ------------------------------------------------------------------------- bool is not an int
def test_bool_where_int_expected(case):
    with pytest.raises(TypeError):
        case.call(case.src.cache, case.sync, [case.good()], None, None, True)
    with pytest.raises(TypeError):
        case.call(case.bsrc.cache, case.sync, [tc(case.bdst.addrs)], [False], [True])
    with pytest.raises(TypeError):
        TransferConfig(OWN_CLUSTER, case.dst.addrs, None, True)
    with pytest.raises(TypeError):
        TransferConfig(True, case.dst.addrs)
    with pytest.raises(TypeError):
        TransferConfig(OWN_CLUSTER, [True, 1, 2, 3])
    cfg = case.good()
    with pytest.raises(TypeError):
        cfg.src_batch_index = False
    with pytest.raises(TypeError):
        case.cm.unregister_cache(True)
    with pytest.raises(TypeError):
        CacheKeyByIdAndIndex(OWN_CLUSTER, 1, True)


# ------------------------------------------------------------------------- register / allocate
@pytest.mark.parametrize("blocks", [False, True])
def test_register_argument_types(env, blocks):
    reg = env.cm.register_blocks_cache if blocks else env.cm.register_cache
    buf = np.zeros(4 * 64, np.uint8)
    addrs = [buf[i * 64 :].ctypes.data for i in range(4)]
    desc = make_desc(4, [4, 16])
    with pytest.raises(TypeError):
        reg("desc", addrs)
    with pytest.raises(TypeError):
        reg(None, addrs)
    for bad in (None, addrs[0], "addrs", {addrs[0]}):
        with pytest.raises(TypeError):
            reg(desc, bad)
    for bad_elem, exc in (
        ("1", TypeError),
        (1.5, TypeError),
        (True, TypeError),
        (-1, ValueError),
        (2**64, ValueError),
    ):
        with pytest.raises(exc):
            reg(desc, addrs[:3] + [bad_elem])
    with pytest.raises(TypeError):
        reg(desc, addrs, remote_accessible="yes")
    with pytest.raises(TypeError):
        reg(desc, addrs, remote_accessible=1)
    if blocks:
        with pytest.raises(TypeError):
            reg(desc, addrs, CacheKey(OWN_CLUSTER, 1))
        with pytest.raises(TypeError):
            reg(desc, addrs, "key")
    else:
        with pytest.raises(TypeError):
            reg(desc, addrs, BlocksCacheKey(OWN_CLUSTER, 0))
        with pytest.raises(TypeError):
            reg(desc, addrs, [BlocksCacheKey(OWN_CLUSTER, 0)])
    # nothing got registered: the same memory registers fine now
    cache = reg(desc, addrs)
    assert cache.tensor_addrs == addrs


@pytest.mark.parametrize("blocks", [False, True])
def test_register_illegal_values(env, blocks):
    reg = env.cm.register_blocks_cache if blocks else env.cm.register_cache
    buf = np.zeros(8 * 64, np.uint8)
    addrs = [buf[i * 64 :].ctypes.data for i in range(4)]
    raises_llm(PARAM_INVALID, reg, make_desc(4, [4, 16]), addrs[:3])
    raises_llm(PARAM_INVALID, reg, make_desc(4, [4, 16]), addrs + [buf[256:].ctypes.data])
    raises_llm(PARAM_INVALID, reg, make_desc(4, [4, 16]), addrs[:3] + [0])
    raises_llm(PARAM_INVALID, reg, CacheDesc(0, [4, 16], DataType.DT_UINT8), [])
    raises_llm(PARAM_INVALID, reg, CacheDesc(4, [4, 16], DataType.DT_STRING), addrs)
    # tensors of one call overlapping each other
    raises_llm(
        PARAM_INVALID, reg, make_desc(4, [4, 16]), [addrs[0], addrs[1], addrs[1] + 8, addrs[3]]
    )
    cache = reg(make_desc(4, [4, 16]), addrs)
    assert cache.is_blocks_cache == blocks
    assert cache.tensor_addrs == addrs


@pytest.mark.parametrize("shift", [0, 1, 63, -63])
def test_register_overlapping_memory_accepted(env, shift):
    """Registrations may overlap other registrations (upstream has no such check); each keeps
    its own tensors."""
    buf = np.zeros(8 * 64 + 128, np.uint8)
    base = buf[64:].ctypes.data
    first = env.cm.register_cache(make_desc(2, [64]), [base, base + 64])
    second = env.cm.register_cache(make_desc(2, [64]), [base + 256, base + 64 + shift])
    third = env.cm.register_blocks_cache(make_desc(2, [1, 64]), [base + shift, base + 320])
    assert second.tensor_addrs == [base + 256, base + 64 + shift]
    assert third.tensor_addrs == [base + shift, base + 320]
    env.cm.unregister_cache(second.cache_id)
    env.cm.unregister_cache(third.cache_id)
    env.cm.unregister_cache(first.cache_id)


def test_allocate_argument_checks(env):
    cm = env.cm
    for fn in (cm.allocate_cache, cm.allocate_blocks_cache):
        with pytest.raises(TypeError):
            fn("desc")
        with pytest.raises(TypeError):
            fn(None)
        raises_llm(PARAM_INVALID, fn, CacheDesc(0, [4, 16], DataType.DT_UINT8))
        raises_llm(PARAM_INVALID, fn, CacheDesc(2, [4, 16], DataType.DT_STRING))
    with pytest.raises(TypeError):
        cm.allocate_cache(make_desc(2, [4]), "keys")
    with pytest.raises(TypeError):
        cm.allocate_cache(make_desc(2, [4]), [BlocksCacheKey(OWN_CLUSTER)])
    with pytest.raises(TypeError):
        cm.allocate_blocks_cache(make_desc(2, [4]), CacheKey(OWN_CLUSTER, 1))
    with pytest.raises(TypeError):
        cm.allocate_blocks_cache(make_desc(2, [4]), 5)
    c = cm.allocate_cache(make_desc(2, [4, 8], DataType.DT_FLOAT))
    assert len(c.tensor_addrs) == 2 and 0 not in c.tensor_addrs
    assert not c.is_blocks_cache
    b = cm.allocate_blocks_cache(make_desc(2, [4, 8], DataType.DT_FLOAT))
    assert b.is_blocks_cache
    assert c.cache_id != b.cache_id


@pytest.mark.parametrize(
    "placement,option", [(DEV, "llm.MemPoolConfig"), (HOST, "llm.HostMemPoolConfig")]
)
def test_allocate_respects_configured_pool(make_env, placement, option):
    env = make_env(extra_options={option: '{"memory_size": 65536}'})
    env.cm.allocate_cache(make_desc(2, [16, 1024], placement=placement))  # 32 KiB: fits
    with pytest.raises(LLMException) as ei:
        env.cm.allocate_cache(make_desc(2, [64, 1024], placement=placement))  # 128 KiB
    assert ei.value.status_code in (
        LLMStatusCode.LLM_DEVICE_OUT_OF_MEMORY,
        LLMStatusCode.LLM_OUT_OF_MEMORY,
    )


def test_unregister_deallocate_argument_types(env):
    cm = env.cm
    for bad in ("1", 1.0, None, True):
        with pytest.raises(TypeError):
            cm.unregister_cache(bad)
    for fn in (cm.deallocate_cache, cm.deallocate_blocks_cache):
        for bad in (None, 1, "cache"):
            with pytest.raises(TypeError):
                fn(bad)


def test_cache_manager_before_init():
    dd = LLMDataDist(LLMRole.PROMPT, OWN_CLUSTER)
    with pytest.raises(RuntimeError, match="llm datadist is not initialized"):
        dd.cache_manager
    dd.finalize()


# ------------------------------------------------------------------------- wrap-around
@pytest.mark.parametrize("db", [[2**60], [2**64 - 1], [2**59 + 1]])
def test_11_b2b_huge_dst_index_does_not_wrap(case, db):
    """d * block_size must not wrap around 2**64 into the registered region."""
    before = case.snapshot()
    raises_llm(PARAM_INVALID, case.call, case.bsrc.cache, case.sync, [tc(case.bdst.addrs)], [0], db)
    case.check_nothing_happened(before)


@pytest.mark.parametrize(
    "size,db", [(2**62, [4]), (2**63, [2]), (2**64 - 1, [1]), (16, [2**60]), (2**32, [2**32])]
)
def test_11_c2b_huge_block_offsets_do_not_wrap(case, size, db):
    before = case.snapshot()
    raises_llm(
        PARAM_INVALID, case.call, case.src.cache, case.sync, [tc(case.bdst.addrs)], None, db, size
    )
    case.check_nothing_happened(before)


@pytest.mark.parametrize("addr", [2**64 - 1, 2**64 - 8, 2**64 - 16, 1])
def test_11_address_near_the_ends_of_the_address_space(case, addr):
    addrs = case.dst.addrs
    addrs[2] = addr
    raises_llm(PARAM_INVALID, case.call, case.src.cache, case.sync, [tc(addrs)])


def test_register_over_allocated_memory_rejected(env):
    a = env.allocated(2, [4, 16])
    raises_llm(PARAM_INVALID, env.cm.register_cache, make_desc(2, [4, 16]), a.addrs)
    raises_llm(
        PARAM_INVALID, env.cm.register_cache, make_desc(2, [8]), [a.addrs[0] + 60, a.addrs[1] + 8]
    )


# ------------------------------------------------------------------------- property: oracle
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_property_validation_oracle(data):
    """Random (often out-of-bounds) indices, sizes, offsets and batch indices: the call either
    succeeds with exactly the reference bytes, or, when the spec's rules say the input is
    illegal, raises LLMException(LLM_PARAM_INVALID) and writes nothing."""
    draw = data.draw
    kind = draw(st.sampled_from(["C2C", "C2B", "B2B"]))
    L = draw(st.integers(1, 3))
    with env_ctx(seed=draw(st.integers(0, 2**31 - 1))) as env:
        rng_ = draw(
            st.sampled_from([None] + [range(a, b) for a in range(L) for b in range(a + 1, L + 1)])
        )
        n_layers = len(rng_) if rng_ is not None else L
        sb = db = size = None
        off = 0
        if kind == "B2B":
            n_src, n_dst = draw(st.integers(1, 6)), draw(st.integers(1, 6))
            bb = draw(st.integers(1, 40))
            src = env.registered(2 * L, [n_src, bb], blocks=True)
            dst = env.registered(2 * n_layers, [n_dst, bb], blocks=True, guard=256)
            n = draw(st.integers(1, min(6, n_dst + 2)))
            sb = draw(st.lists(st.integers(0, n_src + 1), min_size=n, max_size=n))
            db = draw(st.lists(st.integers(0, n_dst + 1), min_size=n, max_size=n, unique=True))
            if draw(st.booleans()):
                sb = sb[:-1] if len(sb) > 1 else sb + [0]
            size = draw(st.sampled_from([None, 0, bb, bb + 1, max(bb - 1, 1)]))
            batch = draw(st.sampled_from([0, 0, 0, 1]))
            valid = (
                len(sb) == len(db)
                and all(s < n_src for s in sb)
                and size in (None, 0, bb)
                and all(d < n_dst for d in db)
                and batch == 0
            )
        else:
            rows, row = draw(st.integers(1, 3)), draw(st.integers(1, 64))
            src = env.registered(2 * L, [rows, row])
            batch = draw(st.integers(0, rows))
            if kind == "C2B":
                size = draw(st.integers(1, row + 8))
                n_dst = draw(st.integers(1, 6))
                dst = env.registered(2 * n_layers, [n_dst, size], blocks=True, guard=256)
                cap = -(-row // size)
                db = draw(
                    st.lists(st.integers(0, n_dst + 1), min_size=1, max_size=cap + 1, unique=True)
                )
                valid = len(db) <= cap and batch < rows and all(d < n_dst for d in db)
            else:
                region = row + draw(st.integers(0, 16))
                dst = env.registered(2 * n_layers, [region], guard=256)
                off = draw(st.integers(-8, region - row + 8))
                valid = batch < rows and 0 <= off and off + row <= region
        cfg = TransferConfig(
            OWN_CLUSTER, [dst.addr_of(i, off) for i in range(2 * n_layers)], rng_, batch
        )
        before, src_before = dst.snapshot(), src.snapshot()
        srcb = src.tensor_bytes()
        sync = RecordingSync()
        if not valid:
            raises_llm(
                PARAM_INVALID, env.cm.transfer_cache_async, src.cache, sync, [cfg], sb, db, size
            )
            assert sync.calls == []
            assert_mem_equal(dst.mem(), before, "rejected call")
            return
        task = env.cm.transfer_cache_async(src.cache, sync, [cfg], sb, db, size)
        assert wait_results(task) == [SUCCESS], task.errors
        refs = [reference.RefConfig([(k, o + off) for k, o in dst.tensors], rng_, batch)]
        exp, _ = reference.expected_transfer(srcb, src.stride, before, refs, sb, db, size)
        assert_mem_equal(dst.mem(), exp)
        assert_mem_equal(src.mem(), src_before)
