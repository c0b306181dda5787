"""Local block operations (spec section 9): copy_blocks, copy_cache, swap_blocks with
Cache.create_cpu_cache, and remap_registered_memory. Every copy is checked byte for byte
against a numpy model, including the guard bytes around registered tensors; every refused call
is checked for its exception type and status code and for leaving memory untouched. The module
runs on the host runtime and, in CI, on the fake ACL runtime (device memory from aclrtMalloc,
pageable numpy memory on the host side)."""

from __future__ import annotations

import numpy as np
import pytest

from llmdist import Cache, CacheDesc, DataType, LLMStatusCode, Placement, block_ops

from .helpers import assert_mem_equal, raises_llm

# every test runs on each runtime (runtime_params.py)
pytestmark = pytest.mark.all_runtimes

PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
DEV, HOST = Placement.DEVICE, Placement.HOST


def blocks_of(tc, i):
    """Tensor i of a test cache as (blocks, block bytes) uint8 rows."""
    return tc.tensor(i).reshape(tc.desc.batch_size, -1)


def cpu_cache(num_tensors, num_blocks, block_bytes, rng):
    """A HOST blocks cache over numpy arrays the test owns (pageable memory)."""
    arrays = [
        rng.integers(0, 256, num_blocks * block_bytes, dtype=np.uint8) for _ in range(num_tensors)
    ]
    desc = CacheDesc(num_tensors, [num_blocks, block_bytes], DataType.DT_UINT8, HOST)
    return Cache.create_cpu_cache(desc, [a.ctypes.data for a in arrays]), arrays


# --------------------------------------------------------------------------------------------
# copy_blocks


@pytest.mark.parametrize("allocated", [False, True])
@pytest.mark.parametrize("placement", [DEV, HOST])
def test_copy_blocks_moves_blocks_in_every_tensor(env, allocated, placement):
    c = env.cache(allocated, 3, [8, 32], placement=placement, blocks=True)
    before = c.snapshot()
    info = {0: [5, 6], 1: [7], 3: [2]}
    env.cm.copy_blocks(c.cache, info)
    expect = {k: v.copy() for k, v in before.items()}
    for t in range(3):
        key, off = c.tensors[t]
        rows = expect[key][off : off + c.size].reshape(8, 32)
        orig = rows.copy()
        for s, ds in info.items():
            for d in ds:
                rows[d] = orig[s]
    assert_mem_equal(c.mem(), expect, "copy_blocks")


def test_copy_blocks_merges_consecutive_blocks_and_empty_info_is_a_no_op(env):
    c = env.registered(2, [16, 8], blocks=True)
    before = c.snapshot()
    env.cm.copy_blocks(c.cache, {})
    assert_mem_equal(c.mem(), before, "empty copy_blocks")
    env.cm.copy_blocks(c.cache, {0: [8], 1: [9], 2: [10], 3: [11]})
    for t in range(2):
        rows = blocks_of(c, t)
        assert np.array_equal(rows[8:12], rows[0:4])


@pytest.mark.parametrize(
    "info, exc",
    [
        ([(0, [1])], TypeError),
        ({0: 1}, TypeError),
        ({0: (1,)}, TypeError),
        ({0: ["1"]}, TypeError),
        ({"0": [1]}, TypeError),
        ({True: [1]}, TypeError),
        ({0: [True]}, TypeError),
        ({-1: [1]}, ValueError),
        ({0: [-1]}, ValueError),
    ],
)
def test_copy_blocks_argument_types(env, info, exc):
    c = env.registered(2, [4, 8], blocks=True)
    with pytest.raises(exc):
        env.cm.copy_blocks(c.cache, info)


@pytest.mark.parametrize(
    "info, what",
    [
        ({4: [1]}, "out of range"),
        ({0: [4]}, "out of range"),
        ({0: [1], 1: [2]}, "both read and written"),
        ({0: [0]}, "both read and written"),
        ({0: [2], 1: [2]}, "written twice"),
        ({0: [2, 2]}, "written twice"),
    ],
)
def test_copy_blocks_refuses_bad_blocks(env, info, what):
    c = env.registered(2, [4, 8], blocks=True)
    before = c.snapshot()
    err = raises_llm(PARAM_INVALID, env.cm.copy_blocks, c.cache, info)
    assert what in str(err)
    assert_mem_equal(c.mem(), before, "refused copy_blocks")


