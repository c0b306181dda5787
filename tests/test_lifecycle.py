"""Cache and LLMDataDist lifecycle: deallocate/unregister (also with transfers in flight),
finalize (also with transfers in flight and a blocked synchronizer), re-init, double init."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from llmdist import (
    BlocksCacheKey,
    LLMDataDist,
    LLMException,
    LLMRole,
    LLMStatusCode,
    TransferConfig,
    TransferWithCacheKeyConfig,
)

from . import reference
from .helpers import (
    OWN_CLUSTER,
    SUCCESS,
    Env,
    GateSync,
    RecordingSync,
    assert_mem_equal,
    make_desc,
    raises_llm,
    wait_results,
)
from .reference import RefConfig

# every test runs on each runtime (runtime_params.py)
pytestmark = pytest.mark.all_runtimes

NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
FINALIZED = LLMStatusCode.LLM_ENGINE_FINALIZED
TIMEOUT = LLMStatusCode.LLM_TIMEOUT


def tc(addrs, rng=None, batch=0):
    return TransferConfig(OWN_CLUSTER, list(addrs), rng, batch)


def transfer_ok(env, src, dst, batch=0):
    before = dst.snapshot()
    srcb = src.tensor_bytes()
    task = env.cm.transfer_cache_async(src.cache, RecordingSync(), [tc(dst.addrs, None, batch)])
    assert wait_results(task) == [SUCCESS]
    exp, _ = reference.expected_transfer(
        srcb, src.stride, before, [RefConfig(dst.tensors, None, batch)]
    )
    assert_mem_equal(dst.mem(), exp)


# --------------------------------------------------------------------------------------------
# deallocate / unregister
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocks", [False, True])
def test_deallocate(env, blocks):
    c = env.allocated(4, [4, 16], blocks=blocks)
    dst = env.registered(4, [4, 16], blocks=blocks)
    assert len(c.cache.tensor_addrs) == 4
    dealloc = env.cm.deallocate_blocks_cache if blocks else env.cm.deallocate_cache
    dealloc(c.cache)
    assert c.cache.tensor_addrs == []
    idx = ([0], [0]) if blocks else (None, None)
    raises_llm(
        NOT_EXIST, env.cm.transfer_cache_async, c.cache, RecordingSync(), [tc(dst.addrs)], *idx
    )
    raises_llm(NOT_EXIST, dealloc, c.cache)


def test_deallocated_handle_stays_dead_when_memory_is_reused(env):
    dst = env.registered(2, [1, 64])
    a = env.allocated(2, [1, 64])
    env.cm.deallocate_cache(a.cache)
    b = env.allocated(2, [1, 64])  # may well get the same addresses back
    raises_llm(NOT_EXIST, env.cm.transfer_cache_async, a.cache, RecordingSync(), [tc(dst.addrs)])
    transfer_ok(env, b, dst)


def test_unregister(env):
    src = env.registered(4, [4, 16])
    dst = env.registered(4, [4, 16])
    env.cm.unregister_cache(src.cache.cache_id)
    raises_llm(NOT_EXIST, env.cm.transfer_cache_async, src.cache, RecordingSync(), [tc(dst.addrs)])
    # the memory is free for a new registration, which works as a source
    addrs = [src.buffers[k][o:].ctypes.data for k, o in src.tensors]
    again = env.cm.register_cache(make_desc(4, [4, 16]), addrs)
    assert again.cache_id != src.cache.cache_id
    src.cache = again
    transfer_ok(env, src, dst, 3)


def test_unregister_keyed_destination(env_remote):
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
    assert ei.value.status_code in (NOT_EXIST, LLMStatusCode.LLM_PARAM_INVALID)
    # the key is free again
    env.registered(4, [4, 16], blocks=True, key=key)


# --------------------------------------------------------------------------------------------
# unregister / deallocate with a task in flight
# --------------------------------------------------------------------------------------------
def _inflight(env, src, dst, block_at=1):
    """Start a C2C task over all layers that blocks in the synchronizer at ``block_at``."""
    gate = GateSync(block_at=block_at)
    task = env.cm.transfer_cache_async(src.cache, gate, [tc(dst.addrs, None, 1)])
    assert gate.entered.wait(10)
    return task, gate


def test_unregister_destination_in_flight(env):
    src = env.registered(8, [2, 4096])
    dst = env.registered(8, [4096])
    before = dst.snapshot()
    task, gate = _inflight(env, src, dst)
    env.cm.unregister_cache(dst.cache.cache_id)
    at_return = dst.snapshot()
    gate.release()
    assert wait_results(task) == [NOT_EXIST]
    assert task.synchronize() == NOT_EXIST
    time.sleep(0.05)
    assert_mem_equal(dst.mem(), at_return, "destination after unregister returned")
    # layers whose synchronizer had not returned were never written
    for layer in (1, 2, 3):
        for t in (2 * layer, 2 * layer + 1):
            k, o = dst.tensors[t]
            assert np.array_equal(dst.buffers[k], before[k]), f"layer {layer} written"


@pytest.mark.parametrize("allocated", [False, True])
def test_release_source_in_flight(env, allocated):
    src = env.cache(allocated, 8, [2, 4096])
    d1 = env.registered(8, [4096])
    d2 = env.registered(8, [4096])
    b1, b2 = d1.snapshot(), d2.snapshot()
    gate = GateSync(block_at=2)
    task = env.cm.transfer_cache_async(
        src.cache, gate, [tc(d1.addrs, None, 0), tc(d2.addrs, None, 1)]
    )
    assert gate.entered.wait(10)
    if allocated:
        env.cm.deallocate_cache(src.cache)
        assert src.cache.tensor_addrs == []
    else:
        env.cm.unregister_cache(src.cache.cache_id)
    s1, s2 = d1.snapshot(), d2.snapshot()
    gate.release()
    assert wait_results(task) == [NOT_EXIST, NOT_EXIST]
    time.sleep(0.05)
    assert_mem_equal(d1.mem(), s1)
    assert_mem_equal(d2.mem(), s2)
    for d, b in ((d1, b1), (d2, b2)):
        for t in range(4, 8):  # layers 2, 3
            k, _ = d.tensors[t]
            assert np.array_equal(d.buffers[k], b[k])


def test_deallocate_destination_in_flight(env):
    src = env.registered(8, [2, 4096])
    dst = env.allocated(8, [4096])
    gate = GateSync(block_at=1)
    task = env.cm.transfer_cache_async(src.cache, gate, [tc(dst.addrs, None, 1)])
    assert gate.entered.wait(10)
    env.cm.deallocate_cache(dst.cache)
    assert dst.cache.tensor_addrs == []
    gate.release()
    assert wait_results(task) == [NOT_EXIST]
    # the manager keeps working
    d2 = env.registered(8, [4096])
    transfer_ok(env, src, d2, 0)


def test_unregister_keyed_destination_in_flight(env_remote):
    env = env_remote
    src = env.registered(8, [6, 256], blocks=True)
    key = BlocksCacheKey(OWN_CLUSTER, 1)
    dst = env.registered(8, [6, 256], blocks=True, key=key)
    gate = GateSync(block_at=1)
    task = env.cm.transfer_cache_async(
        src.cache,
        gate,
        [TransferWithCacheKeyConfig(key, range(0, 4), range(0, 4))],
        [0, 1, 2],
        [5, 4, 3],
    )
    assert gate.entered.wait(10)
    env.cm.unregister_cache(dst.cache.cache_id)
    at_return = dst.snapshot()
    gate.release()
    assert wait_results(task) == [NOT_EXIST]
    time.sleep(0.05)
    assert_mem_equal(dst.mem(), at_return)


def test_unrelated_release_does_not_cancel(env):
    src = env.registered(4, [2, 64])
    dst = env.registered(4, [64])
    other = env.registered(4, [64])
    before = dst.snapshot()
    srcb = src.tensor_bytes()
    gate = GateSync(block_at=1)
    task = env.cm.transfer_cache_async(src.cache, gate, [tc(dst.addrs, None, 1)])
    assert gate.entered.wait(10)
    env.cm.unregister_cache(other.cache.cache_id)
    gate.release()
    assert wait_results(task) == [SUCCESS]
    exp, _ = reference.expected_transfer(
        srcb, src.stride, before, [RefConfig(dst.tensors, None, 1)]
    )
    assert_mem_equal(dst.mem(), exp)


# --------------------------------------------------------------------------------------------
# finalize
# --------------------------------------------------------------------------------------------
def _finalize_with_watchdog(dd, limit=15.0):
    done = threading.Event()
    err = []

    def run():
        try:
            dd.finalize()
        except BaseException as e:  # pragma: no cover - reported below
            err.append(e)
        finally:
            done.set()

    th = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    th.start()
    assert done.wait(limit), "finalize hangs while a synchronizer is blocked"
    assert not err, err
    return time.monotonic() - t0


def test_finalize_with_tasks_in_flight(make_env):
    env = make_env(workers=1)
    src = env.registered(8, [2, 1024])  # 4 layers
    dA = env.registered(6, [1024])  # layers 0-2: started, unfinished at finalize
    dC = env.registered(2, [1024])  # layer 3 only: never started
    dQ = env.registered(8, [1024])  # a second task, queued behind the first (1 worker)
    bA, bC, bQ = dA.snapshot(), dC.snapshot(), dQ.snapshot()
    gate = GateSync(block_at=1)
    t1 = env.cm.transfer_cache_async(
        src.cache, gate, [tc(dA.addrs, range(0, 3), 1), tc(dC.addrs, range(3, 4), 1)]
    )
    assert gate.entered.wait(10)
    q_sync = RecordingSync()
    t2 = env.cm.transfer_cache_async(src.cache, q_sync, [tc(dQ.addrs, None, 0)])
    assert t2.get_results(0) == [TIMEOUT]
    _finalize_with_watchdog(env.dd)
    # the tasks end with a status although the synchronizer is still blocked
    r1 = t1.get_results(10_000)
    assert r1 == [FINALIZED, None], (r1, t1.errors)
    assert t1.synchronize(10_000) == FINALIZED
    r2 = t2.get_results(10_000)
    assert r2 == [None], r2
    assert t2.synchronize(10_000) not in (SUCCESS, TIMEOUT)
    snap = {**dA.snapshot(), **dC.snapshot(), **dQ.snapshot()}
    gate.release()  # the blocked synchronizer returns True into a finalized engine
    time.sleep(0.1)
    assert_mem_equal({**dA.mem(), **dC.mem(), **dQ.mem()}, snap, "after finalize")
    for d, b in ((dC, bC), (dQ, bQ)):
        assert_mem_equal(d.mem(), b, "never-started config")
    for t in range(2, 6):  # layers 1, 2 of dA never passed the synchronizer
        k, _ = dA.tensors[t]
        assert np.array_equal(dA.buffers[k], bA[k])
    assert q_sync.calls == []
    assert t1.get_results(0) == r1  # stable


@pytest.mark.parametrize("workers", [2, None])
def test_finalize_with_many_blocked_tasks(make_env, workers):
    """Every worker stuck in a user's synchronizer (default pool: 4): finalize still returns
    promptly, and every task ends without success."""
    env = make_env(workers=workers)
    src = env.registered(4, [2, 256])
    gate = GateSync(block_at=0)
    tasks, dsts = [], []
    try:
        for i in range(8):
            d = env.registered(4, [256])
            dsts.append((d, d.snapshot()))
            tasks.append(env.cm.transfer_cache_async(src.cache, gate, [tc(d.addrs, None, i % 2)]))
        assert gate.entered.wait(10)
        time.sleep(0.1)  # let every worker reach the gate
        _finalize_with_watchdog(env.dd, limit=8.0)
        for t in tasks:
            res = t.get_results(10_000)
            assert len(res) == 1 and res[0] in (FINALIZED, None), res
            assert t.synchronize(10_000) not in (SUCCESS, TIMEOUT)
    finally:
        gate.release()
    time.sleep(0.1)
    for d, b in dsts:
        assert_mem_equal(d.mem(), b)


def test_finalize_idempotent_and_before_init():
    dd = LLMDataDist(LLMRole.PROMPT, OWN_CLUSTER)
    dd.finalize()  # never initialised: nothing to do
    dd.init(Env.make_options())
    dd.finalize()
    dd.finalize()
    with pytest.raises(RuntimeError, match="llm datadist is not initialized"):
        dd.cache_manager


def test_manager_unusable_after_finalize(make_env):
    env = make_env()
    cm = env.cm
    src = env.registered(4, [2, 16])
    env.dd.finalize()
    buf = np.zeros(128, np.uint8)
    with pytest.raises(LLMException) as ei:
        cm.register_cache(make_desc(2, [64]), [buf.ctypes.data, buf[64:].ctypes.data])
    assert ei.value.status_code == FINALIZED
    with pytest.raises(LLMException):
        cm.transfer_cache_async(src.cache, RecordingSync(), [])


def test_reinit_after_finalize(make_env):
    env = make_env()
    dd = env.dd
    src = env.registered(4, [3, 32])
    dst = env.registered(4, [3, 32])
    transfer_ok(env, src, dst, 1)
    old_src = src.cache
    dd.finalize()
    dd.init(Env.make_options())
    env.cm = dd.cache_manager
    # old handles do not name registered memory any more
    raises_llm(NOT_EXIST, env.cm.transfer_cache_async, old_src, RecordingSync(), [])
    # the same memory registers again (the old registrations are gone) and transfers work
    for c in (src, dst):
        addrs = [c.buffers[k][o:].ctypes.data for k, o in c.tensors]
        c.cache = env.cm.register_cache(make_desc(4, [3, 32]), addrs)
    transfer_ok(env, src, dst, 2)
    a = env.allocated(4, [3, 32])
    transfer_ok(env, a, dst, 0)


def test_init_twice_is_a_noop(make_env):
    env = make_env()
    cm = env.cm
    src = env.registered(4, [2, 16])
    dst = env.registered(4, [2, 16])
    env.dd.init(Env.make_options(remote=True))  # ignored, options included
    assert env.dd.cache_manager is cm
    transfer_ok(env, src, dst, 1)  # TransferConfig still the accepted config type


def test_cluster_id_property():
    dd = LLMDataDist(LLMRole.DECODER, 12345)
    assert dd.cluster_id == 12345
    dd.finalize()


# --------------------------------------------------------------------------------------------
# release while copies are actually running (no synchronizer blocking)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("delay", [0.0, 0.002, 0.01])
def test_unregister_destination_while_copying(env, delay):
    """Big layers, a fast synchronizer: unregister lands somewhere in the middle of the copies.
    Whatever the outcome, no byte of the destination changes after unregister_cache returns."""
    src = env.registered(16, [1, 1 << 20])  # 8 layers of 2 x 1 MiB
    dst = env.registered(16, [1 << 20])
    srcb = src.tensor_bytes()
    before = dst.snapshot()
    task = env.cm.transfer_cache_async(src.cache, RecordingSync(), [tc(dst.addrs)])
    time.sleep(delay)
    env.cm.unregister_cache(dst.cache.cache_id)
    at_return = dst.snapshot()
    res = wait_results(task)
    # None: unregister came before the worker reached the first layer (no layer attempted)
    assert res in ([SUCCESS], [NOT_EXIST], [None]), res
    if res == [None]:
        assert_mem_equal(dst.mem(), before, "config never started")
    time.sleep(0.05)
    assert_mem_equal(dst.mem(), at_return, "after unregister returned")
    if res == [SUCCESS]:
        exp, _ = reference.expected_transfer(srcb, src.stride, before, [RefConfig(dst.tensors)])
        assert_mem_equal(dst.mem(), exp)


@pytest.mark.parametrize("delay", [0.0, 0.005])
def test_finalize_while_copying(make_env, delay):
    """After finalize returns no destination byte changes (the caller may free its memory);
    every task has ended, and a config reported successful has all its bytes."""
    env = make_env()
    src = env.registered(8, [1, 1 << 20])  # 4 layers of 2 x 1 MiB
    srcb = src.tensor_bytes()
    jobs = []
    for i in range(6):
        d = env.registered(8, [1 << 20])
        before = d.snapshot()
        t = env.cm.transfer_cache_async(src.cache, RecordingSync(), [tc(d.addrs)])
        jobs.append((d, before, t))
    time.sleep(delay)
    _finalize_with_watchdog(env.dd)
    snaps = [d.snapshot() for d, _, _ in jobs]
    for d, before, t in jobs:
        res = t.get_results(10_000)
        assert res[0] in (SUCCESS, FINALIZED, None), res
        if res == [SUCCESS]:
            exp, _ = reference.expected_transfer(srcb, src.stride, before, [RefConfig(d.tensors)])
            assert_mem_equal(d.mem(), exp)
    time.sleep(0.05)
    for (d, _, _), s in zip(jobs, snaps):
        assert_mem_equal(d.mem(), s, "after finalize returned")


def test_register_and_unregister_from_threads_while_transferring(env):
    """Registry changes on other threads do not disturb running transfers."""
    src = env.registered(4, [4, 4096])
    jobs = []
    for i in range(8):
        d = env.registered(4, [4096])
        jobs.append((d, d.snapshot()))
    stop = threading.Event()
    errors = []

    def churn():
        try:
            while not stop.is_set():
                buf = np.zeros(4 * 256, np.uint8)
                c = env.cm.register_cache(
                    make_desc(4, [256]), [buf[i * 256 :].ctypes.data for i in range(4)]
                )
                env.cm.unregister_cache(c.cache_id)
                a = env.cm.allocate_cache(make_desc(2, [128]))
                env.cm.deallocate_cache(a)
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    th = [threading.Thread(target=churn) for _ in range(2)]
    for t in th:
        t.start()
    try:
        srcb = src.tensor_bytes()
        tasks = [
            env.cm.transfer_cache_async(src.cache, RecordingSync(), [tc(d.addrs, None, i % 4)])
            for i, (d, _) in enumerate(jobs)
        ]
        for i, (t, (d, before)) in enumerate(zip(tasks, jobs)):
            assert wait_results(t) == [SUCCESS]
            exp, _ = reference.expected_transfer(
                srcb, src.stride, before, [RefConfig(d.tensors, None, i % 4)]
            )
            assert_mem_equal(d.mem(), exp)
    finally:
        stop.set()
        for t in th:
            t.join(10)
    assert not errors, errors
