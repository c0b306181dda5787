"""Clusters across processes on 127.0.0.1: links, the memory exchange, transfers into another
process, and faults (spec/API.md sections 3-6, DESIGN.md "Peers and transports").

The prefill (the side that calls ``transfer_cache_async``) runs in this process, built with the
shared ``Env`` helper; decode clusters run in child processes started with the 'spawn' method
(``cluster_procs.decode_main``) and driven over Pipes: they allocate or register caches, report
their addresses and bytes, unregister, unlink, exit or get killed.  Every destination byte is
compared with the reference model (``reference.py``) and every byte outside the destination
ranges (the rest of the tensors, and guard bytes around registered tensors) must be unchanged.

Two decode processes (clusters 2 and 3) live for the whole module; each test uses a fresh prefill
cluster id and fresh caches, so that a failed test does not leak links into the next one.  Tests
that kill or finalize a decode start their own.  Every wait is bounded.  The decode-side
unlink tests come last: their slow-prefill variant exposes a known race (see its docstring).
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import struct
import time
from typing import Dict, Hashable, List, Optional, Sequence

import numpy as np
import pytest

from llmdist import (
    BlocksCacheKey,
    CacheKeyByIdAndIndex,
    DataType,
    EventSynchronizer,
    LLMException,
    LLMRole,
    LLMStatusCode,
    Placement,
    Stream,
    TransferConfig,
    TransferWithCacheKeyConfig,
)
from llmdist.auth import MAGIC

from . import reference
from .decode_procs import HOST, DCache, DecodeProc, cluster_info, memfd_maps, start_all  # noqa: F401
from .helpers import SUCCESS, Env, GateSync, RecordingSync, SleepSync, assert_mem_equal, free_port
from .raw_protocol import RawPeer, frame, hello
from .reference import RefConfig

LINK_MS = 5000
TASK_MS = 10_000  # bound on any transfer
FP16 = DataType.DT_FLOAT16
LINK_FAILED = LLMStatusCode.LLM_LINK_FAILED
NOT_YET_LINK = LLMStatusCode.LLM_NOT_YET_LINK
ALREADY_LINK = LLMStatusCode.LLM_ALREADY_LINK
NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID

_seeds = itertools.count(1)  # model ids and seeds

# Layouts (DT_FLOAT16).  Source: 4 layers.  Destination: 6 layers.
SRC_ROWS = dict(num_tensors=8, shape=[3, 2, 100])  # 3 rows of 400 bytes
SRC_BLOCKS = dict(num_tensors=8, shape=[12, 128])  # 12 blocks of 256 bytes
DST_ROWS = dict(num_tensors=12, shape=[5, 200])  # 5 rows of 400 bytes
DST_BLOCKS = dict(num_tensors=12, shape=[16, 128])  # 16 blocks of 256 bytes (B2B)
DST_CHUNKS = dict(num_tensors=12, shape=[10, 64])  # 10 blocks of 128 bytes (C2B)
B2B_SRC, B2B_DST = [3, 4, 5, 0, 11], [8, 9, 10, 2, 15]  # runs merge: 3-5 -> 8-10
C2B_DST, C2B_SIZE = [7, 2, 9, 0], 128  # a 400-byte row in 4 chunks (last 16 B)
# Layer-wise tests: 6 layers, blocks on both sides.
L6_SRC = dict(num_tensors=12, shape=[8, 128])
L6_DST = dict(num_tensors=12, shape=[8, 128])
L6_SRC_IDX, L6_DST_IDX = [0, 1, 2, 5, 7], [7, 6, 3, 4, 5]


@pytest.fixture(scope="module")
def decodes(auth_mode):
    """Two long-lived decode clusters, ids 2 and 3."""
    procs = {2: DecodeProc(2), 3: DecodeProc(3)}
    try:
        start_all(*procs.values())
        yield procs
    finally:
        for p in procs.values():
            p.close()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def link(env: Env, *procs: DecodeProc) -> None:
    code, codes = env.dd.link_clusters([p.info() for p in procs], LINK_MS)
    assert code == SUCCESS and codes == [SUCCESS] * len(procs), (code, codes)


def unlink(env: Env, *procs: DecodeProc):
    return env.dd.unlink_clusters([cluster_info(p.cluster_id) for p in procs], LINK_MS, force=True)


def merged(dicts) -> Dict[Hashable, np.ndarray]:
    out: Dict[Hashable, np.ndarray] = {}
    for d in dicts:
        out.update(d)
    return out


def read_all(dcs: Sequence[DCache]) -> Dict[Hashable, np.ndarray]:
    return merged(dc.read() for dc in dcs)


def verify(
    after,
    before,
    src_tensors,
    src_stride,
    refs,
    sb=None,
    db=None,
    bsz=None,
    layers_done=None,
    what="destination",
):
    """Every destination byte against the model; bytes outside the written ranges unchanged."""
    expected, written = reference.expected_transfer(
        src_tensors, src_stride, before, refs, sb, db, bsz, layers_done
    )
    for k in expected:
        untouched = ~written[k]
        if not np.array_equal(after[k][untouched], before[k][untouched]):
            bad = np.flatnonzero((after[k] != before[k]) & untouched)
            raise AssertionError(
                f"{what}: bytes of {k} outside the destination ranges changed "
                f"at offsets {bad[:8].tolist()} ({bad.size} bytes)"
            )
    assert_mem_equal(after, expected, what)
    if layers_done is None or layers_done > 0:
        assert any(w.any() for w in written.values()), "the model expects no byte to change"
        assert any(not np.array_equal(after[k], before[k]) for k in after), (
            "no destination byte changed (the source equals the destination?)"
        )
    return expected, written


def wait_done(task, timeout_ms: int = TASK_MS):
    assert task.synchronize(timeout_ms) != LLMStatusCode.LLM_TIMEOUT, (
        f"transfer still running after {timeout_ms} ms"
    )
    return task.get_results(0)


def keyed_cfg(
    dc: DCache,
    src_layers: range,
    dst_layers: range,
    key: str = "blocks",
    batch_index: int = 0,
    src_batch: int = 0,
) -> TransferWithCacheKeyConfig:
    if key == "blocks":
        k = dc.key
        assert isinstance(k, BlocksCacheKey)
    else:
        k = CacheKeyByIdAndIndex(dc.proc.cluster_id, dc.cache_id, batch_index)
    return TransferWithCacheKeyConfig(k, src_layers, dst_layers, src_batch)


def keyed_ref(
    dc: DCache, src_layers: range, dst_layers: range, batch_index: int = 0, src_batch: int = 0
) -> RefConfig:
    return RefConfig(
        reference.keyed_dst(dc.tensors, src_layers, dst_layers, batch_index * dc.stride),
        src_layers,
        src_batch,
    )


def addr_cfg(
    dc: DCache, src_layers: range, dst_layers: Sequence[int], row: int = 0, src_batch: int = 0
):
    """A TransferConfig writing source layers to the given destination layers (row pre-offset)
    and its reference config."""
    addrs, dst = [], []
    for layer in dst_layers:
        for t in (0, 1):
            addrs.append(dc.addrs[2 * layer + t] + row * dc.stride)
            k, off = dc.tensors[2 * layer + t]
            dst.append((k, off + row * dc.stride))
    return (
        TransferConfig(dc.proc.cluster_id, addrs, src_layers, src_batch),
        RefConfig(dst, src_layers, src_batch),
    )


def run_remote(
    env: Env, src, configs, refs, dcs: Sequence[DCache], sb=None, db=None, bsz=None, sync=None
):
    """Run one transfer into child caches; expect success; check every byte."""
    seen, uniq = set(), []
    for dc in dcs:
        if id(dc) not in seen:
            seen.add(id(dc))
            uniq.append(dc)
    before = read_all(uniq)
    src_tensors = src.tensor_bytes()
    src_snap = src.snapshot()
    sync = sync if sync is not None else RecordingSync()
    task = env.cm.transfer_cache_async(src.cache, sync, configs, sb, db, bsz)
    results = wait_done(task)
    assert results == [SUCCESS] * len(configs), (results, getattr(task, "errors", None))
    verify(read_all(uniq), before, src_tensors, src.stride, refs, sb, db, bsz)
    assert_mem_equal(src.mem(), src_snap, "source")
    return task


def probe(env: Env, src, cluster_id: int) -> LLMStatusCode:
    """Whether env sees cluster_id as linked, without writing anything: a config that fails
    validation after the link check (unknown key / address 8) raises NOT_YET_LINK only when the
    cluster is not linked."""
    if env.remote:
        cfg = TransferWithCacheKeyConfig(
            CacheKeyByIdAndIndex(cluster_id, 2**62, 0), range(0, 1), range(0, 1)
        )
    else:
        cfg = TransferConfig(cluster_id, [8, 16], range(0, 1))
    idx = [0] if src.cache.is_blocks_cache else None
    with pytest.raises(LLMException) as ei:
        env.cm.transfer_cache_async(src.cache, RecordingSync(), [cfg], idx, idx)
    return ei.value.status_code


def wait_unlinked(env: Env, src, cluster_id: int, timeout: float = 5.0) -> float:
    """Poll until env notices that cluster_id is not linked any more; returns the seconds."""
    t0 = time.monotonic()
    while True:
        code = probe(env, src, cluster_id)
        if code == NOT_YET_LINK:
            return time.monotonic() - t0
        assert code in (NOT_EXIST, PARAM_INVALID), code
        assert time.monotonic() - t0 < timeout, (
            f"cluster {env.cluster_id} still sees cluster {cluster_id} linked after {timeout} s"
        )
        time.sleep(0.01)


def wait_child_unlinked(proc: DecodeProc, remote_id: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while proc.call("linked", remote_id):
        assert time.monotonic() < deadline, (
            f"cluster {proc.cluster_id} still holds a link to {remote_id} after {timeout} s"
        )
        time.sleep(0.01)


def cache_mapped(dc: DCache) -> bool:
    """Whether dc's shared memory is mapped into this process."""
    return dc.inode is not None and any(ino == dc.inode for _, _, ino in memfd_maps("self"))


