"""Routes and the layer loop's named contracts, both directions.

The write direction is what every transfer test drives through CacheManager; these tests drive
the core directly with ConfigPlans in the READ direction (what pulls build on): bytes of another
cache land in the cache here, through each route a pull can take on the host runtime (local
memory, a mapping of shared memory, another process's memory), and through a Mooncake channel.
They also check the flow control of the engine channel and the named enums the core exports.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from llmdist import LLMStatusCode, _core
from llmdist._core import ConfigPlan, CopyKind, Direction, Failure, Lane
from llmdist.results import config_results
from llmdist.routes import LocalRoute, MappedRoute, ProcessRoute
from llmdist.transport_mooncake import MAX_QUEUED, WAIT_FAILED, WAIT_TIMEOUT, EngineChannel

LAYERS = 3
BLOCK = 256
BLOCKS = 16
TENSOR = BLOCK * BLOCKS


class Always:
    """A layer synchronizer that releases every layer at once."""

    def synchronize_layer(self, layer, timeout):
        return True


class Region:
    """What a route needs of a registry region: its cache id and end."""

    def __init__(self, cache_id: int, end: int) -> None:
        self.cache = type("C", (), {"cache_id": cache_id})()
        self.end = end
        self.delta = 0
        self.pid = 0


def pattern(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (2 * LAYERS, TENSOR), dtype=np.uint8)


def pull(route, target_bases, regions, local: np.ndarray, src_blocks, dst_blocks, layers=None):
    """Read blocks of the other cache (tensor bases target_bases, 2 per layer) into local's
    tensors through route; returns the finished job."""
    rt = _core.Runtime.host()
    layers = layers or range(LAYERS)
    plan = _core.plan_b2b(
        _core.parse_indices("src", src_blocks), _core.parse_indices("dst", dst_blocks), BLOCK
    )
    addrs = [target_bases[2 * ly + t] for ly in layers for t in range(2)]
    regs = [regions[2 * ly + t] for ly in layers for t in range(2)]
    target_addrs, target_limits = route.reach(addrs, regs)
    cp = ConfigPlan(
        first_layer=layers.start,
        stop_layer=layers.stop,
        row_shift=0,
        kind=CopyKind.COPY_H2H,
        lane=route.lane(CopyKind.COPY_H2H),
        direction=Direction.READ,
        target_addrs=target_addrs,
        target_limits=target_limits,
        pid=route.pid,
        link=route.link,
        engine=route.channel(None),
        single=route.single,
    )
    local_addrs = [local[i].ctypes.data for i in range(2 * LAYERS)]
    job = _core.TransferJob(rt, plan, local_addrs, [cp], Always(), None)
    stream = _core.Stream(rt)
    try:
        job.run(stream)
    finally:
        stream.close()
    assert job.done.is_set()
    return job


def expected_pull(before: np.ndarray, source: np.ndarray, src_blocks, dst_blocks, layers):
    want = before.copy()
    for ly in layers:
        for t in range(2):
            for s, d in zip(src_blocks, dst_blocks):
                want[2 * ly + t, d * BLOCK : (d + 1) * BLOCK] = source[
                    2 * ly + t, s * BLOCK : (s + 1) * BLOCK
                ]
    return want


SRC_BLOCKS = [3, 4, 5, 9, 0]
DST_BLOCKS = [10, 11, 12, 1, 15]


def test_local_route_reads_blocks_into_the_cache_here():
    source = pattern(1)
    local = np.full((2 * LAYERS, TENSOR), 0x5A, dtype=np.uint8)
    before = local.copy()
    bases = [source[i].ctypes.data for i in range(2 * LAYERS)]
    regions = [Region(1, b + TENSOR) for b in bases]
    job = pull(
        LocalRoute(_core.Runtime.host()), bases, regions, local, SRC_BLOCKS, DST_BLOCKS, range(1, 3)
    )
    assert config_results(job) == ([LLMStatusCode.LLM_SUCCESS], [None])
    assert job.outcomes[0].lane == Lane.LANE_RUNTIME
    np.testing.assert_array_equal(
        local, expected_pull(before, source, SRC_BLOCKS, DST_BLOCKS, range(1, 3))
    )


def test_mapped_route_reads_through_a_second_mapping_of_shared_memory():
    size = 2 * LAYERS * TENSOR
    fd, owner = _core.memfd_create(size)
    mapped = 0
    try:
        mapped = _core.memfd_map(fd, size)
        assert mapped != owner
        shared = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * size).from_address(owner))
        source = pattern(2)
        shared[:] = source.reshape(-1)
        local = np.zeros((2 * LAYERS, TENSOR), dtype=np.uint8)
        # The peer's addresses are the owner's; the route adds what turns them into the mapping.
        bases = [owner + i * TENSOR for i in range(2 * LAYERS)]
        regions = [Region(5, b + TENSOR) for b in bases]
        route = MappedRoute(_core.LinkFlag(), {5: mapped - owner})
        addrs, limits = route.reach(bases[:2], regions[:2])
        assert addrs == [mapped, mapped + TENSOR] and limits == [
            mapped + TENSOR,
            mapped + 2 * TENSOR,
        ]
        job = pull(route, bases, regions, local, SRC_BLOCKS, DST_BLOCKS)
        assert config_results(job) == ([LLMStatusCode.LLM_SUCCESS], [None])
        np.testing.assert_array_equal(
            local,
            expected_pull(np.zeros_like(local), source, SRC_BLOCKS, DST_BLOCKS, range(LAYERS)),
        )
    finally:
        if mapped:
            _core.shm_unmap(mapped, size)
        _core.shm_unmap(owner, size)
        os.close(fd)


PEER_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    data = np.random.default_rng(3).integers(0, 256, ({n}, {t}), dtype=np.uint8)
    print(" ".join(str(data[i].ctypes.data) for i in range({n})), flush=True)
    sys.stdin.read()
""")


