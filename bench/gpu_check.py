"""Device check on a device runtime (LLMDIST_RUNTIME, default cuda): correctness, then figures.

1. Correctness: every byte of B2B (a layer range into DEVICE and HOST destinations), C2C and C2B
   transfers, copied back to host memory and compared; on CUDA once with the copy kernel and once
   with DMA copies.
2. Figures: ``python -m llmdist bench`` (default ``local cluster --json gpu_check.json``; other
   arguments pass through), which checks the bytes of every case again and measures it against its
   same-run baselines: B2B/C2B/C2C device to device at 4/16/64 KiB for the copy kernel, DMA, one
   runtime copy per block, torch indexing (when torch sees the device) and one contiguous copy;
   swaps both ways; the event-gated prefill's tail in units of one layer's copy (torch matmuls and
   events when torch sees the GPU, else a device copy per layer); pushes and pulls into another
   process on the device (device IPC).
Targets on an H200: copy kernel >= 0.4x / 0.6x / 0.8x of the contiguous copy at 4 / 16 / 64 KiB
and >= 5x torch indexing at 4 KiB; device IPC at 64 KiB >= 0.5x; event-gated tail <= 2 layer
copies. Exits non-zero when a byte is wrong (never for a missed target); on a fake runtime (tests)
the figures mean nothing."""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np

import llmdist
from llmdist import (
    BlocksCacheKey,
    CacheDesc,
    DataType,
    LayerSynchronizer,
    LLMConfig,
    LLMDataDist,
    LLMRole,
    Placement,
    TransferConfig,
    _core,
)
from llmdist.__main__ import main as llmdist_main

FIGURES = ["local", "cluster", "--json", "gpu_check.json"]


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
            t = self.cm.transfer_cache_async(
                src, Go(), [TransferConfig(1, dst.tensor_addrs[2:6], range(1, 3))], si, di
            )
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
        t = self.cm.transfer_cache_async(
            csrc, Go(), [TransferConfig(1, rdst.tensor_addrs, None, 2)]
        )
        status = t.synchronize(60000)
        got = self.download(rdst)
        self.verify(
            "C2C row 2",
            status == llmdist.LLMStatusCode.LLM_SUCCESS
            and all((got[k] == csrc_data[k][2 * row : 3 * row]).all() for k in range(2 * layers)),
        )
        bdst = self.cm.allocate_blocks_cache(
            CacheDesc(2 * layers, [8, 2048], DataType.DT_UINT8, Placement.DEVICE)
        )
        self.upload(bdst, [np.zeros(8 * 2048, np.uint8)] * (2 * layers))
        t = self.cm.transfer_cache_async(
            csrc, Go(), [TransferConfig(1, bdst.tensor_addrs, None, 1)], None, [7, 0, 3, 4], 2048
        )
        status = t.synchronize(60000)
        got = self.download(bdst)
        ok = status == llmdist.LLMStatusCode.LLM_SUCCESS
        for k in range(2 * layers):
            exp = np.zeros((8, 2048), np.uint8)
            exp[[7, 0, 3, 4]] = csrc_data[k][row : 2 * row].reshape(4, 2048)
            ok = ok and (got[k].reshape(8, 2048) == exp).all()
        self.verify("C2B row 1 into 4 blocks", ok)
        for c in (csrc, rdst):
            self.cm.deallocate_cache(c)
        self.cm.deallocate_blocks_cache(bdst)
        self.cm.deallocate_blocks_cache(src)

    def set_copy(self, mode: str) -> bool:
        """Device-to-device copies by the copy kernel ("kernel") or DMA ("dma"); False when the
        kernel cannot be used here (the reason is printed)."""
        if self.rt.device_copy is None:  # DMA is this runtime's only way
            return mode == "dma"
        self.rt.select_device_copy("auto" if mode == "kernel" else "dma")
        if mode == "kernel" and self.rt.device_copy != "kernel":
            print(f"  copy kernel not available: {self.rt.device_copy_reason}")
            return False
        return True

    def modes(self) -> list:
        return ["kernel", "dma"] if self.rt.device_copy is not None else ["dma"]


def correctness() -> int:
    """Part 1; the number of wrong cases."""
    check = Check(os.environ.get("LLMDIST_RUNTIME", "cuda"))
    print(f"runtime {check.rt.name} {check.rt.version} ({check.rt.library})")
    print("correctness:")
    for mode in check.modes():
        if check.set_copy(mode):
            print(f" device copies by {mode}:")
            check.correctness()
    check.set_copy("kernel")
    check.stream.close()
    check.dd.finalize()
    return check.failures


if __name__ == "__main__":
    os.environ.setdefault("LLMDIST_RUNTIME", "cuda")
    wrong = correctness()
    rc = llmdist_main(["bench", *(sys.argv[1:] or FIGURES)])
    sys.exit(1 if wrong else rc)
