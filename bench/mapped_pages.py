"""Where the mapped route's 4 KiB-block time goes, without the route: 2 MiB batches of 256 random
4 KiB blocks x 2 tensors (one layer of the bench's B2B shape) through the host copy engine, in
the same rounds, into

- a cache the host runtime allocated (2 MiB huge pages, what a local B2B writes),
- a shared memfd mapping this process has already touched (4 KiB pages while shmem huge pages
  are off: what a mapped peer's cache is once written),
- a fresh mapping of the same memfd (its first write to each page takes a page fault: what the
  first transfer into a newly mapped peer cache pays),

with one contiguous copy of the same bytes into the first two as the baseline. Prints medians and
each against the huge-page batch.

    python bench/mapped_pages.py [ROUNDS]
"""

from __future__ import annotations

import ctypes
import os
import random
import statistics
import sys
import time

from host_cluster import open_host_cluster

from llmdist import CacheDesc, DataType, Placement, _core

BLOCK, POOL, TENSORS, PAIRS = 4096, 4096, 2, 256


def main(rounds: int) -> None:
    dd, stream = open_host_cluster("bench/mapped_pages.py")
    rt = dd.runtime
    size = BLOCK * POOL
    desc = CacheDesc(TENSORS, [POOL, BLOCK], DataType.DT_UINT8, Placement.DEVICE)
    src = dd.cache_manager.allocate_blocks_cache(desc)
    huge = dd.cache_manager.allocate_blocks_cache(desc)
    fd, base = _core.memfd_create(size * TENSORS)
    shm = [base + t * size for t in range(TENSORS)]
    ctypes.memset(base, 1, size * TENSORS)  # every page mapped here
    srcs = list(src.tensor_addrs)
    rng = random.Random(7)

    def batch(dsts, si, di) -> float:
        plan = _core.plan_b2b(_core.parse_indices("s", si), _core.parse_indices("d", di), BLOCK)
        t0 = time.perf_counter()
        _core.copy_pairs(rt, stream, plan, srcs, dsts, _core.CopyKind.COPY_H2H, "copy")
        return time.perf_counter() - t0

    def contiguous(dst: int) -> float:
        plan = _core.plan_c2c(PAIRS * BLOCK)
        t0 = time.perf_counter()
        _core.copy_pairs(
            rt, stream, plan, srcs, [dst, dst + size // 2], _core.CopyKind.COPY_H2H, "copy"
        )
        return time.perf_counter() - t0

    names = (
        "into huge pages (local cache)",
        "into shm, pages touched",
        "into shm, fresh mapping",
        "contiguous into huge pages",
        "contiguous into shm",
    )
    times = {n: [] for n in names}
    try:
        for _ in range(rounds):
            si, di = rng.sample(range(POOL), PAIRS), rng.sample(range(POOL), PAIRS)
            times[names[0]].append(batch(list(huge.tensor_addrs), si, di))
            times[names[1]].append(batch(shm, si, di))
            fresh = _core.memfd_map(fd, size * TENSORS)
            try:
                times[names[2]].append(batch([fresh + t * size for t in range(TENSORS)], si, di))
            finally:
                _core.shm_unmap(fresh, size * TENSORS)
            times[names[3]].append(contiguous(huge.tensor_addrs[0]))
            times[names[4]].append(contiguous(shm[0]))
    finally:
        _core.shm_unmap(base, size * TENSORS)
        os.close(fd)
        stream.close()
        dd.finalize()
    ref = statistics.median(times[names[0]])
    moved = TENSORS * PAIRS * BLOCK
    for n in names:
        m = statistics.median(times[n])
        print(f"{n:32s} {m * 1e6:8.1f} us  {moved / m / 1e9:6.2f} GB/s  {m / ref:5.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 60)