def own_shm_maps(pid: int) -> set:
    """The memfds of process pid (inodes) that this process maps."""
    return {ino for _, _, ino in memfd_maps("self")} & {ino for _, _, ino in memfd_maps(pid)}


def still_mapped(inodes: set) -> set:
    """Those of inodes that this process still maps."""
    return {ino for _, _, ino in memfd_maps("self")} & inodes


# --------------------------------------------------------------------------------------------
# links
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def role_listeners(auth_mode):
    procs = {r: DecodeProc(20 + int(r), role=r) for r in LLMRole}
    try:
        start_all(*procs.values())
        yield procs
    finally:
        for p in procs.values():
            p.close()


@pytest.mark.parametrize("mine", list(LLMRole), ids=lambda r: r.name)
@pytest.mark.parametrize("theirs", list(LLMRole), ids=lambda r: r.name)
def test_link_roles(role_listeners, prefill, mine, theirs):
    """Every pair of roles links, either way (as upstream: roles do not restrict links)."""
    listener = role_listeners[theirs]
    env = prefill(role=mine)
    code, codes = env.dd.link_clusters([listener.info()], LINK_MS)
    assert (code, codes) == (SUCCESS, [SUCCESS])
    # the listener knows the link too: it can end it
    assert listener.call("unlink", env.cluster_id) == (SUCCESS, [SUCCESS])
    # and its view is gone at once; ours follows
    assert listener.call("linked", env.cluster_id) is False
    # unlinking a link that was made succeeds from either side, whichever comes second
    assert listener.call("unlink", env.cluster_id) == (SUCCESS, [SUCCESS])
    src = env.registered(2, [2, 8])
    wait_unlinked(env, src, listener.cluster_id)
    assert unlink(env, listener) == (SUCCESS, [SUCCESS])


def test_link_unlink_states(decodes, prefill, cleanup):
    d, d3 = decodes[2], decodes[3]
    dc = cleanup.dcache(d, "allocated", **DST_BLOCKS, blocks=True, key=("blocks", next(_seeds)))
    env = prefill()
    src = env.registered(2, [2, 8])
    assert probe(env, src, 2) == NOT_YET_LINK
    link(env, d)
    assert probe(env, src, 2) == PARAM_INVALID
    # the decode's allocated (shared) memory is mapped here while linked
    held = own_shm_maps(d.pid)
    assert held
    # twice -> already linked; the link stays usable
    assert env.dd.link_clusters([d.info()], LINK_MS) == (ALREADY_LINK, [ALREADY_LINK])
    assert probe(env, src, 2) == PARAM_INVALID
    # another cluster in this process with the same id is refused by the listener
    twin = prefill(cluster_id=env.cluster_id)
    assert twin.dd.link_clusters([d.info()], LINK_MS) == (ALREADY_LINK, [ALREADY_LINK])
    # one call, several clusters: per-cluster codes, overall = the first failure
    code, codes = env.dd.link_clusters([d3.info(), cluster_info(77, free_port())], LINK_MS)
    assert (code, codes) == (LINK_FAILED, [SUCCESS, LINK_FAILED])
    # unlink, twice (a link that was made unlinks with success again)
    code, codes = unlink(env, d, d3)
    assert (code, codes) == (SUCCESS, [SUCCESS, SUCCESS])
    assert unlink(env, d) == (SUCCESS, [SUCCESS])
    assert probe(env, src, 2) == NOT_YET_LINK
    assert not still_mapped(held), "the peer's memory is still mapped after unlink"
    # the decode forgot us too (its side learns it from the connection)
    wait_child_unlinked(d, env.cluster_id)
    assert d.call("unlink", env.cluster_id) == (SUCCESS, [SUCCESS])
    # unknown cluster, on both sides
    assert env.dd.unlink_clusters([cluster_info(4242)], LINK_MS) == (NOT_YET_LINK, [NOT_YET_LINK])
    assert d.call("unlink", 4242) == (NOT_YET_LINK, [NOT_YET_LINK])
    # re-link, and a transfer works
    link(env, d)
    remote = prefill(remote=True)
    link(remote, d)
    rsrc = remote.allocated(**SRC_BLOCKS, blocks=True, dtype=FP16)
    cfg = keyed_cfg(dc, range(0, 4), range(1, 5))
    run_remote(
        remote, rsrc, [cfg], [keyed_ref(dc, range(0, 4), range(1, 5))], [dc], B2B_SRC, B2B_DST
    )
    # the prefill finalizes: the decode's view of it goes
    remote_id = remote.cluster_id
    assert d.call("linked", remote_id)
    remote.close()
    wait_child_unlinked(d, remote_id)


