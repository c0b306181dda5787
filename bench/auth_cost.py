"""What the shared key costs: link_clusters time and push_blocks bandwidth of a keyed pair against
an unkeyed pair, measured side by side in one run: python bench/auth_cost.py [--rounds 30]
[--mib 64].

Two decode clusters listen in child processes on 127.0.0.1, one with llmdist.auth_key and one
without, each holding an allocated blocks cache (host memory, the same-host mapped route). This
process runs a prefill of each kind and alternates keyed and unkeyed rounds (ABBA order): a round links,
pushes every block of its source into the decode's cache once (timed apart), and unlinks. The
bytes are checked once per pair. Prints medians and the keyed/unkeyed ratios, after the cost of
one control frame with and without its MAC."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

KEY = "bench-auth-key"
BLOCK = 1 << 20
TENSORS = 4


def _options(key, listen=None):
    opts = {"llm.EnableCacheManager": "1", "llm.EnableRemoteCacheAccessible": "1"}
    if listen:
        opts["llm.listenIpInfo"] = listen
    if key:
        opts["llmdist.auth_key"] = key
    return opts


def decode_main(cluster_id, key, blocks, conn):
    sys.path.insert(0, os.path.join(HERE, ".."))
    import numpy as np

    from llmdist import BlocksCacheKey, CacheDesc, DataType, LLMDataDist, LLMRole, Placement
    dd = LLMDataDist(LLMRole.DECODER, cluster_id)
    dd.init(_options(key, "127.0.0.1:0"))
    desc = CacheDesc(TENSORS, [blocks, BLOCK], DataType.DT_UINT8, Placement.HOST)
    cache = dd.cache_manager.allocate_blocks_cache(desc, BlocksCacheKey(cluster_id, 0))
    conn.send(dd.listen_port)
    while True:
        cmd = conn.recv()
        if cmd == "digest":
            views = [np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * (blocks * BLOCK))
                                           .from_address(a)) for a in cache.tensor_addrs]
            conn.send([int(v.astype(np.uint64).sum()) for v in views])
        else:
            break
    dd.finalize()


class Pair:
    """A prefill here and a decode in a child process, keyed or not."""

    def __init__(self, keyed: bool, cluster_id: int, blocks: int) -> None:
        import numpy as np

        from llmdist import (
            BlocksCacheKey,
            CacheDesc,
            DataType,
            LLMClusterInfo,
            LLMDataDist,
            LLMRole,
            Placement,
        )
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        key = KEY if keyed else None
        self.proc = ctx.Process(target=decode_main, args=(cluster_id, key, blocks, child))
        self.proc.start()
        port = self.conn.recv()
        self.dd = LLMDataDist(LLMRole.PROMPT, cluster_id + 100)
        self.dd.init(_options(key))
        self.info = LLMClusterInfo()
        self.info.remote_cluster_id = cluster_id
        self.info.append_remote_ip_info("127.0.0.1", port)
        desc = CacheDesc(TENSORS, [blocks, BLOCK], DataType.DT_UINT8, Placement.HOST)
        self.src = self.dd.cache_manager.allocate_blocks_cache(
            desc, BlocksCacheKey(cluster_id + 100, 0))
        rng = np.random.default_rng(cluster_id)
        self.sums = []
        for a in self.src.tensor_addrs:
            v = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * (blocks * BLOCK))
                                      .from_address(a))
            v[:] = rng.integers(0, 256, v.size, dtype=np.uint8)
            self.sums.append(int(v.astype(np.uint64).sum()))
        self.key = BlocksCacheKey(cluster_id, 0)
        self.blocks = list(range(blocks))
        self.bytes = TENSORS * blocks * BLOCK

    def round(self):
        """(link seconds, push seconds) of one link, push and unlink."""
        t0 = time.perf_counter()
        code, _ = self.dd.link_clusters([self.info], 5000)
        link_s = time.perf_counter() - t0
        if int(code) != 0:
            raise RuntimeError(f"link failed: {code}")
        t0 = time.perf_counter()
        self.dd.cache_manager.push_blocks(self.key, self.src, self.blocks, self.blocks,
                                          tensor_num_per_layer=1)
        push_s = time.perf_counter() - t0
        self.dd.unlink_clusters([self.info], 5000)
        return link_s, push_s

    def verify(self) -> bool:
        self.conn.send("digest")
        return self.conn.recv() == self.sums

    def close(self) -> None:
        self.conn.send("exit")
        self.proc.join(30)
        self.dd.finalize()


def frame_cost(n: int = 20000) -> dict:
    """Microseconds per control frame (a cache announcement of 64 tensors, sent and received over
    a socket pair), unkeyed and keyed: best of 3 runs each."""
    import secrets
    import socket
    import threading

    from llmdist import auth
    msg = {"type": "cache_add", "seq": 1,
           "cache": {"id": 1, "num_tensors": 64, "shape": [256, 8192], "keys": [["blocks", 1, 0]],
                     "addrs": list(range(1 << 40, (1 << 40) + 64 * 4096, 4096))}}

    def run(keyed: bool) -> float:
        a, b = socket.socketpair()
        ca, cb = auth.Channel(a), auth.Channel(b)
        if keyed:
            k = secrets.token_bytes(32)
            ca.out.set(k)
            cb.into.set(k)
        t = threading.Thread(target=lambda: [cb.recv() for _ in range(n)])
        t.start()
        t0 = time.perf_counter()
        for _ in range(n):
            ca.send(msg)
        t.join()
        dt = time.perf_counter() - t0
        a.close()
        b.close()
        return dt / n * 1e6

    return {k: min(run(k == "keyed") for _ in range(3)) for k in ("unkeyed", "keyed")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--mib", type=int, default=64, help="bytes pushed per round, MiB")
    args = ap.parse_args()
    us = frame_cost()
    print(f"control frame (64-tensor cache_add, send + receive): unkeyed {us['unkeyed']:.1f} us, "
          f"keyed {us['keyed']:.1f} us ({us['keyed'] - us['unkeyed']:+.1f} us)")
    blocks = max(1, args.mib // TENSORS)
    pairs = {"unkeyed": Pair(False, 1, blocks), "keyed": Pair(True, 2, blocks)}
    try:
        for p in pairs.values():
            p.round()                               # warm-up
        got = {k: [] for k in pairs}
        for r in range(args.rounds):
            order = list(pairs.items())
            if r % 2:
                order.reverse()                     # ABBA: drift and order hit both alike
            for k, p in order:
                got[k].append(p.round())
        ok = {k: p.verify() for k, p in pairs.items()}
        med = {}
        for k, rows in got.items():
            link_ms = statistics.median(r[0] for r in rows) * 1000
            gbs = statistics.median(pairs[k].bytes / r[1] for r in rows) / 1e9
            med[k] = (link_ms, gbs)
            print(f"{k:8s} link_clusters median {link_ms:7.3f} ms   push_blocks "
                  f"{pairs[k].bytes >> 20} MiB median {gbs:6.2f} GB/s   bytes verified: {ok[k]}")
        print(f"keyed - unkeyed link time: {med['keyed'][0] - med['unkeyed'][0]:+.3f} ms; "
              f"keyed / unkeyed bandwidth: {med['keyed'][1] / med['unkeyed'][1]:.3f}x "
              f"({args.rounds} rounds each, ABBA order)")
    finally:
        for p in pairs.values():
            p.close()


if __name__ == "__main__":
    main()
