"""Host runtime streams and events: work issued to an idle stream runs on the issuing thread
(no hand-off to the stream thread), and a wait on an event that has completed holds nothing
back."""

from __future__ import annotations

import numpy as np
import pytest

from llmdist import _core


@pytest.fixture
def host():
    rt = _core.Runtime.host()
    streams = []

    def stream():
        s = _core.Stream(rt)
        streams.append(s)
        return s

    yield rt, stream
    for s in streams:
        s.close()


def test_record_on_an_idle_stream_completes_at_once(host):
    rt, stream = host
    s = stream()
    ev = _core.Event(rt)
    ev.record(s)
    assert ev.query()


def test_record_after_a_copy_completes_with_it(host):
    rt, stream = host
    s = stream()
    src = np.arange(1 << 16, dtype=np.uint8)
    dst = np.zeros_like(src)
    rt.memcpy(dst.ctypes.data, src.ctypes.data, src.nbytes, s)
    ev = _core.Event(rt)
    ev.record(s)
    assert ev.synchronize(10_000)
    np.testing.assert_array_equal(dst, src)


def test_wait_on_a_completed_event_leaves_the_stream_idle(host):
    rt, stream = host
    model, transfer = stream(), stream()
    ev = _core.Event(rt)
    ev.record(model)
    assert ev.synchronize(10_000)
    transfer.wait_event(ev)
    src = np.full(4096, 7, dtype=np.uint8)
    dst = np.zeros_like(src)
    # an idle stream runs the copy on this thread: the bytes are there when memcpy returns
    rt.memcpy(dst.ctypes.data, src.ctypes.data, src.nbytes, transfer)
    np.testing.assert_array_equal(dst, src)
    transfer.synchronize()