class FakeListener:
    """A TCP listener that is not llmdist: it reads what comes and answers ``reply`` (None:
    nothing), then keeps the connection open until closed."""

    def __init__(self, reply: Optional[bytes]) -> None:
        import threading

        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.conns: List[socket.socket] = []
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.conns.append(conn)
            try:
                conn.settimeout(2)
                conn.recv(65536)
                if self.reply is not None:
                    conn.sendall(self.reply)
            except OSError:
                pass

    def __enter__(self) -> "FakeListener":
        return self

    def __exit__(self, *exc) -> None:
        self.stop = True
        self.thread.join(5)
        self.sock.close()
        for c in self.conns:
            c.close()


def test_link_failures_are_bounded(decodes, prefill):
    d = decodes[2]
    env = prefill()
    # nothing listens there
    t0 = time.monotonic()
    assert env.dd.link_clusters([cluster_info(2, free_port())], 2000) == (
        LINK_FAILED,
        [LINK_FAILED],
    )
    assert time.monotonic() - t0 < 2.5
    # listeners that are not llmdist: silent, garbage, a frame cut short, a welcome from the
    # wrong cluster, a frame that is not a welcome; the timeout holds in every case
    wrong = dict(hello(999, env.cluster_id, LLMRole.DECODER, host=OTHER_HOST), type="welcome")
    replies = [
        None,
        b"\x00garbage" * 100,
        MAGIC + struct.pack(">I", 100) + b'{"type"',
        frame(wrong),
        frame({"type": "ack", "seq": 1}),
        MAGIC + b"\xff\xff\xff\xff",
    ]
    for reply in replies:
        with FakeListener(reply) as fake:
            t0 = time.monotonic()
            code = env.dd.link_clusters([cluster_info(2, fake.port)], 400)
            took = time.monotonic() - t0
        assert code == (LINK_FAILED, [LINK_FAILED]), (reply, code)
        assert took < 1.5, f"link_clusters(timeout=400 ms) took {took:.2f} s against {reply!r:.40}"
    # the listener is another cluster
    assert env.dd.link_clusters([d.info(cluster_id=3)], LINK_MS) == (LINK_FAILED, [LINK_FAILED])
    # a cluster with the listener's own id
    me = prefill(cluster_id=2)
    assert me.dd.link_clusters([d.info()], LINK_MS) == (LINK_FAILED, [LINK_FAILED])
    # none of that harmed anything: the right link works
    link(env, d)
    assert unlink(env, d) == (SUCCESS, [SUCCESS])


def test_listener_finalize_and_exit(prefill, cleanup):
    """A decode that finalizes: the prefill notices, the decode's shared memory is gone from
    both processes, a new link is refused; a restarted decode with the same id links."""
    d = cleanup.spawn(40).wait_ready()
    dc = cleanup.dcache(d, "allocated", **DST_BLOCKS, blocks=True, key=("blocks", 1))
    env = prefill(remote=True)
    src = env.allocated(**SRC_BLOCKS, blocks=True, dtype=FP16)
    link(env, d)
    held = own_shm_maps(d.pid)
    assert held
    d.call("finalize")
    wait_unlinked(env, src, 40)
    assert not still_mapped(held), "the finalized peer's memory is still mapped here"
    assert not own_shm_maps(d.pid), "finalize left shared memory mapped in the peer"
    assert env.dd.link_clusters([d.info()], 1000) == (LINK_FAILED, [LINK_FAILED])
    cleanup.caches.remove(dc)
    d.close()
    d2 = cleanup.spawn(40).wait_ready()
    dc2 = cleanup.dcache(d2, "registered", **DST_BLOCKS, blocks=True, key=("blocks", 1))
    link(env, d2)
    run_remote(
        env,
        src,
        [keyed_cfg(dc2, range(0, 4), range(2, 6))],
        [keyed_ref(dc2, range(0, 4), range(2, 6))],
        [dc2],
        B2B_SRC,
        B2B_DST,
    )


# --------------------------------------------------------------------------------------------
# transfers into another process, every byte
# --------------------------------------------------------------------------------------------
CASES = [
    ("B2B", "addr"),
    ("B2B", "blocks_key"),
    ("B2B", "id_key"),
    ("C2B", "addr"),
    ("C2B", "blocks_key"),
    ("C2B", "id_key"),
    ("C2C", "addr"),
    ("C2C", "id_key"),
]
SRC_LAYERS = range(1, 4)
KEY_DST_LAYERS = range(2, 5)
ADDR_DST_LAYERS = [5, 0, 3]


@pytest.mark.parametrize("dst_mem", ["allocated", "registered"])
@pytest.mark.parametrize("kind,addressing", CASES, ids=["-".join(c) for c in CASES])
def test_transfer_bytes(decodes, prefill, cleanup, kind, addressing, dst_mem):
    d = decodes[2]
    seed = next(_seeds)
    env = prefill(remote=addressing != "addr")
    src_alloc = dst_mem == "registered"  # cross the source and destination memory kinds
    sb = db = bsz = None
    if kind == "B2B":
        src = env.cache(src_alloc, **SRC_BLOCKS, dtype=FP16, blocks=True)
        layout, sb, db, batch, row = DST_BLOCKS, B2B_SRC, B2B_DST, 0, 0
        bsz = 256 if addressing == "id_key" else None
    elif kind == "C2B":
        src = env.cache(src_alloc, **SRC_ROWS, dtype=FP16)
        layout, db, bsz, row = DST_CHUNKS, C2B_DST, C2B_SIZE, 0
        batch = 0 if addressing == "blocks_key" else 2
    else:
        src = env.cache(src_alloc, **SRC_ROWS, dtype=FP16)
        layout, batch, row = DST_ROWS, 1, 3
    blocks = kind != "C2C"
    key = ("blocks", seed) if addressing == "blocks_key" else None
    dc = cleanup.dcache(d, dst_mem, **layout, blocks=blocks, key=key, seed=seed)
    link(env, d)
    if addressing == "addr":
        cfg, ref = addr_cfg(dc, SRC_LAYERS, ADDR_DST_LAYERS, row, batch)
    else:
        cfg = keyed_cfg(dc, SRC_LAYERS, KEY_DST_LAYERS, "blocks" if key else "id", row, batch)
        ref = keyed_ref(dc, SRC_LAYERS, KEY_DST_LAYERS, row, batch)
    run_remote(env, src, [cfg], [ref], [dc], sb, db, bsz)
    # the same transfer again, all layers by address or key, into the state it left
    if addressing == "addr":
        cfg, ref = addr_cfg(dc, range(0, 4), [1, 2, 3, 4], row, batch)
    else:
        cfg = keyed_cfg(dc, range(0, 4), range(2, 6), "blocks" if key else "id", row, batch)
        ref = keyed_ref(dc, range(0, 4), range(2, 6), row, batch)
    run_remote(env, src, [cfg], [ref], [dc], sb, db, bsz)


