"""Device-to-device copies on the CUDA runtime: the copy kernel path (one launch per layer covering
every config's tensors) and the DMA path, both against the fake libcudart.so (tests/fake_cuda),
which runs the kernel's semantics on host memory and counts every call. Each scenario runs in a
fresh interpreter, since a process loads a runtime once."""

from __future__ import annotations

import textwrap

from .test_runtimes import run

CUDA_PRELUDE_EXTRA = """
    fake = ctypes.CDLL(os.environ["LLMDIST_CUDA_LIBRARY"])
    fake.fake_cuda_calls.restype = ctypes.c_long
    fake.fake_cuda_kernel_bytes.restype = ctypes.c_long
    def calls(name):
        return fake.fake_cuda_calls(name.encode())
    def host_cache(cm, layers, blocks, block):
        desc = CacheDesc(2 * layers, [blocks, block], DataType.DT_UINT8, Placement.HOST)
        c = cm.allocate_blocks_cache(desc)
        for a in c.tensor_addrs:
            view(a, desc.size)[:] = 0
        return c
"""


def cuda_run(lib: str, script: str, **env: str) -> dict:
    from .test_runtimes import PRELUDE

    return run(
        textwrap.dedent(script),
        prelude=PRELUDE + textwrap.dedent(CUDA_PRELUDE_EXTRA),
        LLMDIST_RUNTIME="cuda",
        LLMDIST_CUDA_LIBRARY=lib,
        **env,
    )


def two_configs(options: dict) -> str:
    return f"import llmdist\nOPTIONS = {options!r}\n" + textwrap.dedent(TWO_CONFIGS)


TWO_CONFIGS = """
    dd, cm = start(OPTIONS)
    info = llmdist.runtime_info()["runtimes"]["cuda"]
    desc, src, dst = fill_blocks(cm, layers=3, blocks=16, block=256)
    dst2 = cm.allocate_blocks_cache(desc)
    for a in dst2.tensor_addrs:
        view(a, desc.size)[:] = 0
    hst = host_cache(cm, 3, 16, 256)
    si, di = [0, 1, 2, 7, 9], [3, 4, 5, 11, 15]     # runs 0-2 merge: 3 runs per tensor
    fake.fake_cuda_reset()
    t = cm.transfer_cache_async(src, Go(), [TransferConfig(1, dst.tensor_addrs),
                                            TransferConfig(1, dst2.tensor_addrs),
                                            TransferConfig(1, hst.tensor_addrs)], si, di)
    status = str(t.synchronize(10000))
    out(info=info, status=status, results=[str(x) for x in t.get_results()], errors=t.errors,
        same=[same_blocks(desc, src, c, si, di) for c in (dst, dst2, hst)],
        launches=calls("cudaLaunchKernel"), batches=calls("cudaMemcpyBatchAsync"),
        copies=calls("cudaMemcpyAsync"), kernel_bytes=fake.fake_cuda_kernel_bytes())
"""


def test_kernel_path_one_launch_per_layer_for_all_device_configs(fake_cuda):
    r = cuda_run(fake_cuda, two_configs({}))
    assert r["info"]["device_copy"] == "kernel", r["info"]
    assert r["status"] == "LLMStatusCode.LLM_SUCCESS", r["errors"]
    assert r["same"] == [True, True, True]
    # two device configs, three layers: one launch per layer covers both configs' K and V
    assert r["launches"] == 3
    assert r["kernel_bytes"] == 3 * 2 * 2 * 5 * 256
    # the device-to-host config stays DMA: one batch per layer
    assert r["batches"] == 3
    # the run table once, then each layer's pairs: no other host-to-device traffic
    assert r["copies"] == 1 + 3


def test_dma_path_when_asked(fake_cuda):
    r = cuda_run(fake_cuda, two_configs({"llmdist.device_copy": "dma"}))
    assert r["info"]["device_copy"] == "dma"
    assert r["info"]["device_copy_reason"] == "llmdist.device_copy=dma"
    assert r["status"] == "LLMStatusCode.LLM_SUCCESS", r["errors"]
    assert r["same"] == [True, True, True]
    assert r["launches"] == 0 and r["kernel_bytes"] == 0
    assert r["batches"] == 3 * 3


def test_driver_refusing_the_ptx_falls_back_to_dma_and_says_why(fake_cuda):
    r = cuda_run(fake_cuda, two_configs({}), FAKE_CUDA_MAX_PTX_ISA="7.8")
    assert r["info"]["device_copy"] == "dma"
    assert "cudaLibraryLoadData" in r["info"]["device_copy_reason"]
    assert "error 222" in r["info"]["device_copy_reason"]
    assert r["status"] == "LLMStatusCode.LLM_SUCCESS" and r["same"] == [True, True, True]
    assert r["launches"] == 0 and r["batches"] == 9


