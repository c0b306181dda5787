"""What a peer, or a client of the listener port, can cost a cluster is bounded: silent peers
cost one ack deadline per announcement, idle connections cannot keep handshakes out, announce
floods hit per-peer caps, a comm hello is refused off the rendezvous port, and local pull/push
refuse overlapping or doubly written blocks (the bounds of docs/api.md's llmdist.* options)."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import List, Optional

import pytest

from llmdist import (
    BlocksCacheKey,
    LLMClusterInfo,
    LLMException,
    LLMRole,
    LLMStatusCode,
    Placement,
)
from llmdist.descs import CacheDesc, DataType

from .helpers import ROOT, SUCCESS, Env, wait_for
from .raw_protocol import RawPeer, frame, hello, read_frame, recv_msg
from .runtime_params import fake_cuda_env

HOST = "127.0.0.1"
LISTENER = 900
ACK_S = 2.0  # the default of llmdist.ack_timeout_ms
SLACK_S = 2.0  # a loaded test machine
PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID


def connect(port: int) -> socket.socket:
    """A TCP connection to the listener, its challenge read."""
    peer = RawPeer(port)
    assert peer.challenge is not None, "the listener sent no challenge"
    return peer.sock


def open_link(
    port: int, cid: int, target: Optional[int] = LISTENER, unix: bool = False, **over
) -> socket.socket:
    """A raw client linked (over TCP, or the Unix socket): challenge, hello, welcome, our
    caches (over["caches"]), and the listener's acknowledgement of them."""
    caches = over.pop("caches", [])
    peer = RawPeer(port, unix=unix)
    reply = peer.link(hello(cid, target, **over), caches)
    assert reply["type"] == "welcome", reply
    return peer.sock


@pytest.fixture
def envs(make_env):
    """Factory of remote-accessible clusters in this process (listening when told)."""

    def factory(
        cluster_id: int, role: LLMRole = LLMRole.PROMPT, listen: bool = False, **options: str
    ) -> Env:
        extra = dict(options)
        if listen:
            extra["llm.listenIpInfo"] = f"{HOST}:0"
        return make_env(cluster_id=cluster_id, role=role, remote=True, extra_options=extra)

    return factory


def info(env: Env) -> LLMClusterInfo:
    i = LLMClusterInfo()
    i.remote_cluster_id = env.cluster_id
    i.append_remote_ip_info(HOST, env.dd.listen_port)
    return i


def listener(envs, **options: str) -> Env:
    return envs(LISTENER, LLMRole.DECODER, listen=True, **options)


# --------------------------------------------------------------------------------------------
# N5: silent peers cost one ack deadline
# --------------------------------------------------------------------------------------------
def silent_peers(lis: Env, ids) -> List[socket.socket]:
    """Raw clients that complete the handshake, then never read or acknowledge anything."""
    socks = []
    for cid in ids:
        socks.append(open_link(lis.dd.listen_port, cid))
    assert wait_for(lambda: all(lis.dd._node.peer(c) is not None for c in ids))
    return socks


def test_silent_peers_cost_one_ack_deadline(envs, caplog):
    lis = listener(envs)
    node = lis.dd._node
    good = envs(901)
    assert good.dd.link_clusters([info(lis)], 5000) == (SUCCESS, [SUCCESS])
    seen_by_good = good.dd._node.peer(LISTENER).mem.entries
    desc = CacheDesc(2, [4, 64], DataType.DT_UINT8, Placement.HOST)
    socks: List[socket.socket] = []
    try:
        with caplog.at_level(logging.WARNING, logger="llmdist"):
            socks += silent_peers(lis, [911, 912, 913])
            t0 = time.monotonic()
            cache = lis.cm.allocate_blocks_cache(desc, BlocksCacheKey(LISTENER, 1))
            took_alloc = time.monotonic() - t0
            assert took_alloc < ACK_S + SLACK_S, took_alloc  # 30 s before (10 s per peer)
            assert cache.cache_id in seen_by_good  # announced to the peer that acks
            assert all(node.peer(c) is None for c in (911, 912, 913))
            assert sum("did not acknowledge" in r.getMessage() for r in caplog.records) == 3

            socks += silent_peers(lis, [921, 922, 923])
            t0 = time.monotonic()
            lis.cm.deallocate_blocks_cache(cache)
            took_dealloc = time.monotonic() - t0
            assert took_dealloc < ACK_S + SLACK_S, took_dealloc  # 30 s before
            assert cache.cache_id not in seen_by_good  # withdrawn from it too
            assert all(node.peer(c) is None for c in (921, 922, 923))
            assert node.peer(901) is not None

            socks += silent_peers(lis, [931, 932, 933])
            t0 = time.monotonic()
            lis.dd.finalize()
            took_finalize = time.monotonic() - t0
    finally:
        for s in socks:
            s.close()
    assert took_finalize < ACK_S + SLACK_S, took_finalize  # 10 s before
    print(
        f"with 3 silent peers: allocate {took_alloc:.2f} s, deallocate {took_dealloc:.2f} s, "
        f"finalize {took_finalize:.2f} s"
    )
    # the peer that acknowledged saw the unlink of finalize
    assert wait_for(lambda: good.dd._node.peer(LISTENER) is None)


