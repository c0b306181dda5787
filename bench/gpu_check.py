"""Device check: correctness and bandwidth of layer-wise transfers on a device runtime.

Run on a machine with a GPU (LLMDIST_RUNTIME=cuda) or an NPU (acl). It verifies every byte of
B2B, C2B, C2C and device-to-host transfers (on CUDA with the copy kernel and with DMA) by copying
results back to host memory, then measures in the same run (best of --reps):
  - B2B device to device, --layers layers x --pairs random blocks out of --pool, K and V, one
    call, at 4, 16 and 64 KiB blocks: llmdist with the copy kernel, llmdist with DMA, one runtime
    copy per block from a C loop, torch `dst[:, di] = src[:, si]` (when torch sees the GPU) and
    one contiguous copy of the same bytes (targets: kernel >= 0.4x / 0.6x / 0.8x contiguous at
    4 / 16 / 64 KiB, and >= 5x torch at 4 KiB);
  - the same B2B push at 64 KiB into a cache of another process on this device (device IPC),
    against a local contiguous copy (target >= 0.5x);
  - an event-gated prefill: per layer some compute on a model stream (torch matmuls when torch
    sees the GPU, else a device copy standing in for it), then the layer's event; the transfer
    waits for each event on the device. Reports the tail after the last layer's compute, in
    units of one layer's copy (target <= 2x).
Prints one table and writes the figures as JSON (--json). Exits non-zero when a byte is wrong
(never for a missed target). On a fake runtime (tests) the figures mean nothing."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

import numpy as np

import llmdist
from llmdist import (BlocksCacheKey, CacheDesc, DataType, EventSynchronizer, LayerSynchronizer,
                     LLMClusterInfo, LLMConfig, LLMDataDist, LLMRole, Placement, TransferConfig)
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

    # ---- device copy mode --------------------------------------------------------------

    def set_copy(self, mode: str) -> bool:
        """Device-to-device copies by the copy kernel ("kernel") or DMA ("dma"); False when the
        kernel cannot be used here (the reason is printed once)."""
        if self.rt.device_copy is None:         # DMA is this runtime's only way
            return mode == "dma"
        self.rt.select_device_copy("auto" if mode == "kernel" else "dma")
        if mode == "kernel" and self.rt.device_copy != "kernel":
            if not self.kernel_why_said:
                print(f"  copy kernel not available: {self.rt.device_copy_reason}")
                self.kernel_why_said = True
            return False
        return True

    def modes(self) -> list:
        return ["kernel", "dma"] if self.rt.device_copy is not None else ["dma"]

    # ---- bandwidth ----------------------------------------------------------------------

    def timed(self, fn, reps: int) -> float:
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    def contiguous(self, nbytes: int, reps: int) -> float:
        """Best time of one device-to-device copy of nbytes."""
        a = self.cm.allocate_cache(CacheDesc(1, [nbytes], DataType.DT_UINT8, Placement.DEVICE))
        b = self.cm.allocate_cache(CacheDesc(1, [nbytes], DataType.DT_UINT8, Placement.DEVICE))

        def go():
            self.rt.memcpy(b.tensor_addrs[0], a.tensor_addrs[0], nbytes, self.stream)
            self.stream.synchronize()
        t = self.timed(go, reps)
        for c in (a, b):
            self.cm.deallocate_cache(c)
        return t

    def torch_indexing(self, block: int, layers: int, pool: int, si, di, reps: int):
        """Best time of torch `dst[:, di] = src[:, si]` over the whole cache, or None."""
        if self.torch is None:
            return None
        torch = self.torch
        dev = torch.device("cuda", self.rt.device_id)
        src = torch.empty((2 * layers, pool, block), dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        s = torch.tensor(si, device=dev)
        d = torch.tensor(di, device=dev)

        def go():
            dst[:, d] = src[:, s]
            torch.cuda.synchronize()
        go()
        t = self.timed(go, reps)
        del src, dst
        torch.cuda.empty_cache()
        return t

    def bench(self, block: int, layers: int, pool: int, pairs: int, reps: int) -> dict:
        desc = CacheDesc(2 * layers, [pool, block], DataType.DT_UINT8, Placement.DEVICE)
        src = self.cm.allocate_blocks_cache(desc)
        dst = self.cm.allocate_blocks_cache(desc)
        rng = np.random.default_rng(1)
        si = rng.choice(pool, pairs, replace=False).tolist()
        di = rng.choice(pool, pairs, replace=False).tolist()
        nbytes = 2 * layers * pairs * block
        cfg = [TransferConfig(1, dst.tensor_addrs)]
        row = {"block": block, "bytes": nbytes}

        def transfer():
            t = self.cm.transfer_cache_async(src, Go(), cfg, si, di)
            if t.synchronize() != llmdist.LLMStatusCode.LLM_SUCCESS:
                raise RuntimeError(f"transfer failed: {t.errors}")
        for mode in ("kernel", "dma"):
            row[mode] = self.timed(transfer, reps) if self.set_copy(mode) else None
        self.set_copy("kernel")
        dsts = [d + di[j] * block for d in dst.tensor_addrs for j in range(pairs)]
        srcs = [s + si[j] * block for s in src.tensor_addrs for j in range(pairs)]

        def per_block():
            self.rt.memcpy_each(dsts, srcs, block, self.stream)
            self.stream.synchronize()
        row["per_block"] = self.timed(per_block, reps)
        for c in (src, dst):
            self.cm.deallocate_blocks_cache(c)
        row["torch"] = self.torch_indexing(block, layers, pool, si, di, reps)
        row["contiguous"] = self.contiguous(nbytes, reps)
        return row

    # ---- device IPC to another process on this device -----------------------------------

    def ipc(self, block: int, layers: int, pool: int, pairs: int, reps: int) -> dict:
        """Push B2B into a cache another process allocated on this device (device IPC)."""
        child = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--ipc-child", "--runtime", self.rt.name,
             "--block", str(block), "--layers", str(layers), "--pool", str(pool)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        out = {"block": block, "bytes": 2 * layers * pairs * block}
        try:
            hello = json.loads(child.stdout.readline())
            info = LLMClusterInfo()
            info.remote_cluster_id = IPC_CHILD_CLUSTER
            info.append_remote_ip_info("127.0.0.1", hello["port"])
            code, _ = self.dd.link_clusters([info], 10000)
            if code != llmdist.LLMStatusCode.LLM_SUCCESS:
                raise RuntimeError(f"link_clusters to the child failed: {code}")
            desc = CacheDesc(2 * layers, [pool, block], DataType.DT_UINT8, Placement.DEVICE)
            src = self.cm.allocate_blocks_cache(desc)
            self.upload(src, ipc_pattern(desc, IPC_SEED))
            rng = np.random.default_rng(2)
            si = rng.choice(pool, pairs, replace=False).tolist()
            di = rng.choice(pool, pairs, replace=False).tolist()
            cfg = [TransferConfig(IPC_CHILD_CLUSTER, hello["addrs"])]

            def push():
                t = self.cm.transfer_cache_async(src, Go(), cfg, si, di)
                if t.synchronize() != llmdist.LLMStatusCode.LLM_SUCCESS:
                    raise RuntimeError(f"IPC transfer failed: {t.errors}")
            out["device_copy"] = self.rt.device_copy
            out["ipc"] = self.timed(push, reps)
            child.stdin.write(json.dumps({"si": si, "di": di}) + "\n")
            child.stdin.flush()
            ok = json.loads(child.stdout.readline())["ok"]
            self.verify(f"B2B {block >> 10} KiB into another process (device IPC)", ok)
            out["ok"] = ok
            self.dd.unlink_clusters([info], 10000, force=True)
            self.cm.deallocate_blocks_cache(src)
        finally:
            child.stdin.close()
            child.wait(60)
        out["contiguous"] = self.contiguous(out["bytes"], reps)
        return out

    # ---- event-gated prefill -------------------------------------------------------------

    def prefill(self, block: int, layers: int, pool: int, pairs: int, reps: int, work: int) -> dict:
        """A forward pass of `layers` layers, each some compute then the layer's event; the
        transfer of the whole cache runs alongside, each layer gated by its event on the device.
        Tail: from the last layer's compute done to the transfer done."""
        desc = CacheDesc(2 * layers, [pool, block], DataType.DT_UINT8, Placement.DEVICE)
        src = self.cm.allocate_blocks_cache(desc)
        dst = self.cm.allocate_blocks_cache(desc)
        rng = np.random.default_rng(3)
        si = rng.choice(pool, pairs, replace=False).tolist()
        di = rng.choice(pool, pairs, replace=False).tolist()
        cfg = [TransferConfig(1, dst.tensor_addrs)]
        one = [TransferConfig(1, dst.tensor_addrs[:2], range(0, 1))]

        def one_layer():
            t = self.cm.transfer_cache_async(src, Go(), one, si, di)
            t.synchronize()
        layer_copy = self.timed(one_layer, reps)
        torch = self.torch
        if torch is not None:
            n = work
            a = torch.randn((n, n), dtype=torch.float16, device=f"cuda:{self.rt.device_id}")
            model = torch.cuda.Stream()
            events = [torch.cuda.Event() for _ in range(layers)]
            with torch.cuda.stream(model):
                for ev in events:
                    ev.record()         # torch creates the event at its first record
            torch.cuda.synchronize()
            sync = EventSynchronizer(self.rt, [ev.cuda_event for ev in events])

            def layer(i):
                with torch.cuda.stream(model):
                    for _ in range(2):
                        a @ a
                    events[i].record()
                sync.mark_recorded(i)

            def model_done():
                model.synchronize()
            compute = f"torch matmuls {n}x{n} fp16, 2 per layer"
        else:
            # no torch on this runtime: a device copy of `work` bytes stands in for a layer
            sync = EventSynchronizer(self.rt, layers)
            model = _core.Stream(self.rt)
            buf = [self.cm.allocate_cache(CacheDesc(1, [work], DataType.DT_UINT8, Placement.DEVICE))
                   for _ in range(2)]

            def layer(i):
                self.rt.memcpy(buf[1].tensor_addrs[0], buf[0].tensor_addrs[0], work, model)
                sync.record(i, model)

            def model_done():
                model.synchronize()
            compute = f"a device copy of {work} bytes per layer"
        out = {"layers": layers, "compute": compute, "layer_copy": layer_copy}
        for mode in self.modes():
            if not self.set_copy(mode):
                out[mode] = None
                continue
            best = None
            for _ in range(reps):
                sync.reset()
                t = self.cm.transfer_cache_async(src, sync, cfg, si, di)
                t0 = time.perf_counter()
                for i in range(layers):
                    layer(i)
                model_done()
                t_last = time.perf_counter()
                status = t.synchronize(60000)
                t_end = time.perf_counter()
                if status != llmdist.LLMStatusCode.LLM_SUCCESS:
                    raise RuntimeError(f"event-gated transfer failed: {t.errors}")
                run = {"forward": t_last - t0, "tail": max(t_end - t_last, 0.0)}
                if best is None or run["tail"] < best["tail"]:
                    best = run
            out[mode] = best
        self.set_copy("kernel")
        if torch is None:
            for c in buf:
                self.cm.deallocate_cache(c)
        for c in (src, dst):
            self.cm.deallocate_blocks_cache(c)
        return out


