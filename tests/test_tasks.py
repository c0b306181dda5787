"""CacheTask behaviour: concurrency, timeouts, synchronizer failures, call order, result order
(spec 5.1 and 5.4)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from llmdist import DataType, LLMStatusCode, TransferConfig

from . import reference
from .helpers import (
    OWN_CLUSTER,
    SUCCESS,
    WAIT_MS,
    FailSync,
    GateSync,
    RecordingSync,
    SleepSync,
    assert_mem_equal,
    wait_results,
)
from .reference import RefConfig

# every test runs on each runtime (runtime_params.py)
pytestmark = pytest.mark.all_runtimes

TIMEOUT = LLMStatusCode.LLM_TIMEOUT
PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
FAILED = LLMStatusCode.LLM_FAILED


def tc(addrs, rng=None, batch=0):
    return TransferConfig(OWN_CLUSTER, list(addrs), rng, batch)


class Job:
    """One transfer prepared against the reference model."""

    def __init__(self, env, src, dsts, configs, refs, sb=None, db=None, bs=None):
        self.env, self.src, self.dsts = env, src, dsts
        self.configs, self.refs = configs, refs
        self.sb, self.db, self.bs = sb, db, bs
        self.before = {}
        for d in dsts:
            self.before.update(d.snapshot())
        self.src_tensors = src.tensor_bytes()
        self.task = None

    def submit(self, sync):
        self.task = self.env.cm.transfer_cache_async(
            self.src.cache, sync, self.configs, self.sb, self.db, self.bs
        )
        return self.task

    def mem(self):
        out = {}
        for d in self.dsts:
            out.update(d.mem())
        return out

    def expected(self, layers_done=None):
        exp, _ = reference.expected_transfer(
            self.src_tensors,
            self.src.stride,
            self.before,
            self.refs,
            self.sb,
            self.db,
            self.bs,
            layers_done,
        )
        return exp

    def check(self, layers_done=None, what=""):
        assert_mem_equal(self.mem(), self.expected(layers_done), what)


def c2c_job(env, src, batch, rng=None, nconfigs=1):
    n_layers = len(rng) if rng is not None else src.num_layers
    cfgs, refs, dsts = [], [], []
    for _ in range(nconfigs):
        d = env.registered(2 * n_layers, [src.stride + 8])
        cfgs.append(tc([d.addr_of(i, 3) for i in range(2 * n_layers)], rng, batch))
        refs.append(RefConfig([(k, o + 3) for k, o in d.tensors], rng, batch))
        dsts.append(d)
    return Job(env, src, dsts, cfgs, refs)


# --------------------------------------------------------------------------------------------
# concurrency
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [None, 1, 3])
def test_64_tasks_in_flight_from_4_threads(make_env, workers):
    env = make_env(workers=workers)
    rows = env.registered(6, [8, 4, 8], DataType.DT_UINT16)  # 3 layers, stride 64
    blocks = env.registered(6, [10, 64], blocks=True)  # 3 layers, block 64
    n_threads, per_thread = 4, 16
    jobs = []
    for t in range(n_threads * per_thread):
        kind = t % 3
        rng = [None, range(1, 3), range(0, 1), range(2, 3)][t % 4]
        nl = len(rng) if rng is not None else 3
        if kind == 0:
            jobs.append(c2c_job(env, rows, t % 8, rng, nconfigs=1 + t % 2))
        elif kind == 1:
            d = env.registered(2 * nl, [6, 24], blocks=True)
            jobs.append(
                Job(
                    env,
                    rows,
                    [d],
                    [tc(d.addrs, rng, t % 8)],
                    [RefConfig(d.tensors, rng, t % 8)],
                    None,
                    [5, 0, 3],
                    24,
                )
            )
        else:
            d = env.registered(2 * nl, [12, 64], blocks=True)
            sb = [(t + i) % 10 for i in range(4)]
            db = [11 - (t % 3), 2, 3, 4]
            jobs.append(
                Job(env, blocks, [d], [tc(d.addrs, rng)], [RefConfig(d.tensors, rng)], sb, db)
            )
    gate = GateSync(block_at=0)
    errors = []

    def submit(chunk):
        try:
            for j in chunk:
                j.submit(gate)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [
        threading.Thread(target=submit, args=(jobs[i::n_threads],)) for i in range(n_threads)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors, errors
    assert all(j.task is not None for j in jobs)
    # every task is in flight: the gate holds all synchronizers
    assert gate.entered.wait(10)
    for j in jobs:
        assert j.task.get_results(0) == [TIMEOUT] * len(j.configs)
        assert j.task.synchronize(0) == TIMEOUT
    for j in jobs:  # nothing arrived yet
        assert_mem_equal(j.mem(), j.before, "before release")
    main = threading.get_ident()
    gate.release()
    for j in jobs:
        assert wait_results(j.task) == [SUCCESS] * len(j.configs), j.task.errors
        j.check(what="after release")
    assert main not in gate.threads  # synchronizers run on background threads


def test_tasks_on_other_workers_progress_while_one_is_blocked(make_env):
    env = make_env(workers=2)
    src = env.registered(4, [4, 32])
    blocked = c2c_job(env, src, 1)
    free = c2c_job(env, src, 2)
    gate = GateSync(block_at=0)
    blocked.submit(gate)
    assert gate.entered.wait(10)
    free.submit(RecordingSync())
    assert wait_results(free.task, 10_000) == [SUCCESS]
    free.check()
    assert blocked.task.get_results(0) == [TIMEOUT]
    gate.release()
    assert wait_results(blocked.task) == [SUCCESS]
    blocked.check()


def test_call_returns_before_any_layer(env):
    src = env.registered(4, [2, 16])
    job = c2c_job(env, src, 1)
    gate = GateSync(block_at=0)
    t0 = time.monotonic()
    task = job.submit(gate)
    assert time.monotonic() - t0 < 5
    assert gate.entered.wait(10)
    assert task.get_results(0) == [TIMEOUT]
    assert_mem_equal(job.mem(), job.before)
    gate.release()
    assert wait_results(task) == [SUCCESS]
    job.check()


# --------------------------------------------------------------------------------------------
# timeouts
# --------------------------------------------------------------------------------------------
def test_slow_synchronizer_timeout_then_success(env):
    src = env.registered(6, [3, 40])
    job = c2c_job(env, src, 2, None, nconfigs=2)
    sync = SleepSync(0.15)  # 3 layers: ~0.45 s
    task = job.submit(sync)
    assert task.synchronize(0) == TIMEOUT
    assert task.get_results(0) == [TIMEOUT, TIMEOUT]
    t0 = time.monotonic()
    assert task.synchronize(30) == TIMEOUT
    assert time.monotonic() - t0 >= 0.025
    assert task.get_results(10) == [TIMEOUT, TIMEOUT]
    # the transfer goes on; waiting again works
    assert task.synchronize(WAIT_MS) == SUCCESS
    assert task.get_results() == [SUCCESS, SUCCESS]
    assert task.get_results(0) == [SUCCESS, SUCCESS]
    assert task.synchronize(0) == SUCCESS
    assert sync.calls == [0, 1, 2]
    job.check()


def test_gate_synchronizer_timeouts_are_repeatable(env):
    src = env.registered(4, [2, 16])
    job = c2c_job(env, src, 0)
    gate = GateSync(block_at=1)
    task = job.submit(gate)
    assert gate.entered.wait(10)
    for _ in range(3):
        assert task.synchronize(0) == TIMEOUT
        assert task.get_results(0) == [TIMEOUT]
    t0 = time.monotonic()
    assert task.get_results(60) == [TIMEOUT]
    elapsed = time.monotonic() - t0
    assert 0.05 <= elapsed < 10
    gate.release()
    assert task.synchronize() == SUCCESS  # None: wait for the end
    assert task.get_results() == [SUCCESS]
    job.check()


@pytest.mark.parametrize(
    "bad,exc",
    [(-1, ValueError), (2**32, ValueError), (True, TypeError), (1.5, TypeError), ("10", TypeError)],
)
def test_timeout_argument_checks(env, bad, exc):
    src = env.registered(2, [1, 16])
    job = c2c_job(env, src, 0)
    task = job.submit(RecordingSync())
    with pytest.raises(exc):
        task.synchronize(bad)
    with pytest.raises(exc):
        task.get_results(bad)
    assert wait_results(task) == [SUCCESS]


# --------------------------------------------------------------------------------------------
# synchronizer failure
# --------------------------------------------------------------------------------------------
def failure_job(env):
    """4 layers; configs: A 0-1, B all, C 1-3, D 3, E 0-2 (in that order)."""
    src = env.registered(8, [2, 32])
    specs = [range(0, 2), None, range(1, 4), range(3, 4), range(0, 3)]
    dsts, cfgs, refs = [], [], []
    for r in specs:
        n = len(r) if r is not None else 4
        d = env.registered(2 * n, [32])
        dsts.append(d)
        cfgs.append(tc(d.addrs, r, 1))
        refs.append(RefConfig(d.tensors, r, 1))
    return Job(env, src, dsts, cfgs, refs)


def test_synchronizer_false_fails_unfinished_configs(env):
    job = failure_job(env)
    sync = FailSync(at=2, mode="false")
    task = job.submit(sync)
    res = wait_results(task)
    # A covers layers 0-1 only: all issued before the failure -> success
    assert res == [SUCCESS, PARAM_INVALID, PARAM_INVALID, PARAM_INVALID, PARAM_INVALID]
    assert task.synchronize() == PARAM_INVALID
    assert sync.calls == [0, 1, 2]  # no layer after the failed one is waited for
    errs = task.errors
    assert len(errs) == 5 and errs[0] is None
    assert all(isinstance(e, str) and e for e in errs[1:]), errs
    assert task.exception is None
    # layers 0-1 arrived for every config covering them; nothing from layer 2 on
    job.check(layers_done=2)


def test_synchronizer_raising_fails_unfinished_configs(env):
    job = failure_job(env)
    exc = RuntimeError("the model blew up at layer three")
    sync = FailSync(at=3, mode="raise", exc=exc)
    task = job.submit(sync)
    res = wait_results(task)
    # A (0-1) and E (0-2) were fully issued before layer 3
    assert res == [SUCCESS, FAILED, FAILED, FAILED, SUCCESS]
    assert task.synchronize() == FAILED
    assert task.exception is exc
    assert sync.calls == [0, 1, 2, 3]
    errs = task.errors
    assert errs[0] is None and errs[4] is None
    for e in (errs[1], errs[2], errs[3]):
        assert isinstance(e, str) and "the model blew up at layer three" in e, errs
    job.check(layers_done=3)


def test_synchronizer_false_at_first_layer(env):
    job = failure_job(env)
    sync = FailSync(at=0, mode="false")
    task = job.submit(sync)
    res = wait_results(task)
    assert res == [PARAM_INVALID] * 5
    assert task.synchronize() == PARAM_INVALID
    assert sync.calls == [0]
    assert_mem_equal(job.mem(), job.before)


def test_synchronizer_raising_at_first_covered_layer(env):
    src = env.registered(8, [2, 32])
    d = env.registered(4, [32])
    job = Job(env, src, [d], [tc(d.addrs, range(2, 4), 0)], [RefConfig(d.tensors, range(2, 4))])
    exc = KeyError("no event for this layer")
    task = job.submit(FailSync(at=2, mode="raise", exc=exc))
    assert wait_results(task) == [FAILED]
    assert task.exception is exc
    assert task.synchronize() == FAILED
    assert_mem_equal(job.mem(), job.before)


def test_failures_of_separate_tasks_are_independent(env):
    src = env.registered(4, [2, 16])
    bad = c2c_job(env, src, 0)
    good = c2c_job(env, src, 1)
    t_bad = bad.submit(FailSync(at=0, mode="raise"))
    t_good = good.submit(RecordingSync())
    assert wait_results(t_bad) == [FAILED]
    assert wait_results(t_good) == [SUCCESS]
    assert t_good.exception is None and t_good.errors == [None]
    good.check()


# --------------------------------------------------------------------------------------------
# synchronizer call order and coverage, result order
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ranges,calls",
    [
        ([range(4, 5), range(1, 3)], [1, 2, 4]),
        ([range(5, 6)], [5]),
        ([None], [0, 1, 2, 3, 4, 5]),
        ([range(3, 6), range(0, 1), range(3, 4)], [0, 3, 4, 5]),
        ([range(2, 3), range(2, 3), range(2, 3)], [2]),
    ],
)
def test_synchronizer_called_once_per_covered_layer_ascending(env, ranges, calls):
    src = env.registered(12, [2, 16])  # 6 layers
    dsts, cfgs, refs = [], [], []
    for r in ranges:
        n = len(r) if r is not None else 6
        d = env.registered(2 * n, [16])
        dsts.append(d)
        cfgs.append(tc(d.addrs, r, 1))
        refs.append(RefConfig(d.tensors, r, 1))
    job = Job(env, src, dsts, cfgs, refs)
    sync = RecordingSync()
    task = job.submit(sync)
    assert wait_results(task) == [SUCCESS] * len(ranges)
    assert sync.calls == calls
    for t in sync.timeouts:
        assert t is None or (isinstance(t, int) and not isinstance(t, bool))
    job.check()


def test_results_in_config_order(env):
    """Configs to one cluster with different outcomes: one result each, in config order."""
    src = env.registered(8, [2, 32])  # 4 layers
    specs = [range(1, 4), range(0, 2), range(3, 4), range(0, 1), None, range(1, 2)]
    dsts, cfgs, refs = [], [], []
    for r in specs:
        n = len(r) if r is not None else 4
        d = env.registered(2 * n, [32])
        dsts.append(d)
        cfgs.append(tc(d.addrs, r, 0))
        refs.append(RefConfig(d.tensors, r, 0))
    job = Job(env, src, dsts, cfgs, refs)
    task = job.submit(FailSync(at=2, mode="false"))
    assert wait_results(task) == [
        PARAM_INVALID,
        SUCCESS,
        PARAM_INVALID,
        SUCCESS,
        PARAM_INVALID,
        SUCCESS,
    ]
    assert task.synchronize() == PARAM_INVALID
    job.check(layers_done=2)


# --------------------------------------------------------------------------------------------
# a layer is read only after its synchronizer returned; arguments are taken at call time
# --------------------------------------------------------------------------------------------
class WriterSync(RecordingSync):
    """Plays the model: writes layer l's K and V into the source inside synchronize_layer(l)."""

    def __init__(self, src, data):
        super().__init__()
        self.src, self.data = src, data

    def synchronize_layer(self, layer_index, timeout_in_millis):
        super().synchronize_layer(layer_index, timeout_in_millis)
        for t in (2 * layer_index, 2 * layer_index + 1):
            self.src.tensor(t)[:] = self.data[t]
        return True