def test_kernel_mode_refuses_to_start_without_the_kernel(fake_cuda):
    r = cuda_run(
        fake_cuda,
        """
        try:
            start({"llmdist.device_copy": "kernel"})
            out(raised=None)
        except LLMException as e:
            out(raised=str(e), code=int(e.status_code))
    """,
        FAKE_CUDA_MAX_PTX_ISA="7.8",
    )
    assert r["raised"] is not None and "copy kernel cannot be used" in r["raised"]
    assert r["code"] == int(__import__("llmdist").LLMStatusCode.LLM_FEATURE_NOT_ENABLED)


def test_bad_device_copy_option_is_a_param_error(fake_cuda):
    r = cuda_run(
        fake_cuda,
        """
        try:
            start({"llmdist.device_copy": "fast"})
            out(raised=None)
        except LLMException as e:
            out(raised=str(e), code=int(e.status_code))
    """,
    )
    assert "llmdist.device_copy must be auto, kernel or dma" in r["raised"]
    assert r["code"] == int(__import__("llmdist").LLMStatusCode.LLM_PARAM_INVALID)


def test_a_failed_launch_fails_only_the_configs_it_carried(fake_cuda):
    r = cuda_run(
        fake_cuda,
        """
        dd, cm = start()
        desc, src, dst = fill_blocks(cm, layers=4, blocks=16, block=256)
        si, di = [0, 5], [8, 2]
        fake.fake_cuda_reset()
        # launches: layer 0 and 1 (config A), layer 2 and 3 (config B); the second one fails
        assert fake.fake_cuda_inject(b"cudaLaunchKernel", 1, 719) == 0
        t = cm.transfer_cache_async(src, Go(), [
            TransferConfig(1, dst.tensor_addrs[0:4], src_layer_range=range(0, 2)),
            TransferConfig(1, dst.tensor_addrs[4:8], src_layer_range=range(2, 4))], si, di)
        t.synchronize(10000)
        def layer_same(l):
            ok = True
            for k in (2 * l, 2 * l + 1):
                s = view(src.tensor_addrs[k], desc.size).reshape(-1, 256)
                d = view(dst.tensor_addrs[k], desc.size).reshape(-1, 256)
                ok &= bool((d[di] == s[si]).all())
            return ok
        out(results=[str(x) for x in t.get_results()], errors=t.errors,
            layers=[layer_same(l) for l in range(4)], launches=calls("cudaLaunchKernel"))
    """,
    )
    assert r["results"][0] != "LLMStatusCode.LLM_SUCCESS"
    assert "719" in r["errors"][0] or "launch failure" in r["errors"][0]
    assert r["results"][1] == "LLMStatusCode.LLM_SUCCESS", r["errors"]
    assert r["layers"] == [True, False, True, True]
    assert r["launches"] == 4


def test_event_gated_layers_launch_after_the_layer_event(fake_cuda):
    """EventSynchronizer on CUDA: the worker's stream waits for each layer's event on the device
    and the layer's launch follows; nothing of a layer moves before its event."""
    r = cuda_run(
        fake_cuda,
        """
        dd, cm = start()
        desc, src, dst = fill_blocks(cm, layers=4)
        sync = EventSynchronizer(dd.runtime, 4)
        model = Stream(dd.runtime)
        si, di = [0, 1, 2, 3], [4, 5, 6, 7]
        fake.fake_cuda_reset()
        t = cm.transfer_cache_async(src, sync, [TransferConfig(1, dst.tensor_addrs)], si, di)
        sync.record(0, model); sync.record(1, model)
        import time; time.sleep(0.3)
        def layer_done(l):
            d = view(dst.tensor_addrs[2 * l], desc.size).reshape(-1, 256)
            s = view(src.tensor_addrs[2 * l], desc.size).reshape(-1, 256)
            return bool((d[di] == s[si]).all())
        mid_layers = [layer_done(l) for l in range(4)]
        sync.record(2, model); sync.record(3, model)
        out(mid_layers=mid_layers, status=str(t.synchronize(10000)), errors=t.errors,
            same=same_blocks(desc, src, dst, si, di), launches=calls("cudaLaunchKernel"),
            waits=calls("cudaStreamWaitEvent"))
    """,
    )
    assert r["mid_layers"] == [True, True, False, False]
    assert r["status"] == "LLMStatusCode.LLM_SUCCESS" and r["same"], r["errors"]
    # layer 1 may join layer 0's launch when its event has completed by then, never layer 2
    assert 2 <= r["launches"] <= 4 and r["waits"] >= 2


