"""The optional inter-host transport over Mooncake Transfer Engine (TCP, P2P handshake).

Two processes on 127.0.0.1: a receiver (spawned) registers a canary-filled numpy buffer and
reports its session id and address; this process writes scattered ranges into it, and the
receiver checks every byte, inside the ranges and outside them. Tests that need Mooncake skip
only when the ``mooncake`` package cannot be imported; the missing-module test always runs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from typing import List, Tuple

import numpy as np
import pytest

from llmdist import LLMException, LLMStatusCode

HOST = "127.0.0.1"
DST_BYTES = 4 << 20
CANARY = 0xA5
Plan = List[Tuple[int, int, int]]  # (src offset, dst offset, length)


def source_bytes(seed: int, nbytes: int) -> np.ndarray:
    """The sender's data, reproducible on the receiver's side from the seed."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def scattered_plan(seed: int, src_bytes: int, slots: int, slot_bytes: int) -> Plan:
    """One range per destination slot, of random length and place, with untouched gaps between."""
    rng = np.random.default_rng(seed)
    plan = []
    for slot in rng.permutation(slots):
        length = int(rng.choice([1, 3, 4096, 65536 - 17, int(rng.integers(1, slot_bytes - 64))]))
        length = min(length, slot_bytes - 64)
        dst = int(slot) * slot_bytes + int(rng.integers(1, slot_bytes - length - 1))
        src = int(rng.integers(0, src_bytes - length))
        plan.append((src, dst, length))
    return plan


def _receiver(to_parent, from_parent) -> None:
    """Child process: register a canary buffer, then check plans until told to stop."""
    from llmdist.transport_mooncake import MooncakeTransport

    with MooncakeTransport(HOST) as transport:
        buf = np.full(DST_BYTES, CANARY, dtype=np.uint8)
        transport.register(buf.ctypes.data, buf.nbytes)
        to_parent.put((transport.session_id, buf.ctypes.data, os.getpid()))
        while True:
            try:
                msg = from_parent.get(timeout=60)
            except queue.Empty:
                return
            if msg[0] == "stop":
                return
            _, seed, src_bytes, plan = msg
            expected = np.full(DST_BYTES, CANARY, dtype=np.uint8)
            inside = np.zeros(DST_BYTES, dtype=bool)
            src = source_bytes(seed, src_bytes)
            for s, d, n in plan:
                expected[d : d + n] = src[s : s + n]
                inside[d : d + n] = True
            bad = buf != expected
            counts = (int(np.count_nonzero(bad & inside)), int(np.count_nonzero(bad & ~inside)))
            buf[:] = CANARY  # before replying: the parent writes again as soon as it hears back
            to_parent.put(counts)


