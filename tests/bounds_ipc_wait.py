"""A listening cluster on the CUDA runtime whose peer never confirms device-IPC readiness:
while a push to that peer waits for the confirmation, this cluster allocates a cache and runs
a local pull. Run as ``python -m tests.bounds_ipc_wait`` (from the directory that holds `tests`) with LLMDIST_CUDA_LIBRARY set; prints one
JSON line with the seconds each took and how the push ended. (A process of its own: a process
drives one runtime.)"""

import json
import socket
import threading
import time

from llmdist import (
    BlocksCacheKey,
    CacheDesc,
    DataType,
    LLMDataDist,
    LLMException,
    LLMRole,
    Placement,
    cluster,
)
from llmdist.auth import Channel  # noqa: E402

ME, PEER = 990, 991


def main() -> None:
    dd = LLMDataDist(LLMRole.DECODER, ME)
    dd.init(
        {
            "llm.listenIpInfo": "127.0.0.1:0",
            "llm.EnableCacheManager": "1",
            "llm.EnableRemoteCacheAccessible": "1",
            "ge.exec.deviceId": "0",
            "llmdist.runtime": "cuda",
        }
    )
    cm = dd.cache_manager
    desc = CacheDesc(2, [4, 64], DataType.DT_UINT8, Placement.DEVICE)
    src = cm.allocate_blocks_cache(desc, BlocksCacheKey(ME, 1))
    # The peer: links, acknowledges announcements, never sends ipc_ready.
    base = 1 << 40
    wire = {
        "id": 1,
        "num_tensors": 2,
        "shape": [4, 64],
        "dtype": 4,
        "placement": 1,
        "batch_dim": 0,
        "seq_len_dim": -1,
        "blocks": True,
        "addrs": [base, base + 256],
        "origin": "allocated",
        "remote_accessible": True,
        "keys": [["blocks", PEER, 1]],
        "share": {"kind": "cuda_ipc", "id": "peer-export", "base": base, "size": 512, "device": 0},
    }
    hello = {
        "type": "hello",
        "version": cluster.PROTOCOL_VERSION,
        "cluster_id": PEER,
        "role": int(LLMRole.PROMPT),
        "target": ME,
        "host": cluster.host_identity(),
        "runtime": "cuda",
        "caches": [],
    }
    # device IPC ids go only to a peer on the listener's Unix socket (the kernel names it)
    tcp = socket.create_connection(("127.0.0.1", dd.listen_port), timeout=5)
    challenge, _ = Channel(tcp).recv(time.monotonic() + 5)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(b"\0" + challenge["unix"].encode())
    tcp.close()
    chan = Channel(sock)
    assert chan.recv(time.monotonic() + 5)[0]["type"] == "challenge"
    chan.send(hello)
    assert chan.recv(time.monotonic() + 5)[0]["type"] == "welcome"
    chan.send({"type": "caches", "caches": [wire]})
    # linked once the listener acknowledges those caches (sequence 0, the handshake's end)
    while True:
        msg, fds = chan.recv(time.monotonic() + 5)
        chan.close_fds(fds)
        if msg["type"] == "ack" and msg.get("seq") == 0:
            break

    def ack_all() -> None:
        try:
            sock.settimeout(None)
            while True:
                msg, fds = chan.recv()
                chan.close_fds(fds)
                if msg["type"] != "ack":
                    chan.send({"type": "ack", "seq": msg.get("seq", 0)})
        except (OSError, cluster.ProtocolError):
            pass

    threading.Thread(target=ack_all, daemon=True).start()
    pushed = {}

    def push() -> None:
        t0 = time.monotonic()
        try:
            cm.push_blocks(BlocksCacheKey(PEER, 1), src, [0], [0])
            pushed["result"] = "success"
        except LLMException as exc:
            pushed["result"] = exc.status_code.name
        pushed["s"] = time.monotonic() - t0

    t = threading.Thread(target=push)
    t.start()
    time.sleep(0.5)  # the push is waiting for the peer's confirmation now
    t0 = time.monotonic()
    dst = cm.allocate_blocks_cache(desc, BlocksCacheKey(ME, 2))
    alloc_s = time.monotonic() - t0
    t0 = time.monotonic()
    cm.pull_blocks(BlocksCacheKey(ME, 1), dst, [0, 1], [2, 3])
    pull_s = time.monotonic() - t0
    waiting = t.is_alive()
    t.join(30)
    sock.close()
    print(
        json.dumps(
            {"alloc_s": alloc_s, "pull_s": pull_s, "push_was_waiting": waiting, "push": pushed}
        ),
        flush=True,
    )
    dd.finalize()


if __name__ == "__main__":
    main()