@pytest.fixture
def peer_process():
    proc = subprocess.Popen(
        [sys.executable, "-c", PEER_SCRIPT.format(n=2 * LAYERS, t=TENSOR)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        bases = [int(x) for x in proc.stdout.readline().split()]
        yield proc, bases
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_process_route_reads_another_process_memory(peer_process):
    proc, bases = peer_process
    local = np.full((2 * LAYERS, TENSOR), 0x11, dtype=np.uint8)
    before = local.copy()
    regions = [Region(9, b + TENSOR) for b in bases]
    route = ProcessRoute(_core.LinkFlag(proc.pid), proc.pid)
    job = pull(route, bases, regions, local, SRC_BLOCKS, DST_BLOCKS)
    assert config_results(job) == ([LLMStatusCode.LLM_SUCCESS], [None])
    assert job.outcomes[0].lane == Lane.LANE_PROCESS
    np.testing.assert_array_equal(
        local, expected_pull(before, pattern(3), SRC_BLOCKS, DST_BLOCKS, range(LAYERS))
    )


def test_process_route_read_from_a_gone_process_fails_with_its_errno(peer_process):
    proc, bases = peer_process
    proc.kill()
    proc.wait(timeout=30)
    local = np.full((2 * LAYERS, TENSOR), 0x11, dtype=np.uint8)
    regions = [Region(9, b + TENSOR) for b in bases]
    job = pull(ProcessRoute(None, proc.pid), bases, regions, local, SRC_BLOCKS, DST_BLOCKS)
    assert job.outcomes[0].failure == Failure.FAIL_PROCESS
    statuses, errors = config_results(job)
    assert statuses == [LLMStatusCode.LLM_LINK_FAILED]
    assert (
        errors[0].startswith(f"reading from process {proc.pid} failed") and "errno 3" in errors[0]
    )
    assert (local == 0x11).all()


@pytest.fixture
def split_everything():
    """Make the host copy engine share every batch between two threads, cutting runs apart."""
    before = _core.host_tuning()
    _core.set_host_tuning(copy_threads=2, split_min_bytes=0)
    yield
    _core.set_host_tuning(**before)


def test_process_route_split_between_copy_threads_reads_every_byte(peer_process, split_everything):
    proc, bases = peer_process
    local = np.full((2 * LAYERS, TENSOR), 0x11, dtype=np.uint8)
    before = local.copy()
    regions = [Region(9, b + TENSOR) for b in bases]
    job = pull(
        ProcessRoute(_core.LinkFlag(proc.pid), proc.pid),
        bases,
        regions,
        local,
        SRC_BLOCKS,
        DST_BLOCKS,
    )
    assert config_results(job) == ([LLMStatusCode.LLM_SUCCESS], [None])
    np.testing.assert_array_equal(
        local, expected_pull(before, pattern(3), SRC_BLOCKS, DST_BLOCKS, range(LAYERS))
    )


def test_process_route_split_between_copy_threads_reports_the_errno(peer_process, split_everything):
    proc, bases = peer_process
    proc.kill()
    proc.wait(timeout=30)
    local = np.full((2 * LAYERS, TENSOR), 0x11, dtype=np.uint8)
    regions = [Region(9, b + TENSOR) for b in bases]
    job = pull(ProcessRoute(None, proc.pid), bases, regions, local, SRC_BLOCKS, DST_BLOCKS)
    assert job.outcomes[0].failure == Failure.FAIL_PROCESS
    assert job.outcomes[0].os_error == 3  # ESRCH
    assert (local == 0x11).all()


def test_bare_process_vm_baseline_moves_the_same_blocks(peer_process):
    proc, bases = peer_process
    local = np.zeros((2, TENSOR), dtype=np.uint8)
    here = [local[i].ctypes.data + b * BLOCK for i in range(2) for b in range(BLOCKS)]
    there = [bases[i] + (BLOCKS - 1 - b) * BLOCK for i in range(2) for b in range(BLOCKS)]
    _core.ProcessVmBaseline(proc.pid, False, here, there, BLOCK, threads=2)()
    want = pattern(3)[:2].reshape(2, BLOCKS, BLOCK)[:, ::-1].reshape(2, TENSOR)
    np.testing.assert_array_equal(local, want)
    with pytest.raises(ValueError, match="remote_addrs must have one entry per local address"):
        _core.ProcessVmBaseline(proc.pid, False, here, there[:-1], BLOCK)
    proc.kill()
    proc.wait(timeout=30)
    with pytest.raises(OSError) as info:
        _core.ProcessVmBaseline(proc.pid, False, here, there, BLOCK, threads=2)()
    assert info.value.errno == 3


def test_config_plan_checks_its_shape():
    base = dict(
        first_layer=0,
        stop_layer=2,
        row_shift=0,
        kind=CopyKind.COPY_H2H,
        lane=Lane.LANE_RUNTIME,
        target_addrs=[1, 2, 3, 4],
        target_limits=[9, 9, 9, 9],
    )
    cp = ConfigPlan(**base)
    assert (cp.direction, cp.lane, cp.kind, cp.pid, cp.link, cp.engine, cp.single) == (
        Direction.WRITE,
        Lane.LANE_RUNTIME,
        CopyKind.COPY_H2H,
        0,
        None,
        None,
        False,
    )
    with pytest.raises(ValueError, match="2 layers need 4 target addresses"):
        ConfigPlan(**{**base, "target_addrs": [1, 2]})
    with pytest.raises(ValueError, match="not a range"):
        ConfigPlan(**{**base, "first_layer": 3})
    with pytest.raises(ValueError, match="engine channel goes with LANE_ENGINE"):
        ConfigPlan(**{**base, "lane": Lane.LANE_ENGINE})
    with pytest.raises(ValueError, match="LANE_PROCESS needs the peer's pid"):
        ConfigPlan(**{**base, "lane": Lane.LANE_PROCESS})
    with pytest.raises(TypeError):
        ConfigPlan(0, 2, 0, CopyKind.COPY_H2H, Lane.LANE_RUNTIME, [1, 2, 3, 4], [9, 9, 9, 9])


def test_copy_kinds_are_numbered_as_the_runtimes_number_them():
    assert [
        int(k)
        for k in (
            CopyKind.COPY_H2H,
            CopyKind.COPY_H2D,
            CopyKind.COPY_D2H,
            CopyKind.COPY_D2D,
            CopyKind.COPY_DEFAULT,
        )
    ] == [0, 1, 2, 3, 4]


def test_local_route_sends_host_copies_of_a_device_runtime_to_the_host_engine():
    class DeviceRuntime:
        is_host = False

    route = LocalRoute(DeviceRuntime())
    assert route.lane(CopyKind.COPY_H2H) == Lane.LANE_HOST
    assert route.lane(CopyKind.COPY_D2D) == Lane.LANE_RUNTIME
    assert LocalRoute(_core.Runtime.host()).lane(CopyKind.COPY_H2H) == Lane.LANE_RUNTIME


# --------------------------------------------------------------------------------------------
# the engine channel's flow control, against a transport that records what it is asked
# --------------------------------------------------------------------------------------------
class RecordingTransport:
    """Batches complete when waited for; fails the batches named in fail (by start order)."""

    def __init__(self, fail=(), refuse_after=None, verdict=WAIT_FAILED):
        self.started = []  # (op, local, peer, lengths)
        self.live = set()
        self.max_live_runs = 0
        self.runs = {}
        self.fail = set(fail)
        self.refuse_after = refuse_after
        self.verdict = verdict

    def _start(self, op, local, peer, lengths):
        if self.refuse_after is not None and len(self.started) >= self.refuse_after:
            raise RuntimeError("peer unreachable")
        h = len(self.started)
        self.started.append((op, list(local), list(peer), list(lengths)))
        self.live.add(h)
        self.runs[h] = len(lengths)
        self.max_live_runs = max(self.max_live_runs, sum(self.runs[x] for x in self.live))
        return h

    def write_batch(self, session, src, dst, lengths, room_timeout_ms):
        return self._start("write", src, dst, lengths)

    def read_batch(self, session, dst, src, lengths, room_timeout_ms):
        return self._start("read", dst, src, lengths)

    def wait(self, handle, timeout_ms):
        self.live.discard(handle)
        return self.verdict if handle in self.fail else 0


def test_engine_channel_keeps_at_most_max_queued_runs_in_flight():
    t = RecordingTransport()
    ch = EngineChannel(t, "peer:1", 1000)
    n = 3 * MAX_QUEUED + 7
    assert ch.write(list(range(n)), list(range(100, 100 + n)), [8] * n) == 0
    assert ch.read(list(range(n)), list(range(100, 100 + n)), [8] * n) == 0
    assert t.max_live_runs <= MAX_QUEUED
    assert [op for op, *_ in t.started] == ["write"] * 4 + ["read"] * 4
    # every run handed over exactly once, in order, each direction
    for op in ("write", "read"):
        local = [a for o, loc, _, _ in t.started if o == op for a in loc]
        assert local == list(range(n))
    assert ch.settle() == 0 and not t.live and ch.error is None


def test_engine_channel_reports_the_first_failed_batch_and_a_refusal():
    t = RecordingTransport(fail={0, 1}, verdict=WAIT_TIMEOUT)
    ch = EngineChannel(t, "peer:1", 1000)
    assert ch.write([1], [2], [8]) == 0
    assert ch.write([3], [4], [8]) == 0
    assert ch.settle() == WAIT_TIMEOUT
    t = RecordingTransport(refuse_after=1)
    ch = EngineChannel(t, "peer:1", 1000)
    assert ch.write([1], [2], [8]) == 0
    assert ch.read([3], [4], [8]) == WAIT_FAILED
    assert ch.error == "transfer engine refused a read: peer unreachable"