class Peer:
    """The parent's view of a receiver process."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.to_child, self.from_child = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(
            target=_receiver, args=(self.from_child, self.to_child), daemon=True
        )
        self.proc.start()
        self.session, self.addr, self.pid = self.from_child.get(timeout=60)

    def check(self, seed: int, src_bytes: int, plan: Plan) -> Tuple[int, int]:
        """(wrong bytes inside the ranges, changed bytes outside them), counted by the receiver."""
        self.to_child.put(("check", seed, src_bytes, plan))
        return self.from_child.get(timeout=60)

    def stop(self) -> None:
        """End the receiver, by force if it does not leave on its own."""
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGCONT)
            self.to_child.put(("stop",))
            self.proc.join(20)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


@pytest.fixture
def mooncake():
    """Skip unless the mooncake package imports."""
    return pytest.importorskip("mooncake")


@pytest.fixture
def peer(mooncake):
    p = Peer()
    yield p
    p.stop()


@pytest.fixture
def sender(mooncake):
    from llmdist.transport_mooncake import MooncakeTransport

    t = MooncakeTransport(HOST)
    yield t
    t.close()


def _src(sender, seed: int, nbytes: int) -> np.ndarray:
    buf = source_bytes(seed, nbytes)
    sender.register(buf.ctypes.data, buf.nbytes)
    return buf


def _write(sender, peer, src: np.ndarray, plan: Plan) -> int:
    return sender.write_batch(
        peer.session,
        [src.ctypes.data + s for s, _, _ in plan],
        [peer.addr + d for _, d, _ in plan],
        [n for _, _, n in plan],
    )


def test_scattered_batch_lands_exactly(sender, peer):
    assert sender.session_id.startswith(HOST + ":") and peer.session != sender.session_id
    seed, src_bytes = 11, 2 << 20
    src = _src(sender, seed, src_bytes)
    for round_ in range(3):  # reuse of the connection and of the registration
        plan = scattered_plan(seed + round_, src_bytes, slots=64, slot_bytes=DST_BYTES // 64)
        handle = _write(sender, peer, src, plan)
        assert sender.wait(handle, 20_000) == 0
        assert peer.check(seed, src_bytes, plan) == (0, 0)


def test_channel_reads_back_what_was_written(sender, peer):
    """The read direction (pull): an engine channel reads the peer's ranges into local memory."""
    from llmdist.transport_mooncake import EngineChannel

    src = _src(sender, 11, 1 << 20)
    plan = scattered_plan(12, src.nbytes, 64, DST_BYTES // 64)
    assert sender.wait(_write(sender, peer, src, plan), 30_000) == 0
    back = np.zeros(src.nbytes, dtype=np.uint8)
    sender.register(back.ctypes.data, back.nbytes)
    channel = EngineChannel(sender, peer.session, 30_000)
    assert (
        channel.read(
            [back.ctypes.data + s for s, _, _ in plan],
            [peer.addr + d for _, d, _ in plan],
            [n for _, _, n in plan],
        )
        == 0
    )
    assert channel.settle() == 0 and channel.error is None
    want = np.zeros_like(back)
    for s, _, n in plan:
        want[s : s + n] = src[s : s + n]
    np.testing.assert_array_equal(back, want)
    assert peer.check(11, src.nbytes, plan) == (0, 0)


def test_write_outside_registered_memory_fails_in_time(sender, peer):
    seed, src_bytes = 5, 1 << 20
    src = _src(sender, seed, src_bytes)
    for dst_off in (DST_BYTES + (1 << 20), DST_BYTES - 10):  # beyond, and across the end
        plan = [(0, dst_off, 4096)]
        handle = _write(sender, peer, src, plan)
        t0 = time.monotonic()
        rc = sender.wait(handle, 3_000)
        assert rc != 0 and time.monotonic() - t0 < 3.5
        with pytest.raises(LLMException):  # a finished handle is gone
            sender.wait(handle, 0)
    assert peer.check(seed, src_bytes, []) == (0, 0)  # nothing landed anywhere
    ok = [(0, 0, 4096)]  # and the connection still works
    assert sender.wait(_write(sender, peer, src, ok), 20_000) == 0
    assert peer.check(seed, src_bytes, ok) == (0, 0)


def _stop_all_threads(pid: int) -> None:
    """SIGSTOP a process and return once every thread of it is stopped (delivery is async)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:
                continue
        if states and all(state in "Tt" for state in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")


def test_wait_never_blocks_past_timeout_on_a_stalled_peer(sender, peer):
    from llmdist.transport_mooncake import WAIT_TIMEOUT

    seed, src_bytes = 7, 2 << 20
    src = _src(sender, seed, src_bytes)
    plan = scattered_plan(seed, src_bytes, slots=32, slot_bytes=DST_BYTES // 32)
    assert sender.wait(_write(sender, peer, src, [(0, 0, 1)]), 20_000) == 0  # connect first
    _stop_all_threads(peer.pid)
    try:
        handle = _write(sender, peer, src, plan)
        for timeout_ms in (0, 300):
            t0 = time.monotonic()
            assert sender.wait(handle, timeout_ms) == WAIT_TIMEOUT
            assert time.monotonic() - t0 < timeout_ms / 1000 + 0.5
    finally:
        os.kill(peer.pid, signal.SIGCONT)
    assert sender.wait(handle, 20_000) == 0  # the same handle completes once the peer runs
    assert peer.check(seed, src_bytes, [(0, 0, 1)] + plan) == (0, 0)


def test_argument_and_state_errors(sender, peer):
    buf = np.zeros(4096, dtype=np.uint8)
    sender.register(buf.ctypes.data, buf.nbytes)

    def code(fn, *args):
        with pytest.raises(LLMException) as ei:
            fn(*args)
        return ei.value.status_code

    assert code(sender.register, buf.ctypes.data + 8, 8) == LLMStatusCode.LLM_PARAM_INVALID
    assert code(sender.unregister, buf.ctypes.data + 8) == LLMStatusCode.LLM_PARAM_INVALID
    assert (
        code(sender.write_batch, peer.session, [buf.ctypes.data], [peer.addr], [8, 8])
        == LLMStatusCode.LLM_PARAM_INVALID
    )
    assert code(sender.write_batch, peer.session, [], [], []) == LLMStatusCode.LLM_PARAM_INVALID
    assert code(sender.wait, 12345, 0) == LLMStatusCode.LLM_PARAM_INVALID
    # port 1 on loopback: nothing listens, the handshake is refused at once
    assert (
        code(sender.write_batch, f"{HOST}:1", [buf.ctypes.data], [peer.addr], [8])
        == LLMStatusCode.LLM_LINK_FAILED
    )
    sender.unregister(buf.ctypes.data)
    sender.close()
    sender.close()
    assert code(sender.register, buf.ctypes.data, 8) == LLMStatusCode.LLM_ENGINE_FINALIZED


def test_missing_module_is_feature_not_enabled(monkeypatch):
    from llmdist.transport_mooncake import MooncakeTransport

    monkeypatch.setitem(sys.modules, "mooncake", None)  # makes the imports fail
    monkeypatch.setitem(sys.modules, "mooncake.engine", None)
    with pytest.raises(LLMException) as ei:
        MooncakeTransport(HOST)
    assert ei.value.status_code == LLMStatusCode.LLM_FEATURE_NOT_ENABLED
    assert "pip install 'llmdist[mooncake]'" in str(ei.value)
    assert "'llmdist[mooncake-npu]'" in str(ei.value)


def test_engine_that_does_not_load_names_the_system_libraries(monkeypatch):
    """Mooncake installed, its engine not loadable (a system library missing): the message
    names the libraries, not the extra that is already installed."""
    import importlib.util

    from llmdist.transport_mooncake import MooncakeTransport

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "mooncake" else real(name, *a),
    )
    monkeypatch.setitem(sys.modules, "mooncake.engine", None)
    with pytest.raises(LLMException) as ei:
        MooncakeTransport(HOST)
    assert ei.value.status_code == LLMStatusCode.LLM_FEATURE_NOT_ENABLED
    assert "libibverbs1, libnuma1 and libcurl4" in str(ei.value)
    assert "pip install" not in str(ei.value)


def test_batches_beyond_the_peers_queue_all_arrive(sender, peer):
    """Mooncake's TCP transport fails what does not fit its per-peer queue; the transport
    holds batches back until they fit, so neither a huge batch nor many at once fail."""
    from llmdist.transport_mooncake import QUEUE_ROOM

    seed, src_bytes = 11, 1 << 20
    src = _src(sender, seed, src_bytes)
    plan = scattered_plan(seed, src_bytes, slots=64, slot_bytes=DST_BYTES // 64)
    # every range many times over, in one batch and in four started before any wait
    big = plan * -(-(4 * QUEUE_ROOM) // len(plan))
    assert sender.wait(_write(sender, peer, src, big), 20_000) == 0
    assert peer.check(seed, src_bytes, plan) == (0, 0)
    handles = [_write(sender, peer, src, big[: 2 * QUEUE_ROOM]) for _ in range(4)]
    assert [sender.wait(h, 20_000) for h in handles] == [0] * 4
    assert peer.check(seed, src_bytes, big[: 2 * QUEUE_ROOM]) == (0, 0)


def test_a_full_queue_times_out_the_channel_not_the_batch(sender, peer):
    """With the peer stopped and its queue full, another channel's write gives up after its
    wait_ms with LLM_TIMEOUT; the batches already queued complete once the peer runs."""
    from llmdist.transport_mooncake import QUEUE_ROOM, WAIT_TIMEOUT, EngineChannel

    seed, src_bytes = 13, 1 << 20
    src = _src(sender, seed, src_bytes)
    ranges = [(i * 64, i * 64, 64) for i in range(QUEUE_ROOM)]
    assert sender.wait(_write(sender, peer, src, [(0, 0, 1)]), 20_000) == 0  # connect first
    _stop_all_threads(peer.pid)
    try:
        full = _write(sender, peer, src, ranges)
        channel = EngineChannel(sender, peer.session, 300)
        t0 = time.monotonic()
        rc = channel.write([src.ctypes.data], [peer.addr + (2 << 20)], [4096])
        assert rc == WAIT_TIMEOUT and 0.25 < time.monotonic() - t0 < 2.0
        assert channel.verdict(rc)[0] == LLMStatusCode.LLM_TIMEOUT
        assert "stayed full" in channel.error
    finally:
        os.kill(peer.pid, signal.SIGCONT)
    assert sender.wait(full, 20_000) == 0
    assert peer.check(seed, src_bytes, ranges) == (0, 0)
