"""Runtime choice and the device backends, tested without hardware.

ACL runs against the fake libascendcl.so built from tests/fake_acl (host memory, one thread per
stream, the real API's argument checks); CUDA against the real libcudart of the
nvidia-cuda-runtime wheel (or the system's), which answers "no driver" here. Each scenario runs
in a fresh interpreter, since a process loads a runtime once and drives one runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from .helpers import ROOT, build_fake_runtime

PRELUDE = textwrap.dedent("""
    import ctypes, json, os, sys, threading
    import numpy as np
    from llmdist import *
    from llmdist import _core
    class Go(LayerSynchronizer):
        def synchronize_layer(self, layer, timeout):
            return True
    def start(options=None, cid=1):
        dd = LLMDataDist(LLMRole.PROMPT, cid)
        c = LLMConfig(); c.device_id = 0
        opts = c.generate_options(); opts.update(options or {})
        dd.init(opts)
        return dd, dd.cache_manager
    def view(addr, n):
        return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(addr))
    def fill_blocks(cm, layers=4, blocks=16, block=256, placement=Placement.DEVICE):
        desc = CacheDesc(2 * layers, [blocks, block], DataType.DT_UINT8, placement)
        src = cm.allocate_blocks_cache(desc)
        dst = cm.allocate_blocks_cache(desc)
        rng = np.random.default_rng(1)
        for a in src.tensor_addrs:
            view(a, desc.size)[:] = rng.integers(0, 255, desc.size, dtype=np.uint8)
        for a in dst.tensor_addrs:
            view(a, desc.size)[:] = 0
        return desc, src, dst
    def same_blocks(desc, src, dst, si, di, block=256):
        for s, d in zip(src.tensor_addrs, dst.tensor_addrs):
            sv = view(s, desc.size).reshape(-1, block); dv = view(d, desc.size).reshape(-1, block)
            if not (dv[di] == sv[si]).all():
                return False
        return True
    def out(**kw):
        print("RESULT " + json.dumps(kw, default=str))
""")


def run(script: str, prelude: str = PRELUDE, **env: str) -> dict:
    """Run prelude + script in a fresh interpreter; return what it passed to out()."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMDIST_", "FAKE_ACL_"))}
    full_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
        cwd=ROOT,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULT ") :])


# --------------------------------------------------------------------------------------------
# choice of runtime
# --------------------------------------------------------------------------------------------
def test_auto_falls_back_to_host_and_says_why(tmp_path):
    r = run(
        """
        dd, cm = start()
        info = runtime_info()
        out(active=info["active"], name=dd.runtime.name, acl=info["runtimes"]["acl"],
            cuda=info["runtimes"]["cuda"])
    """,
        LLMDIST_ACL_LIBRARY=str(tmp_path / "missing" / "libascendcl.so"),
    )
    assert r["active"] == "host" and r["name"] == "host"
    assert r["acl"]["available"] is False
    assert "libascendcl" in r["acl"]["reason"] and "missing" in r["acl"]["reason"]
    assert r["cuda"]["available"] is False and r["cuda"]["reason"]


def test_explicit_cuda_without_a_driver_is_a_clear_error():
    r = run("""
        try:
            start({"llmdist.runtime": "cuda"})
            out(raised=None)
        except LLMException as e:
            out(raised=str(e), code=int(e.status_code), paths=__import__("llmdist").runtimes.cuda_library_paths())
    """)
    assert r["raised"] is not None, "cuda must not silently fall back when asked for"
    assert r["code"] == 0x5010B000 + 0x019  # LLM_FEATURE_NOT_ENABLED
    assert "cuda runtime is not available" in r["raised"]
    # the runtime's own answer: no driver (35) when libcudart loads, else the loader's message
    assert (
        "error 35" in r["raised"]
        or "driver" in r["raised"].lower()
        or "could not be loaded" in r["raised"]
    ), r["raised"]


def test_cuda_wheel_library_is_found_first():
    pytest.importorskip(
        "nvidia.cuda_runtime", reason="nvidia-cuda-runtime-cu12 wheel not installed"
    )
    r = run("""
        import llmdist.runtimes as rts
        out(paths=rts.cuda_library_paths(), info=runtime_info()["runtimes"]["cuda"])
    """)
    assert "nvidia/cuda_runtime/lib/libcudart.so.12" in r["paths"][0]
    assert r["info"]["available"] is False
    assert "error 35" in r["info"]["reason"] and "12." in r["info"]["reason"]


def test_env_and_option_pick_the_runtime(fake_acl):
    r = run(
        """
        dd, cm = start()
        a = dd.runtime.name
        out(env_choice=a, version=dd.runtime.version, library=dd.runtime.library)
    """,
        LLMDIST_RUNTIME="acl",
        LLMDIST_ACL_LIBRARY=fake_acl,
    )
    assert r["env_choice"] == "acl" and r["version"] == "1.15.0" and r["library"] == fake_acl
    r = run(
        """
        dd, cm = start({"llmdist.runtime": "host"})
        out(name=dd.runtime.name)
    """,
        LLMDIST_RUNTIME="acl",
        LLMDIST_ACL_LIBRARY=fake_acl,
    )
    assert r["name"] == "host"
    r = run(
        """
        dd, cm = start()
        out(name=dd.runtime.name)
    """,
        LLMDIST_ACL_LIBRARY=fake_acl,
    )
    assert r["name"] == "acl", "auto takes ACL when it loads and sees a device"


