"""The task slots (llmdist.max_inflight_tasks) as _core.Slots: a bounded count that a thread
takes with a timeout and any thread gives back."""

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