@pytest.mark.parametrize("addressing", ["addr", "key"])
def test_fan_out_to_two_decodes(decodes, prefill, cleanup, addressing):
    """One call, configs to two decode processes (and two to one of them)."""
    d2, d3 = decodes[2], decodes[3]
    s = next(_seeds)
    env = prefill(remote=addressing == "key")
    src = env.allocated(**SRC_BLOCKS, blocks=True, dtype=FP16)
    a = cleanup.dcache(d2, "allocated", **DST_BLOCKS, blocks=True, key=("blocks", s), seed=s)
    b = cleanup.dcache(d3, "registered", **DST_BLOCKS, blocks=True, key=("blocks", s), seed=s + 1)
    link(env, d2, d3)
    if addressing == "key":
        cfgs = [
            keyed_cfg(a, range(0, 2), range(4, 6)),
            keyed_cfg(b, range(1, 4), range(0, 3), "id"),
            keyed_cfg(a, range(2, 4), range(0, 2), "id"),
        ]
        refs = [
            keyed_ref(a, range(0, 2), range(4, 6)),
            keyed_ref(b, range(1, 4), range(0, 3)),
            keyed_ref(a, range(2, 4), range(0, 2)),
        ]
    else:
        pairs = [
            addr_cfg(a, range(0, 2), [5, 4]),
            addr_cfg(b, range(0, 4), [0, 1, 2, 3]),
            addr_cfg(a, range(3, 4), [0]),
        ]
        cfgs, refs = [p[0] for p in pairs], [p[1] for p in pairs]
    run_remote(env, src, cfgs, refs, [a, b], B2B_SRC, B2B_DST)


@pytest.mark.parametrize("dst_mem", ["allocated", "registered"])
def test_cache_made_after_link_is_usable_at_once(decodes, prefill, cleanup, dst_mem):
    d = decodes[3]
    s = next(_seeds)
    keyed = prefill(remote=True)
    plain = prefill()
    link(keyed, d)
    link(plain, d)
    src = keyed.registered(**SRC_BLOCKS, blocks=True, dtype=FP16)
    psrc = plain.allocated(**SRC_ROWS, dtype=FP16)
    # made after both links: register/allocate return only once the peers know it
    dc = cleanup.dcache(d, dst_mem, **DST_BLOCKS, blocks=True, key=("blocks", s), seed=s)
    run_remote(
        keyed,
        src,
        [keyed_cfg(dc, range(0, 4), range(1, 5))],
        [keyed_ref(dc, range(0, 4), range(1, 5))],
        [dc],
        B2B_SRC,
        B2B_DST,
    )
    rows = cleanup.dcache(d, dst_mem, **DST_ROWS, seed=s + 1)
    cfg, ref = addr_cfg(rows, range(0, 4), [5, 3, 1, 0], row=4, src_batch=2)
    run_remote(plain, psrc, [cfg], [ref], [rows])


@pytest.mark.parametrize("dst_mem", ["allocated", "registered"])
def test_event_synchronizer_across_processes(decodes, prefill, cleanup, dst_mem):
    """Event-based readiness gates copies into a peer too (shared memory and process writes):
    with layers 0-2 recorded the decode holds exactly those; the rest follows their events."""
    d = decodes[2]
    s = next(_seeds)
    env = prefill(remote=True)
    src = env.registered(**L6_SRC, blocks=True, dtype=FP16)
    dc = cleanup.dcache(d, dst_mem, **L6_DST, blocks=True, key=("blocks", s), seed=s)
    link(env, d)
    src_tensors = src.tensor_bytes()
    sync = EventSynchronizer(env.dd.runtime, 6)
    model = Stream(env.dd.runtime)
    ref = keyed_ref(dc, range(0, 6), range(0, 6))
    task = env.cm.transfer_cache_async(
        src.cache, sync, [keyed_cfg(dc, range(0, 6), range(0, 6))], L6_SRC_IDX, L6_DST_IDX
    )
    for layer in range(3):
        sync.record(layer, model)
    time.sleep(0.3)
    assert task.get_results(0) == [LLMStatusCode.LLM_TIMEOUT]
    verify(
        dc.read(), dc.initial, src_tensors, src.stride, [ref], L6_SRC_IDX, L6_DST_IDX, layers_done=3
    )
    for layer in range(3, 6):
        sync.record(layer, model)
    assert wait_done(task) == [SUCCESS], task.errors
    verify(dc.read(), dc.initial, src_tensors, src.stride, [ref], L6_SRC_IDX, L6_DST_IDX)
    assert unlink(env, d) == (SUCCESS, [SUCCESS])


def test_host_placement_on_the_peer(decodes, prefill, cleanup):
    """A HOST destination on the peer may be memory it allocated or (host runtime, the process
    route) registered; a HOST source cannot go to a DEVICE destination (spec 5.3 rule 9),
    across processes as locally."""
    d = decodes[3]
    s = next(_seeds)
    env = prefill()
    src = env.allocated(**SRC_ROWS, dtype=FP16)
    hsrc = env.allocated(**SRC_ROWS, dtype=FP16, placement=Placement.HOST)
    host_alloc = cleanup.dcache(d, "allocated", **DST_ROWS, seed=s, placement="HOST")
    host_reg = cleanup.dcache(d, "registered", **DST_ROWS, seed=s + 1, placement="HOST")
    dev = cleanup.dcache(d, "allocated", **DST_ROWS, seed=s + 2)
    link(env, d)
    cfg, ref = addr_cfg(host_alloc, range(0, 4), [5, 4, 3, 2], row=2, src_batch=1)
    run_remote(env, src, [cfg], [ref], [host_alloc])
    cfg, ref = addr_cfg(host_alloc, range(0, 4), [0, 1, 2, 3], row=0, src_batch=2)
    run_remote(env, hsrc, [cfg], [ref], [host_alloc])
    # registered HOST memory (what a serving engine's CPU KV tensors are): written through
    # process writes
    cfg, ref = addr_cfg(host_reg, range(0, 4), [3, 2, 1, 0], row=1, src_batch=2)
    run_remote(env, src, [cfg], [ref], [host_reg])
    cfg, _ = addr_cfg(dev, range(0, 4), [0, 1, 2, 3])
    with pytest.raises(LLMException) as ei:
        env.cm.transfer_cache_async(hsrc.cache, RecordingSync(), [cfg])
    assert ei.value.status_code == PARAM_INVALID
    assert_mem_equal(read_all([dev]), merged([dev.initial]))