def test_acl_without_devices(fake_acl):
    r = run(
        """
        dd, cm = start()
        first = dd.runtime.name
        dd.finalize()
        try:
            start({"llmdist.runtime": "acl"})
            out(first=first, raised=None)
        except LLMException as e:
            out(first=first, raised=str(e))
    """,
        LLMDIST_ACL_LIBRARY=fake_acl,
        FAKE_ACL_DEVICE_COUNT="0",
    )
    assert r["first"] == "host"
    assert "sees no device" in r["raised"]


def test_bad_runtime_name():
    r = run("""
        try:
            start({"llmdist.runtime": "tpu"})
        except LLMException as e:
            out(code=int(e.status_code), msg=str(e))
    """)
    assert r["code"] == 0x5010B005 and "tpu" in r["msg"]


# --------------------------------------------------------------------------------------------
# ACL backend
# --------------------------------------------------------------------------------------------
ACL_BATCH = """
    fake = ctypes.CDLL(os.environ["LLMDIST_ACL_LIBRARY"])
    fake.fake_acl_calls.restype = ctypes.c_long
    dd, cm = start()
    desc, src, dst = fill_blocks(cm)
    si, di = [1, 2, 3, 9], [5, 6, 7, 0]
    fake.fake_acl_reset()
    t = cm.transfer_cache_async(src, Go(), [TransferConfig(1, dst.tensor_addrs)], si, di)
    out(status=str(t.synchronize(10000)), same=same_blocks(desc, src, dst, si, di),
        batch=fake.fake_acl_calls(b"aclrtMemcpyBatchAsync"),
        single=fake.fake_acl_calls(b"aclrtMemcpyAsync"))
"""


def test_acl_copies_use_the_batch_call(fake_acl):
    r = run(ACL_BATCH, LLMDIST_ACL_LIBRARY=fake_acl)
    assert r["status"] == "LLMStatusCode.LLM_SUCCESS" and r["same"]
    assert r["batch"] == 4 and r["single"] == 0, "one batch per layer, no per-run copies"


def test_acl_without_batch_copies_run_by_run(fake_acl):
    r = run(ACL_BATCH, LLMDIST_ACL_LIBRARY=fake_acl, FAKE_ACL_NO_BATCH="1")
    assert r["status"] == "LLMStatusCode.LLM_SUCCESS" and r["same"]
    # blocks 1,2,3 -> 5,6,7 merge into one run, 9 -> 0 is another: 2 runs x 2 tensors x 4
    # layers; the batch call was tried once, then dropped
    assert r["single"] == 2 * 2 * 4 and r["batch"] == 1


def test_acl_failure_fails_only_its_config(fake_acl):
    r = run(
        """
        fake = ctypes.CDLL(os.environ["LLMDIST_ACL_LIBRARY"])
        dd, cm = start()
        desc, src, dst = fill_blocks(cm)
        dst2 = cm.allocate_blocks_cache(desc)
        for a in dst2.tensor_addrs:
            view(a, desc.size)[:] = 0
        si, di = [1, 2], [3, 4]
        fake.fake_acl_reset()
        # the 3rd batch call fails: config 0's layer 1 (configs alternate per layer)
        fake.fake_acl_inject(b"aclrtMemcpyBatchAsync", 2, 507053)
        t = cm.transfer_cache_async(src, Go(), [TransferConfig(1, dst.tensor_addrs),
                                                TransferConfig(1, dst2.tensor_addrs)], si, di)
        t.synchronize(10000)
        out(results=[str(x) for x in t.get_results()], errors=t.errors,
            second_ok=same_blocks(desc, src, dst2, si, di))
    """,
        LLMDIST_ACL_LIBRARY=fake_acl,
    )
    assert r["results"] == ["LLMStatusCode.LLM_DEVICE_MEM_ERROR", "LLMStatusCode.LLM_SUCCESS"]
    assert "507053" in r["errors"][0] and "acl" in r["errors"][0]
    assert r["errors"][1] is None and r["second_ok"]