IPC_CHILD_CLUSTER = 2
IPC_SEED = 7


def ipc_pattern(desc, seed: int) -> list:
    """The bytes the IPC source cache holds, reproducible in the child."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, desc.size, dtype=np.uint8) for _ in range(desc.num_tensors)]


def ipc_child(args) -> int:
    """The other process of the IPC check: a listening decoder that allocates the destination
    cache, prints {"port", "addrs"}, then checks the bytes it received."""
    dd = LLMDataDist(LLMRole.DECODER, IPC_CHILD_CLUSTER)
    cfg = LLMConfig()
    cfg.device_id = int(os.environ.get("LLMDIST_DEVICE", "0"))
    cfg.listen_ip_info = "127.0.0.1:0"
    cfg.enable_remote_cache_accessible = True
    opts = cfg.generate_options()
    opts["llmdist.runtime"] = args.runtime
    dd.init(opts)
    check = Check.__new__(Check)
    check.dd, check.cm, check.rt = dd, dd.cache_manager, dd.runtime
    check.stream = _core.Stream(check.rt)
    desc = CacheDesc(2 * args.layers, [args.pool, args.block], DataType.DT_UINT8, Placement.DEVICE)
    dst = check.cm.allocate_blocks_cache(desc, BlocksCacheKey(IPC_CHILD_CLUSTER, 0))
    check.upload(dst, [np.zeros(desc.size, np.uint8)] * desc.num_tensors)
    print(json.dumps({"port": dd.listen_port, "addrs": list(dst.tensor_addrs)}), flush=True)
    line = sys.stdin.readline()
    if line:
        req = json.loads(line)
        expect = ipc_pattern(desc, IPC_SEED)
        got = check.download(dst)
        ok = True
        for k in range(desc.num_tensors):
            e = np.zeros((args.pool, args.block), np.uint8)
            e[req["di"]] = expect[k].reshape(args.pool, args.block)[req["si"]]
            ok = ok and bool((got[k].reshape(args.pool, args.block) == e).all())
        print(json.dumps({"ok": ok}), flush=True)
        sys.stdin.readline()        # the parent closes stdin when it is done
    dd.finalize()
    return 0


def load_torch(rt):
    """torch, when it drives a CUDA device of this runtime (the baselines use torch.cuda); else
    None."""
    if rt.framework_device != "cuda":
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def gbps(nbytes: int, t) -> str:
    return f"{nbytes / t / 1e9:9.1f}" if t else f"{'-':>9}"


def ratio(a, b) -> str:
    return f"{b / a:6.2f}x" if a and b else f"{'-':>7}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", default=os.environ.get("LLMDIST_RUNTIME", "cuda"))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--pool", type=int, default=1024, help="blocks per tensor")
    ap.add_argument("--pairs", type=int, default=256, help="blocks moved per tensor")
    ap.add_argument("--blocks", default="4,16,64", help="block sizes in KiB")
    ap.add_argument("--prefill-work", type=int, default=8192,
                    help="matmul size per layer (torch), else bytes of the stand-in copy")
    ap.add_argument("--json", default="gpu_check.json", help="where to write the figures")
    ap.add_argument("--ipc-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--block", type=int, default=65536, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ipc_child:
        return ipc_child(args)
    check = Check(args.runtime)
    check.kernel_why_said = False
    check.torch = load_torch(check.rt)
    print(f"runtime {check.rt.name} {check.rt.version} ({check.rt.library}); "
          f"torch: {'yes' if check.torch is not None else 'no'}")
    report = {"runtime": llmdist.runtime_info(), "args": vars(args)}
    print("correctness:")
    for mode in check.modes():
        if check.set_copy(mode):
            print(f" device copies by {mode}:")
            check.correctness()
    check.set_copy("kernel")
    blocks = [int(b) * 1024 for b in args.blocks.split(",")]
    rows = [check.bench(b, args.layers, args.pool, args.pairs, args.reps) for b in blocks]
    ipc_block = 65536 if 65536 in blocks else blocks[-1]
    ipc = check.ipc(ipc_block, args.layers, args.pool, args.pairs, args.reps)
    work = args.prefill_work if check.torch is not None else args.prefill_work * 1024
    pf = check.prefill(16384 if 16384 in blocks else blocks[0], args.layers, args.pool,
                       args.pairs, args.reps, work)
    report.update(bandwidth=rows, ipc=ipc, prefill=pf, failures=check.failures)

    print(f"\n{args.layers} layers x {args.pairs} blocks of {args.pool}, K and V, one call; "
          f"GB/s, best of {args.reps}; ratios against this run's baselines")
    print(f"  {'case':<28} {'kernel':>9} {'DMA':>9} {'per-block':>9} {'torch':>9} {'contig':>9}"
          f" {'k/contig':>8} {'k/torch':>8}")
    for r in rows:
        n = r["bytes"]
        print(f"  {'B2B %d KiB' % (r['block'] >> 10):<28} {gbps(n, r['kernel'])} {gbps(n, r['dma'])} "
              f"{gbps(n, r['per_block'])} {gbps(n, r['torch'])} {gbps(n, r['contiguous'])} "
              f"{ratio(r['kernel'], r['contiguous']):>8} {ratio(r['kernel'], r['torch']):>8}")
    n = ipc["bytes"]
    print(f"  {'IPC B2B %d KiB (%s)' % (ipc['block'] >> 10, ipc.get('device_copy')):<28} "
          f"{gbps(n, ipc.get('ipc'))} {'':>9} {'':>9} {'':>9} {gbps(n, ipc['contiguous'])} "
          f"{ratio(ipc.get('ipc'), ipc['contiguous']):>8}")
    for mode in check.modes():
        best = pf.get(mode)
        if best:
            print(f"  prefill tail ({mode}): {best['tail'] * 1e3:.2f} ms after the last layer = "
                  f"{best['tail'] / pf['layer_copy']:.2f} x one layer's copy "
                  f"({pf['layer_copy'] * 1e3:.2f} ms); forward {best['forward'] * 1e3:.1f} ms, "
                  f"{pf['compute']}")
    print("targets (H200): kernel >= 0.4x/0.6x/0.8x contig at 4/16/64 KiB; >= 5x torch at 4 KiB; "
          "IPC 64 KiB >= 0.5x contig; prefill tail <= 2x one layer's copy")
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"figures: {args.json}")
    check.dd.finalize()
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