@pytest.mark.parametrize("dst_mem", ["allocated", "registered"])
def test_released_cache_is_refused(decodes, prefill, cleanup, dst_mem):
    d = decodes[2]
    s = next(_seeds)
    keyed = prefill(remote=True)
    plain = prefill()
    src = keyed.allocated(**SRC_BLOCKS, blocks=True, dtype=FP16)
    psrc = plain.allocated(**SRC_BLOCKS, blocks=True, dtype=FP16)
    dc = cleanup.dcache(d, dst_mem, **DST_BLOCKS, blocks=True, key=("blocks", s), seed=s)
    link(keyed, d)
    link(plain, d)
    cfg_k = keyed_cfg(dc, range(0, 4), range(0, 4))
    cfg_i = keyed_cfg(dc, range(0, 4), range(0, 4), "id")
    cfg_a, ref_a = addr_cfg(dc, range(0, 4), [0, 1, 2, 3])
    run_remote(
        keyed, src, [cfg_k], [keyed_ref(dc, range(0, 4), range(0, 4))], [dc], B2B_SRC, B2B_DST
    )
    run_remote(plain, psrc, [cfg_a], [ref_a], [dc], B2B_SRC, B2B_DST)
    d.call("release", dc.name)
    cleanup.caches.remove(dc)
    for cfg, env, source, code in (
        (cfg_k, keyed, src, NOT_EXIST),
        (cfg_i, keyed, src, NOT_EXIST),
        (cfg_a, plain, psrc, PARAM_INVALID),
    ):
        with pytest.raises(LLMException) as ei:
            env.cm.transfer_cache_async(source.cache, RecordingSync(), [cfg], B2B_SRC, B2B_DST)
        assert ei.value.status_code == code, (cfg, ei.value)
    assert not cache_mapped(dc), "a deallocated peer cache is still mapped here"


def test_removed_key_is_refused_but_id_key_works(decodes, prefill, cleanup):
    d = decodes[3]
    s = next(_seeds)
    env = prefill(remote=True)
    src = env.allocated(**SRC_BLOCKS, blocks=True, dtype=FP16)
    dc = cleanup.dcache(d, "registered", **DST_BLOCKS, blocks=True, key=("blocks", s), seed=s)
    link(env, d)
    d.call("remove_key", dc.name)
    with pytest.raises(LLMException) as ei:
        env.cm.transfer_cache_async(
            src.cache, RecordingSync(), [keyed_cfg(dc, range(0, 1), range(0, 1))], B2B_SRC, B2B_DST
        )
    assert ei.value.status_code == NOT_EXIST
    run_remote(
        env,
        src,
        [keyed_cfg(dc, range(0, 4), range(2, 6), "id")],
        [keyed_ref(dc, range(0, 4), range(2, 6))],
        [dc],
        B2B_SRC,
        B2B_DST,
    )


def test_out_of_bounds_on_the_peer_is_refused(decodes, prefill, cleanup):
    """Destination ranges are checked against the peer's caches; nothing is written."""
    d = decodes[2]
    env = prefill()
    src = env.allocated(**SRC_BLOCKS, blocks=True, dtype=FP16)
    dc = cleanup.dcache(d, "registered", **DST_BLOCKS, blocks=True)
    link(env, d)
    nblocks = dc.size // dc.stride
    cases = [
        ([dc.addrs[0], dc.addrs[1]], [0, 1, 2, 3, nblocks]),  # one block past the end
        ([dc.addrs[0], dc.addrs[1]], [0, 1, 2, 3, 2**40]),  # far past it
        ([dc.addrs[0] - 64, dc.addrs[1]], [0, 1, 2, 3, 4]),  # K starts in the guard
        ([dc.addrs[0], dc.addrs[1] + 64], [11, 12, 13, 14, 15]),  # V ends in the guard
        ([dc.addrs[0], 4096], [0, 1, 2, 3, 4]),
    ]  # not the peer's at all
    for addrs, db in cases:
        cfg = TransferConfig(2, addrs, range(0, 1))
        with pytest.raises(LLMException) as ei:
            env.cm.transfer_cache_async(src.cache, RecordingSync(), [cfg], B2B_SRC, db)
        assert ei.value.status_code == PARAM_INVALID, (addrs, db)
    assert_mem_equal(dc.read(), dc.initial, "destination")


def _mooncake_importable() -> bool:
    try:
        import mooncake.engine  # noqa: F401
    except ImportError:
        return False
    return True


MOONCAKE = _mooncake_importable()


def test_transport_option(decodes, prefill, cleanup):
    d = decodes[2]
    dc = cleanup.dcache(d, "registered", **DST_BLOCKS, blocks=True, key=("blocks", next(_seeds)))
    with pytest.raises(LLMException) as ei:
        prefill(extra_options={"llmdist.transport": "carrier-pigeon"})
    assert ei.value.status_code == PARAM_INVALID
    direct = prefill(extra_options={"llmdist.transport": "direct"})
    assert direct.dd.peer_info(2) is None
    link(direct, d)
    info = direct.dd.peer_info(2)
    assert info["path"] == "direct" and info["same_host"] and info["pid"] > 0
    src = direct.allocated(**SRC_BLOCKS, blocks=True, dtype=FP16)
    cfg, ref = addr_cfg(dc, range(0, 4), [2, 3, 4, 5])
    run_remote(direct, src, [cfg], [ref], [dc], B2B_SRC, B2B_DST)
    for remote in (False, True):
        # Forced onto Mooncake Transfer Engine (over loopback TCP): with the llmdist[mooncake]
        # extra the bytes arrive; without it the transfer is refused, naming the extra.
        moon = prefill(remote=remote, extra_options={"llmdist.transport": "mooncake"})
        link(moon, d)
        assert moon.dd.peer_info(2)["path"] == "mooncake"
        msrc = moon.allocated(**SRC_BLOCKS, blocks=True, dtype=FP16)
        if remote:
            cfg, ref = (
                keyed_cfg(dc, range(0, 4), range(0, 4)),
                keyed_ref(dc, range(0, 4), range(0, 4)),
            )
        else:
            cfg, ref = addr_cfg(dc, range(0, 4), [0, 1, 2, 3])
        if MOONCAKE:
            run_remote(moon, msrc, [cfg], [ref], [dc], B2B_SRC, B2B_DST)
        else:
            state = dc.read()
            with pytest.raises(LLMException) as ei:
                moon.cm.transfer_cache_async(msrc.cache, RecordingSync(), [cfg], B2B_SRC, B2B_DST)
            assert ei.value.status_code == LLMStatusCode.LLM_FEATURE_NOT_ENABLED
            assert "llmdist[mooncake]" in str(ei.value)
            assert_mem_equal(dc.read(), state, "destination")
        assert unlink(moon, d) == (SUCCESS, [SUCCESS])