def test_acl_host_to_host_goes_through_the_host_engine(fake_acl):
    """ACL has no async H2H copy (207000) and refuses pageable memory in async copies: a
    registered (pageable) HOST source to an allocated HOST destination still works."""
    r = run(
        """
        dd, cm = start()
        desc = CacheDesc(4, [8, 128], DataType.DT_UINT8, Placement.HOST)
        arrs = [np.random.default_rng(i).integers(0, 255, desc.size, dtype=np.uint8) for i in range(4)]
        src = cm.register_blocks_cache(desc, [a.ctypes.data for a in arrs])
        dst = cm.allocate_blocks_cache(desc)
        t = cm.transfer_cache_async(src, Go(), [TransferConfig(1, dst.tensor_addrs)], [0, 5], [7, 1])
        status = str(t.synchronize(10000))
        ok = all((view(d, desc.size).reshape(8, 128)[[7, 1]] == a.reshape(8, 128)[[0, 5]]).all()
                 for a, d in zip(arrs, dst.tensor_addrs))
        out(status=status, errors=t.errors, ok=ok)
    """,
        LLMDIST_ACL_LIBRARY=fake_acl,
    )
    assert r["status"] == "LLMStatusCode.LLM_SUCCESS", r["errors"]
    assert r["ok"]


def test_acl_device_to_host(fake_acl):
    r = run(
        """
        dd, cm = start()
        desc, src, _ = fill_blocks(cm)
        hdesc = CacheDesc(desc.num_tensors, desc.shape, desc.data_type, Placement.HOST)
        dst = cm.allocate_blocks_cache(hdesc)
        t = cm.transfer_cache_async(src, Go(), [TransferConfig(1, dst.tensor_addrs)], [0, 1, 2], [2, 3, 4])
        out(status=str(t.synchronize(10000)), errors=t.errors, same=same_blocks(desc, src, dst, [0, 1, 2], [2, 3, 4]))
    """,
        LLMDIST_ACL_LIBRARY=fake_acl,
    )
    assert r["status"] == "LLMStatusCode.LLM_SUCCESS", r["errors"]
    assert r["same"]


def test_what_each_runtime_says_about_itself(fake_acl):
    """The runtime interface answers the same questions for every runtime: whether its memory
    is host RAM, how its memory is shared, how much device memory is free, and what an error
    code means (the status an allocation failure gets comes from the runtime's error class)."""
    r = run(
        """
        host = _core.Runtime.host()
        dd, cm = start({"llmdist.runtime": "acl"})
        acl = dd.runtime
        before = acl.mem_info()
        p = acl.malloc(4 << 20, True)
        after = acl.mem_info()
        acl.free(p, True)
        refused = {}
        for name, rt in (("host", host), ("acl", acl)):
            try:
                rt.malloc(1 << 62, True)
            except LLMException as e:
                refused[name] = [str(e.status_code), str(e)]
        out(host=[host.is_host, host.ipc_kind, host.ipc_align, host.mem_info(),
                  host.ipc_unavailable],
            acl=[acl.is_host, acl.ipc_kind, acl.ipc_align, acl.ipc_unavailable],
            before=before, after=after, refused=refused)
    """,
        LLMDIST_ACL_LIBRARY=fake_acl,
        FAKE_ACL_HBM_BYTES=str(64 << 20),
    )
    assert r["host"] == [True, None, 1, None, "the host runtime has no device memory"]
    assert r["acl"] == [False, "acl_ipc", 4096, None]
    assert r["before"] == [64 << 20, 64 << 20] and r["after"] == [60 << 20, 64 << 20]
    assert r["refused"]["host"][0] == "LLMStatusCode.LLM_OUT_OF_MEMORY"
    assert r["refused"]["acl"][0] == "LLMStatusCode.LLM_DEVICE_OUT_OF_MEMORY"
    assert "207001" in r["refused"]["acl"][1] and "acl runtime" in r["refused"]["acl"][1]


def test_acl_has_no_copy_kernel_and_is_torchs_npu(fake_acl):
    """ACL copies device to device by DMA only (the device-copy choice is ignored) and torch
    names its devices "npu"; both answers come from the runtime interface."""
    r = run(
        """
        dd, cm = start({"llmdist.runtime": "acl", "llmdist.device_copy": "kernel"})
        acl = dd.runtime
        out(acl=[acl.framework_device, acl.device_copy, acl.device_copy_reason])
    """,
        LLMDIST_ACL_LIBRARY=fake_acl,
    )
    assert r["acl"] == ["npu", None, None]


def test_acl_thread_without_device_is_caught(fake_acl):
    """The fake answers 107002 to a thread that did not set the device; llmdist binds every
    thread it issues work from, so transfers work from a fresh user thread too."""
    r = run(
        """
        dd, cm = start()
        res = {}
        def worker():
            desc, src, dst = fill_blocks(cm)
            t = cm.transfer_cache_async(src, Go(), [TransferConfig(1, dst.tensor_addrs)], [1], [2])
            res["status"] = str(t.synchronize(10000)); res["errors"] = t.errors
        th = threading.Thread(target=worker); th.start(); th.join(30)
        fake = ctypes.CDLL(os.environ["LLMDIST_ACL_LIBRARY"])
        p = ctypes.c_void_p()
        raw = {}
        def raw_call():
            raw["rc"] = fake.aclrtMalloc(ctypes.byref(p), 64, 0)
        th = threading.Thread(target=raw_call); th.start(); th.join(10)
        out(raw_rc=raw["rc"], **res)
    """,
        LLMDIST_ACL_LIBRARY=fake_acl,
    )
    assert r["raw_rc"] == 107002
    assert r["status"] == "LLMStatusCode.LLM_SUCCESS", r["errors"]


