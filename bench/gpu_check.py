"""Device check: correctness and bandwidth of layer-wise transfers on a device runtime.

Run on a machine with a GPU (LLMDIST_RUNTIME=cuda) or an NPU (acl). It verifies every byte of
B2B, C2B, C2C and device-to-host transfers by copying results back to host memory, then measures
in the same run:
  - B2B device-to-device, 32 layers x 256 random blocks of 64 KiB, against one contiguous
    device-to-device copy of the same bytes (target >= 0.7x);
  - the same with 4 KiB blocks against one runtime copy per block issued from a C loop
    (target: llmdist >= 3x faster).
Prints a table and exits non-zero when a byte is wrong (never for a missed target)."""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

import numpy as np

import llmdist
from llmdist import (BlocksCacheKey, CacheDesc, DataType, LayerSynchronizer, LLMConfig,
                     LLMDataDist, LLMRole, Placement, TransferConfig)
from llmdist import _core


class Go(LayerSynchronizer):
    def synchronize_layer(self, layer_index, timeout_in_millis):
        return True


def host_view(addr: int, n: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(addr))


class Check:
    def __init__(self, runtime_name: str) -> None:
        self.dd = LLMDataDist(LLMRole.PROMPT, 1)
        cfg = LLMConfig()
        cfg.device_id = int(os.environ.get("LLMDIST_DEVICE", "0"))
        opts = cfg.generate_options()
        opts["llmdist.runtime"] = runtime_name
        self.dd.init(opts)
        self.cm = self.dd.cache_manager
        self.rt = self.dd.runtime
        self.stream = _core.Stream(self.rt)
        self.failures = 0

    def upload(self, cache, data: list) -> None:
        """Fill a device cache from host arrays through a page-locked staging cache."""
        desc = cache.cache_desc
        stage = self.cm.allocate_cache(CacheDesc(1, [desc.size], DataType.DT_UINT8, Placement.HOST))
        for addr, arr in zip(cache.tensor_addrs, data):
            host_view(stage.tensor_addrs[0], desc.size)[:] = arr
            self.rt.memcpy(addr, stage.tensor_addrs[0], desc.size, self.stream)
            self.stream.synchronize()
        self.cm.deallocate_cache(stage)

    def download(self, cache) -> list:
        desc = cache.cache_desc
        if desc.placement == Placement.HOST:
            return [host_view(a, desc.size).copy() for a in cache.tensor_addrs]
        stage = self.cm.allocate_cache(CacheDesc(1, [desc.size], DataType.DT_UINT8, Placement.HOST))
        out = []
        for addr in cache.tensor_addrs:
            self.rt.memcpy(stage.tensor_addrs[0], addr, desc.size, self.stream)
            self.stream.synchronize()
            out.append(host_view(stage.tensor_addrs[0], desc.size).copy())
        self.cm.deallocate_cache(stage)
        return out

    def verify(self, name: str, ok: bool) -> None:
        print(f"  {name:<40} {'ok' if ok else 'WRONG BYTES'}")
        self.failures += not ok

    def correctness(self) -> None:
        rng = np.random.default_rng(0)
        layers, blocks, block = 4, 64, 4096
        desc = CacheDesc(2 * layers, [blocks, block], DataType.DT_UINT8, Placement.DEVICE)
        src_data = [rng.integers(0, 255, desc.size, dtype=np.uint8) for _ in range(2 * layers)]
        src = self.cm.allocate_blocks_cache(desc, BlocksCacheKey(1, 0))
        self.upload(src, src_data)
        si = [3, 4, 5, 9, 60, 1]
        di = [10, 11, 12, 0, 63, 30]
        for placement in (Placement.DEVICE, Placement.HOST):
            ddesc = CacheDesc(2 * layers, [blocks, block], DataType.DT_UINT8, placement)
            dst = self.cm.allocate_blocks_cache(ddesc)
            zeros = [np.zeros(desc.size, np.uint8)] * (2 * layers)
            if placement == Placement.DEVICE:
                self.upload(dst, zeros)
            else:
                for a in dst.tensor_addrs:
                    host_view(a, desc.size)[:] = 0
            t = self.cm.transfer_cache_async(src, Go(), [TransferConfig(1, dst.tensor_addrs[2:6], range(1, 3))], si, di)
            status = t.synchronize(60000)
            got = self.download(dst)
            ok = status == llmdist.LLMStatusCode.LLM_SUCCESS
            for k in range(2 * layers):
                exp = np.zeros((blocks, block), np.uint8)
                if 2 <= k < 6:
                    exp[di] = src_data[k].reshape(blocks, block)[si]
                ok = ok and (got[k].reshape(blocks, block) == exp).all()
            self.verify(f"B2B layers 1-2 to {placement.name}", ok)
            self.cm.deallocate_blocks_cache(dst)
        # C2C and C2B from a non-blocks cache
        cdesc = CacheDesc(2 * layers, [4, 8192], DataType.DT_UINT8, Placement.DEVICE)
        csrc_data = [rng.integers(0, 255, cdesc.size, dtype=np.uint8) for _ in range(2 * layers)]
        csrc = self.cm.allocate_cache(cdesc)
        self.upload(csrc, csrc_data)
        row = cdesc.size // 4
        rdesc = CacheDesc(2 * layers, [1, 8192], DataType.DT_UINT8, Placement.DEVICE)
        rdst = self.cm.allocate_cache(rdesc)
        t = self.cm.transfer_cache_async(csrc, Go(), [TransferConfig(1, rdst.tensor_addrs, None, 2)])
        status = t.synchronize(60000)
        got = self.download(rdst)
        self.verify("C2C row 2", status == llmdist.LLMStatusCode.LLM_SUCCESS and all(
            (got[k] == csrc_data[k][2 * row:3 * row]).all() for k in range(2 * layers)))
        bdst = self.cm.allocate_blocks_cache(CacheDesc(2 * layers, [8, 2048], DataType.DT_UINT8, Placement.DEVICE))
        self.upload(bdst, [np.zeros(8 * 2048, np.uint8)] * (2 * layers))
        t = self.cm.transfer_cache_async(csrc, Go(), [TransferConfig(1, bdst.tensor_addrs, None, 1)],
                                         None, [7, 0, 3, 4], 2048)
        status = t.synchronize(60000)
        got = self.download(bdst)
        ok = status == llmdist.LLMStatusCode.LLM_SUCCESS
        for k in range(2 * layers):
            exp = np.zeros((8, 2048), np.uint8)
            exp[[7, 0, 3, 4]] = csrc_data[k][row:2 * row].reshape(4, 2048)
            ok = ok and (got[k].reshape(8, 2048) == exp).all()
        self.verify("C2B row 1 into 4 blocks", ok)
        for c in (csrc, rdst):
            self.cm.deallocate_cache(c)
        self.cm.deallocate_blocks_cache(bdst)
        self.cm.deallocate_blocks_cache(src)

    def bench(self, block: int, reps: int) -> dict:
        layers, pool, pairs = 32, 1024, 256
        desc = CacheDesc(2 * layers, [pool, block], DataType.DT_UINT8, Placement.DEVICE)
        src = self.cm.allocate_blocks_cache(desc)
        dst = self.cm.allocate_blocks_cache(desc)
        rng = np.random.default_rng(1)
        si = rng.choice(pool, pairs, replace=False).tolist()
        di = rng.choice(pool, pairs, replace=False).tolist()
        nbytes = 2 * layers * pairs * block
        cfg = [TransferConfig(1, dst.tensor_addrs)]
        best_l = best_c = best_e = float("inf")
        flat_src = self.cm.allocate_cache(CacheDesc(1, [nbytes], DataType.DT_UINT8, Placement.DEVICE))
        flat_dst = self.cm.allocate_cache(CacheDesc(1, [nbytes], DataType.DT_UINT8, Placement.DEVICE))
        dsts = [d + di[j] * block for d in dst.tensor_addrs for j in range(pairs)]
        srcs = [s + si[j] * block for s in src.tensor_addrs for j in range(pairs)]
        for _ in range(reps):
            t0 = time.perf_counter()
            t = self.cm.transfer_cache_async(src, Go(), cfg, si, di)
            t.synchronize()
            best_l = min(best_l, time.perf_counter() - t0)
            t0 = time.perf_counter()
            self.rt.memcpy(flat_dst.tensor_addrs[0], flat_src.tensor_addrs[0], nbytes, self.stream)
            self.stream.synchronize()
            best_c = min(best_c, time.perf_counter() - t0)
            t0 = time.perf_counter()
            self.rt.memcpy_each(dsts, srcs, block, self.stream)
            self.stream.synchronize()
            best_e = min(best_e, time.perf_counter() - t0)
        for c in (flat_src, flat_dst):
            self.cm.deallocate_cache(c)
        for c in (src, dst):
            self.cm.deallocate_blocks_cache(c)
        return {"block": block, "bytes": nbytes, "llmdist_GBps": nbytes / best_l / 1e9,
                "contiguous_GBps": nbytes / best_c / 1e9, "per_block_GBps": nbytes / best_e / 1e9,
                "vs_contiguous": best_c / best_l, "vs_per_block": best_e / best_l}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", default=os.environ.get("LLMDIST_RUNTIME", "cuda"))
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    check = Check(args.runtime)
    print(f"runtime {check.rt.name} {check.rt.version} ({check.rt.library})")
    print("correctness:")
    check.correctness()
    print("bandwidth (best of %d; ratios against baselines in this run):" % args.reps)
    print(f"  {'block':>7} {'llmdist GB/s':>13} {'contig GB/s':>12} {'per-block GB/s':>15} "
          f"{'x contig':>9} {'x per-block':>12}")
    for block in (4096, 65536):
        r = check.bench(block, args.reps)
        print(f"  {block >> 10:>5}Ki {r['llmdist_GBps']:>13.1f} {r['contiguous_GBps']:>12.1f} "
              f"{r['per_block_GBps']:>15.1f} {r['vs_contiguous']:>9.2f} {r['vs_per_block']:>12.2f}")
    print("targets: 64 KiB >= 0.70x contiguous; 4 KiB >= 3x per-block")
    check.dd.finalize()
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
