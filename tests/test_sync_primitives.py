"""The planner's C-level waits: _core.Slots, the task slots (llmdist.max_inflight_tasks), a
bounded count a thread takes with a timeout and any thread gives back; and _core.Done, a job's
end, set once and waited on by any number of threads."""

from __future__ import annotations

import threading
import time

import pytest

from llmdist import _core


def test_slots_count_down_and_refuse_when_none_is_free():
    s = _core.Slots(2)
    assert s.size == 2
    assert s.acquire(0.2) and s.acquire(0.2)
    t0 = time.monotonic()
    assert s.acquire(0.2) is False
    assert time.monotonic() - t0 >= 0.19  # it waited for the timeout
    assert s.acquire(0) is False
    s.release()
    assert s.acquire(0) is True


def test_a_release_on_another_thread_wakes_a_waiter():
    s = _core.Slots(1)
    assert s.acquire()
    releaser = threading.Timer(0.1, s.release)
    releaser.start()
    assert s.acquire(5.0) is True  # woken by the release, long before the timeout
    releaser = threading.Timer(0.1, s.release)
    releaser.start()
    assert s.acquire() is True  # no timeout: waits as long as it takes
    releaser.join()


def test_slots_are_bounded():
    s = _core.Slots(1)
    with pytest.raises(ValueError, match="released too many times"):
        s.release()
    assert s.acquire(0) and not s.acquire(0)
    s.release()
    with pytest.raises(ValueError):
        s.release()
    with pytest.raises(ValueError, match="size must be > 0"):
        _core.Slots(0)


def test_done_wakes_every_waiter_once_set():
    d = _core.Done()
    assert not d.is_set()
    assert d.wait(0) is False and d.wait(-1) is False
    t0 = time.monotonic()
    assert d.wait(0.1) is False
    assert time.monotonic() - t0 >= 0.09  # it waited for the timeout
    woke = []
    waiters = [
        threading.Thread(target=lambda t=t: woke.append(d.wait(t))) for t in (None, 5.0, None, 5.0)
    ]
    for w in waiters:
        w.start()
    time.sleep(0.05)
    d.set()
    for w in waiters:
        w.join(5)
    assert woke == [True] * 4
    d.set()  # a second set changes nothing
    assert d.is_set() and d.wait() and d.wait(0)


def test_a_transfer_job_ends_on_a_done():
    plan = _core.plan_c2c(8)
    job = _core.TransferJob(_core.Runtime.host(), plan, [], [], None)
    assert isinstance(job.done, _core.Done) and not job.done.is_set()