@pytest.mark.skipif(not MOONCAKE, reason="the llmdist[mooncake] extra is not installed")
def test_mooncake_many_writes_in_flight(decodes, prefill, cleanup):
    """All layers ready at once with nothing to merge: 8 layers x 2 tensors x 300 scattered
    blocks = 4800 writes, more than Mooncake's TCP transport queues per peer (1024); llmdist
    bounds what it keeps in flight, so the transfer succeeds."""
    d = decodes[2]
    s = next(_seeds)
    env = prefill(remote=True, extra_options={"llmdist.transport": "mooncake"})
    src = env.allocated(num_tensors=16, shape=[600, 64], blocks=True, dtype=FP16)
    dc = cleanup.dcache(
        d, "allocated", num_tensors=16, shape=[600, 64], blocks=True, key=("blocks", s), seed=s
    )
    link(env, d)
    rng = np.random.default_rng(s)
    sb = rng.permutation(600)[:300].tolist()
    db = rng.permutation(600)[:300].tolist()
    run_remote(
        env,
        src,
        [keyed_cfg(dc, range(0, 8), range(0, 8))],
        [keyed_ref(dc, range(0, 8), range(0, 8))],
        [dc],
        sb,
        db,
    )
    assert unlink(env, d) == (SUCCESS, [SUCCESS])


# --------------------------------------------------------------------------------------------
# faults
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("victim_mem", ["allocated", "registered"])
def test_kill_decode_mid_transfer_then_relink(decodes, prefill, cleanup, victim_mem):
    """kill -9 of one decode while the synchronizer is blocked at a middle layer: its config
    ends LLM_LINK_FAILED, the config to a live decode in the same call succeeds, no hang; a
    restarted decode with the same id links and receives."""
    live = decodes[3]
    victim = cleanup.spawn(50)
    victim.wait_ready()
    s = next(_seeds)
    env = prefill(remote=True)
    src = env.allocated(**L6_SRC, blocks=True, dtype=FP16)
    v = cleanup.dcache(victim, victim_mem, **L6_DST, blocks=True, key=("blocks", 1), seed=s)
    other = "registered" if victim_mem == "allocated" else "allocated"
    a = cleanup.dcache(live, other, **L6_DST, blocks=True, key=("blocks", s), seed=s + 1)
    link(env, victim, live)
    held = own_shm_maps(victim.pid)
    before = a.read()
    src_tensors = src.tensor_bytes()
    sync = GateSync(block_at=3, max_wait=20)
    cfgs = [keyed_cfg(v, range(0, 6), range(0, 6)), keyed_cfg(a, range(0, 6), range(0, 6))]
    task = env.cm.transfer_cache_async(src.cache, sync, cfgs, L6_SRC_IDX, L6_DST_IDX)
    try:
        assert sync.entered.wait(10)
        # Released at once, before the link drop need have been noticed: copies into the dead
        # peer's shared memory (still mapped here) must not be reported delivered either.
        victim.kill()
    finally:
        sync.release()
    t0 = time.monotonic()
    results = wait_done(task)
    assert time.monotonic() - t0 < 5
    assert results == [LINK_FAILED, SUCCESS], (results, getattr(task, "errors", None))
    verify(
        a.read(),
        before,
        src_tensors,
        src.stride,
        [keyed_ref(a, range(0, 6), range(0, 6))],
        L6_SRC_IDX,
        L6_DST_IDX,
    )
    # the dead peer is gone; a transfer to it is refused, to the live one works
    wait_unlinked(env, src, victim.cluster_id)
    assert not still_mapped(held)
    cleanup.caches.remove(v)
    # restart with the same cluster id: a new link works and receives
    again = cleanup.spawn(50).wait_ready()
    v2 = cleanup.dcache(again, victim_mem, **L6_DST, blocks=True, key=("blocks", 1), seed=s + 2)
    link(env, again)
    run_remote(
        env,
        src,
        [keyed_cfg(v2, range(0, 6), range(0, 6)), keyed_cfg(a, range(1, 3), range(4, 6), "id")],
        [keyed_ref(v2, range(0, 6), range(0, 6)), keyed_ref(a, range(1, 3), range(4, 6))],
        [v2, a],
        L6_SRC_IDX,
        L6_DST_IDX,
    )


@pytest.mark.parametrize("reap", ["reaped-at-once", "reaped-late"])
def test_killed_peer_shared_memory_is_released(prefill, cleanup, reap):
    """kill -9 of a linked decode holding shared memory: this process, its survivor, unmaps
    the dead process's memfds once the link drops (also while the dead process is not reaped
    yet), so that nothing holds that memory any more; nothing is left in /dev/shm."""
    victim = cleanup.spawn(51).wait_ready()
    for n in range(2):
        cleanup.dcache(victim, "allocated", **DST_BLOCKS, blocks=True, key=("blocks", n))
    env = prefill(remote=True)
    link(env, victim)
    held = own_shm_maps(victim.pid)
    assert len(held) == 2
    cleanup.caches.clear()
    os.kill(victim.pid, signal.SIGKILL)
    if reap == "reaped-at-once":
        victim.proc.join(10)
    deadline = time.monotonic() + 10
    while still_mapped(held) and time.monotonic() < deadline:
        time.sleep(0.02)
    if reap == "reaped-late":
        assert os.path.exists(f"/proc/{victim.pid}"), "the killed child was reaped early"
    assert not still_mapped(held), "the killed peer's shared memory is still mapped here"
    victim.proc.join(10)


@pytest.mark.parametrize("dst_mem", ["allocated", "registered"])
def test_unlink_while_blocked_in_flight(decodes, prefill, cleanup, dst_mem):
    """The prefill unlinks while its synchronizer is blocked at layer 3: unlink returns without
    waiting for the synchronizer, the config ends LLM_LINK_FAILED, the decode holds exactly
    layers 0-2 and nothing changes after unlink returned."""
    d = decodes[2]
    s = next(_seeds)
    env = prefill(remote=True)
    src = env.registered(**L6_SRC, blocks=True, dtype=FP16)
    dc = cleanup.dcache(d, dst_mem, **L6_DST, blocks=True, key=("blocks", s), seed=s)
    link(env, d)
    src_tensors = src.tensor_bytes()
    sync = GateSync(block_at=3, max_wait=20)
    ref = keyed_ref(dc, range(0, 6), range(0, 6))
    task = env.cm.transfer_cache_async(
        src.cache, sync, [keyed_cfg(dc, range(0, 6), range(0, 6))], L6_SRC_IDX, L6_DST_IDX
    )
    try:
        assert sync.entered.wait(10)
        t0 = time.monotonic()
        assert unlink(env, d) == (SUCCESS, [SUCCESS])
        took = time.monotonic() - t0
        at_unlink = dc.read()
    finally:
        sync.release()
    assert took < 3, f"unlink waited {took:.1f} s for a blocked synchronizer"
    assert wait_done(task) == [LINK_FAILED], getattr(task, "errors", None)
    time.sleep(0.1)
    later = dc.read()
    assert_mem_equal(later, at_unlink, "after unlink")
    verify(
        at_unlink, dc.initial, src_tensors, src.stride, [ref], L6_SRC_IDX, L6_DST_IDX, layers_done=3
    )
    # a later link works, and the transfer completes
    link(env, d)
    run_remote(
        env, src, [keyed_cfg(dc, range(0, 6), range(0, 6))], [ref], [dc], L6_SRC_IDX, L6_DST_IDX
    )


