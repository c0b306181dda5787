"""Reliability: releases racing each other, a listener that nothing a client sends can knock
over or turn against its own memory, the registry with thousands of caches, the bound on tasks
in flight, and descriptors too large for the address space.

The listener runs in this process (a DECODER Env listening on 127.0.0.1, port picked by the OS)
so that tests can look at its state and slow it down; clients are raw sockets speaking the
control protocol, or a real PROMPT Env of this process."""

from __future__ import annotations

import json
import logging
import socket
import struct
import subprocess
import threading
import time
from typing import List, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmdist import (
    BlocksCacheKey,
    CacheDesc,
    DataType,
    LLMClusterInfo,
    LLMException,
    LLMRole,
    LLMStatusCode,
    Placement,
    TransferConfig,
    TransferWithCacheKeyConfig,
    cluster,
    registry,
)

from .helpers import SUCCESS, Env, GateSync, RecordingSync, host_view, wait_for
from .raw_protocol import RawPeer, frame, hello

HOST = "127.0.0.1"
LISTENER = 2
NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
SETTLE_S = 10.0  # bound on waiting for the listener to finish with a connection


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def listening(make_env, cluster_id: int = LISTENER) -> Env:
    return make_env(
        cluster_id=cluster_id,
        role=LLMRole.DECODER,
        remote=True,
        extra_options={"llm.listenIpInfo": f"{HOST}:0"},
    )


def read_until_closed(sock: socket.socket, timeout: float = SETTLE_S) -> bytes:
    """Everything the listener sends until it closes; fails if it keeps the connection open."""
    sock.settimeout(timeout)
    got = b""
    deadline = time.monotonic() + timeout
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return got
        except socket.timeout:
            raise AssertionError(f"the listener kept the connection open {timeout} s") from None
        if not chunk:
            return got
        got += chunk
        assert time.monotonic() < deadline, "the listener kept the connection open"


def first_reply(data: bytes) -> Optional[dict]:
    """The listener's first frame after its challenge."""
    while len(data) >= 8:
        (n,) = struct.unpack(">I", data[4:8])
        msg = json.loads(data[8 : 8 + n])
        if msg.get("type") != "challenge":
            return msg
        data = data[8 + n :]
    return None


def handshake_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "llmdist-handshake")