def test_event_gated_layers_already_finished_share_a_launch(fake_cuda):
    """Layers whose events completed before the worker got to them go with the first waiting
    layer's launch: four layers recorded before the transfer starts take one launch; a layer
    recorded later gets its own."""
    r = cuda_run(
        fake_cuda,
        """
        dd, cm = start()
        desc, src, dst = fill_blocks(cm, layers=5)
        sync = EventSynchronizer(dd.runtime, 5)
        model = Stream(dd.runtime)
        si, di = [0, 1, 2, 3], [4, 5, 6, 7]
        for l in range(4):
            sync.record(l, model)
        model.synchronize()
        fake.fake_cuda_reset()
        t = cm.transfer_cache_async(src, sync, [TransferConfig(1, dst.tensor_addrs)], si, di)
        def layer_done(l):
            d = view(dst.tensor_addrs[2 * l], desc.size).reshape(-1, 256)
            s = view(src.tensor_addrs[2 * l], desc.size).reshape(-1, 256)
            return bool((d[di] == s[si]).all())
        import time
        deadline = time.monotonic() + 30
        while not all(layer_done(l) for l in range(4)) and time.monotonic() < deadline:
            time.sleep(0.01)
        early = calls("cudaLaunchKernel")       # every launch that moved layers 0-3
        sync.record(4, model)
        out(early=early, status=str(t.synchronize(10000)), errors=t.errors,
            same=same_blocks(desc, src, dst, si, di), launches=calls("cudaLaunchKernel"))
    """,
        LLMDIST_DEVICE_COPY="kernel",
    )
    assert r["status"] == "LLMStatusCode.LLM_SUCCESS" and r["same"], r["errors"]
    assert r["early"] == 1 and r["launches"] == 2


def test_runtimes_say_whether_they_have_a_copy_kernel_and_their_framework_device(fake_cuda):
    """The device-copy choice and the framework's device type come from the runtime interface:
    CUDA has a copy kernel and is torch's "cuda"; the host runtime has neither (ACL: see
    test_runtimes)."""
    r = cuda_run(
        fake_cuda,
        """
        host = _core.Runtime.host()
        host.select_device_copy("kernel")       # ignored: DMA is the host's only way
        dd, cm = start({"llmdist.device_copy": "dma"})
        cuda = dd.runtime
        out(host=[host.framework_device, host.device_copy, host.device_copy_reason],
            cuda=[cuda.framework_device, cuda.device_copy, cuda.device_copy_reason])
    """,
    )
    assert r["host"] == [None, None, None]
    assert r["cuda"] == ["cuda", "dma", "llmdist.device_copy=dma"]


def test_layers_ready_at_once_share_a_launch_up_to_the_group_bound(fake_cuda):
    """A pull has every layer ready at once: its layers go to the device in one launch, as many
    layers per launch as fit 64 MiB (the bound that keeps a cancellation's wait short). Four
    layers of 2 x 256 x 256 B: one launch; four layers of 2 x 96 x 128 KiB (24 MiB): two."""
    r = cuda_run(
        fake_cuda,
        """
        dd, cm = start()
        res = {}
        for name, blocks, block in (("small", 256, 256), ("big", 96, 128 << 10)):
            desc = CacheDesc(8, [blocks, block], DataType.DT_UINT8, Placement.DEVICE)
            key = BlocksCacheKey(1, blocks)
            src = cm.allocate_blocks_cache(desc, key)
            dst = cm.allocate_blocks_cache(desc)
            rng = np.random.default_rng(blocks)
            for a in src.tensor_addrs:
                view(a, desc.size)[:] = rng.integers(0, 255, desc.size, dtype=np.uint8)
            for a in dst.tensor_addrs:
                view(a, desc.size)[:] = 0
            si = list(range(blocks))[::-1]
            di = list(range(blocks))
            fake.fake_cuda_reset()
            cm.pull_blocks(key, dst, si, di)
            res[name] = dict(launches=calls("cudaLaunchKernel"),
                             same=same_blocks(desc, src, dst, si, di, block))
            cm.deallocate_blocks_cache(src)
            cm.deallocate_blocks_cache(dst)
        out(**res)
    """,
        LLMDIST_DEVICE_COPY="kernel",
    )
    assert r["small"] == {"launches": 1, "same": True}
    assert r["big"] == {"launches": 2, "same": True}
