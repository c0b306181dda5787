"""Figures for the reliability notes, one command each (run from the repository root):

    python bench/reliability_figures.py shm-leaks [trials]     shared memory objects a killed
                                                               peer leaves in /dev/shm
    python bench/reliability_figures.py registration [n]       allocate_cache time with n caches held
    python bench/reliability_figures.py inflight-rss [tasks]   RSS with tasks nobody waits for
    python bench/reliability_figures.py big-hello [caches]     seconds until the welcome to a
                                                               hello announcing that many caches

Each prints one JSON line. These are measurements, not tests: run them on an idle machine and
compare figures taken on the same machine."""

from __future__ import annotations

import gc
import glob
import json
import multiprocessing as mp
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import cluster_procs  # noqa: E402

from llmdist import (  # noqa: E402
    CacheDesc,
    DataType,
    LayerSynchronizer,
    LLMClusterInfo,
    LLMConfig,
    LLMDataDist,
    LLMException,
    LLMRole,
    LLMStatusCode,
    Placement,
    TransferConfig,
)


def _dd(
    role: LLMRole, cluster_id: int, listen: bool, extra=None, remote: bool = True
) -> LLMDataDist:
    dd = LLMDataDist(role, cluster_id)
    cfg = LLMConfig()
    cfg.device_id = 0
    cfg.enable_cache_manager = True
    cfg.enable_remote_cache_accessible = remote
    if listen:
        cfg.listen_ip_info = "127.0.0.1:0"
    opts = cfg.generate_options()
    opts.update(extra or {})
    dd.init(opts)
    return dd


def _objects_of(pid: int):
    return glob.glob(f"/dev/shm/llmdist-{pid}-*")


def _recv(conn, timeout=30.0):
    if not conn.poll(timeout):
        raise TimeoutError("child did not answer")
    return conn.recv()


def _child(cluster_id: int, role: LLMRole):
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(
        target=cluster_procs.decode_main, args=(child, cluster_id, int(role)), daemon=True
    )
    proc.start()
    child.close()
    msg = _recv(conn, 60)
    assert msg[0] == "ready", msg
    return proc, conn, msg[1], msg[2]


def _call(conn, *cmd):
    conn.send(cmd)
    msg = _recv(conn)
    assert msg[0] == "ok", msg
    return msg[1]


def shm_leaks(trials: int) -> dict:
    """kill -9 a peer holding shared memory, in three ways, trials times each; count the objects
    of the dead process left in /dev/shm 3 s after it died (removing them afterwards)."""
    out = {}
    survivor_dec = _dd(LLMRole.DECODER, 1, listen=True)
    survivor_pre = _dd(LLMRole.PROMPT, 2, listen=False)
    try:
        for scenario in ("decode-killed", "decode-killed-reaped-late", "prefill-killed"):
            leaked = trials_leaking = 0
            for t in range(trials):
                cid = 1000 + t
                if scenario == "prefill-killed":
                    proc, conn, port, pid = _child(cid, LLMRole.PROMPT)
                    for n in range(2):
                        _call(conn, "alloc", f"c{n}", 4, [4, 1024])
                    code, _ = _call(conn, "link", 1, survivor_dec.listen_port)
                    assert code == 0, code
                    survivor = survivor_dec
                else:
                    proc, conn, port, pid = _child(cid, LLMRole.DECODER)
                    for n in range(2):
                        _call(conn, "alloc", f"c{n}", 4, [4, 1024])
                    info = LLMClusterInfo()
                    info.remote_cluster_id = cid
                    info.append_remote_ip_info("127.0.0.1", port)
                    code, _ = survivor_pre.link_clusters([info], 5000)
                    assert code == LLMStatusCode.LLM_SUCCESS, code
                    survivor = survivor_pre
                os.kill(pid, signal.SIGKILL)
                if scenario.endswith("late"):
                    time.sleep(1.0)
                proc.join(10)
                t0 = time.monotonic()
                while survivor._node.peer(cid) is not None and time.monotonic() - t0 < 10:
                    time.sleep(0.02)
                time.sleep(3.0)
                left = _objects_of(pid)
                leaked += len(left)
                trials_leaking += bool(left)
                for f in left:
                    os.unlink(f)
                conn.close()
            out[scenario] = {
                "trials": trials,
                "trials_leaking": trials_leaking,
                "objects_left": leaked,
            }
    finally:
        survivor_dec.finalize()
        survivor_pre.finalize()
    return out