# --------------------------------------------------------------------------------------------
# event-based layer readiness
# --------------------------------------------------------------------------------------------
EVENT_SCRIPT = """
    dd, cm = start()
    desc, src, dst = fill_blocks(cm, layers=4)
    sync = EventSynchronizer(dd.runtime, 4)
    model = Stream(dd.runtime)
    si, di = [0, 1, 2, 3], [4, 5, 6, 7]
    t = cm.transfer_cache_async(src, sync, [TransferConfig(1, dst.tensor_addrs)], si, di)
    early = [t.get_results(0), same_blocks(desc, src, dst, si, di)]
    # layers 0 and 1 are ready; the transfer must stop before layer 2
    sync.record(0, model); sync.record(1, model)
    import time; time.sleep(0.3)
    mid = [str(x) for x in t.get_results(0)]
    def layer_done(l):
        d = view(dst.tensor_addrs[2 * l], desc.size).reshape(-1, 256)
        s = view(src.tensor_addrs[2 * l], desc.size).reshape(-1, 256)
        return bool((d[di] == s[si]).all())
    mid_layers = [layer_done(l) for l in range(4)]
    sync.record(2, model); sync.record(3, model)
    out(early=[str(x) for x in early[0]], mid=mid, mid_layers=mid_layers,
        status=str(t.synchronize(10000)), errors=t.errors,
        same=same_blocks(desc, src, dst, si, di))
"""


def test_event_synchronizer_on_host():
    r = run(EVENT_SCRIPT)
    assert r["early"] == ["LLMStatusCode.LLM_TIMEOUT"]
    assert r["mid"] == ["LLMStatusCode.LLM_TIMEOUT"]
    assert r["mid_layers"] == [True, True, False, False]
    assert r["status"] == "LLMStatusCode.LLM_SUCCESS" and r["same"]


def test_event_synchronizer_on_acl(fake_acl):
    r = run(EVENT_SCRIPT, LLMDIST_ACL_LIBRARY=fake_acl)
    assert r["mid_layers"] == [True, True, False, False]
    assert r["status"] == "LLMStatusCode.LLM_SUCCESS" and r["same"]


def test_event_synchronizer_times_out_with_sync_kv_timeout():
    r = run("""
        dd, cm = start({"llm.SyncKvCacheWaitTime": "200"})
        desc, src, dst = fill_blocks(cm, layers=2)
        sync = EventSynchronizer(dd.runtime, 2)
        t = cm.transfer_cache_async(src, sync, [TransferConfig(1, dst.tensor_addrs)], [0], [1])
        out(status=str(t.synchronize(10000)), errors=t.errors)
    """)
    assert r["status"] == "LLMStatusCode.LLM_TIMEOUT"
    assert "200 ms" in r["errors"][0]


def test_event_synchronizer_rejects_too_few_events():
    r = run("""
        dd, cm = start()
        desc, src, dst = fill_blocks(cm, layers=4)
        try:
            cm.transfer_cache_async(src, EventSynchronizer(dd.runtime, 2),
                                    [TransferConfig(1, dst.tensor_addrs)], [0], [1])
        except LLMException as e:
            out(code=int(e.status_code), msg=str(e))
    """)
    assert r["code"] == 0x5010B005 and "2 events" in r["msg"]


def test_acl_non_sync_event_handle_fails_the_config(fake_acl):
    """A framework event made without ACL_EVENT_SYNC cannot be waited on: the stream wait fails
    with the runtime's code and message, and the config says so."""
    r = run(
        """
        fake = ctypes.CDLL(os.environ["LLMDIST_ACL_LIBRARY"])
        dd, cm = start()
        desc, src, dst = fill_blocks(cm, layers=1)
        fake.aclrtSetDevice(0)
        ev = ctypes.c_void_p()
        assert fake.aclrtCreateEventWithFlag(ctypes.byref(ev), 0x8) == 0   # TIME_LINE only
        sync = EventSynchronizer(dd.runtime, [ev.value])
        t = cm.transfer_cache_async(src, sync, [TransferConfig(1, dst.tensor_addrs)], [0], [1])
        sync.mark_recorded(0)
        out(status=str(t.synchronize(10000)), errors=t.errors)
    """,
        LLMDIST_ACL_LIBRARY=fake_acl,
    )
    assert r["status"] == "LLMStatusCode.LLM_FAILED"
    assert "107000" in r["errors"][0]