def test_copy_blocks_needs_a_live_blocks_cache(env):
    with pytest.raises(TypeError):
        env.cm.copy_blocks("cache", {0: [1]})
    plain = env.registered(2, [4, 8])
    raises_llm(PARAM_INVALID, env.cm.copy_blocks, plain.cache, {0: [1]})
    c = env.allocated(2, [4, 8], blocks=True)
    env.cm.deallocate_blocks_cache(c.cache)
    raises_llm(NOT_EXIST, env.cm.copy_blocks, c.cache, {0: [1]})
    r = env.registered(2, [4, 8], blocks=True)
    env.cm.unregister_cache(r.cache.cache_id)
    raises_llm(NOT_EXIST, env.cm.copy_blocks, r.cache, {0: [1]})


def test_copy_blocks_of_another_managers_cache_is_refused(env, make_env):
    other = make_env(cluster_id=99)
    c = other.registered(2, [4, 8], blocks=True)
    raises_llm(NOT_EXIST, env.cm.copy_blocks, c.cache, {0: [1]})


# --------------------------------------------------------------------------------------------
# copy_cache


@pytest.mark.parametrize(
    "src_place, dst_place", [(DEV, DEV), (DEV, HOST), (HOST, HOST), (HOST, DEV)]
)
@pytest.mark.parametrize("offset, size", [(0, -1), (5, -1), (3, 17), (0, 48)])
def test_copy_cache_copies_one_row_range_per_tensor(env, src_place, dst_place, offset, size):
    src = env.registered(4, [3, 48], placement=src_place)
    dst = env.registered(4, [5, 64], placement=dst_place)
    before = dst.snapshot()
    env.cm.copy_cache(
        dst.cache,
        src.cache,
        dst_batch_index=4,
        src_batch_index=2,
        offset=offset,
        size=size,
        req_id=12,
    )
    n = 48 - offset if size == -1 else size
    expect = {k: v.copy() for k, v in before.items()}
    for t in range(4):
        key, off = dst.tensors[t]
        start = off + 4 * 64 + offset
        expect[key][start : start + n] = src.tensor(t)[2 * 48 + offset : 2 * 48 + offset + n]
    assert_mem_equal(dst.mem(), expect, "copy_cache")


def test_copy_cache_between_rows_of_one_cache(env):
    c = env.allocated(2, [4, 16])
    env.cm.copy_cache(c.cache, c.cache, dst_batch_index=3, src_batch_index=0)
    for t in range(2):
        rows = c.tensor(t).reshape(4, 16)
        assert np.array_equal(rows[3], rows[0])


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        (dict(dst_batch_index=-1), ValueError),
        (dict(src_batch_index=2**32), ValueError),
        (dict(offset=-1), ValueError),
        (dict(size=2**63), ValueError),
        (dict(size=1.0), TypeError),
        (dict(req_id=-1), ValueError),
        (dict(req_id="1"), TypeError),
        (dict(dst_batch_index=True), TypeError),
    ],
)
def test_copy_cache_argument_types(env, kwargs, exc):
    src = env.registered(2, [2, 16])
    dst = env.registered(2, [2, 16])
    with pytest.raises(exc):
        env.cm.copy_cache(dst.cache, src.cache, **kwargs)


@pytest.mark.parametrize(
    "kwargs, what",
    [
        (dict(size=0), "size"),
        (dict(size=-2), "size"),
        (dict(src_batch_index=2), "src_batch_index"),
        (dict(dst_batch_index=3), "dst_batch_index"),
        (dict(offset=16), "offset"),
        (dict(offset=8, size=9), "past the source row"),
        (dict(size=17), "past the source row"),
    ],
)
def test_copy_cache_refuses_ranges_outside_the_rows(env, kwargs, what):
    src = env.registered(2, [2, 16])
    dst = env.registered(2, [3, 16])
    before = dst.snapshot()
    err = raises_llm(PARAM_INVALID, env.cm.copy_cache, dst.cache, src.cache, **kwargs)
    assert what in str(err)
    assert_mem_equal(dst.mem(), before, "refused copy_cache")