def registration(n: int) -> dict:
    """Milliseconds per allocate_cache of a 64-tensor cache with 100 and with n caches held."""
    dd = _dd(LLMRole.PROMPT, 1, listen=False)
    cm = dd.cache_manager
    desc = CacheDesc(64, [1, 64], DataType.DT_UINT8, Placement.HOST)
    caches, marks = [], {}
    t_all = time.perf_counter()
    probe = 50
    for count in sorted({100, n}):
        while len(caches) < count - probe:
            caches.append(cm.allocate_cache(desc))
        t0 = time.perf_counter()
        for _ in range(probe):
            caches.append(cm.allocate_cache(desc))
        marks[count] = (time.perf_counter() - t0) / probe * 1e3
    total = time.perf_counter() - t_all
    dd.finalize()
    return {
        "caches": n,
        "ms_per_alloc_at_100": round(marks[100], 3),
        f"ms_per_alloc_at_{n}": round(marks[n], 3),
        "seconds_to_reach_n": round(total, 1),
    }


class _Slow(LayerSynchronizer):
    """A consumer slower than the producer: each layer is ready 1 ms after it is asked for."""

    def synchronize_layer(self, layer_index, timeout_in_millis):
        time.sleep(0.001)
        return True


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def inflight_rss(tasks: int) -> dict:
    """Submit tasks local transfers, whose layers become ready slower than they are submitted,
    without waiting for any; when one is refused as busy, back off briefly and retry. RSS at
    the peak and after every task has finished."""
    dd = _dd(LLMRole.PROMPT, 1, listen=False, remote=False)
    cm = dd.cache_manager
    desc = CacheDesc(2, [1, 64], DataType.DT_UINT8, Placement.HOST)
    src, dst = cm.allocate_cache(desc), cm.allocate_cache(desc)
    cfg = [TransferConfig(1, list(dst.tensor_addrs))]
    sync = _Slow()
    gc.collect()
    base = _rss_mib()
    peak = base
    busy = 0
    last = None
    t0 = time.perf_counter()
    for i in range(tasks):
        while True:
            try:
                last = cm.transfer_cache_async(src, sync, cfg)
                break
            except LLMException as exc:
                if exc.status_code != LLMStatusCode.LLM_LINK_BUSY:
                    raise
                busy += 1
                time.sleep(0.001)
        if i % 1000 == 0:
            peak = max(peak, _rss_mib())
    peak = max(peak, _rss_mib())
    submit_s = time.perf_counter() - t0
    last.synchronize(600_000)
    while cm._inflight:
        time.sleep(0.01)
    last = None
    gc.collect()
    time.sleep(0.5)
    after = _rss_mib()
    dd.finalize()
    return {
        "tasks": tasks,
        "rss_before_mib": round(base, 1),
        "rss_peak_mib": round(peak, 1),
        "rss_after_drain_mib": round(after, 1),
        "busy_refusals": busy,
        "submit_seconds": round(submit_s, 1),
    }


def big_hello(n: int) -> dict:
    """Send a listener a hello announcing n caches (written with process writes, so nothing is
    mapped) and time the welcome; the CPU time the listener spent on it too."""
    import socket
    import struct

    from llmdist import cluster

    dd = _dd(LLMRole.DECODER, 2, listen=True)
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
        for i in range(n)
    ]
    msg = {
        "type": "hello",
        "version": cluster.PROTOCOL_VERSION,
        "cluster_id": 9,
        "role": int(LLMRole.PROMPT),
        "target": 2,
        "host": cluster.host_identity(),
        "pid": os.getpid(),
        "caches": caches,
    }
    data = json.dumps(msg).encode()
    s = socket.create_connection(("127.0.0.1", dd.listen_port))
    s.settimeout(300)

    def reply() -> dict:
        (size,) = struct.unpack(">I", s.recv(8, socket.MSG_WAITALL)[4:])
        return json.loads(s.recv(size, socket.MSG_WAITALL))

    reply()  # the listener's challenge
    cpu0, t0 = time.process_time(), time.perf_counter()
    s.sendall(cluster.MAGIC + struct.pack(">I", len(data)) + data)
    kind = reply().get("type")
    took, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    s.close()
    dd.finalize()
    return {
        "caches": n,
        "frame_mib": round(len(data) / 2**20, 1),
        "welcomed": kind == "welcome",
        "seconds_to_welcome": round(took, 2),
        "cpu_seconds": round(cpu, 2),
    }


if __name__ == "__main__":
    what = sys.argv[1]
    arg = int(sys.argv[2]) if len(sys.argv) > 2 else None
    if what == "shm-leaks":
        res = shm_leaks(arg or 30)
    elif what == "registration":
        res = registration(arg or 4000)
    elif what == "inflight-rss":
        res = inflight_rss(arg or 100_000)
    elif what == "big-hello":
        res = big_hello(arg or 16_000)
    else:
        raise SystemExit(__doc__)
    print(json.dumps({what: res}))