# --------------------------------------------------------------------------------------------
# device IPC: a prefill on the ACL runtime writes into a decode process's DEVICE caches
# --------------------------------------------------------------------------------------------
# The scenario (a fresh interpreter) is the prefill; the decode is a child process
# (cluster_procs.decode_main, spawned) on the same fake libascendcl.so, listening on 127.0.0.1.
IPC_PRELUDE = PRELUDE + textwrap.dedent("""
    import multiprocessing as mp, time
    from tests import cluster_procs
    from llmdist import device_ipc
    CTX = mp.get_context("spawn")
    fake = ctypes.CDLL(os.environ["LLMDIST_ACL_LIBRARY"])
    fake.fake_acl_live.argtypes = [ctypes.c_char_p]
    fake.fake_acl_live.restype = ctypes.c_long
    class Decode:
        def __init__(self, cid, options=None):
            self.cid = cid
            self.conn, child = CTX.Pipe()
            self.proc = CTX.Process(target=cluster_procs.decode_main,
                                    args=(child, cid, int(LLMRole.DECODER), options, True, 60.0),
                                    daemon=True)
            self.proc.start()
            child.close()
            assert self.conn.poll(60), "the decode did not start"
            msg = self.conn.recv()
            assert msg[0] == "ready", msg
            self.port, self.pid = msg[1], msg[2]
        def call(self, *cmd, timeout=20):
            self.conn.send(cmd)
            assert self.conn.poll(timeout), f"no answer to {cmd}"
            msg = self.conn.recv()
            if msg[0] == "err":
                raise RuntimeError(msg[3])
            return msg[1]
        def info(self):
            i = LLMClusterInfo(); i.remote_cluster_id = self.cid
            i.append_remote_ip_info("127.0.0.1", self.port)
            return i
        def kill(self):
            os.kill(self.proc.pid, 9); self.proc.join(10)
    def prefill(cid, keyed, listen=False):
        dd = LLMDataDist(LLMRole.PROMPT, cid)
        c = LLMConfig(); c.device_id = 0; c.enable_cache_manager = True
        c.enable_remote_cache_accessible = keyed
        if listen:
            c.listen_ip_info = "127.0.0.1:0"
        dd.init(c.generate_options())
        return dd, dd.cache_manager
    def link(dd, d):
        return [str(x) for x in dd.link_clusters([d.info()], 5000)[1]]
    LAYERS, BLOCKS, BLOCK = 4, 16, 256
    DESC = CacheDesc(2 * LAYERS, [BLOCKS, BLOCK], DataType.DT_UINT8, Placement.DEVICE)
    def source(cm, seed):
        src = cm.allocate_blocks_cache(DESC)
        rng = np.random.default_rng(seed)
        for a in src.tensor_addrs:
            view(a, DESC.size)[:] = rng.integers(0, 256, DESC.size, dtype=np.uint8)
        return src
    def expect(initial, writes, name="dst"):
        '''initial: the decode's buffers; writes: (src cache, src blocks, dst blocks, layers).'''
        exp = {k: v.copy().reshape(BLOCKS, BLOCK) for k, v in initial.items()}
        for src, si, di, layers in writes:
            for l in layers:
                for t in (0, 1):
                    s = view(src.tensor_addrs[2 * l + t], DESC.size).reshape(BLOCKS, BLOCK)
                    exp[f"2:{name}.{2 * l + t}"][di] = s[si]
        return exp
    def same(got, exp):
        return sorted(got) == sorted(exp) and all(
            (got[k].reshape(BLOCKS, BLOCK) == exp[k]).all() for k in exp)
    class Gate(LayerSynchronizer):
        def __init__(self, at):
            self.at = at; self.entered = threading.Event(); self.go = threading.Event()
        def synchronize_layer(self, layer, timeout):
            if layer >= self.at:
                self.entered.set(); self.go.wait(20)
            return True
    def wait_unlinked(dd, cid):
        t0 = time.monotonic()
        while dd._node.peer(cid) is not None and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        return dd._node.peer(cid) is None
""")


def run_ipc(script: str, fake_acl: str, **env: str) -> dict:
    """Run a device-IPC scenario: this interpreter and its decode child on the fake ACL."""
    return run(script, IPC_PRELUDE, LLMDIST_RUNTIME="acl", LLMDIST_ACL_LIBRARY=fake_acl, **env)


