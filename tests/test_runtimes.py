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

HERE = os.path.dirname(os.path.abspath(__file__))

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


@pytest.fixture(scope="module")
def fake_acl(tmp_path_factory) -> str:
    """Build the fake libascendcl.so once for this module."""
    out = tmp_path_factory.mktemp("fake_acl")
    subprocess.run(["bash", os.path.join(HERE, "fake_acl", "build.sh"), str(out)], check=True,
                   capture_output=True)
    return str(out / "libascendcl.so")


def run(script: str, **env: str) -> dict:
    """Run PRELUDE + script in a fresh interpreter; return what it passed to out()."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMDIST_", "FAKE_ACL_"))}
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script)],
                          capture_output=True, text=True, env=full_env, timeout=120)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULT "):])


# --------------------------------------------------------------------------------------------
# choice of runtime
# --------------------------------------------------------------------------------------------
def test_auto_falls_back_to_host_and_says_why(tmp_path):
    r = run("""
        dd, cm = start()
        info = runtime_info()
        out(active=info["active"], name=dd.runtime.name, acl=info["runtimes"]["acl"],
            cuda=info["runtimes"]["cuda"])
    """, LLMDIST_ACL_LIBRARY=str(tmp_path / "missing" / "libascendcl.so"))
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
    assert ("error 35" in r["raised"] or "driver" in r["raised"].lower()
            or "could not be loaded" in r["raised"]), r["raised"]


def test_cuda_wheel_library_is_found_first():
    pytest.importorskip("nvidia.cuda_runtime", reason="nvidia-cuda-runtime-cu12 wheel not installed")
    r = run("""
        import llmdist.runtimes as rts
        out(paths=rts.cuda_library_paths(), info=runtime_info()["runtimes"]["cuda"])
    """)
    assert "nvidia/cuda_runtime/lib/libcudart.so.12" in r["paths"][0]
    assert r["info"]["available"] is False
    assert "error 35" in r["info"]["reason"] and "12." in r["info"]["reason"]


def test_env_and_option_pick_the_runtime(fake_acl):
    r = run("""
        dd, cm = start()
        a = dd.runtime.name
        out(env_choice=a, version=dd.runtime.version, library=dd.runtime.library)
    """, LLMDIST_RUNTIME="acl", LLMDIST_ACL_LIBRARY=fake_acl)
    assert r["env_choice"] == "acl" and r["version"] == "1.15.0" and r["library"] == fake_acl
    r = run("""
        dd, cm = start({"llmdist.runtime": "host"})
        out(name=dd.runtime.name)
    """, LLMDIST_RUNTIME="acl", LLMDIST_ACL_LIBRARY=fake_acl)
    assert r["name"] == "host"
    r = run("""
        dd, cm = start()
        out(name=dd.runtime.name)
    """, LLMDIST_ACL_LIBRARY=fake_acl)
    assert r["name"] == "acl", "auto takes ACL when it loads and sees a device"


def test_acl_without_devices(fake_acl):
    r = run("""
        dd, cm = start()
        first = dd.runtime.name
        dd.finalize()
        try:
            start({"llmdist.runtime": "acl"})
            out(first=first, raised=None)
        except LLMException as e:
            out(first=first, raised=str(e))
    """, LLMDIST_ACL_LIBRARY=fake_acl, FAKE_ACL_DEVICE_COUNT="0")
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
    r = run("""
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
    """, LLMDIST_ACL_LIBRARY=fake_acl)
    assert r["results"] == ["LLMStatusCode.LLM_DEVICE_MEM_ERROR", "LLMStatusCode.LLM_SUCCESS"]
    assert "507053" in r["errors"][0] and "acl" in r["errors"][0]
    assert r["errors"][1] is None and r["second_ok"]


def test_acl_host_to_host_goes_through_the_host_engine(fake_acl):
    """ACL has no async H2H copy (207000) and refuses pageable memory in async copies: a
    registered (pageable) HOST source to an allocated HOST destination still works."""
    r = run("""
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
    """, LLMDIST_ACL_LIBRARY=fake_acl)
    assert r["status"] == "LLMStatusCode.LLM_SUCCESS", r["errors"]
    assert r["ok"]


def test_acl_device_to_host(fake_acl):
    r = run("""
        dd, cm = start()
        desc, src, _ = fill_blocks(cm)
        hdesc = CacheDesc(desc.num_tensors, desc.shape, desc.data_type, Placement.HOST)
        dst = cm.allocate_blocks_cache(hdesc)
        t = cm.transfer_cache_async(src, Go(), [TransferConfig(1, dst.tensor_addrs)], [0, 1, 2], [2, 3, 4])
        out(status=str(t.synchronize(10000)), errors=t.errors, same=same_blocks(desc, src, dst, [0, 1, 2], [2, 3, 4]))
    """, LLMDIST_ACL_LIBRARY=fake_acl)
    assert r["status"] == "LLMStatusCode.LLM_SUCCESS", r["errors"]
    assert r["same"]


def test_acl_thread_without_device_is_caught(fake_acl):
    """The fake answers 107002 to a thread that did not set the device; llmdist binds every
    thread it issues work from, so transfers work from a fresh user thread too."""
    r = run("""
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
    """, LLMDIST_ACL_LIBRARY=fake_acl)
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
    r = run("""
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
    """, LLMDIST_ACL_LIBRARY=fake_acl)
    assert r["status"] == "LLMStatusCode.LLM_FAILED"
    assert "107000" in r["errors"][0]