def link_and_send(make_env, lis: Env, cluster_id: int) -> None:
    """A real prefill links to the listener and its bytes arrive in a listener cache."""
    pre = make_env(cluster_id=cluster_id, role=LLMRole.PROMPT, remote=True)
    info = LLMClusterInfo()
    info.remote_cluster_id = lis.cluster_id
    info.append_remote_ip_info(HOST, lis.dd.listen_port)
    assert pre.dd.link_clusters([info], 5000) == (SUCCESS, [SUCCESS])
    src = pre.allocated(4, [2, 64], placement=Placement.HOST)
    key = BlocksCacheKey(lis.cluster_id, cluster_id)
    dst = lis.allocated(4, [2, 64], placement=Placement.HOST, blocks=True, key=key)
    cfg = TransferWithCacheKeyConfig(key, range(0, 2), range(0, 2))
    task = pre.cm.transfer_cache_async(src.cache, RecordingSync(), [cfg], [0, 1], [1, 0])
    assert task.synchronize(10_000) == SUCCESS
    for i in range(4):
        got = dst.tensor(i).reshape(2, 64)
        want = src.tensor(i).reshape(2, 64)
        assert np.array_equal(got[1], want[0]) and np.array_equal(got[0], want[1])
    lis.cm.deallocate_blocks_cache(dst.cache)
    pre.close()


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def thread_errors(monkeypatch):
    """Exceptions that escaped any thread (threading.excepthook)."""
    seen: List[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    return seen


# --------------------------------------------------------------------------------------------
# releases racing each other
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rival", ["deallocate", "finalize"])
def test_racing_releases_free_once(make_env, rival):
    """Two threads release one allocated cache at once (the first paused after it looked the
    cache up): the memory is freed exactly once and the loser gets LLM_KV_CACHE_NOT_EXIST."""
    e = make_env()
    cm = e.cm
    cache = cm.allocate_cache(CacheDesc(2, [64], DataType.DT_UINT8, Placement.HOST))
    freed: List[int] = []
    real_free, real_entry_of = cm.allocator.free, cm.releases.entry_of

    def counting_free(entry):
        freed.append(entry.cache.cache_id)
        if len(freed) == 1:  # never free twice for real, even on a broken build
            real_free(entry)

    looked_up, go = threading.Event(), threading.Event()

    def paused_entry_of(*args):
        entry = real_entry_of(*args)
        if threading.current_thread() is first:
            looked_up.set()
            go.wait(10)
        return entry

    cm.allocator.free, cm.releases.entry_of = counting_free, paused_entry_of
    codes = []

    def release():
        try:
            cm.deallocate_cache(cache)
            codes.append(SUCCESS)
        except LLMException as exc:
            codes.append(exc.status_code)

    first = threading.Thread(target=release)
    first.start()
    assert looked_up.wait(10)
    if rival == "deallocate":
        release()
    else:
        e.dd.finalize()
    go.set()
    first.join(10)
    assert freed == [cache.cache_id]
    if rival == "deallocate":
        assert sorted(codes) == sorted([SUCCESS, NOT_EXIST])
    else:
        assert codes == [NOT_EXIST]


def test_racing_unregisters_release_once(env):
    tc = env.registered(2, [64], placement=Placement.HOST)
    cm = env.cm
    calls = []
    both = threading.Barrier(2)
    cid = tc.cache.cache_id
    real_unregister = cm.unregister_cache
    codes = []

    def unregister():
        try:
            real_unregister(cid)
            codes.append(SUCCESS)
        except LLMException as exc:
            codes.append(exc.status_code)

    # both threads look the cache up before either releases it
    class Lookup(dict):
        def get(self, k, d=None):
            got = super().get(k, d)
            if k == cid and len(calls) < 2:
                calls.append(k)
                both.wait(10)
            return got

    cm._mem.entries = Lookup(cm._mem.entries)
    ts = [threading.Thread(target=unregister) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    # the second finds the cache gone, which is no error for unregister_cache (as upstream)
    assert codes == [SUCCESS, SUCCESS]
    assert cid not in cm._mem.entries and not tc.cache._valid


# --------------------------------------------------------------------------------------------
# descriptors too large for the address space
# --------------------------------------------------------------------------------------------
def test_oversized_descriptors_name_the_parameter(env):
    huge = CacheDesc(2, [2**33, 2**31], DataType.DT_UINT8, Placement.HOST)  # 2^65 bytes
    for alloc in (env.cm.allocate_cache, env.cm.allocate_blocks_cache):
        with pytest.raises(LLMException) as ei:
            alloc(huge)
        assert ei.value.status_code == PARAM_INVALID
        assert "cache_desc" in str(ei.value) and "64-bit" in str(ei.value)
    desc = CacheDesc(2, [2**62], DataType.DT_UINT8, Placement.DEVICE)
    with pytest.raises(LLMException) as ei:
        env.cm.register_cache(desc, [2**40, 2**64 - 2**61])
    assert ei.value.status_code == PARAM_INVALID
    assert "tensor 1" in str(ei.value) and "64-bit address space" in str(ei.value)
    # up to the very last byte is fine (nothing is touched before a transfer)
    c = env.cm.register_cache(desc, [2**40, 2**64 - 2**62])
    env.cm.unregister_cache(c.cache_id)


# --------------------------------------------------------------------------------------------
# the listener: failed handshakes, forged names, malformed frames, slow and idle clients
# --------------------------------------------------------------------------------------------
def test_failed_welcome_leaves_no_stale_peer(make_env, monkeypatch):
    """A client resets its connection right after its hello; the listener's welcome fails. The
    cluster id it used then links for real (it was refused as already linked)."""
    lis = listening(make_env)
    node = lis.dd._node
    real_hello = node._hello

    def slow_hello(*args, **kw):
        time.sleep(0.3)  # by now the client has reset the connection
        return real_hello(*args, **kw)

    monkeypatch.setattr(node, "_hello", slow_hello)
    s = socket.create_connection((HOST, lis.dd.listen_port), timeout=5)
    s.sendall(frame(hello(556, LISTENER)))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    assert wait_for(lambda: handshake_threads() == 0)
    monkeypatch.undo()
    assert node.peer(556) is None, "a failed handshake left the peer linked"
    link_and_send(make_env, lis, 556)


def _forge(lis: Env, sock_hello: dict) -> bytes:
    s = socket.create_connection((HOST, lis.dd.listen_port), timeout=5)
    try:
        try:
            s.sendall(frame(sock_hello))
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # dropped while still sending
        return read_until_closed(s)
    finally:
        s.close()


def test_shared_memory_needs_its_descriptor(make_env):
    """A cache announced as shared memory without the descriptor that holds it (over TCP, or
    naming a descriptor that did not come) is refused: there is no name to claim."""
    lis = listening(make_env)
    own = lis.allocated(2, [64], placement=Placement.HOST)
    entry = lis.cm._mem.entries[own.cache.cache_id]
    w = cluster.cache_to_wire(entry, [])
    assert w["share"]["kind"] == "memfd"
    for unix in (False, True):
        raw = RawPeer(lis.dd.listen_port, unix=unix)
        try:
            reply = raw.link(hello(559, LISTENER, caches=[w]))
        except ConnectionError:
            reply = None  # dropped without a word
        finally:
            raw.close()
        assert reply is None or reply["type"] == "refuse", reply
        assert wait_for(lambda: lis.dd._node.peer(559) is None)
    link_and_send(make_env, lis, 558)


def test_tensors_outside_the_shared_memory_are_refused(make_env):
    """A peer's cache whose tensors lie outside the shared memory it names would make writes
    land outside the mapping: the hello is refused."""
    lis = listening(make_env)
    peer = make_env(
        cluster_id=568,
        role=LLMRole.PROMPT,
        remote=True,
        extra_options={"llmdist.shareable_memory": "1"},
    )
    own = peer.allocated(2, [64], placement=Placement.HOST)
    entry = peer.cm._mem.entries[own.cache.cache_id]
    fds: List[int] = []
    wire = cluster.cache_to_wire(entry, fds)
    share = wire["share"]
    for addrs in (
        [share["base"] - 64, share["base"]],
        [share["base"], share["base"] + share["size"] - 32],
    ):
        w = dict(wire, addrs=addrs)
        raw = RawPeer(lis.dd.listen_port, unix=True)
        try:
            with pytest.raises(ConnectionError):  # the link is dropped, not acknowledged
                raw.link(hello(568, LISTENER), caches=[w], fds=fds)
        finally:
            raw.close()
        assert wait_for(lambda: lis.dd._node.peer(568) is None)


@pytest.mark.parametrize(
    "data",
    [
        b'{"type":"hello","caches":' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        json.dumps(hello(560, LISTENER, host="\ud800")).encode(),
        json.dumps(
            hello(560, LISTENER, caches=[{"share": {"kind": "memfd", "fd": "\udfff"}}])
        ).encode(),
        json.dumps({"type": "hello", "version": [[[[[]]]]]}).encode(),
    ],
    ids=["deeply-nested", "surrogate-host", "surrogate-name", "nested-version"],
)
def test_malformed_frames_close_cleanly(make_env, thread_errors, data):
    lis = listening(make_env)
    s = socket.create_connection((HOST, lis.dd.listen_port), timeout=5)
    try:
        s.sendall(frame(data))
        reply = first_reply(read_until_closed(s))
    finally:
        s.close()
    assert reply is None or reply["type"] == "refuse", reply
    assert wait_for(lambda: handshake_threads() == 0)
    assert not thread_errors, thread_errors
    link_and_send(make_env, lis, 561)


@pytest.mark.parametrize(
    "msg",
    [
        {"type": "ack", "seq": [1]},
        {"type": "ack", "seq": {"a": 1}},
        {"type": "key_remove", "key": 5, "seq": 1},
        {"type": "key_remove", "key": ["cache", "x"], "seq": 1},
        {"type": "cache_remove", "cache_id": True, "seq": 1},
        {"type": "cache_add", "cache": [], "seq": 1},
        {"type": "unlink", "seq": "1"},
    ],
)
def test_bad_messages_after_the_link_are_protocol_errors(make_env, thread_errors, caplog, msg):
    """A linked peer sending an ill-typed message is dropped as a protocol error: no traceback,
    no error logged, and the same cluster id links again."""
    lis = listening(make_env)
    raw = RawPeer(lis.dd.listen_port)
    try:
        assert raw.link(hello(562, LISTENER))["type"] == "welcome"
        assert wait_for(lambda: lis.dd._node.peer(562) is not None)
        with caplog.at_level(logging.INFO, logger="llmdist"):
            raw.send(msg)
            read_until_closed(raw.sock)
            assert wait_for(lambda: lis.dd._node.peer(562) is None)
    finally:
        raw.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert not thread_errors, thread_errors
    link_and_send(make_env, lis, 562)


@pytest.mark.parametrize(
    "field,value",
    [
        ("role", True),
        ("version", 2.0),
        ("runtime", 3),
        ("cluster_id", 563.0),
        ("want_engine", 1),
        ("want_engine", "yes"),
        ("host", 12),
        ("target", False),
        ("mooncake", 7),
        ("caches", {"0": 1}),
    ],
)
def test_hello_schema_is_strict(make_env, monkeypatch, field, value):
    """Ill-typed handshake fields are refused (true is not 1); nothing is started for them."""
    lis = listening(make_env)
    node = lis.dd._node
    started = []
    monkeypatch.setattr(node, "ensure_engine", lambda ip: started.append(ip))
    reply = first_reply(_forge(lis, hello(563, **{"target": LISTENER, field: value})))
    assert reply is not None and reply["type"] == "refuse", reply
    assert reply["code"] == int(LLMStatusCode.LLM_LINK_FAILED)
    assert not started and node.peer(563) is None


@pytest.mark.parametrize(
    "field,value", [("dtype", True), ("placement", False), ("blocks", 1), ("num_tensors", True)]
)
def test_cache_schema_is_strict(make_env, field, value):
    lis = listening(make_env)
    own = lis.allocated(2, [64], placement=Placement.HOST)
    wire = cluster.cache_to_wire(lis.cm._mem.entries[own.cache.cache_id])
    wire = dict(wire, share={"kind": "process"}, **{field: value})
    reply = first_reply(_forge(lis, hello(564, LISTENER, caches=[wire])))
    assert reply is None or reply["type"] == "refuse", reply
    assert lis.dd._node.peer(564) is None


def test_trickling_client_is_cut_at_the_handshake_deadline(make_env, monkeypatch):
    """One byte every 0.3 s never lets a per-read timeout expire; the handshake's total
    deadline (shortened to 1 s here) still ends it."""
    monkeypatch.setattr(cluster, "HANDSHAKE_TIMEOUT_S", 1.0)
    lis = listening(make_env)
    s = socket.create_connection((HOST, lis.dd.listen_port), timeout=5)
    data = frame(hello(565, LISTENER))
    t0 = time.monotonic()
    closed = False
    try:
        for b in data:
            try:
                s.sendall(bytes([b]))
            except OSError:
                closed = True
                break
            time.sleep(0.3)
            if time.monotonic() - t0 > 6:
                break
            s.settimeout(0.0)
            try:
                if s.recv(1) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
    finally:
        s.close()
    assert closed, "a client trickling its hello outlived the handshake deadline"
    assert lis.dd._node.peer(565) is None


def test_idle_connections_hold_a_bounded_number_of_threads(make_env):
    lis = listening(make_env)
    bound = getattr(cluster, "MAX_HANDSHAKES", 32)
    socks = [
        socket.create_connection((HOST, lis.dd.listen_port), timeout=5) for _ in range(3 * bound)
    ]
    try:
        # every connection has been accepted (or closed at once) by the time a late one is
        probe = socket.create_connection((HOST, lis.dd.listen_port), timeout=5)
        socks.append(probe)
        time.sleep(0.5)
        assert handshake_threads() <= bound
    finally:
        for s in socks:
            s.close()
    assert wait_for(lambda: handshake_threads() == 0)
    link_and_send(make_env, lis, 566)


def test_hello_with_thousands_of_caches_links(make_env):
    """A hello announcing 4,000 caches (process writes: nothing to map) is taken in whole."""
    lis = listening(make_env)
    base = 1 << 40
    caches = [
        {
            "id": i + 1,
            "num_tensors": 2,
            "shape": [64],
            "dtype": 4,
            "placement": 1,
            "batch_dim": 0,
            "seq_len_dim": -1,
            "blocks": False,
            "addrs": [base + 256 * i, base + 256 * i + 128],
            "origin": "registered",
            "remote_accessible": True,
            "keys": [],
            "share": {"kind": "process"},
        }
        for i in range(4000)
    ]
    raw = RawPeer(lis.dd.listen_port, unix=True, timeout=30)
    try:
        assert raw.link(hello(567, LISTENER), caches=caches)["type"] == "welcome"
        assert wait_for(lambda: lis.dd._node.peer(567) is not None)
        assert len(lis.dd._node.peer(567).mem.entries) == 4000
    finally:
        raw.close()
    assert wait_for(lambda: lis.dd._node.peer(567) is None)


# --------------------------------------------------------------------------------------------
# fuzzing the control protocol
# --------------------------------------------------------------------------------------------
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_fields = [
    "type",
    "version",
    "cluster_id",
    "role",
    "target",
    "host",
    "pid",
    "tgid",
    "runtime",
    "caches",
    "want_engine",
    "mooncake",
    "engine_error",
]


@st.composite
def _messages(draw):
    """Hellos with some fields replaced by arbitrary JSON, or arbitrary frames and bytes."""
    kind = draw(st.sampled_from(["hello", "frame", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "frame":
        return frame(json.dumps(draw(_json)).encode())
    msg = hello(draw(st.integers(570, 580)), LISTENER)
    for f in draw(st.lists(st.sampled_from(_fields), max_size=3, unique=True)):
        if draw(st.booleans()):
            msg[f] = draw(_json)
        else:
            msg.pop(f, None)
    return frame(json.dumps(msg).encode())


@pytest.fixture(scope="module")
def fuzz_listener():
    e = Env(
        cluster_id=LISTENER,
        role=LLMRole.DECODER,
        remote=True,
        extra_options={"llm.listenIpInfo": f"{HOST}:0"},
    )
    e.dd._node.ensure_engine = lambda ip: None  # no Mooncake engine for fuzzed hellos
    try:
        yield e
    finally:
        e.close()


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=_messages())
def test_fuzz_control_protocol(fuzz_listener, thread_errors, data):
    """Whatever a client sends, the listener answers with at most a refusal or a welcome,
    closes or keeps serving a valid link, and no thread dies of an exception."""
    lis = fuzz_listener
    s = socket.create_connection((HOST, lis.dd.listen_port), timeout=5)
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # dropped while still sending
        reply = first_reply(read_until_closed(s))
    finally:
        s.close()
    assert reply is None or reply["type"] in ("refuse", "welcome"), reply
    assert wait_for(lambda: handshake_threads() == 0 and not lis.dd._node.peers)
    assert not thread_errors, thread_errors


def test_listener_works_after_fuzzing(fuzz_listener, make_env):
    link_and_send(make_env, fuzz_listener, 590)


# --------------------------------------------------------------------------------------------
# the registry with thousands of caches
# --------------------------------------------------------------------------------------------
def test_registration_does_not_scan_the_registry(env, monkeypatch):
    """With 2,000 caches held, registering one more reads O(log n) region bounds, not all."""
    reads = [0]
    base = registry.Region

    def counted(slot):
        desc = getattr(base, slot)

        def get(self):
            reads[0] += 1
            return desc.__get__(self)

        return property(get, desc.__set__)

    counting = type(
        "CountingRegion",
        (base,),
        {"__slots__": (), "start": counted("start"), "end": counted("end")},
    )
    monkeypatch.setattr(registry, "Region", counting)
    buf = np.zeros(2001 * 4 * 64, dtype=np.uint8)
    addr = buf.ctypes.data
    desc = CacheDesc(4, [64], DataType.DT_UINT8, Placement.DEVICE)
    order = np.random.default_rng(3).permutation(2001)
    for k in order[:2000]:
        env.cm.register_cache(desc, [addr + (4 * int(k) + t) * 64 for t in range(4)])
    reads[0] = 0
    k = int(order[2000])
    env.cm.register_cache(desc, [addr + (4 * k + t) * 64 for t in range(4)])
    assert reads[0] < 200, f"registering one cache read {reads[0]} region bounds"
    env._keep.append(buf)


_ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "remove", "locate"]),
        st.integers(0, 63),
        st.integers(1, 4),
        st.integers(1, 3),
    ),
    max_size=120,
)