def test_ack_timeout_option_is_checked():
    for bad in ("0", "-5", "2s", "1e3", "600001"):
        with pytest.raises(LLMException) as exc:
            Env(cluster_id=902, extra_options={"llmdist.ack_timeout_ms": bad})
        assert exc.value.status_code == PARAM_INVALID
        assert "llmdist.ack_timeout_ms" in str(exc.value) and "[1, 600000]" in str(exc.value)


def test_ack_timeout_option_sets_the_deadline(envs):
    lis = listener(envs, **{"llmdist.ack_timeout_ms": "300"})
    socks = silent_peers(lis, [941])
    try:
        t0 = time.monotonic()
        lis.allocated(2, [4, 64], placement=Placement.HOST)
        took = time.monotonic() - t0
    finally:
        for s in socks:
            s.close()
    assert lis.dd._node.peer(941) is None
    assert 0.25 < took < 0.3 + SLACK_S, took


# --------------------------------------------------------------------------------------------
# N6: idle connections cannot keep a link out
# --------------------------------------------------------------------------------------------
class IdleHolder:
    """Holds count idle connections to port from source address ip, opening a new one for
    each the listener closes."""

    def __init__(self, port: int, ip: str, count: int) -> None:
        self.port, self.ip, self.count = port, ip, count
        self.stop = threading.Event()
        self.opened = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> Optional[socket.socket]:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((self.ip, 0))
            s.connect((HOST, self.port))
        except OSError:
            s.close()
            return None
        self.opened += 1
        return s

    def _run(self) -> None:
        socks = [s for s in (self._open() for _ in range(self.count)) if s is not None]
        try:
            while not self.stop.is_set():
                for i, s in enumerate(socks):
                    s.setblocking(False)
                    try:
                        gone = s.recv(1) == b""
                    except BlockingIOError:
                        gone = False
                    except OSError:
                        gone = True
                    if gone:
                        s.close()
                        socks[i] = self._open() or s
                time.sleep(0.005)
        finally:
            for s in socks:
                s.close()

    def __enter__(self) -> "IdleHolder":
        self.thread.start()
        time.sleep(0.5)  # all of them connected
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.mark.parametrize("attacker_ip", ["127.0.0.2", HOST], ids=["other-address", "same-address"])
def test_links_succeed_while_a_client_holds_idle_connections(envs, attacker_ip):
    lis = listener(envs)
    good = envs(950)
    runs = 20
    ok = 0
    with IdleHolder(lis.dd.listen_port, attacker_ip, 36) as holder:
        for _ in range(runs):
            code, codes = good.dd.link_clusters([info(lis)], 5000)
            if code == SUCCESS and codes == [SUCCESS]:
                ok += 1
                i = LLMClusterInfo()
                i.remote_cluster_id = LISTENER
                assert good.dd.unlink_clusters([i], 5000, force=True)[0] == SUCCESS
                assert wait_for(lambda: lis.dd._node.peer(950) is None)
    print(
        f"links under attack from {attacker_ip}: {ok}/{runs}, idle connections opened: "
        f"{holder.opened}"
    )
    assert ok == runs, f"{ok} of {runs} links succeeded"


# --------------------------------------------------------------------------------------------
# N11: pull/push within one cluster: no byte read is written, no block written twice
# --------------------------------------------------------------------------------------------
BLOCK = 64  # bytes per block of the caches below: shape [8, 64] of DT_UINT8


def refused(fn, *args, **kwargs) -> str:
    with pytest.raises(LLMException) as exc:
        fn(*args, **kwargs)
    assert exc.value.status_code == PARAM_INVALID, exc.value
    return str(exc.value)


def unchanged(tc, snapshot) -> bool:
    return all((x == y).all() for x, y in zip(tc.tensor_bytes(), snapshot))


