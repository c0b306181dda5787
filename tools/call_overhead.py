"""Where transfer_cache_async's return time goes on the host runtime: the same call (61 layers x
256 blocks of 4 KiB, and one layer) made back to back with its layers held, and made right after
the previous call's copies (a one-layer transfer, 2 MiB, or a 61-layer one, 122 MiB) ran.

Run from a checkout with the extension built: python tools/call_overhead.py [--rounds N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmdist import (  # noqa: E402
    CacheDesc,
    DataType,
    LLMConfig,
    LLMDataDist,
    LLMRole,
    Placement,
    TransferConfig,
)
from llmdist.transfer_types import LayerSynchronizer  # noqa: E402

LAYERS = 61
POOL = 512
PAIRS = 256
BLOCK_ELEMS = 2048  # float16: 4 KiB blocks
HELD = 4  # calls back to back while the layers are held


class Gate(LayerSynchronizer):
    """Holds every layer until released."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def synchronize_layer(self, layer_index, timeout_in_millis):
        return self.event.wait(None if timeout_in_millis is None else timeout_in_millis / 1000.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args()
    dd = LLMDataDist(LLMRole.PROMPT, 1)
    cfg = LLMConfig()
    cfg.device_id = 0
    cfg.enable_cache_manager = True
    dd.init(cfg.generate_options())
    cm = dd.cache_manager
    desc = CacheDesc(2 * LAYERS, [POOL, BLOCK_ELEMS], DataType.DT_FLOAT16, Placement.DEVICE)
    src = cm.allocate_blocks_cache(desc)
    dst = cm.allocate_blocks_cache(desc)
    rng = random.Random(1)
    si, di = rng.sample(range(POOL), PAIRS), rng.sample(range(POOL), PAIRS)
    calls = {
        f"{LAYERS} layers": [TransferConfig(1, list(dst.tensor_addrs))],
        "1 layer": [TransferConfig(1, list(dst.tensor_addrs[:2]), range(0, 1))],
    }
    times: Dict[str, List[float]] = {}
    for r in range(args.rounds + 2):
        # each call once after each kind of transfer, then HELD calls back to back
        for before in calls:
            for name, cfgs in calls.items():
                gate = Gate()
                tasks = [cm.transfer_cache_async(src, gate, calls[before], si, di)]
                gate.event.set()
                tasks[0].synchronize()
                gate = Gate()
                for k in range(HELD):
                    t0 = time.perf_counter()
                    tasks.append(cm.transfer_cache_async(src, gate, cfgs, si, di))
                    t = time.perf_counter() - t0
                    where = f"after a {before} transfer" if k == 0 else "back to back"
                    if r >= 2:
                        times.setdefault(f"{name} call, {where}", []).append(t)
                gate.event.set()
                for task in tasks[1:]:
                    task.synchronize()
    cm.deallocate_blocks_cache(src)
    cm.deallocate_blocks_cache(dst)
    dd.finalize()
    for label, ts in times.items():
        print(f"{label:45s} median {statistics.median(ts) * 1e6:7.1f} us  ({len(ts)} calls)")


if __name__ == "__main__":
    main()