def test_acl_ipc_transfer_into_a_decode_process(fake_acl):
    """B2B by key and by address into a DEVICE blocks cache the decode allocated: imported
    once in this process (two prefill clusters share it), D2D copies on the runtime stream, every
    byte of the decode's cache checked."""
    r = run_ipc(
        """
        d = Decode(2)
        rep = d.call("alloc", "dst", 2 * LAYERS, [BLOCKS, BLOCK], True, ("blocks", 7), 3,
                     "DT_UINT8", "DEVICE")
        share = d.call("share", "dst")
        keyed_dd, keyed = prefill(1, True)
        addr_dd, addressed = prefill(3, False)
        links = link(keyed_dd, d) + link(addr_dd, d)
        src1, src2 = source(keyed, 1), source(addressed, 2)
        fake.fake_acl_reset()
        si1, di1 = [0, 1, 2, 9], [5, 6, 7, 0]
        t1 = keyed.transfer_cache_async(
            src1, Go(), [TransferWithCacheKeyConfig(BlocksCacheKey(2, 7), range(4), range(4))],
            si1, di1)
        s1 = str(t1.synchronize(10000))
        si2, di2 = [3, 4, 5, 15], [10, 11, 12, 1]      # layers 1-2 of the source to layers 2-3
        t2 = addressed.transfer_cache_async(
            src2, Go(), [TransferConfig(2, rep["addrs"][4:8], range(1, 3))], si2, di2)
        s2 = str(t2.synchronize(10000))
        got = d.call("read", "dst")
        exp = expect(rep["buffers"], [(src1, si1, di1, range(4))])
        for l in (1, 2):                                 # src2 layer l -> dst layer l + 1
            for t in (0, 1):
                s = view(src2.tensor_addrs[2 * l + t], DESC.size).reshape(BLOCKS, BLOCK)
                exp[f"2:dst.{2 * (l + 1) + t}"][di2] = s[si2]
        res = dict(share_kind=share["kind"], key=share.get("id", ""), links=links, s1=s1, s2=s2,
                   errors=[t1.errors, t2.errors], same=same(got, exp),
                   imports=fake.fake_acl_live(b"ipc_import"), counted=device_ipc.IMPORTS.count(),
                   batches=fake.fake_acl_calls(b"aclrtMemcpyBatchAsync"),
                   decode_keys=d.call("acl_live", "ipc_key"))
        keyed_dd.finalize(); addr_dd.finalize()          # closes the import
        res.update(imports_after=fake.fake_acl_live(b"ipc_import"), linked=d.call("linked", 1))
        d.call("finalize")                               # closes the export, frees
        res.update(decode_after=[d.call("acl_live", w) for w in ("ipc_key", "device")])
        out(**res)
    """,
        fake_acl,
    )
    assert r["share_kind"] == "acl_ipc" and r["key"].startswith("fakeacl-")
    assert r["links"] == ["LLMStatusCode.LLM_SUCCESS"] * 2
    assert [r["s1"], r["s2"]] == ["LLMStatusCode.LLM_SUCCESS"] * 2, r["errors"]
    assert r["same"], "the decode's cache does not hold the expected bytes"
    assert r["imports"] == 1 and r["counted"] == 1, "one import per process"
    assert r["batches"] == 4 + 2, "one D2D batch per layer on the runtime stream"
    assert r["decode_keys"] == 1
    assert r["imports_after"] == 0 and r["linked"] is False
    assert r["decode_after"] == [0, 0], "the decode closed its export and freed its memory"


def test_acl_ipc_into_another_device(fake_acl):
    """The decode drives device 1, the prefill device 0: the import enables peer access, and the
    copies go run by run (a batch call names one destination device, here the wrong one)."""
    r = run_ipc(
        """
        d = Decode(2, {"ge.exec.deviceId": "1"})
        rep = d.call("alloc", "dst", 2 * LAYERS, [BLOCKS, BLOCK], True, ("blocks", 7), 3,
                     "DT_UINT8", "DEVICE")
        dd, cm = prefill(1, True)
        res = {"link": link(dd, d), "device": d.call("share", "dst")["device"]}
        src = source(cm, 1)
        si, di = [0, 1, 2, 9], [5, 6, 7, 0]
        fake.fake_acl_reset()
        t = cm.transfer_cache_async(src, Go(), [
            TransferWithCacheKeyConfig(BlocksCacheKey(2, 7), range(4), range(4))], si, di)
        res["results"] = [str(x) for x in t.get_results(10000)]
        res["errors"] = t.errors
        res["same"] = same(d.call("read", "dst"),
                           expect(rep["buffers"], [(src, si, di, range(4))]))
        res["batch"] = fake.fake_acl_calls(b"aclrtMemcpyBatchAsync")
        res["single"] = fake.fake_acl_calls(b"aclrtMemcpyAsync")
        out(**res)
    """,
        fake_acl,
        FAKE_ACL_DEVICE_COUNT="2",
    )
    assert r["link"] == ["LLMStatusCode.LLM_SUCCESS"] and r["device"] == 1
    assert r["results"] == ["LLMStatusCode.LLM_SUCCESS"], r["errors"]
    assert r["same"]
    # runs 0-2 -> 5-7 merge, 9 -> 0 is another: 2 runs x 2 tensors x 4 layers
    assert r["batch"] == 0 and r["single"] == 2 * 2 * 4