def test_local_pull_push_refuse_overlap_and_double_writes(envs):
    from llmdist import CacheKeyByIdAndIndex

    me = 960
    e = envs(me)
    a = e.allocated(2, [8, BLOCK], placement=Placement.HOST, blocks=True, key=BlocksCacheKey(me, 1))
    b = e.allocated(2, [8, BLOCK], placement=Placement.HOST, blocks=True, key=BlocksCacheKey(me, 2))
    rows = e.allocated(2, [4, BLOCK], placement=Placement.HOST)
    before = [a.tensor_bytes(), b.tensor_bytes(), rows.tensor_bytes()]
    key_a = BlocksCacheKey(me, 1)
    # a cache read and written at the same blocks
    msg = refused(e.cm.pull_blocks, key_a, a.cache, [0, 1], [1, 2])
    assert msg.startswith("pull_blocks: src_blocks and dst_blocks: ") and "overlap" in msg
    msg = refused(e.cm.push_blocks, key_a, a.cache, [0, 1], [1, 2])
    assert msg.startswith("push_blocks: src_blocks and dst_blocks: ") and "overlap" in msg
    # a row read and written at once
    row_key = CacheKeyByIdAndIndex(me, rows.cache.cache_id, 1)
    msg = refused(e.cm.pull_cache, row_key, rows.cache, 1)
    assert msg.startswith("pull_cache: the source row and batch_index: ") and "overlap" in msg
    msg = refused(e.cm.push_cache, row_key, rows.cache, 1)
    assert msg.startswith("push_cache: src_batch_index and the destination row: "), msg
    # a destination block written twice, even from another cache
    msg = refused(e.cm.pull_blocks, key_a, b.cache, [0, 1], [3, 3])
    assert msg == "dst_blocks: destination block 3 is written twice", msg
    msg = refused(e.cm.push_blocks, key_a, b.cache, [0, 1], [5, 5])
    assert msg == "dst_blocks: destination block 5 is written twice", msg
    for tc, was in zip((a, b, rows), before):
        assert unchanged(tc, was)
    # disjoint blocks of one cache still move
    e.cm.pull_blocks(key_a, a.cache, [0, 1], [4, 5])
    e.cm.push_blocks(key_a, a.cache, [2], [6])
    for t in range(2):
        got, was = a.tensor(t), before[0][t]
        assert (got[4 * BLOCK : 6 * BLOCK] == was[0 : 2 * BLOCK]).all()
        assert (got[6 * BLOCK : 7 * BLOCK] == was[2 * BLOCK : 3 * BLOCK]).all()
        assert (got[: 4 * BLOCK] == was[: 4 * BLOCK]).all()


def test_pull_push_with_a_peer_refuse_double_writes(envs):
    lis = listener(envs)
    pre = envs(961)
    assert pre.dd.link_clusters([info(lis)], 5000) == (SUCCESS, [SUCCESS])
    there = lis.allocated(
        2, [8, BLOCK], placement=Placement.HOST, blocks=True, key=BlocksCacheKey(LISTENER, 7)
    )
    here = pre.allocated(2, [8, BLOCK], placement=Placement.HOST, blocks=True)
    snap_there, snap_here = there.tensor_bytes(), here.tensor_bytes()
    key = BlocksCacheKey(LISTENER, 7)
    msg = refused(pre.cm.push_blocks, key, here.cache, [0, 1], [2, 2])
    assert msg == "dst_blocks: destination block 2 is written twice", msg
    msg = refused(pre.cm.pull_blocks, key, here.cache, [0, 1], [4, 4])
    assert msg == "dst_blocks: destination block 4 is written twice", msg
    assert unchanged(there, snap_there) and unchanged(here, snap_here)
    pre.cm.push_blocks(key, here.cache, [0, 1], [2, 3])  # distinct blocks move
    for t in range(2):
        assert (there.tensor(t)[2 * BLOCK : 4 * BLOCK] == snap_here[t][: 2 * BLOCK]).all()


# --------------------------------------------------------------------------------------------
# N9: announce floods hit per-peer caps; the listener stays bounded and serves others
# --------------------------------------------------------------------------------------------
FLOODED = 980