@pytest.mark.parametrize("dst_mem", ["allocated", "registered"])
def test_unlink_while_copying(decodes, prefill, cleanup, dst_mem):
    """Unlink while layers are being copied: the task ends with a status, every destination
    byte holds its old or its new value, and the bytes stop changing when unlink returns."""
    d = decodes[3]
    s = next(_seeds)
    env = prefill()
    shape = [16, 2048]  # 64 KiB tensors, 4 KiB blocks, 32 layers
    nt = 64
    src = env.allocated(nt, shape, dtype=FP16, blocks=True)
    dc = cleanup.dcache(d, dst_mem, nt, shape, blocks=True, seed=s)
    link(env, d)
    perm = [int(x) for x in np.random.default_rng(s).permutation(16)]
    cfg, ref = addr_cfg(dc, range(0, nt // 2), list(range(nt // 2)))
    before = dc.read()
    src_tensors = src.tensor_bytes()
    sync = SleepSync(0.004)
    task = env.cm.transfer_cache_async(src.cache, sync, [cfg], list(range(16)), perm)
    deadline = time.monotonic() + 10
    while len(sync.calls) < 6:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    code = unlink(env, d)
    at_unlink = dc.read()
    results = wait_done(task)
    time.sleep(0.05)
    later = dc.read()
    assert code == (SUCCESS, [SUCCESS])
    assert results[0] in (SUCCESS, LINK_FAILED), results
    assert_mem_equal(later, at_unlink, "after unlink")
    expected, _ = reference.expected_transfer(
        src_tensors, src.stride, before, [ref], list(range(16)), perm, None
    )
    for k in expected:
        ok = (at_unlink[k] == before[k]) | (at_unlink[k] == expected[k])
        assert ok.all(), (
            f"{k}: {np.count_nonzero(~ok)} bytes hold neither the old nor the new value"
        )
    if results[0] == SUCCESS:
        assert_mem_equal(at_unlink, expected, "destination")


def test_decode_unregisters_in_flight(decodes, prefill, cleanup):
    """unregister_cache on the decode while a transfer into the cache is blocked: it returns
    without waiting for the prefill's synchronizer, nothing lands afterwards, the config ends
    LLM_KV_CACHE_NOT_EXIST and the key is refused."""
    d = decodes[3]
    s = next(_seeds)
    env = prefill(remote=True)
    src = env.allocated(**L6_SRC, blocks=True, dtype=FP16)
    dc = cleanup.dcache(d, "registered", **L6_DST, blocks=True, key=("blocks", s), seed=s)
    other = cleanup.dcache(d, "allocated", **L6_DST, blocks=True, seed=s + 1)
    link(env, d)
    src_tensors = src.tensor_bytes()
    other_before = other.read()
    ref = keyed_ref(dc, range(0, 6), range(0, 6))
    sync = GateSync(block_at=2, max_wait=20)
    cfgs = [
        keyed_cfg(dc, range(0, 6), range(0, 6)),
        keyed_cfg(other, range(0, 6), range(0, 6), "id"),
    ]
    task = env.cm.transfer_cache_async(src.cache, sync, cfgs, L6_SRC_IDX, L6_DST_IDX)
    try:
        assert sync.entered.wait(10)
        d.send("unregister_watch", dc.name, 0.3)
        mid = d.recv()
        assert mid[0] == "mid", mid
    finally:
        sync.release()
    out = d.result()
    cleanup.caches.remove(dc)
    assert out["took"] < 5, f"unregister_cache took {out['took']:.1f} s (blocked by the peer)"
    assert wait_done(task) == [NOT_EXIST, SUCCESS], getattr(task, "errors", None)
    assert_mem_equal(out["second"], out["first"], "decode memory after unregister returned")
    verify(
        out["first"],
        dc.initial,
        src_tensors,
        src.stride,
        [ref],
        L6_SRC_IDX,
        L6_DST_IDX,
        layers_done=2,
    )
    verify(
        other.read(),
        other_before,
        src_tensors,
        src.stride,
        [keyed_ref(other, range(0, 6), range(0, 6))],
        L6_SRC_IDX,
        L6_DST_IDX,
    )
    with pytest.raises(LLMException) as ei:
        env.cm.transfer_cache_async(src.cache, RecordingSync(), cfgs[:1], L6_SRC_IDX, L6_DST_IDX)
    assert ei.value.status_code == NOT_EXIST


def test_decode_deallocates_in_flight(decodes, prefill, cleanup):
    """deallocate on the decode while a transfer into its shared memory is blocked: it returns
    promptly, the config ends LLM_KV_CACHE_NOT_EXIST, and neither process crashes when the
    transfer goes on (the mapping here must not be written after it is gone)."""
    d = decodes[2]
    s = next(_seeds)
    env = prefill(remote=True)
    src = env.allocated(**L6_SRC, blocks=True, dtype=FP16)
    dc = cleanup.dcache(d, "allocated", **L6_DST, blocks=True, key=("blocks", s), seed=s)
    link(env, d)
    sync = GateSync(block_at=2, max_wait=20)
    task = env.cm.transfer_cache_async(
        src.cache, sync, [keyed_cfg(dc, range(0, 6), range(0, 6))], L6_SRC_IDX, L6_DST_IDX
    )
    try:
        assert sync.entered.wait(10)
        t0 = time.monotonic()
        d.call("release", dc.name, timeout=15)
        took = time.monotonic() - t0
        cleanup.caches.remove(dc)
    finally:
        sync.release()
    assert took < 5, f"deallocate took {took:.1f} s (blocked by the peer)"
    assert wait_done(task) == [NOT_EXIST], getattr(task, "errors", None)
    assert d.call("ping") == d.pid
    assert not cache_mapped(dc), "a deallocated peer cache is still mapped here"


# --------------------------------------------------------------------------------------------
# garbage on the listener port
# --------------------------------------------------------------------------------------------
OTHER_HOST = "some-other-host"  # the host identity of the raw hellos below


def _answered(port: int, hello_msg: dict, timeout: float = 20.0) -> socket.socket:
    """A raw connection whose hello the listener answered (a welcome; a keyed listener refuses
    it). Retried while the listener turns connections away unread: the connections of a test
    just before may still hold this address's handshake slots."""
    deadline = time.monotonic() + timeout
    while True:
        raw = None
        try:
            raw = RawPeer(port)
            raw.link(hello_msg)
            return raw.sock
        except (ConnectionError, OSError):
            pass
        if raw is not None:
            raw.close()
        assert time.monotonic() < deadline, "the listener answered no raw peer"
        time.sleep(0.2)


def send_and_expect_close(
    port: int, data: bytes, half_close: bool = True, timeout: float = 12.0
) -> bytes:
    """Send data; the listener must close the connection within timeout. Returns its reply."""
    s = socket.create_connection((HOST, port), timeout=5)
    try:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            return b""  # closed while we were still sending: dropped
        s.settimeout(timeout)
        got = b""
        t0 = time.monotonic()
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                raise AssertionError(
                    f"listener kept the connection open {timeout} s after {data[:40]!r}..."
                ) from None
            if not chunk:
                break
            got += chunk
            assert time.monotonic() - t0 < timeout
        return got
    finally:
        s.close()


def test_garbage_on_listener_port(decodes, prefill, cleanup):
    d = decodes[2]
    port = d.port
    rng = np.random.default_rng(7)
    stalled = []
    try:
        # a half-sent frame, left open while everything else happens
        for part in (MAGIC[:2], MAGIC + struct.pack(">I", 100) + b'{"ty'):
            s = socket.create_connection((HOST, port), timeout=5)
            s.sendall(part)
            stalled.append(s)
        # a connection that says nothing at all
        stalled.append(socket.create_connection((HOST, port), timeout=5))
        cases = [
            rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),  # random bytes
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # a wrong protocol
            MAGIC + b"\xff\xff\xff\xff",  # huge length header
            MAGIC + struct.pack(">I", (16 << 20) + 1) + b"x" * 1000,  # just over a limit
            MAGIC + struct.pack(">I", 1000) + b'{"type": "hello"',  # truncated frame
            MAGIC[:3],  # truncated header
            frame(hello(555, 2, host=OTHER_HOST), magic=b"LLMX"),  # wrong magic
            frame(b"\xff\xfe not json"),  # not JSON
            frame([1, 2, 3]),  # not a message
            frame({"type": "ack", "seq": 1}),  # not a handshake
            frame(hello(555, 999, host=OTHER_HOST)),  # wrong target cluster
            frame(hello(555, 2, version=12345, host=OTHER_HOST)),  # wrong version
            frame(hello(2, 2, host=OTHER_HOST)),  # the listener's id
            frame(hello("555", 2, host=OTHER_HOST)),  # ill-typed id
            frame(hello(555, 2, caches=[{"id": 1}], host=OTHER_HOST)),  # malformed cache
            frame(hello(555, 2, caches="nope", host=OTHER_HOST)),
            frame(hello(555, 2, role=99, host=OTHER_HOST)),
        ]
        for data in cases:
            send_and_expect_close(port, data)
        # many at once
        socks = [socket.create_connection((HOST, port), timeout=5) for _ in range(16)]
        for s in socks:
            s.sendall(rng.integers(0, 256, 64, dtype=np.uint8).tobytes())
            s.close()
        # a fake peer that completes the handshake, then sends garbage: dropped, and the
        # cluster id it used can link for real afterwards
        s = _answered(port, hello(556, 2, host=OTHER_HOST))
        try:
            s.sendall(frame({"type": "cache_add", "cache": {"id": "x"}, "seq": 1}) + b"junk" * 10)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused (keyed listener) and closed already
        deadline = time.monotonic() + 10
        while True:
            try:
                if not s.recv(65536):
                    break
            except (ConnectionResetError, socket.timeout):
                break
            assert time.monotonic() < deadline, "the listener kept a peer that sent garbage"
        s.close()
        assert d.alive() and d.call("ping") == d.pid
        # real links work, while the stalled connections are still open
        env = prefill(remote=True, cluster_id=556)
        src = env.allocated(**SRC_ROWS, dtype=FP16)
        dc = cleanup.dcache(d, "registered", **DST_ROWS, seed=next(_seeds))
        link(env, d)
        run_remote(
            env,
            src,
            [keyed_cfg(dc, range(0, 4), range(2, 6), "id", 4, 2)],
            [keyed_ref(dc, range(0, 4), range(2, 6), 4, 2)],
            [dc],
        )
        other = prefill()
        link(other, d)
    finally:
        for s in stalled:
            s.close()
    assert d.alive()


# --------------------------------------------------------------------------------------------
# the decode side unlinks (last: see the slow-prefill variant)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("slow_prefill", [False, True], ids=["timely-prefill", "slow-prefill"])
@pytest.mark.parametrize("dst_mem", ["allocated", "registered"])
def test_decode_unlinks(decodes, prefill, cleanup, dst_mem, slow_prefill, monkeypatch):
    """The decode side unlinks while a transfer into it is blocked at layer 2: after its unlink
    returns nothing more lands in its memory, the prefill's config ends LLM_LINK_FAILED, the
    prefill notices (later transfers LLM_NOT_YET_LINK) and can link again.

    ``slow-prefill``: the prefill reads its control connection 0.2 s late (as on a loaded host;
    injected by delaying the control-frame reader of this process), so the outcome does not
    depend on which of the prefill's threads wins a race: the decode's unlink must not return
    while the prefill can still write into its memory."""
    if slow_prefill:
        from llmdist.auth import Channel

        real = Channel.recv

        def late(chan, *args):
            msg, fds = real(chan, *args)
            if msg.get("type") == "unlink":
                time.sleep(0.2)
            return msg, fds

        monkeypatch.setattr(Channel, "recv", late)
    d = decodes[2]
    s = next(_seeds)
    env = prefill(remote=True)
    src = env.allocated(**L6_SRC, blocks=True, dtype=FP16)
    dc = cleanup.dcache(d, dst_mem, **L6_DST, blocks=True, key=("blocks", s), seed=s)
    link(env, d)
    src_tensors = src.tensor_bytes()
    ref = keyed_ref(dc, range(0, 6), range(0, 6))
    sync = GateSync(block_at=2, max_wait=20)
    task = env.cm.transfer_cache_async(
        src.cache, sync, [keyed_cfg(dc, range(0, 6), range(0, 6))], L6_SRC_IDX, L6_DST_IDX
    )
    try:
        assert sync.entered.wait(10)
        d.send("unlink_watch", dc.name, env.cluster_id, 0.3)
        mid = d.recv()
        assert mid[0] == "mid", mid
    finally:
        sync.release()  # the prefill goes on only if it missed the unlink
    out = d.result()
    results = wait_done(task)
    assert out["result"] == (SUCCESS, [SUCCESS])
    assert_mem_equal(out["second"], out["first"], "decode memory after its unlink returned")
    verify(
        out["first"],
        dc.initial,
        src_tensors,
        src.stride,
        [ref],
        L6_SRC_IDX,
        L6_DST_IDX,
        layers_done=2,
    )
    assert results == [LINK_FAILED], (results, getattr(task, "errors", None))
    wait_unlinked(env, src, 2)
    # the decode ended the link; ending it from this side too succeeds (either side may)
    assert unlink(env, d) == (SUCCESS, [SUCCESS])
    link(env, d)
    run_remote(
        env, src, [keyed_cfg(dc, range(0, 6), range(0, 6))], [ref], [dc], L6_SRC_IDX, L6_DST_IDX
    )


from .helpers import keyed_and_unkeyed  # noqa: E402

auth_mode = keyed_and_unkeyed()  # every test here runs without and with a shared key