def test_acl_ipc_when_the_decode_links_to_the_prefill(fake_acl):
    """The decode links to a listening prefill: it whitelists the prefill for the caches it
    exported before (and the prefill waits for its "ipc_ready" before importing them); a cache
    it allocates after the link is whitelisted when exported. One call writes into both."""
    r = run_ipc(
        """
        dd, cm = prefill(1, True, listen=True)
        d = Decode(2)
        early = d.call("alloc", "early", 2 * LAYERS, [BLOCKS, BLOCK], True, ("blocks", 7), 3,
                       "DT_UINT8", "DEVICE")
        res = {"link": d.call("link", 1, dd.listen_port)}
        late = d.call("alloc", "late", 2 * LAYERS, [BLOCKS, BLOCK], True, ("blocks", 8), 4,
                      "DT_UINT8", "DEVICE")
        src = source(cm, 1)
        si, di = [0, 1, 2, 9], [5, 6, 7, 0]
        t = cm.transfer_cache_async(src, Go(), [
            TransferWithCacheKeyConfig(BlocksCacheKey(2, 7), range(4), range(4)),
            TransferWithCacheKeyConfig(BlocksCacheKey(2, 8), range(1, 3), range(1, 3))], si, di)
        res["results"] = [str(x) for x in t.get_results(10000)]
        res["errors"] = t.errors
        res["early"] = same(d.call("read", "early"),
                            expect(early["buffers"], [(src, si, di, range(4))], "early"))
        res["late"] = same(d.call("read", "late"),
                           expect(late["buffers"], [(src, si, di, range(1, 3))], "late"))
        res["imports"] = fake.fake_acl_live(b"ipc_import")
        d.call("finalize")                      # unlinks: the prefill closes its imports first
        res["noticed"] = wait_unlinked(dd, 2)
        res["imports_after"] = fake.fake_acl_live(b"ipc_import")
        res["decode_after"] = [d.call("acl_live", w) for w in ("ipc_key", "device")]
        out(**res)
    """,
        fake_acl,
    )
    assert r["link"][0] == 0
    assert r["results"] == ["LLMStatusCode.LLM_SUCCESS"] * 2, r["errors"]
    assert r["early"] and r["late"]
    assert r["imports"] == 2 and r["noticed"] and r["imports_after"] == 0
    assert r["decode_after"] == [0, 0]


def test_acl_ipc_withdrawn_and_unexportable_caches_are_refused(fake_acl):
    """deallocate on the decode: the import here is closed before the decode frees, and later
    transfers are refused (by key: not exist; by address: not inside the decode's memory).
    DEVICE memory the decode registered, and its HOST caches, are refused with the reason."""
    r = run_ipc(
        """
        d = Decode(2)
        rep = d.call("alloc", "dst", 2 * LAYERS, [BLOCKS, BLOCK], True, ("blocks", 7), 3,
                     "DT_UINT8", "DEVICE")
        d.call("register", "reg", 2 * LAYERS, [BLOCKS, BLOCK], True, ("blocks", 8), 4, 64,
               "DT_UINT8", "DEVICE")
        d.call("alloc", "host", 2 * LAYERS, [BLOCKS, BLOCK], True, ("blocks", 9), 5,
               "DT_UINT8", "HOST")
        keyed_dd, keyed = prefill(1, True)
        addr_dd, addressed = prefill(3, False)
        link(keyed_dd, d); link(addr_dd, d)
        src1, src2 = source(keyed, 1), source(addressed, 2)
        res = {}
        def attempt(name, cm, src, cfg):
            try:
                t = cm.transfer_cache_async(src, Go(), [cfg], [0, 1], [2, 3])
                res[name] = [str(x) for x in t.get_results(10000)]
            except LLMException as e:
                res[name] = [str(e.status_code), str(e)]
        def by_key(model):
            return TransferWithCacheKeyConfig(BlocksCacheKey(2, model), range(4), range(4))
        attempt("before", keyed, src1, by_key(7))
        res["imported"] = fake.fake_acl_live(b"ipc_import")
        attempt("registered", keyed, src1, by_key(8))
        attempt("host", keyed, src1, by_key(9))
        d.call("release", "dst")
        res["imports_after_release"] = fake.fake_acl_live(b"ipc_import")
        res["decode_keys"] = d.call("acl_live", "ipc_key")
        attempt("by_key_after", keyed, src1, by_key(7))
        attempt("by_addr_after", addressed, src2, TransferConfig(2, rep["addrs"]))
        d.call("release", "reg")
        attempt("registered_after", keyed, src1, by_key(8))
        out(**res)
    """,
        fake_acl,
    )
    assert r["before"] == ["LLMStatusCode.LLM_SUCCESS"] and r["imported"] == 1
    code, msg = r["registered"]
    assert code == "LLMStatusCode.LLM_FEATURE_NOT_ENABLED"
    assert "registered" in msg and "cannot be exported" in msg and "allocate_blocks_cache" in msg
    code, msg = r["host"]
    assert code == "LLMStatusCode.LLM_FEATURE_NOT_ENABLED" and "HOST memory" in msg
    assert r["imports_after_release"] == 0 and r["decode_keys"] == 0
    assert r["by_key_after"][0] == "LLMStatusCode.LLM_KV_CACHE_NOT_EXIST"
    code, msg = r["by_addr_after"]
    assert code == "LLMStatusCode.LLM_PARAM_INVALID" and "not inside memory" in msg
    assert r["registered_after"][0] == "LLMStatusCode.LLM_KV_CACHE_NOT_EXIST"