def test_copy_cache_refuses_mismatched_or_blocks_caches(env):
    src = env.registered(2, [2, 16])
    raises_llm(PARAM_INVALID, env.cm.copy_cache, env.registered(4, [2, 16]).cache, src.cache)
    raises_llm(
        PARAM_INVALID, env.cm.copy_cache, src.cache, env.registered(2, [2, 16], blocks=True).cache
    )
    raises_llm(
        PARAM_INVALID, env.cm.copy_cache, env.registered(2, [2, 16], blocks=True).cache, src.cache
    )
    small = env.registered(2, [2, 8])
    raises_llm(PARAM_INVALID, env.cm.copy_cache, small.cache, src.cache)  # row runs past dst
    gone = env.allocated(2, [2, 16])
    env.cm.deallocate_cache(gone.cache)
    raises_llm(NOT_EXIST, env.cm.copy_cache, gone.cache, src.cache)
    raises_llm(NOT_EXIST, env.cm.copy_cache, src.cache, gone.cache)


def test_copy_cache_refuses_overlapping_source_and_destination(env):
    c = env.registered(2, [2, 16])
    before = c.snapshot()
    err = raises_llm(PARAM_INVALID, env.cm.copy_cache, c.cache, c.cache)
    assert "overlap" in str(err)
    assert_mem_equal(c.mem(), before, "overlapping copy_cache")


# --------------------------------------------------------------------------------------------
# swap_blocks and Cache.create_cpu_cache


@pytest.mark.parametrize("allocated", [False, True])
def test_swap_out_and_in_round_trip_with_a_cpu_cache(env, rng, allocated):
    dev = env.cache(allocated, 3, [6, 64], placement=DEV, blocks=True)
    cpu, arrays = cpu_cache(3, 10, 64, rng)
    start = [blocks_of(dev, t).copy() for t in range(3)]
    out = {0: 9, 2: 3, 3: 4, 5: 0}
    env.cm.swap_blocks(dev.cache, cpu, out)
    for t in range(3):
        host = arrays[t].reshape(10, 64)
        for s, d in out.items():
            assert np.array_equal(host[d], start[t][s]), (t, s, d)
    # overwrite the device blocks, then swap back in to other blocks
    for t in range(3):
        blocks_of(dev, t)[:] = 0
    back = {9: 1, 3: 2, 4: 3, 0: 5}
    env.cm.swap_blocks(cpu, dev.cache, back)
    for t in range(3):
        rows = blocks_of(dev, t)
        assert np.array_equal(rows[1], start[t][0])
        assert np.array_equal(rows[2], start[t][2])
        assert np.array_equal(rows[3], start[t][3])
        assert np.array_equal(rows[5], start[t][5])
        assert not rows[0].any() and not rows[4].any()


def test_swap_with_an_allocated_host_cache(env):
    dev = env.registered(2, [4, 128], placement=DEV, blocks=True)
    host = env.allocated(2, [8, 128], placement=HOST, blocks=True)
    env.cm.swap_blocks(dev.cache, host.cache, {1: 7, 2: 0})
    for t in range(2):
        assert np.array_equal(blocks_of(host, t)[7], blocks_of(dev, t)[1])
        assert np.array_equal(blocks_of(host, t)[0], blocks_of(dev, t)[2])
    env.cm.swap_blocks(host.cache, dev.cache, {3: 3})
    for t in range(2):
        assert np.array_equal(blocks_of(dev, t)[3], blocks_of(host, t)[3])


def test_swap_through_several_staging_rounds(env, rng, monkeypatch):
    """Blocks larger than the staging buffer, and more blocks than fit in one round (the
    staging path runs on device runtimes for pageable host memory; the host runtime copies
    directly and must give the same bytes)."""
    monkeypatch.setattr(block_ops, "STAGING_BYTES", 100)
    ops = env.dd.cache_manager.block_ops
    ops.copier.close()
    ops.copier = block_ops.LocalCopier(env.dd.runtime)
    dev = env.registered(2, [5, 96], placement=DEV, blocks=True)
    cpu, arrays = cpu_cache(2, 5, 96, rng)
    env.cm.swap_blocks(cpu, dev.cache, {0: 4, 1: 3, 2: 2, 4: 0})
    for t in range(2):
        host = arrays[t].reshape(5, 96)
        rows = blocks_of(dev, t)
        for s, d in {0: 4, 1: 3, 2: 2, 4: 0}.items():
            assert np.array_equal(rows[d], host[s])
    for t in range(2):
        arrays[t][:] = 0
    env.cm.swap_blocks(dev.cache, cpu, {4: 1, 0: 2})
    for t in range(2):
        host = arrays[t].reshape(5, 96)
        assert np.array_equal(host[1], blocks_of(dev, t)[4])
        assert np.array_equal(host[2], blocks_of(dev, t)[0])
        assert not host[0].any() and not host[3].any() and not host[4].any()