class ChildListener:
    """tests/bounds_listener.py in a process of its own (its peak memory is its own)."""

    def __init__(self, **options: str) -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bounds_listener", str(FLOODED), json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.port = int(self.proc.stdout.readline())

    def ask(self, cmd: str):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(20)
        except (OSError, ValueError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def child_listener():
    made: List[ChildListener] = []

    def factory(**options: str) -> ChildListener:
        c = ChildListener(**options)
        made.append(c)
        return c

    try:
        yield factory
    finally:
        for c in made:
            c.close()


def wire_cache(i: int) -> dict:
    """A peer cache written by process writes (nothing is mapped for it), at its own address."""
    base = (1 << 40) + 256 * i
    return {
        "id": 10_000 + i,
        "num_tensors": 2,
        "shape": [64],
        "dtype": 4,
        "placement": 1,
        "batch_dim": 0,
        "seq_len_dim": -1,
        "blocks": False,
        "addrs": [base, base + 128],
        "origin": "registered",
        "remote_accessible": True,
        "keys": [],
        "share": {"kind": "process"},
    }


class FloodingPeer:
    """A raw client linked to a listener, counting the acks it gets back."""

    def __init__(self, port: int, cid: int, target: int, **over) -> None:
        # on the Unix socket: a peer of this host, whose caches are reached by process
        # writes (a TCP peer counts as another host's, for which a Mooncake engine starts)
        self.sock = open_link(port, cid, target, unix=True, **over)
        self.acks = 0
        self.closed = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            self.sock.settimeout(None)
            while read_frame(self.sock)["type"] == "ack":
                self.acks += 1
        except (ConnectionError, OSError, ValueError):
            pass
        self.closed.set()

    def flood(self, frames) -> int:
        """Send the frames (in a thread of their own); how many went out before the end."""
        sent = 0
        try:
            for f in frames:
                self.sock.sendall(f)
                sent += 1
        except OSError:
            pass
        return sent


def push_and_check(child: ChildListener, cid: int, envs) -> None:
    """A legitimate peer links to the child listener and its bytes arrive there."""
    pre = envs(cid)
    i = LLMClusterInfo()
    i.remote_cluster_id = FLOODED
    i.append_remote_ip_info(HOST, child.port)
    assert pre.dd.link_clusters([i], 5000) == (SUCCESS, [SUCCESS])
    src = pre.allocated(2, [4, 64], placement=Placement.HOST, blocks=True)
    pre.cm.push_blocks(BlocksCacheKey(FLOODED, 1), src.cache, [0, 1], [2, 3])
    got = bytes.fromhex(child.ask("read"))
    assert got[128:256] == src.tensor(0)[:128].tobytes()


def test_cache_add_flood_is_capped(child_listener, envs):
    child = child_listener(**{"llmdist.max_peer_caches": "1000"})
    start = child.ask("stat")
    flooder = FloodingPeer(child.port, 981, FLOODED)
    frames = [
        frame({"type": "cache_add", "cache": wire_cache(i), "seq": i + 1}) for i in range(20_000)
    ]
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("sent", flooder.flood(frames)), daemon=True)
    t.start()
    push_and_check(child, 982, envs)  # served while the flood goes on
    assert flooder.closed.wait(30), "the flooding peer was not unlinked"
    t.join(10)
    flooder.sock.close()
    end = child.ask("stat")
    assert str(981) not in end["peers"]
    assert flooder.acks <= 1000  # acknowledged caches: at most the cap
    grew_mb = (end["hwm_kb"] - start["hwm_kb"]) / 1024
    print(
        f"cache_add flood: {out.get('sent')} frames sent, {flooder.acks} acknowledged, "
        f"listener peak memory +{grew_mb:.1f} MB"
    )
    assert grew_mb < 40, grew_mb


def test_huge_hello_is_refused_unread(child_listener, envs):
    child = child_listener()
    start = child.ask("stat")
    data = frame(hello(983, FLOODED, caches=[wire_cache(i) for i in range(50_000)]))
    assert len(data) > 12 << 20
    s = connect(child.port)
    try:
        try:
            s.sendall(data)
        except OSError:
            pass  # closed while still sending
        assert recv_msg(s, 10) is None  # no welcome: closed
    finally:
        s.close()
    end = child.ask("stat")
    assert str(983) not in end["peers"]
    grew_mb = (end["hwm_kb"] - start["hwm_kb"]) / 1024
    print(f"12.9 MiB hello: listener peak memory +{grew_mb:.1f} MB")
    assert grew_mb < 30, grew_mb
    push_and_check(child, 984, envs)


def test_hello_over_the_cache_cap_is_refused(envs):
    lis = listener(envs, **{"llmdist.max_peer_caches": "100"})
    s = connect(lis.dd.listen_port)
    try:
        s.sendall(frame(hello(985, LISTENER)))
        assert recv_msg(s)["type"] == "welcome"
        s.sendall(frame({"type": "caches", "caches": [wire_cache(i) for i in range(101)]}))
        assert recv_msg(s) is None
    finally:
        s.close()
    assert lis.dd._node.peer(985) is None
    ok = FloodingPeer(lis.dd.listen_port, 986, LISTENER, caches=[wire_cache(i) for i in range(100)])
    try:
        assert wait_for(lambda: lis.dd._node.peer(986) is not None)
        assert len(lis.dd._node.peer(986).mem.entries) == 100
    finally:
        ok.sock.close()