@pytest.mark.parametrize("blocks", [False, True])
def test_layer_copied_after_its_synchronizer_returns(env, blocks):
    rng = np.random.default_rng(5)
    if blocks:
        src = env.registered(8, [6, 4096], blocks=True)
        dst = env.registered(8, [8, 4096], blocks=True)
        sb, db, batch = [0, 1, 2, 5], [7, 0, 1, 2], 0
    else:
        src = env.registered(8, [3, 8192])
        dst = env.registered(8, [8192])
        sb = db = None
        batch = 2
    data = [rng.integers(0, 256, src.size, dtype=np.uint8) for _ in range(8)]
    before = dst.snapshot()
    task = env.cm.transfer_cache_async(
        src.cache, WriterSync(src, data), [tc(dst.addrs, None, batch)], sb, db
    )
    assert wait_results(task) == [SUCCESS]
    exp, _ = reference.expected_transfer(
        data, src.stride, before, [RefConfig(dst.tensors, None, batch)], sb, db
    )
    assert_mem_equal(dst.mem(), exp)


def test_arguments_are_taken_at_call_time(env):
    src = env.registered(4, [6, 64], blocks=True)
    dst = env.registered(4, [8, 64], blocks=True)
    other = env.registered(4, [8, 64], blocks=True)
    before, other_before = dst.snapshot(), other.snapshot()
    srcb = src.tensor_bytes()
    addrs = dst.addrs
    cfg = TransferConfig(OWN_CLUSTER, addrs)
    addrs[0] = other.addrs[0]  # the config took a snapshot
    sb, db = [0, 1, 2], [5, 6, 7]
    configs = [cfg]
    gate = GateSync(block_at=0)
    task = env.cm.transfer_cache_async(src.cache, gate, configs, sb, db)
    assert gate.entered.wait(10)
    # mutate everything the caller handed over
    sb[:] = [3, 3, 3]
    db[:] = [0, 1, 2]
    cfg.dst_addrs = other.addrs
    cfg.src_layer_range = range(0, 1)
    configs.append(TransferConfig(OWN_CLUSTER, other.addrs))
    gate.release()
    assert wait_results(task) == [SUCCESS]
    exp, _ = reference.expected_transfer(
        srcb, src.stride, before, [RefConfig(dst.tensors)], [0, 1, 2], [5, 6, 7]
    )
    assert_mem_equal(dst.mem(), exp)
    assert_mem_equal(other.mem(), other_before)
    assert gate.calls == [0, 1]