def test_acl_ipc_unlink_and_kill_end_with_link_failed(fake_acl):
    """The decode unlinks while the prefill's synchronizer holds layer 2: the config ends
    LLM_LINK_FAILED, layers 0-1 arrived and nothing else; a new link works again. Then kill -9
    of the decode mid-transfer: LLM_LINK_FAILED, no hang, the import is closed."""
    r = run_ipc(
        """
        d = Decode(2)
        rep = d.call("alloc", "dst", 2 * LAYERS, [BLOCKS, BLOCK], True, ("blocks", 7), 3,
                     "DT_UINT8", "DEVICE")
        dd, cm = prefill(1, True)
        res = {"link": link(dd, d)}
        src = source(cm, 1)
        si, di = [0, 1, 2, 9], [5, 6, 7, 0]
        cfg = TransferWithCacheKeyConfig(BlocksCacheKey(2, 7), range(4), range(4))
        gate = Gate(2)
        t = cm.transfer_cache_async(src, gate, [cfg], si, di)
        assert gate.entered.wait(10)
        res["unlink"] = d.call("unlink", 1)
        res["noticed"] = wait_unlinked(dd, 2)
        gate.go.set()
        res["unlinked"] = [str(x) for x in t.get_results(10000)]
        res["partial"] = same(d.call("read", "dst"),
                              expect(rep["buffers"], [(src, si, di, range(2))]))
        res["imports_unlinked"] = fake.fake_acl_live(b"ipc_import")
        res["relink"] = link(dd, d)
        t = cm.transfer_cache_async(src, Go(), [cfg], si, di)
        res["again"] = [str(x) for x in t.get_results(10000)]
        res["full"] = same(d.call("read", "dst"),
                           expect(rep["buffers"], [(src, si, di, range(4))]))
        gate = Gate(2)
        t = cm.transfer_cache_async(src, gate, [cfg], si, di)
        assert gate.entered.wait(10)
        d.kill()
        res["noticed_kill"] = wait_unlinked(dd, 2)
        t0 = time.monotonic()
        gate.go.set()
        res["killed"] = [str(x) for x in t.get_results(10000)]
        res["took"] = time.monotonic() - t0
        t0 = time.monotonic()           # the reader thread closes the import after the cancel
        while fake.fake_acl_live(b"ipc_import") and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        res["imports_killed"] = fake.fake_acl_live(b"ipc_import")
        try:
            cm.transfer_cache_async(src, Go(), [cfg], si, di)
        except LLMException as e:
            res["after_kill"] = str(e.status_code)
        t0 = time.monotonic(); dd.finalize(); res["finalize"] = time.monotonic() - t0
        out(**res)
    """,
        fake_acl,
    )
    assert r["link"] == ["LLMStatusCode.LLM_SUCCESS"]
    assert r["unlink"][0] == 0 and r["noticed"]
    assert r["unlinked"] == ["LLMStatusCode.LLM_LINK_FAILED"]
    assert r["partial"], "layers 0-1 must have arrived, layers 2-3 not"
    assert r["imports_unlinked"] == 0
    assert r["relink"] == ["LLMStatusCode.LLM_SUCCESS"]
    assert r["again"] == ["LLMStatusCode.LLM_SUCCESS"] and r["full"]
    assert r["noticed_kill"] and r["killed"] == ["LLMStatusCode.LLM_LINK_FAILED"]
    assert r["took"] < 5 and r["imports_killed"] == 0
    assert r["after_kill"] == "LLMStatusCode.LLM_NOT_YET_LINK"
    assert r["finalize"] < 5


def test_acl_without_ipc_symbols_refuses_transfers_to_other_processes(tmp_path):
    """An older libascendcl without the device-IPC symbols: the decode's caches are not
    exported, and a transfer to it is refused, naming the missing functions."""
    build_fake_runtime("fake_acl", tmp_path, FAKE_ACL_CFLAGS="-DFAKE_ACL_NO_IPC")
    r = run_ipc(
        """
        d = Decode(2)
        d.call("alloc", "dst", 2 * LAYERS, [BLOCKS, BLOCK], True, ("blocks", 7), 3, "DT_UINT8",
               "DEVICE")
        share = d.call("share", "dst")
        dd, cm = prefill(1, True)
        res = {"link": link(dd, d), "share": share, "why": dd.runtime.ipc_unavailable}
        try:
            cm.transfer_cache_async(source(cm, 1), Go(), [TransferWithCacheKeyConfig(
                BlocksCacheKey(2, 7), range(4), range(4))], [0], [1])
        except LLMException as e:
            res["refused"] = [str(e.status_code), str(e)]
        out(**res)
    """,
        str(tmp_path / "libascendcl.so"),
    )
    assert r["link"] == ["LLMStatusCode.LLM_SUCCESS"]
    assert r["share"]["kind"] == "none" and "aclrtIpcMemGetExportKey" in r["share"]["reason"]
    assert "aclrtIpcMemImportByKey" in r["why"]
    code, msg = r["refused"]
    assert code == "LLMStatusCode.LLM_FEATURE_NOT_ENABLED"
    assert "device IPC" in msg and "aclrtIpcMemImportByKey" in msg
