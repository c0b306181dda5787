"""Event.record_on: recording an llmdist event on a stream llmdist did not create, given by its
raw handle (a framework's stream, e.g. torch.cuda.current_stream().cuda_stream), on the host
runtime and on the fake CUDA runtime (tests/fake_cuda)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from llmdist import _core, runtimes
from llmdist.events import EventSynchronizer

from .runtime_params import fake_cuda_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_record_on_a_raw_stream_handle_on_host():
    rt = runtimes.load("host", 0)
    stream = _core.Stream(rt)
    sync = EventSynchronizer(rt, 2)
    sync.events[1].record_on(stream.handle)
    sync.mark_recorded(1)
    assert sync.synchronize_layer(1, 1000)
    assert not sync.synchronize_layer(0, 0)  # layer 0 was never marked
    with pytest.raises(TypeError):
        sync.events[0].record_on("stream")


def test_record_on_reaches_the_cuda_runtime_with_that_stream(fake_cuda):
    code = textwrap.dedent("""
        import ctypes, os
        from llmdist import _core, runtimes
        from llmdist.events import EventSynchronizer
        lib = ctypes.CDLL(os.environ["LLMDIST_CUDA_LIBRARY"])
        lib.fake_cuda_calls.restype = ctypes.c_long
        rt = runtimes.load("cuda", 0)
        stream = _core.Stream(rt)
        sync = EventSynchronizer(rt, 3)
        before = lib.fake_cuda_calls(b"cudaEventRecord")
        sync.events[2].record_on(stream.handle)
        sync.mark_recorded(2)
        assert lib.fake_cuda_calls(b"cudaEventRecord") == before + 1
        assert sync.synchronize_layer(2, 1000)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMDIST_")}
    env.update(fake_cuda_env(fake_cuda), PYTHONPATH=REPO)
    res = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
