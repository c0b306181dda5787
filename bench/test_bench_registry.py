"""Registration with many caches held, against the same operations with few held (same run).

f. allocate_cache + deallocate_cache of a 64-tensor cache with 10,000 caches held vs with 100
g. register_cache + unregister_cache of a 64-tensor cache, same comparison

The registry keeps regions sorted in bounded chunks (O(log n) per operation), so the ratio
should stay near 1; before, every registration rebuilt arrays of all regions (O(n)). Nothing
asserts on a time."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest

from llmdist import CacheDesc, DataType, Placement

HELD = 10_000
FEW = 100
TENSORS = 64
DESC = CacheDesc(TENSORS, [1, 64], DataType.DT_UINT8, Placement.HOST)


def _per_op(op, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[5:])


@pytest.fixture
def held(cache_manager):
    """Caches held by the session's cache manager; all released afterwards."""
    caches = []
    yield caches
    for c in caches:
        cache_manager.deallocate_cache(c)


@pytest.mark.parametrize("kind", ["allocate", "register"])
def test_registration_with_many_caches(benchmark, cache_manager, held, report, rounds_scale, kind):
    cm = cache_manager
    buf = np.zeros(TENSORS * 128, dtype=np.uint8)  # a registered cache's memory (spaced)
    addrs = [buf.ctypes.data + 128 * i for i in range(TENSORS)]

    def one():
        if kind == "allocate":
            cm.deallocate_cache(cm.allocate_cache(DESC))
        else:
            cm.unregister_cache(cm.register_cache(DESC, addrs).cache_id)

    rounds = max(20, int(200 * rounds_scale))
    while len(held) < FEW:
        held.append(cm.allocate_cache(DESC))
    few = _per_op(one, rounds)
    t0 = time.perf_counter()
    while len(held) < HELD:
        held.append(cm.allocate_cache(DESC))
    fill_s = time.perf_counter() - t0
    many = benchmark.pedantic(lambda: _per_op(one, rounds), rounds=1, iterations=1)
    ratio = many / few
    benchmark.extra_info.update(
        held=HELD,
        few=FEW,
        tensors=TENSORS,
        few_us=few * 1e6,
        many_us=many * 1e6,
        ratio=ratio,
        fill_seconds=fill_s,
        target_ratio=2.0,
    )
    section = {
        "allocate": "f. allocate_cache + deallocate_cache, 64 tensors (median)",
        "register": "g. register_cache + unregister_cache, 64 tensors (median)",
    }[kind]
    report.add(
        section,
        f"{HELD} caches held",
        f"{many * 1e6:.0f} us",
        f"{few * 1e6:.0f} us ({FEW} held)",
        f"{ratio:.2f}x",
        "<= 2x",
        f"filling to {HELD} took {fill_s:.1f} s",
    )
