"""Streaming stores for small blocks, with and without: one copy_pairs call of 256 random blocks
per tensor (enough tensors to make each batch size) through the host copy engine, with plain
stores (the knobs' defaults, stream_store_short_batch_bytes 0) and with streaming stores for
every run (stream_store_min_bytes 64), alternating in the same rounds. Prints, for each block
size and batch size, the median time of the first over the second (above 1: streaming stores
are faster): the sweep behind stream_store_short_batch_bytes (docs/tuning.md).

    python bench/short_runs.py [ROUNDS]
"""

from __future__ import annotations

import random
import statistics
import sys
import time

from host_cluster import open_host_cluster

import llmdist
from llmdist import CacheDesc, DataType, Placement, _core

POOL, PAIRS = 1024, 256
BLOCKS = (64, 128, 256, 512, 1024, 2048)
BATCH_KIB = (256, 1024, 4096, 8192)


def main(rounds: int) -> None:
    dd, stream = open_host_cluster("bench/short_runs.py")
    rt = dd.runtime
    saved = llmdist.host_tuning()
    settings = {
        "plain": dict(stream_store_min_bytes=saved["stream_store_min_bytes"]),
        "streaming": dict(stream_store_min_bytes=64),
    }
    cm = dd.cache_manager
    rng = random.Random(1)
    try:
        print(f"plain / streaming stores, {rounds} rounds; per block size: batch, ratio")
        for block in BLOCKS:
            row = []
            for kib in BATCH_KIB:
                tensors = max(1, kib * 1024 // (PAIRS * block))
                desc = CacheDesc(tensors, [POOL, block], DataType.DT_UINT8, Placement.DEVICE)
                src, dst = cm.allocate_blocks_cache(desc), cm.allocate_blocks_cache(desc)
                si, di = rng.sample(range(POOL), PAIRS), rng.sample(range(POOL), PAIRS)
                plan = _core.plan_b2b(
                    _core.parse_indices("s", si), _core.parse_indices("d", di), block
                )
                srcs, dsts = list(src.tensor_addrs), list(dst.tensor_addrs)
                times = {name: [] for name in settings}
                try:
                    for _ in range(rounds):
                        for name, knobs in settings.items():
                            llmdist.set_host_tuning(stream_store_short_batch_bytes=0, **knobs)
                            t0 = time.perf_counter()
                            _core.copy_pairs(
                                rt, stream, plan, srcs, dsts, _core.CopyKind.COPY_H2H, "copy"
                            )
                            times[name].append(time.perf_counter() - t0)
                finally:
                    cm.deallocate_blocks_cache(src)
                    cm.deallocate_blocks_cache(dst)
                ratio = statistics.median(times["plain"]) / statistics.median(times["streaming"])
                row.append(f"{tensors * PAIRS * block // 1024:5d} KiB {ratio:4.2f}x")
            print(f"{block:5d} B blocks: " + "  ".join(row), flush=True)
    finally:
        llmdist.set_host_tuning(**saved)
        stream.close()
        dd.finalize()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