@settings(max_examples=60, deadline=None)
@given(ops=_ops)
def test_registry_matches_a_model(ops):
    """Adds, removes and lookups agree with a brute-force list of intervals, overlapping
    registrations included (chunks kept small here so that splitting and merging chunks are
    exercised)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "_CHUNK", 2)
        _registry_ops(ops)


def _registry_ops(ops) -> None:
    reg = registry.MemoryRegistry()
    model = {}  # cache id -> (cache, [(start, end)])
    next_id = [1]
    for op, slot, ntensors, tsize in ops:
        start = 1000 + slot * 16
        if op == "add":
            desc = CacheDesc(ntensors, [tsize * 4], DataType.DT_UINT8, Placement.DEVICE)
            addrs = [start + 5 * t * tsize for t in range(ntensors)]
            from llmdist.descs import Cache

            cache = Cache(next_id[0], desc, addrs, False)
            next_id[0] += 1
            spans = [(a, a + desc.size) for a in addrs]
            # tensors of one cache may not overlap; caches may overlap each other
            clash = any(
                spans[i][0] < spans[j][1] and spans[j][0] < spans[i][1]
                for i in range(len(spans))
                for j in range(i)
            )
            if clash:
                with pytest.raises(LLMException):
                    reg.add(cache, registry.REGISTERED)
            else:
                reg.add(cache, registry.REGISTERED)
                model[cache.cache_id] = (cache, spans)
        elif op == "remove" and model:
            cid = sorted(model)[slot % len(model)]
            reg.remove(model.pop(cid)[0])
        else:
            lo, hi = 0, tsize
            regions, bad = reg.locate([start, start + 3], lo, hi)
            want = []
            for a in (start, start + 3):
                hit = [
                    (c, s, e)
                    for c, sp in model.values()
                    for s, e in sp
                    if s <= a + lo and a + hi <= e
                ]
                want.append(hit[0] if hit else None)
            want_bad = next((i for i, w in enumerate(want) if w is None), -1)
            assert bad == want_bad
            for r, a in zip(regions[: bad if bad >= 0 else None], (start, start + 3)):
                # any region of a cache held that holds the range
                assert r.cache.cache_id in model
                assert (r.start, r.end) in model[r.cache.cache_id][1]
                assert r.start <= a + lo and a + hi <= r.end
        assert len(reg) == sum(len(sp) for _, sp in model.values())


# --------------------------------------------------------------------------------------------
# tasks in flight
# --------------------------------------------------------------------------------------------
def test_tasks_in_flight_are_bounded(make_env):
    """With llmdist.max_inflight_tasks=2 and two tasks blocked, a third is refused with
    LLM_LINK_BUSY naming the option; once they finish, submitting works again."""
    e = make_env(extra_options={"llmdist.max_inflight_tasks": "2"})
    src = e.allocated(2, [1, 64], placement=Placement.HOST)
    dst = e.allocated(2, [1, 64], placement=Placement.HOST)
    cfg = [TransferConfig(e.cluster_id, dst.addrs)]
    gate = GateSync(block_at=0)
    tasks = [e.cm.transfer_cache_async(src.cache, gate, cfg) for _ in range(2)]
    try:
        with pytest.raises(LLMException) as ei:
            e.cm.transfer_cache_async(src.cache, gate, cfg)
        assert ei.value.status_code == LLMStatusCode.LLM_LINK_BUSY
        assert "llmdist.max_inflight_tasks" in str(ei.value)
    finally:
        gate.release()
    assert [t.synchronize(10_000) for t in tasks] == [SUCCESS, SUCCESS]
    assert wait_for(lambda: not e.cm.transfers.inflight)
    assert e.cm.transfer_cache_async(src.cache, RecordingSync(), cfg).synchronize(10_000) == SUCCESS
    assert np.array_equal(host_view(dst.addrs[0], 64), src.tensor(0))


@pytest.mark.parametrize("text", ["0", "-1", "many", "1.5"])
def test_max_inflight_tasks_option_is_checked(make_env, text):
    with pytest.raises(LLMException) as ei:
        make_env(extra_options={"llmdist.max_inflight_tasks": text})
    assert ei.value.status_code == PARAM_INVALID
    assert "llmdist.max_inflight_tasks" in str(ei.value)


# --------------------------------------------------------------------------------------------
# the Mooncake engine
# --------------------------------------------------------------------------------------------
def test_engine_start_failure_is_retried(make_env, monkeypatch):
    """A failed start of the Mooncake engine is reported, and not kept for the cluster's life:
    the next link that needs the engine starts it."""
    from llmdist import transport_mooncake

    e = make_env()
    node = e.dd._node
    attempts = []

    class FlakyEngine:
        session_id = "127.0.0.1:1"

        def __init__(self, local_ip):
            attempts.append(local_ip)
            if len(attempts) == 1:
                raise LLMException(
                    "the engine did not start", status_code=LLMStatusCode.LLM_FEATURE_NOT_ENABLED
                )

        def register(self, *args):
            pass

        def unregister(self, *args):
            pass

        def close(self):
            pass

    monkeypatch.setattr(transport_mooncake, "MooncakeTransport", FlakyEngine)
    node.ensure_engine(HOST)
    assert node.engine is None and "did not start" in node.engine_error
    node.ensure_engine(HOST)
    assert isinstance(node.engine, FlakyEngine) and node.engine_error is None
    node.ensure_engine(HOST)
    assert len(attempts) == 2
