"""Two-process benchmarks: the prefill (this process) sends the B2B workload into a decode
cluster in a child process on 127.0.0.1. Run: ``python -m pytest bench -q --benchmark-only``.
Targets are reported in the summary table and in ``extra_info``; nothing asserts on a time.

f. 32 layers x 256 random (src, dst) 64 KiB block pairs, every layer ready at once
   (the same workload as a. at 64K), through each data path, against a contiguous np.copyto of
   the same bytes in the sending process, measured before every round of the same test:
   - direct-shm:        same host, into the decode's allocated cache (POSIX shared memory,
                        mapped into the prefill)
   - direct-registered: same host, into numpy memory the decode registered
                        (process_vm_writev)
   - mooncake:          Mooncake Transfer Engine over loopback TCP (skipped without
                        ``mooncake``)
   - local:             the same transfer inside the prefill process (reference)

NIXL (UCX backend), writing the same blocks from a process of its own, runs in
``python -m llmdist bench cluster`` when nixl is installed.

Memory: the pool is 256 blocks (not 1024) per tensor by default, so that each cache is 1 GiB:
source + copy scratch here, allocated + registered caches in the decode (4 GiB).
``--llmdist-mem-gib`` below 4 shrinks it further.

The child processes and their helpers are llmdist.bench.procs, shared with
``python -m llmdist bench cluster``.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import llmdist
from llmdist import (
    BlocksCacheKey,
    CacheDesc,
    DataType,
    LayerSynchronizer,
    LLMClusterInfo,
    LLMRole,
    LLMStatusCode,
    Placement,
    TransferWithCacheKeyConfig,
)
from llmdist.bench import procs
from llmdist.bench.procs import Child, ChildError
from llmdist.bench.workload import block_pairs

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

NUM_LAYERS = 32
NUM_PAIRS = 256
FULL_POOL = 1024
BLOCK = 64 * KiB
CLUSTER_MEM_CAP = 4 * GiB  # all four caches of this module together, by default
DECODE_ID = 61
PREFILL_DIRECT_ID = 62
PREFILL_MOONCAKE_ID = 63
DST_ALLOCATED = 0  # model ids of the decode's caches
DST_REGISTERED = 1
LINK_MS = 5000
TASK_MS = 120_000
OK = LLMStatusCode.LLM_SUCCESS
TARGET = 0.7  # same-host path vs contiguous np.copyto (reported, not asserted)

SECTION = (
    "f. B2B into another process (64K x 256 pairs x 64 tensors, all layers ready) "
    "vs contiguous np.copyto in the sending process (bandwidth, same bytes)"
)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


MOONCAKE = _importable("mooncake.engine") if _importable("mooncake") else False


def median(xs):
    return statistics.median(xs)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def fmt_bw(nbytes: int, seconds: float) -> str:
    return f"{gbps(nbytes, seconds):.2f} GB/s"


def drop_warmup(xs, n=1):
    return xs[n:] or xs


def rounds_for(
    nbytes: int,
    scale: float,
    seconds_per_byte: float,
    budget_s: float = 6.0,
    lo: int = 5,
    hi: int = 20,
) -> int:
    """Rounds that fit about budget_s at the expected speed, lo..hi, times
    --llmdist-rounds-scale."""
    n = budget_s / max(1e-9, nbytes * seconds_per_byte)
    return max(3, int(round(min(hi, max(lo, n)) * scale)))


class Go(LayerSynchronizer):
    def synchronize_layer(self, layer_index, timeout_in_millis):
        return True


# ------------------------------------------------------------------------------------------
# The workload


class ClusterWorkload:
    """Source memory (the B2B pattern) registered with two prefill clusters (transport direct
    and mooncake), a scratch buffer of the same size (np.copyto baseline, and the destination
    of the local reference), and a decode child holding an allocated and a registered blocks
    cache of the same layout, linked to both prefills."""

    def __init__(self, budget: int, report):
        self.layers = NUM_LAYERS
        self.num_tensors = 2 * NUM_LAYERS
        self.block = BLOCK
        self.pairs = NUM_PAIRS
        max_pool = budget // (4 * self.num_tensors * BLOCK)
        self.pool = max(1, min(FULL_POOL, max_pool))
        self.tensor_bytes = self.pool * BLOCK
        self.cache_bytes = self.num_tensors * self.tensor_bytes
        self.src_idx, self.dst_idx = block_pairs(self.pool, self.pairs, 1234)
        self.bytes_moved = self.num_tensors * self.pairs * BLOCK
        self.notes = [
            f"f.: pool {self.pool} blocks of {BLOCK // KiB}K per tensor (not "
            f"{FULL_POOL}): 1 cache = {self.cache_bytes / GiB:.2f} GiB; "
            f"{self.pairs} pairs per tensor kept"
        ]
        self.report = report
        self._pool = None
        self.decode = None
        self.prefills = {}
        self._env_saved = {}
        self.mooncake_error = None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _setenv(self, key: str, value: str) -> None:
        if key not in self._env_saved:
            self._env_saved[key] = os.environ.get(key)
        os.environ[key] = value

    def _build(self):
        # Source pattern, scratch, both pre-faulted.
        self.src_mem = procs.aligned_empty(self.cache_bytes)
        procs.fill_pattern(self.src_mem, start=1)
        self.scratch = procs.aligned_empty(self.cache_bytes)
        self.scratch.fill(0)
        self.src_t = self.src_mem.reshape(self.num_tensors, self.pool, BLOCK)
        self.scr_t = self.scratch.reshape(self.num_tensors, self.pool, BLOCK)
        self.src_digests = procs.block_digests(list(self.src_t), self.src_idx)

        if MOONCAKE and "GLOG_minloglevel" not in os.environ:
            self._setenv("GLOG_minloglevel", "1")  # no INFO line per Mooncake batch

        self.decode = Child(procs.decode_main, DECODE_ID, name=f"decode-{DECODE_ID}")
        msg = self.decode.recv(60)
        if msg[0] != "ready":
            raise ChildError(f"decode child: unexpected {msg!r}")
        _, self.port, self.decode.pid = msg
        layout = (
            self.num_tensors,
            [self.pool, BLOCK],
            DataType.DT_UINT8.value,
            int(Placement.DEVICE),
        )
        self.dst_addrs = {
            DST_ALLOCATED: self.decode.call("alloc", DST_ALLOCATED, *layout),
            DST_REGISTERED: self.decode.call("register", DST_REGISTERED, *layout),
        }

        self.desc = CacheDesc(
            num_tensors=self.num_tensors,
            shape=[self.pool, BLOCK],
            data_type=DataType.DT_UINT8,
            placement=Placement.DEVICE,
        )
        self._prefill("direct", PREFILL_DIRECT_ID, local_dst=True)
        if MOONCAKE:
            try:
                self._prefill("mooncake", PREFILL_MOONCAKE_ID)
            except Exception as exc:  # noqa: BLE001 - the test skips with the reason
                self.mooncake_error = f"{type(exc).__name__}: {exc}"

    def _prefill(self, transport: str, cid: int, local_dst: bool = False):
        dd = procs.start_cluster(LLMRole.PROMPT, cid, transport)
        self.prefills[transport] = {"dd": dd}
        cm = dd.cache_manager
        src = cm.register_blocks_cache(
            self.desc,
            [int(self.src_t[i].ctypes.data) for i in range(self.num_tensors)],
            BlocksCacheKey(cid, 0),
        )
        p = self.prefills[transport]
        p.update(cm=cm, src=src, info=LLMClusterInfo())
        if local_dst:
            p["local"] = cm.register_blocks_cache(
                self.desc,
                [int(self.scr_t[i].ctypes.data) for i in range(self.num_tensors)],
                BlocksCacheKey(cid, 1),
            )
        p["info"].remote_cluster_id = DECODE_ID
        p["info"].append_remote_ip_info("127.0.0.1", self.port)
        status, _ = dd.link_clusters([p["info"]], LINK_MS)
        if status != OK:
            raise RuntimeError(f"prefill {cid} ({transport}) could not link: {status.name}")
        p["linked"] = True
        info = dd.peer_info(DECODE_ID)  # which data path llmdist chose (informational)
        p["path"] = info["path"] if info else "?"

    # --- operations ---------------------------------------------------------------------
    def transfer(self, transport: str, dst: str):
        """One layer-wise B2B transfer, every layer ready at once; returns its status."""
        p = self.prefills[transport]
        if dst == "local":
            cfg = TransferWithCacheKeyConfig(
                BlocksCacheKey(p["dd"].cluster_id, 1), range(self.layers), range(self.layers)
            )
        else:
            model = DST_ALLOCATED if dst == "allocated" else DST_REGISTERED
            cfg = TransferWithCacheKeyConfig(
                BlocksCacheKey(DECODE_ID, model), range(self.layers), range(self.layers)
            )
        task = p["cm"].transfer_cache_async(p["src"], Go(), [cfg], self.src_idx, self.dst_idx)
        return task.synchronize(TASK_MS)

    def copyto(self, threads: int = 1, start: int = 0, chunk: int = 256 * MiB):
        """Contiguous np.copyto of bytes_moved bytes (src -> scratch), from byte `start`; with
        threads=2 each chunk is split in halves copied by this thread and a helper."""
        left, n, off = self.bytes_moved, self.cache_bytes, start % self.cache_bytes
        while left:
            c = min(chunk, left, n - off)
            if threads == 1:
                np.copyto(self.scratch[off : off + c], self.src_mem[off : off + c])
            else:
                h = (c // 2) & ~4095
                fut = self._helper().submit(
                    np.copyto, self.scratch[off + h : off + c], self.src_mem[off + h : off + c]
                )
                np.copyto(self.scratch[off : off + h], self.src_mem[off : off + h])
                fut.result()
            left -= c
            off = (off + c) % n

    def _helper(self):
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1)
        return self._pool

    def verify_remote(self, model_id: int) -> bool:
        got = self.decode.call("digests", model_id, self.dst_idx)
        return got == self.src_digests

    def verify_local(self) -> bool:
        s = np.asarray(self.src_idx, dtype=np.intp)
        d = np.asarray(self.dst_idx, dtype=np.intp)
        return all(
            np.array_equal(self.scr_t[i][d], self.src_t[i][s]) for i in range(self.num_tensors)
        )

    def close(self):
        for transport, p in self.prefills.items():
            dd = p["dd"]
            try:
                if p.get("linked"):
                    dd.unlink_clusters([p["info"]], LINK_MS, force=True)
            finally:
                dd.finalize()
        self.prefills.clear()
        if self.decode is not None:
            self.decode.close()
            self.decode = None
        for k, v in self._env_saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._env_saved.clear()
        if self._pool is not None:
            self._pool.shutdown()
        self.src_mem = self.scratch = self.src_t = self.scr_t = None


@pytest.fixture(scope="module")
def cluster(mem_budget, report):
    w = ClusterWorkload(min(mem_budget, CLUSTER_MEM_CAP), report)
    for n in w.notes:
        report.note(n)
    yield w
    w.close()


# ------------------------------------------------------------------------------------------
# f. B2B into another process

PATHS = {
    # name: (prefill transport, destination, description)
    "direct-shm": (
        "direct",
        "allocated",
        "same host: decode's allocated cache (POSIX shm, mapped)",
    ),
    "direct-registered": (
        "direct",
        "registered",
        "same host: decode's registered numpy memory (process_vm_writev)",
    ),
    "mooncake": ("mooncake", "allocated", "Mooncake TE, TCP over 127.0.0.1"),
    "local": ("direct", "local", "same process (reference)"),
}


def _record(benchmark, report, w, name, t_path, t_base, desc, target, extra=None, note=""):
    t_path, t_base = drop_warmup(t_path), drop_warmup(t_base)
    ratio = median(t_base) / median(t_path)
    benchmark.extra_info.update(
        path=name,
        block_size=w.block,
        layers=w.layers,
        pairs=w.pairs,
        pool=w.pool,
        bytes_moved=w.bytes_moved,
        rounds=len(t_path),
        path_gbps=gbps(w.bytes_moved, median(t_path)),
        copyto_gbps=gbps(w.bytes_moved, median(t_base)),
        ratio_vs_copyto=ratio,
        target_ratio=target,
        **(extra or {}),
    )
    report.add(
        SECTION,
        f"{name}: {desc}",
        fmt_bw(w.bytes_moved, median(t_path)),
        fmt_bw(w.bytes_moved, median(t_base)),
        f"{ratio:.2f}x",
        f">= {target}x" if target else "-",
        note,
    )
    return ratio


@pytest.mark.parametrize("name", list(PATHS))
def test_cluster_b2b_vs_copyto(benchmark, cluster, name, report, rounds_scale):
    w = cluster
    transport, dst, desc = PATHS[name]
    if transport == "mooncake":
        if not MOONCAKE:
            pytest.skip("mooncake is not importable (pip install 'llmdist[mooncake]')")
        if w.mooncake_error:
            pytest.skip(f"the Mooncake prefill did not start: {w.mooncake_error}")
    p = w.prefills[transport]
    model = {"allocated": DST_ALLOCATED, "registered": DST_REGISTERED}.get(dst)
    if model is not None:
        w.decode.call("clear", model)  # the check below proves this path wrote the bytes
    else:
        w.scratch.fill(0)
    expected_s_per_byte = 1 / 1e9 if transport == "mooncake" else 1 / 8e9
    rounds = rounds_for(w.bytes_moved, rounds_scale, expected_s_per_byte)
    t_path, t_base, t_base2, statuses = [], [], [], []

    def setup():  # the baselines run before each round, outside its timing
        t0 = time.perf_counter()
        w.copyto()
        t1 = time.perf_counter()
        w.copyto(threads=2, start=w.bytes_moved // 2)  # not the bytes just copied (cache)
        t_base.append(t1 - t0)
        t_base2.append(time.perf_counter() - t1)
        if dst == "local":  # the scratch is also the local destination: copy then clear it
            w.scratch.fill(0)

    def run():
        t0 = time.perf_counter()
        statuses.append(w.transfer(transport, dst))
        t_path.append(time.perf_counter() - t0)

    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=1)
    bad = [s for s in statuses if s != OK]
    assert not bad, f"{name}: transfers failed: {bad[:3]}"
    ok = w.verify_local() if model is None else w.verify_remote(model)
    assert ok, f"{name}: the destination does not hold the source blocks"
    target = TARGET if transport == "direct" and dst != "local" else None
    base2 = median(drop_warmup(t_base2))
    ratio2 = base2 / median(drop_warmup(t_path))
    _record(
        benchmark,
        report,
        w,
        name,
        t_path,
        t_base,
        desc,
        target,
        extra={
            "llmdist_path": p["path"],
            "transport_option": transport,
            "copyto_2threads_gbps": gbps(w.bytes_moved, base2),
            "ratio_vs_copyto_2threads": ratio2,
            "tuning": llmdist.host_tuning(),
        },
        note=f"2-thread copyto {fmt_bw(w.bytes_moved, base2)} ({ratio2:.2f}x); "
        f"llmdist path {p['path']}",
    )
