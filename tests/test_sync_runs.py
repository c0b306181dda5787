"""Synchronous transfers run on their caller's thread (host runtime, a worker idle): the
deadline thread ends them at llm.SyncKvCacheWaitTime as a waiting caller would, and the bytes
and results are those of a worker's run."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from llmdist import (
    BlocksCacheKey,
    LLMException,
    LLMStatusCode,
    Placement,
    TransferConfig,
)
from llmdist._core import TransferJob
from llmdist.deadlines import Deadlines

from .helpers import Env

TIMEOUT = LLMStatusCode.LLM_TIMEOUT


class FakeJob:
    """What Deadlines needs of a job: done, and cancel with a status code."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.cancelled = []

    def cancel(self, code, configs=None) -> None:
        self.cancelled.append(code)
        self.done.set()


def test_deadlines_cancel_a_late_job_and_spare_one_done_in_time():
    d = Deadlines()
    try:
        late, early, dropped = FakeJob(), FakeJob(), FakeJob()
        d.add(late, 0.2)
        early.done.set()
        d.add(early, 0.1)
        entry = d.add(dropped, 0.1)
        d.done(entry)
        assert late.done.wait(5)
        assert late.cancelled == [TIMEOUT]
        time.sleep(0.2)
        assert early.cancelled == [] and dropped.cancelled == []
    finally:
        d.close()


def test_an_earlier_deadline_wakes_the_thread():
    d = Deadlines()
    try:
        far, near = FakeJob(), FakeJob()
        d.add(far, 60.0)
        t0 = time.monotonic()
        d.add(near, 0.1)
        assert near.done.wait(5) and time.monotonic() - t0 < 5
        assert near.cancelled == [TIMEOUT] and far.cancelled == []
    finally:
        d.close()


def test_many_jobs_done_in_time_are_not_kept():
    d = Deadlines()
    try:
        for _ in range(1000):
            d.done(d.add(FakeJob(), 60.0))
        assert len(d._heap) < 200
    finally:
        d.close()