def test_key_cap(envs):
    lis = listener(envs, **{"llmdist.max_peer_keys": "10"})
    peer = FloodingPeer(lis.dd.listen_port, 987, LISTENER)
    try:
        for i in range(3):
            w = dict(wire_cache(i), keys=[["cache", 987, 4 * i + j, 1, 0] for j in range(4)])
            peer.sock.sendall(frame({"type": "cache_add", "cache": w, "seq": i + 1}))
        assert peer.closed.wait(10), "a peer over the key cap stayed linked"
        assert peer.acks == 2  # 8 keys taken, the next 4 over the cap of 10
    finally:
        peer.sock.close()
    assert lis.dd._node.peer(987) is None


def test_frame_rate_is_bounded(envs):
    rate = 200
    lis = listener(envs, **{"llmdist.peer_frame_rate": str(rate)})
    peer = FloodingPeer(lis.dd.listen_port, 988, LISTENER)
    frames = [
        frame({"type": "key_remove", "key": ["blocks", 988, i], "seq": i + 1})
        for i in range(20_000)
    ]
    t0 = time.monotonic()
    threading.Thread(target=peer.flood, args=(frames,), daemon=True).start()
    time.sleep(2.0)
    acks, elapsed = peer.acks, time.monotonic() - t0
    peer.sock.close()
    print(f"frame flood: {acks} frames served in {elapsed:.2f} s at a rate of {rate}/s")
    # a burst of `rate` frames, then `rate` a second (a slower machine serves fewer)
    assert acks <= rate + rate * elapsed + 20, (acks, elapsed)
    link_ok = envs(989).dd.link_clusters([info(lis)], 5000)
    assert link_ok == (SUCCESS, [SUCCESS])


# --------------------------------------------------------------------------------------------
# No cache manager lock across a device-IPC readiness wait (fake CUDA runtime)
# --------------------------------------------------------------------------------------------
def test_ipc_readiness_wait_does_not_stall_the_cluster(fake_cuda):
    import subprocess
    import sys

    env = dict(os.environ, **fake_cuda_env(fake_cuda))
    env.pop("LLMDIST_RUNTIME", None)
    res = subprocess.run(
        [sys.executable, "-m", "tests.bounds_ipc_wait"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"while a push waited for ipc_ready: {got}")
    # the push waits for the confirmation (10 s) and fails without it ...
    assert got["push_was_waiting"], got
    assert got["push"]["result"] == "LLM_LINK_FAILED" and got["push"]["s"] > 5, got
    # ... but allocation and a local pull of the same cluster go on meanwhile (10 s before)
    assert got["alloc_s"] < 3 and got["pull_s"] < 3, got


# --------------------------------------------------------------------------------------------
# N10: a comm hello only on the rendezvous port
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("role", [LLMRole.PROMPT, LLMRole.DECODER])
def test_comm_hello_is_refused_off_the_rendezvous_port(envs, role):
    """A hello naming a rank-table comm used to skip the role check on any listener (a PROMPT
    welcomed by a PROMPT); an ordinary listener now refuses it, whatever the roles."""
    lis = envs(LISTENER, role, listen=True)
    s = connect(lis.dd.listen_port)
    try:
        s.sendall(frame(hello(992, LISTENER, comm="comm-a")))
        reply = recv_msg(s)
    finally:
        s.close()
    assert reply is not None and reply["type"] == "refuse", reply
    assert reply["code"] == int(LLMStatusCode.LLM_LINK_FAILED)
    assert "rendezvous port" in reply["reason"], reply
    assert lis.dd._node.peer(992) is None


def test_acks_of_our_own_requests_are_not_rate_limited(envs):
    """A cluster limited to 10 frames a second from each peer still announces 50 caches in a
    row at full speed: the acks it awaits do not count against the rate."""
    lis = listener(envs, **{"llmdist.peer_frame_rate": "10"})
    pre = envs(993)
    assert pre.dd.link_clusters([info(lis)], 5000) == (SUCCESS, [SUCCESS])
    seen = pre.dd._node.peer(LISTENER).mem.entries
    t0 = time.monotonic()
    made = [lis.allocated(2, [4, 64], placement=Placement.HOST) for _ in range(50)]
    took = time.monotonic() - t0
    assert all(tc.cache.cache_id in seen for tc in made)
    assert lis.dd._node.peer(993) is not None
    assert took < 3.0, took  # 50 acks at 10 a second would take 4 s or more