def test_swap_refusals(env, rng):
    dev = env.registered(2, [4, 64], placement=DEV, blocks=True)
    cpu, arrays = cpu_cache(2, 4, 64, rng)
    snap = [a.copy() for a in arrays]
    with pytest.raises(TypeError):
        env.cm.swap_blocks(dev.cache, cpu, {0: "1"})
    with pytest.raises(TypeError):
        env.cm.swap_blocks(dev.cache, cpu, [(0, 1)])
    with pytest.raises(TypeError):
        env.cm.swap_blocks(dev.cache, "cpu", {0: 1})
    with pytest.raises(ValueError):
        env.cm.swap_blocks(dev.cache, cpu, {0: -1})
    raises_llm(PARAM_INVALID, env.cm.swap_blocks, dev.cache, cpu, {4: 0})
    raises_llm(PARAM_INVALID, env.cm.swap_blocks, dev.cache, cpu, {0: 4})
    raises_llm(PARAM_INVALID, env.cm.swap_blocks, dev.cache, cpu, {0: 1, 2: 1})
    # same placement on both sides
    dev2 = env.registered(2, [4, 64], placement=DEV, blocks=True)
    raises_llm(PARAM_INVALID, env.cm.swap_blocks, dev.cache, dev2.cache, {0: 1})
    cpu2, _ = cpu_cache(2, 4, 64, rng)
    raises_llm(PARAM_INVALID, env.cm.swap_blocks, cpu2, cpu, {0: 1})
    # block size and tensor count must match
    raises_llm(PARAM_INVALID, env.cm.swap_blocks, dev.cache, cpu_cache(2, 4, 32, rng)[0], {0: 1})
    raises_llm(PARAM_INVALID, env.cm.swap_blocks, dev.cache, cpu_cache(3, 4, 64, rng)[0], {0: 1})
    # both must be blocks caches
    plain = env.registered(2, [4, 64], placement=DEV)
    raises_llm(PARAM_INVALID, env.cm.swap_blocks, plain.cache, cpu, {0: 1})
    # the device cache must be live in this manager
    gone = env.allocated(2, [4, 64], placement=DEV, blocks=True)
    env.cm.deallocate_blocks_cache(gone.cache)
    raises_llm(NOT_EXIST, env.cm.swap_blocks, gone.cache, cpu, {0: 1})
    for a, b in zip(arrays, snap):
        assert np.array_equal(a, b)


def test_swap_refuses_a_cpu_cache_aliasing_the_device_cache(env):
    """On the host runtime "device" memory is host memory: a CPU cache over the same bytes
    would make the swap read what it writes."""
    if not env.dd.runtime.is_host:
        pytest.skip("device memory of a device runtime cannot alias host memory")
    dev = env.registered(1, [4, 64], placement=DEV, blocks=True)
    alias = Cache.create_cpu_cache(
        CacheDesc(1, [4, 64], DataType.DT_UINT8, HOST), [dev.addrs[0] + 64]
    )
    before = dev.snapshot()
    err = raises_llm(PARAM_INVALID, env.cm.swap_blocks, dev.cache, alias, {1: 0})
    assert "overlap" in str(err)
    assert_mem_equal(dev.mem(), before, "refused swap")


def test_create_cpu_cache_checks():
    desc = CacheDesc(2, [4, 8], DataType.DT_UINT8, HOST)
    c = Cache.create_cpu_cache(desc, [4096, 8192])
    assert (c.cache_id, c.is_blocks_cache, c.tensor_addrs) == (-1, True, [4096, 8192])
    raises_llm(
        PARAM_INVALID, Cache.create_cpu_cache, CacheDesc(2, [4, 8], DataType.DT_UINT8, DEV), [1, 2]
    )
    raises_llm(PARAM_INVALID, Cache.create_cpu_cache, desc, [1])
    raises_llm(PARAM_INVALID, Cache.create_cpu_cache, desc, [0, 1])
    with pytest.raises(TypeError):
        Cache.create_cpu_cache(desc, [[1], 1])


# --------------------------------------------------------------------------------------------
# remap_registered_memory


def test_remap_registered_memory_is_not_supported(env):
    err = raises_llm(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, env.cm.remap_registered_memory, [])
    assert "not supported" in str(err)