class Held:
    """A synchronizer that holds layer 0 until released."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.entered = threading.Event()

    def synchronize_layer(self, layer, timeout):
        self.entered.set()
        return self.go.wait(30)


def test_a_job_run_on_the_calling_thread_ends_with_llm_timeout_at_its_deadline():
    env = Env(cluster_id=4102, extra_options={"llm.SyncKvCacheWaitTime": "200"})
    try:
        src = env.allocated(2, [4, 64], blocks=True)
        dst = env.allocated(2, [4, 64], blocks=True)
        pl = env.cm.transfers
        held = Held()
        cfg = TransferConfig(env.cluster_id, dst.addrs)
        # a job planned as transfer_cache_async plans it, then run here like a pull
        from llmdist import _core

        plan = _core.plan_b2b(
            _core.parse_indices("s", [0]), _core.parse_indices("d", [1]), src.desc.size // 4
        )
        regions, bad = pl.mem.registry.locate(dst.addrs, plan.dst_lo, plan.dst_hi)
        assert bad < 0
        cp = pl.plan_config(
            _core.Direction.WRITE,
            pl.local_route,
            range(1),
            0,
            _core.CopyKind.COPY_D2D,
            dst.addrs,
            regions,
            2,
        )
        job = TransferJob(pl.runtime, plan, src.cache.tensor_addrs, [cp], held, None)
        assert pl.slots.acquire(timeout=1)
        with pl.lock:
            pl.launch(job, src.cache.cache_id, [set()], here=True)
        releaser = threading.Timer(1.0, held.go.set)
        releaser.start()
        t0 = time.monotonic()
        with pytest.raises(LLMException) as ei:
            pl.finish(job, "the held job")
        assert ei.value.status_code == TIMEOUT
        assert "200 ms" in str(ei.value)
        assert time.monotonic() - t0 < 10
        assert job not in pl.inflight
        releaser.cancel()
        del cfg
    finally:
        env.close()


def test_every_worker_counts_as_idle_once_start_returns():
    """A synchronous call right after start runs on its caller's thread only when a worker is
    idle: each worker is counted before start() returns (they counted themselves after it, so
    the first call could find none idle)."""
    from llmdist import _core
    from llmdist.workers import TransferWorkers

    for _ in range(20):
        workers = TransferWorkers(_core.Runtime.host(), 2)
        workers.start()
        try:
            assert workers.idle == 2
        finally:
            workers.shutdown(5.0)


def test_pulls_and_pushes_on_the_calling_thread_move_the_bytes():
    env = Env(remote=True, cluster_id=4103)
    try:
        key = BlocksCacheKey(env.cluster_id, 1)
        src = env.allocated(4, [8, 128], blocks=True, key=key)
        dst = env.allocated(4, [8, 128], blocks=True)
        assert env.cm.transfers.workers.idle > 0
        env.cm.pull_blocks(key, dst.cache, [0, 3], [5, 6])
        for t in range(4):
            assert bytes(dst.tensor(t)[5 * 128 : 7 * 128]) == (
                bytes(src.tensor(t)[0:128]) + bytes(src.tensor(t)[3 * 128 : 4 * 128])
            )
        dkey = BlocksCacheKey(env.cluster_id, 2)
        out = env.allocated(4, [8, 128], blocks=True, key=dkey)
        env.cm.push_blocks(dkey, dst.cache, [5], [7])
        for t in range(4):
            assert bytes(out.tensor(t)[7 * 128 : 8 * 128]) == bytes(
                dst.tensor(t)[5 * 128 : 6 * 128]
            )
        assert env.cm.transfers.inflight == {}
        assert Placement.DEVICE == src.desc.placement
    finally:
        env.close()


def test_local_pulls_into_registered_memory_are_still_checked_for_overlap():
    """Caches llmdist allocated (apart from each other, and from any registered memory) skip
    the byte-range comparison; a registered destination does not: a pull from a cache
    registered over the same memory that reads what it writes is refused untouched."""
    from llmdist import CacheDesc, DataType

    env = Env(remote=True, cluster_id=4105)
    try:
        dst = env.registered(2, [4, 64], blocks=True)
        key = BlocksCacheKey(env.cluster_id, 3)
        env.cm.register_blocks_cache(
            CacheDesc(2, [4, 64], DataType.DT_UINT8, Placement.DEVICE), dst.addrs, key
        )
        before = dst.snapshot()
        with pytest.raises(LLMException) as ei:
            env.cm.pull_blocks(key, dst.cache, [0, 1], [1, 2])
        assert ei.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
        assert "overlap" in str(ei.value)
        assert all((dst.mem()[k] == before[k]).all() for k in before)
        # blocks apart in the same memory are fine
        env.cm.pull_blocks(key, dst.cache, [0], [3])
        for t in range(2):
            k, off = dst.tensors[t]
            assert bytes(dst.tensor(t)[3 * 64 : 4 * 64]) == bytes(before[k][off : off + 64])
    finally:
        env.close()


class Spinner:
    """A Python thread that counts while it holds the GIL: its count moves only when another
    thread releases the GIL (the switch interval is set far above a small pull)."""

    def __init__(self) -> None:
        self.count = 0
        self.stop = False
        self.thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        while not self.stop:
            self.count += 1


@pytest.mark.parametrize("nbytes, keeps", [(64 << 10, True), (64 << 20, False)])
def test_a_small_pull_on_the_calling_thread_keeps_the_gil(nbytes, keeps):
    """A released GIL goes to the busy thread for a whole switch interval (5 ms by default)
    before the pull may finish: a pull of at most KEEP_GIL_BYTES keeps it; a larger one lets
    other threads run during its copies (64 MiB: milliseconds, time for the spinner to wake
    on a loaded machine)."""
    from llmdist import _core
    from llmdist.transfers import KEEP_GIL_BYTES

    assert (nbytes <= KEEP_GIL_BYTES) == keeps
    env = Env(remote=True, cluster_id=4106, extra_options={"llm.SyncKvCacheWaitTime": "5000"})
    spinner = Spinner()
    interval = sys.getswitchinterval()
    tuning = _core.host_tuning()
    # one copy thread: a core stays free for the spinner (two would take both cores of a
    # 2-CPU machine for the whole copy, and the spinner would only wake after it)
    _core.set_host_tuning(copy_threads=1)
    try:
        key = BlocksCacheKey(env.cluster_id, 1)
        block = nbytes // 8  # 2 tensors x 4 blocks
        src = env.allocated(2, [8, block], blocks=True, key=key)
        dst = env.allocated(2, [8, block], blocks=True)
        env.cm.pull_blocks(key, dst.cache, [0], [4])  # the shape: later pulls are compiled
        sys.setswitchinterval(0.2)
        spinner.thread.start()
        # A pull that keeps the GIL must never let the spinner count. One that releases it lets
        # the spinner run once the OS schedules it, which a loaded 2-CPU machine may delay past
        # one copy: up to 5 pulls, one of which must see the spinner count.
        moved = []
        for _ in range(1 if keeps else 5):
            time.sleep(0.01)  # the spinner runs; this thread comes back at a forced switch
            before = spinner.count
            env.cm.pull_blocks(key, dst.cache, [0, 1, 2, 3], [4, 5, 6, 7])
            moved.append(spinner.count - before)
            if moved[-1]:
                break
        for t in range(2):
            assert bytes(dst.tensor(t)[4 * block :]) == bytes(src.tensor(t)[: 4 * block])
        assert (max(moved) == 0) == keeps, f"the spinner counted {moved} during the pulls"
    finally:
        spinner.stop = True
        sys.setswitchinterval(interval)
        _core.set_host_tuning(**tuning)
        if spinner.thread.is_alive():
            spinner.thread.join()
        env.close()


def test_planning_a_few_thousand_blocks_keeps_the_gil():
    """Plans of fewer than 65,536 pairs are made holding the GIL: a release, even for
    microseconds, let a busy thread keep it for its whole switch interval (it made one pull
    in three beside such a thread take that long)."""
    from llmdist import _core

    spinner = Spinner()
    interval = sys.getswitchinterval()
    src = _core.parse_indices("src", list(range(0, 8192, 2)))
    dst = _core.parse_indices("dst", list(range(4096)))
    try:
        sys.setswitchinterval(0.2)
        spinner.thread.start()
        moved = []
        for _ in range(20):
            time.sleep(0.01)  # the spinner runs; this thread comes back at a forced switch
            before = spinner.count
            _core.plan_b2b(src, dst, 64)
            _core.plan_c2b(dst, 4096 * 64, 64)
            moved.append(spinner.count - before)
        assert moved == [0] * 20
    finally:
        spinner.stop = True
        sys.setswitchinterval(interval)
        if spinner.thread.is_alive():
            spinner.thread.join()
