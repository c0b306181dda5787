"""Security of links: the shared key (mutual authentication, authenticated frames), identity from
the kernel without a key (SO_PEERCRED over the listener's Unix socket), shared memory as sealed
memfds, keyed rank-table comms, and bounded resources per link."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from llmdist import (
    BlocksCacheKey,
    LLMClusterInfo,
    LLMException,
    LLMRole,
    LLMStatusCode,
    Placement,
    RegisterMemStatus,
    _core,
    auth,
    cluster,
)
from llmdist.shares import ShareKind

from .helpers import ROOT, SUCCESS, Env, llmdist_shm_names, wait_for
from .raw_protocol import RawPeer, frame
from .rendezvous import free_rendezvous_base, one_server_table, rendezvous_options

HOST = "127.0.0.1"
LINK_FAILED = LLMStatusCode.LLM_LINK_FAILED
KEY = "key-of-the-test-deployment"
BLOCKS, BLOCK_BYTES = 4, 1024


def listener(make_env, cluster_id: int = 31, key=None, role=LLMRole.DECODER, **opts) -> Env:
    extra = {"llm.listenIpInfo": f"{HOST}:0", **opts}
    if key is not None:
        extra["llmdist.auth_key"] = key
    return make_env(cluster_id=cluster_id, role=role, remote=True, extra_options=extra)


def linker(make_env, cluster_id: int, key=None, **opts) -> Env:
    extra = dict(opts)
    if key is not None:
        extra["llmdist.auth_key"] = key
    return make_env(cluster_id=cluster_id, role=LLMRole.PROMPT, remote=True, extra_options=extra)


def info_of(env: Env) -> LLMClusterInfo:
    info = LLMClusterInfo()
    info.remote_cluster_id = env.cluster_id
    info.append_remote_ip_info(HOST, env.dd.listen_port)
    return info


def blocks_cache(env: Env, model: int):
    return env.allocated(
        2,
        [BLOCKS, BLOCK_BYTES],
        placement=Placement.HOST,
        blocks=True,
        key=BlocksCacheKey(env.cluster_id, model),
    )


# --------------------------------------------------------------------------------------------
# the shared key
# --------------------------------------------------------------------------------------------
def test_keyed_pair_transfers_and_strangers_get_nothing(make_env, caplog):
    """Both sides keyed: the link works and blocks move both ways. A stranger without the key,
    or with another key, cannot link (LLM_LINK_FAILED, logged as authentication on both sides),
    so it reaches nothing of the listener: its pull finds no link and its cache stays as it was."""
    lis = listener(make_env, key=KEY)
    src = blocks_cache(lis, 1)
    pre = linker(make_env, 41, key=KEY)
    assert pre.dd.link_clusters([info_of(lis)], 5000) == (SUCCESS, [SUCCESS])
    dst = blocks_cache(pre, 1)
    pre.cm.pull_blocks(BlocksCacheKey(lis.cluster_id, 1), dst.cache, [0, 1, 2, 3], [3, 2, 1, 0])
    for i in range(2):
        got, want = dst.tensor(i).reshape(BLOCKS, -1), src.tensor(i).reshape(BLOCKS, -1)
        assert np.array_equal(got, want[::-1])
    for n, key in enumerate((None, "another key")):
        stranger = linker(make_env, 50 + n, key=key)
        mine = blocks_cache(stranger, 1)
        before = [mine.tensor(i).copy() for i in range(2)]
        with caplog.at_level(logging.INFO, logger="llmdist"):
            caplog.clear()
            assert stranger.dd.link_clusters([info_of(lis)], 3000) == (LINK_FAILED, [LINK_FAILED])
            assert wait_for(
                lambda: any(
                    "refused a connection: AuthError" in r.getMessage() for r in caplog.records
                )
            )
        mine_log = [
            r.getMessage()
            for r in caplog.records
            if r.getMessage().startswith(f"link to cluster {lis.cluster_id} ")
            and " failed" in r.getMessage()
        ]
        assert mine_log and "authentication" in mine_log[0], mine_log
        refused = [r for r in caplog.records if "refused a connection" in r.getMessage()]
        assert len(refused) == 1, [r.getMessage() for r in refused]
        assert stranger.cluster_id not in lis.dd._node.peers
        with pytest.raises(LLMException) as ei:
            stranger.cm.pull_blocks(BlocksCacheKey(lis.cluster_id, 1), mine.cache, [0], [0])
        assert ei.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK
        assert all(np.array_equal(mine.tensor(i), before[i]) for i in range(2))


def test_keyed_linker_refuses_a_keyless_listener(make_env, caplog):
    """The key is mutual: a keyed linker does not link to a listener without the key."""
    lis = listener(make_env)
    pre = linker(make_env, 42, key=KEY)
    with caplog.at_level(logging.INFO, logger="llmdist"):
        assert pre.dd.link_clusters([info_of(lis)], 3000) == (LINK_FAILED, [LINK_FAILED])
    assert any("authentication" in r.getMessage() for r in caplog.records)
    assert not lis.dd._node.peers and not pre.dd._node.peers


def _keyed_hello(key: bytes, nl: bytes, cid: int) -> bytes:
    """A keyed hello frame as a client holding key would send it after challenge nonce nl."""
    msg = {
        "type": "hello",
        "version": cluster.PROTOCOL_VERSION,
        "cluster_id": cid,
        "role": int(LLMRole.PROMPT),
        "target": None,
        "host": "elsewhere",
        "caches": [],
        "nonce": secrets.token_hex(auth.NONCE),
    }
    data = json.dumps(msg).encode()
    out = auth._Direction()
    out.set(key, auth.hello_context(nl))
    return auth.KEYED_MAGIC + struct.pack(">I", len(data)) + data + out.tag(data)


@pytest.mark.parametrize("attack", ["unkeyed-hello", "forged-tag", "other-key", "replayed-hello"])
def test_raw_clients_without_the_key_are_refused(make_env, attack):
    """Raw protocol against a keyed listener: a hello without a MAC, with a made-up tag, under
    another key, or a valid hello replayed on a new connection (another challenge) is refused;
    nothing links and a keyed client links afterwards."""
    lis = listener(make_env, key=KEY)
    raw = RawPeer(lis.dd.listen_port)
    assert raw.challenge["auth"] is True
    nl = bytes.fromhex(raw.challenge["nonce"])
    if attack == "unkeyed-hello":
        wire = frame(
            {
                "type": "hello",
                "version": cluster.PROTOCOL_VERSION,
                "cluster_id": 60,
                "role": int(LLMRole.PROMPT),
                "target": None,
                "host": "x",
                "caches": [],
            }
        )
    elif attack == "forged-tag":
        wire = _keyed_hello(KEY.encode(), nl, 60)[: -auth.TAG] + secrets.token_bytes(auth.TAG)
    elif attack == "other-key":
        wire = _keyed_hello(b"not the key", nl, 60)
    else:
        # a hello that was valid on one connection, sent again on a second one
        wire = _keyed_hello(KEY.encode(), nl, 60)
        raw.sock.sendall(wire)
        assert raw.recv()["type"] == "welcome"  # the proper use
        raw.close()
        raw = RawPeer(lis.dd.listen_port)
        assert wait_for(lambda: 60 not in lis.dd._node.peers)
    try:
        raw.sock.sendall(wire)
        reply = raw.recv()
        assert reply == {
            "type": "refuse",
            "code": int(LINK_FAILED),
            "reason": "authentication failed",
        }, reply
        with pytest.raises((ConnectionError, OSError)):
            raw.recv()
    finally:
        raw.close()
    assert 60 not in lis.dd._node.peers
    pre = linker(make_env, 61, key=KEY)
    assert pre.dd.link_clusters([info_of(lis)], 5000) == (SUCCESS, [SUCCESS])


def _keyed_pair():
    a, b = socket.socketpair()
    ca, cb = auth.Channel(a), auth.Channel(b)
    k1, k2 = secrets.token_bytes(32), secrets.token_bytes(32)
    ca.out.set(k1), cb.into.set(k1)
    cb.out.set(k2), ca.into.set(k2)
    return ca, cb


@pytest.mark.parametrize("attack", ["injected", "replayed", "reordered", "reflected"])
def test_session_frames_cannot_be_injected_replayed_or_reordered(attack):
    """After the handshake every frame carries a MAC over its sequence number under a key of its
    direction: an unkeyed frame, a frame sent again, frames swapped, or a frame sent back to its
    sender are refused as AuthError."""
    ca, cb = _keyed_pair()

    def frame_bytes() -> bytes:
        """One frame as it crossed the socket (read raw on b's side)."""
        head = cb.sock.recv(8, socket.MSG_WAITALL)
        (n,) = struct.unpack(">I", head[4:])
        return head + cb.sock.recv(n + auth.TAG, socket.MSG_WAITALL)

    ca.send({"type": "ack", "seq": 1})
    first = frame_bytes()
    ca.send({"type": "ack", "seq": 2})
    second = frame_bytes()
    if attack == "injected":
        wire = frame({"type": "unlink", "seq": 3})
    elif attack == "replayed":
        wire = first + first
    elif attack == "reordered":
        wire = second + first
    else:
        # what a sent to b, turned back to a as if b had sent it
        wire = first
    # b's channel has not taken either frame yet (they were read raw): it expects the first
    target = ca if attack == "reflected" else cb
    peer_sock = cb.sock if attack == "reflected" else ca.sock
    peer_sock.sendall(wire)
    with pytest.raises(auth.AuthError):
        target.recv(time.monotonic() + 5)
        target.recv(time.monotonic() + 5)


def test_session_frames_arrive_in_order():
    ca, cb = _keyed_pair()
    for i in range(5):
        ca.send({"type": "ack", "seq": i})
    assert [cb.recv(time.monotonic() + 5)[0]["seq"] for _ in range(5)] == list(range(5))


def test_key_file_must_be_private(make_env, tmp_path):
    """llmdist.auth_key_file: a file readable by group or others is refused, naming the option
    and the rule; a private file works as the key; LLMDIST_AUTH_KEY works too."""
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    os.chmod(path, 0o640)
    with pytest.raises(LLMException) as ei:
        Env(cluster_id=70, extra_options={"llmdist.auth_key_file": str(path)})
    assert ei.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    assert "llmdist.auth_key_file" in str(ei.value) and "group or others" in str(ei.value)
    os.chmod(path, 0o600)
    lis = listener(make_env, 71, **{"llmdist.auth_key_file": str(path)})
    pre = linker(make_env, 72, key=KEY)
    assert pre.dd.link_clusters([info_of(lis)], 5000) == (SUCCESS, [SUCCESS])
    os.environ[auth.ENV_KEY] = KEY
    try:
        by_env = linker(make_env, 73)
    finally:
        del os.environ[auth.ENV_KEY]
    assert by_env.dd.link_clusters([info_of(lis)], 5000) == (SUCCESS, [SUCCESS])


# --------------------------------------------------------------------------------------------
# without a key: identity from the kernel
# --------------------------------------------------------------------------------------------
BYSTANDER = textwrap.dedent("""
    import ctypes, os, sys
    buf = ctypes.create_string_buffer(os.urandom(%d), %d)
    print(os.getpid(), ctypes.addressof(buf), buf.raw.hex(), flush=True)
    sys.stdin.readline()
    print(buf.raw.hex(), flush=True)
""")

RAW_CLIENT = textwrap.dedent("""
    import encodings.idna, json, os, socket, sys
    from tests.raw_protocol import RawPeer
    port, unix, uid, hello, caches = json.loads(sys.argv[1])
    if uid is not None:
        os.setgid(uid)
        os.setuid(uid)
    raw = RawPeer(port, unix=unix)
    reply = raw.link(hello, caches)
    print(reply["type"], flush=True)
    try:
        while True:                 # acknowledge whatever the listener asks
            msg = raw.recv()
            if msg.get("seq"):
                raw.send({"type": "ack", "seq": msg["seq"]})
    except (ConnectionError, OSError):
        pass
""")


@pytest.fixture
def bystander():
    """A process that does not use llmdist, holding a buffer of known random bytes."""
    size = 2 * BLOCKS * BLOCK_BYTES
    p = subprocess.Popen(
        [sys.executable, "-c", BYSTANDER % (size, size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    pid, addr, data = p.stdout.readline().split()

    class B:
        pass

    b = B()
    b.pid, b.addr, b.data, b.size = int(pid), int(addr), bytes.fromhex(data), size

    def final() -> bytes:
        p.stdin.write("\n")
        p.stdin.flush()
        return bytes.fromhex(p.stdout.readline().strip())

    b.final = final
    yield b
    p.kill()
    p.wait()


@pytest.mark.parametrize("how", ["tcp", "unix-same-uid", "unix-other-uid"])
def test_claimed_pid_and_addresses_reach_nothing_of_a_bystander(make_env, bystander, how):
    """A raw client claims a cluster id plus the pid and addresses of a bystander process. The
    listener's pull_blocks and push_blocks on that 'cache' read none of the bystander's bytes
    and write none of them: process transfers go only to the pid the kernel named for the
    connection, of our uid (over TCP or from another uid there is no process route)."""
    if how == "unix-other-uid" and os.geteuid() != 0:
        pytest.skip("starting a process of another uid needs root")
    lis = listener(make_env, 32)
    dst = blocks_cache(lis, 1)
    src = blocks_cache(lis, 2)
    half = bystander.size // 2
    hello = {
        "type": "hello",
        "version": cluster.PROTOCOL_VERSION,
        "cluster_id": 700,
        "role": int(LLMRole.PROMPT),
        "target": lis.cluster_id,
        "host": cluster.host_identity(),
        "pid": bystander.pid,
        "tgid": bystander.pid,
        "caches": [],
    }
    cache = {
        "id": 1,
        "num_tensors": 2,
        "shape": [BLOCKS, BLOCK_BYTES],
        "dtype": 4,
        "placement": int(Placement.HOST),
        "batch_dim": 0,
        "seq_len_dim": -1,
        "blocks": True,
        "addrs": [bystander.addr, bystander.addr + half],
        "origin": "allocated",
        "remote_accessible": True,
        "keys": [["blocks", 700, 0]],
        "share": {"kind": "process"},
    }
    hello_caches = dict(hello, caches=[cache])  # the legacy place, for a listener that reads it
    uid = 65534 if how == "unix-other-uid" else None
    args = json.dumps([lis.dd.listen_port, how != "tcp", uid, hello_caches, [cache]])
    client = subprocess.Popen(
        [sys.executable, "-c", RAW_CLIENT, args], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert client.stdout.readline().strip() == "welcome"
        assert wait_for(lambda: lis.dd._node.peer(700) is not None)
        peer = lis.dd._node.peer(700)
        assert wait_for(lambda: peer.mem.entries)
        key = BlocksCacheKey(700, 0)
        outcomes = []
        for op in (
            lambda: lis.cm.pull_blocks(key, dst.cache, [0, 1, 2, 3], [0, 1, 2, 3]),
            lambda: lis.cm.push_blocks(key, src.cache, [0, 1, 2, 3], [0, 1, 2, 3]),
        ):
            try:
                op()
                outcomes.append("done")
            except LLMException as exc:
                outcomes.append(exc.status_code)
        if how != "unix-same-uid":
            # no process route at all, with the reason
            assert outcomes == [LLMStatusCode.LLM_FEATURE_NOT_ENABLED] * 2, outcomes
        got = b"".join(dst.tensor(i).tobytes() for i in range(2))
        assert got != bystander.data[: len(got)]
        for i in range(2):
            row = dst.tensor(i).tobytes()
            assert row not in bystander.data, "the bystander's bytes were read"
        assert bystander.final() == bystander.data, "the bystander's memory was written"
    finally:
        client.kill()
        client.wait()


def test_pid_in_the_hello_is_not_believed(make_env):
    """The peer's pid (process route, link liveness and the device-IPC whitelist) is the one
    SO_PEERCRED gives for the Unix socket, whatever the hello claims."""
    lis = listener(make_env, 33)
    raw = RawPeer(lis.dd.listen_port, unix=True)
    try:
        hello = {
            "type": "hello",
            "version": cluster.PROTOCOL_VERSION,
            "cluster_id": 701,
            "role": int(LLMRole.PROMPT),
            "target": None,
            "host": cluster.host_identity(),
            "pid": 1,
            "tgid": 1,
            "caches": [],
        }
        assert raw.link(hello)["type"] == "welcome"
        assert wait_for(lambda: lis.dd._node.peer(701) is not None)
        peer = lis.dd._node.peer(701)
        assert (peer.pid, peer.tgid, peer.link.pid, peer.uid) == (
            os.getpid(),
            os.getpid(),
            os.getpid(),
            os.geteuid(),
        )
    finally:
        raw.close()
    raw = RawPeer(lis.dd.listen_port)  # over TCP: no process of this host is known
    try:
        hello["cluster_id"] = 702
        assert raw.link(hello)["type"] == "welcome"
        assert wait_for(lambda: lis.dd._node.peer(702) is not None)
        peer = lis.dd._node.peer(702)
        assert (peer.pid, peer.tgid, peer.same_host) == (0, 0, False)
        assert "TCP" in peer.no_process_route
    finally:
        raw.close()


def test_linked_cluster_id_cannot_be_claimed_again(make_env):
    """A second peer claiming the cluster id of a linked peer is refused; the link stays."""
    lis = listener(make_env, 34)
    pre = linker(make_env, 703)
    assert pre.dd.link_clusters([info_of(lis)], 5000) == (SUCCESS, [SUCCESS])
    first = lis.dd._node.peer(703)
    raw = RawPeer(lis.dd.listen_port, unix=True)
    try:
        hello = {
            "type": "hello",
            "version": cluster.PROTOCOL_VERSION,
            "cluster_id": 703,
            "role": int(LLMRole.PROMPT),
            "target": None,
            "host": cluster.host_identity(),
            "caches": [],
        }
        reply = raw.link(hello)
    finally:
        raw.close()
    assert reply["type"] == "refuse" and reply["code"] == int(LLMStatusCode.LLM_ALREADY_LINK)
    assert lis.dd._node.peer(703) is first and first.link.is_up


# --------------------------------------------------------------------------------------------
# shared memory as sealed memfds
# --------------------------------------------------------------------------------------------
def test_shared_memory_is_sealed_and_nameless(make_env):
    """A listening cluster's host caches live in memfds sealed against shrinking and growing:
    their owner cannot truncate them under a mapper, and nothing appears in /dev/shm."""
    lis = listener(make_env, 35)
    c = blocks_cache(lis, 1)
    share = lis.cm._mem.entries[c.cache.cache_id].share
    assert share.kind == ShareKind.MEMFD
    for size in (0, 4096, share.size * 2):
        with pytest.raises(PermissionError):
            os.ftruncate(share.fd, size)
    assert not llmdist_shm_names()


def _memfd(size: int, seals: int) -> int:
    import fcntl

    fd = os.memfd_create("raw", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@pytest.mark.parametrize("memory", ["unsealed", "grow-only-seal", "too-small"])
def test_truncatable_memory_is_not_mapped(make_env, memory):
    """A peer offering memory it could shrink later (or smaller than it says) is refused before
    the listener maps it: a later truncate cannot make the listener's copies die of SIGBUS. The
    listener stays up and serves the next link."""
    import fcntl

    lis = listener(make_env, 36)
    size = 2 * BLOCKS * BLOCK_BYTES
    seals = {
        "unsealed": 0,
        "grow-only-seal": fcntl.F_SEAL_GROW,
        "too-small": fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW,
    }[memory]
    fd = _memfd(size // 2 if memory == "too-small" else size, seals)
    base = 1 << 40
    cache = {
        "id": 1,
        "num_tensors": 2,
        "shape": [BLOCKS, BLOCK_BYTES],
        "dtype": 4,
        "placement": int(Placement.HOST),
        "batch_dim": 0,
        "seq_len_dim": -1,
        "blocks": True,
        "addrs": [base, base + size // 2],
        "origin": "allocated",
        "remote_accessible": True,
        "keys": [["blocks", 704, 0]],
        "share": {"kind": "memfd", "fd": 0, "base": base, "size": size},
    }
    raw = RawPeer(lis.dd.listen_port, unix=True)
    try:
        hello = {
            "type": "hello",
            "version": cluster.PROTOCOL_VERSION,
            "cluster_id": 704,
            "role": int(LLMRole.PROMPT),
            "target": None,
            "host": cluster.host_identity(),
            "caches": [],
        }
        with pytest.raises(ConnectionError):
            raw.link(hello, [cache], [fd])
        if memory != "too-small":
            os.ftruncate(fd, 0)  # what would have crashed a mapper
    finally:
        raw.close()
        os.close(fd)
    assert wait_for(lambda: lis.dd._node.peer(704) is None)
    pre = linker(make_env, 705)
    assert pre.dd.link_clusters([info_of(lis)], 5000) == (SUCCESS, [SUCCESS])
    dst = blocks_cache(lis, 1)
    src = blocks_cache(pre, 1)
    pre.cm.push_blocks(BlocksCacheKey(lis.cluster_id, 1), src.cache, [0, 1], [1, 0])
    assert np.array_equal(
        dst.tensor(0).reshape(BLOCKS, -1)[:2], src.tensor(0).reshape(BLOCKS, -1)[[1, 0]]
    )


PIDNS_CLUSTER = textwrap.dedent("""
    import sys
    import numpy as np
    from tests.helpers import Env
    from llmdist import BlocksCacheKey, LLMClusterInfo, LLMRole, Placement
    e = Env(cluster_id=81, role=LLMRole.PROMPT, remote=True,
            extra_options={"llm.listenIpInfo": "127.0.0.1:0"})
    c = e.allocated(2, [4, 1024], placement=Placement.HOST, blocks=True,
                    key=BlocksCacheKey(81, 1))
    info = LLMClusterInfo()
    info.remote_cluster_id = 80
    info.append_remote_ip_info("127.0.0.1", %d)
    code, _ = e.dd.link_clusters([info], 5000)
    e.close()
    print("linked" if int(code) == 0 else f"link failed {code}", flush=True)
""")


def test_cluster_in_another_pid_namespace_removes_nothing(make_env):
    """A cluster started in a new pid namespace that shares /dev/shm (docker --ipc=host)
    allocates shared memory, links, and ends; nothing named exists that it could remove, and
    the live cluster of this namespace keeps its memory and keeps working."""
    if subprocess.run(["unshare", "--pid", "--fork", "true"]).returncode != 0:
        pytest.skip("unshare --pid needs root")
    lis = listener(make_env, 80)
    mine = blocks_cache(lis, 1)
    before = [mine.tensor(i).copy() for i in range(2)]
    out = subprocess.run(
        ["unshare", "--pid", "--fork", sys.executable, "-c", PIDNS_CLUSTER % lis.dd.listen_port],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.stdout.strip() == "linked", out.stderr[-2000:]
    assert not llmdist_shm_names()
    assert all(np.array_equal(mine.tensor(i), before[i]) for i in range(2))
    pre = linker(make_env, 82)
    assert pre.dd.link_clusters([info_of(lis)], 5000) == (SUCCESS, [SUCCESS])
    got = blocks_cache(pre, 1)
    pre.cm.pull_blocks(BlocksCacheKey(lis.cluster_id, 1), got.cache, [0, 1, 2, 3], [0, 1, 2, 3])
    assert all(np.array_equal(got.tensor(i), before[i]) for i in range(2))


# --------------------------------------------------------------------------------------------
# bounded per link
# --------------------------------------------------------------------------------------------
def test_link_and_reset_storm_leaves_no_threads(make_env):
    """500 links each ended by a connection reset: no thread is left per ended link (the
    hellos name a live process of this host as theirs, which is not believed either)."""
    lis = listener(make_env, 37)
    blocks_cache(lis, 1)
    other = subprocess.Popen(["sleep", "120"])
    try:
        hello = {
            "type": "hello",
            "version": cluster.PROTOCOL_VERSION,
            "cluster_id": 0,
            "role": int(LLMRole.PROMPT),
            "target": None,
            "host": cluster.host_identity(),
            "pid": other.pid,
            "caches": [],
        }
        start = threading.active_count()
        for i in range(500):
            raw = RawPeer(lis.dd.listen_port, unix=(i % 2 == 0))
            hello["cluster_id"] = 1000 + i
            assert raw.link(hello)["type"] == "welcome"
            if raw.sock.family == socket.AF_INET:
                raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
        assert wait_for(lambda: not lis.dd._node.peers)
        time.sleep(0.5)
        assert threading.active_count() <= start + 10, threading.active_count() - start
    finally:
        other.kill()
        other.wait()


# --------------------------------------------------------------------------------------------
# rank-table comms
# --------------------------------------------------------------------------------------------
def _keyed_members(make_env, base, ids, key, total_s=None):
    return [
        make_env(
            cluster_id=cid,
            role=role,
            remote=True,
            extra_options={
                **rendezvous_options(base, total_s),
                **({"llmdist.auth_key": key} if key else {}),
            },
        )
        for cid, role in zip(ids, [LLMRole.PROMPT, LLMRole.DECODER])
    ]


def _status(env, comm_id, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        st = env.dd.query_register_mem_status(comm_id)
        if st != RegisterMemStatus.PREPARING or time.monotonic() > deadline:
            return st
        time.sleep(0.01)


def test_keyed_comm_refuses_a_stranger_joining_as_a_member(make_env):
    """A keyless stranger with member A's cluster id races A to B's rendezvous port: B admits
    only the keyed A, and the comm forms between the real members."""
    base = free_rendezvous_base()
    a, b = _keyed_members(make_env, base, [90, 91], KEY)
    info = {90: 0, 91: 1}
    table = one_server_table(2)
    stranger = make_env(
        cluster_id=90, role=LLMRole.PROMPT, remote=True, extra_options=rendezvous_options(base, 3)
    )
    comm_b = b.dd.link("secure", info, table)
    comm_s = stranger.dd.link("secure", info, table)
    time.sleep(0.3)  # the stranger tries first
    comm_a = a.dd.link("secure", info, table)
    assert _status(a, comm_a) == RegisterMemStatus.OK
    assert _status(b, comm_b) == RegisterMemStatus.OK
    assert _status(stranger, comm_s) == RegisterMemStatus.FAILED
    assert b.dd._node.peer(90) is not None and not stranger.dd._node.peers
    # the link B holds is A's: bytes B pushes land in A's cache
    ca = blocks_cache(a, 1)
    cb = blocks_cache(b, 1)
    b.cm.push_blocks(BlocksCacheKey(90, 1), cb.cache, [0, 1, 2, 3], [0, 1, 2, 3])
    assert all(np.array_equal(ca.tensor(i), cb.tensor(i)) for i in range(2))


def test_keyed_comm_squatter_receives_nothing(make_env):
    """A keyless stranger that binds member B's rendezvous port first (posing as B) gets no
    link from the keyed member A, so none of A's KV cache: A's comm fails instead."""
    base = free_rendezvous_base()
    (a,) = _keyed_members(make_env, base, [92], KEY, total_s=3)
    info = {92: 0, 93: 1}
    table = one_server_table(2)
    squatter = make_env(
        cluster_id=93, role=LLMRole.DECODER, remote=True, extra_options=rendezvous_options(base, 3)
    )
    sq = blocks_cache(squatter, 1)
    before = [sq.tensor(i).copy() for i in range(2)]
    comm_s = squatter.dd.link("secure", info, table)
    time.sleep(0.2)
    comm_a = a.dd.link("secure", info, table)
    blocks_cache(a, 1)
    assert _status(a, comm_a) == RegisterMemStatus.FAILED
    assert _status(squatter, comm_s) == RegisterMemStatus.FAILED
    assert not squatter.dd._node.peers and not a.dd._node.peers
    assert all(np.array_equal(sq.tensor(i), before[i]) for i in range(2))


def test_rendezvous_binds_the_tables_address(make_env):
    """The rendezvous listens on the member's address from the rank table, not 0.0.0.0."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.255.255.255", 1))
        ip = s.getsockname()[0]
    except OSError:
        ip = None
    finally:
        s.close()
    if ip is None or ip.startswith("127."):
        pytest.skip("no non-loopback IPv4 address on this machine")
    base = free_rendezvous_base()
    env = make_env(
        cluster_id=95, role=LLMRole.DECODER, remote=True, extra_options=rendezvous_options(base, 5)
    )
    table = one_server_table(2, server_id=ip)
    env.dd.link("bind", {94: 0, 95: 1}, table)
    comm = next(iter(env.dd._comms._comms.values()))
    assert wait_for(lambda: comm.listener is not None)
    assert comm.listener.tcp.getsockname()[0] == ip


def test_demo_with_a_shared_key():
    """python -m llmdist demo --auth-key: the two clusters link with the key and the KV cache
    arrives intact (the demo checks every byte)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmdist",
            "demo",
            "--layers",
            "2",
            "--tokens",
            "64",
            "--dim",
            "64",
            "--auth-key",
            "demo-key",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "shared key: both sides proved it" in out.stdout
    assert out.stdout.rstrip().endswith("PASS")


def test_link_flag_follows_the_peer_process_not_its_pid(make_env):
    """A same-host peer's link flag holds a pidfd of the process that connected (the kernel's,
    SO_PEERPIDFD): its exit is seen even while it is not reaped, where the pid alone would still
    answer (and could later name another process)."""
    lis = listener(make_env, 38)
    raw = RawPeer(lis.dd.listen_port, unix=True)
    try:
        hello = {
            "type": "hello",
            "version": cluster.PROTOCOL_VERSION,
            "cluster_id": 706,
            "role": int(LLMRole.PROMPT),
            "target": None,
            "host": cluster.host_identity(),
            "caches": [],
        }
        assert raw.link(hello)["type"] == "welcome"
        assert wait_for(lambda: lis.dd._node.peer(706) is not None)
        flag = lis.dd._node.peer(706).link
        with open(f"/proc/self/fdinfo/{flag.pidfd}") as f:
            assert f"Pid:\t{os.getpid()}" in f.read()
    finally:
        raw.close()
    child = subprocess.Popen(["sleep", "30"])
    try:
        flag = _core.LinkFlag(child.pid, os.pidfd_open(child.pid))
        assert flag.peer_alive()
        child.kill()
        assert wait_for(lambda: not flag.peer_alive(), 5)
        os.kill(child.pid, 0)  # the unreaped pid still answers
    finally:
        child.wait()
