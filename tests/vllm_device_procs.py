"""Child process of tests/test_vllm_device_push.py: one LLMDistConnector worker (prefill or
decode) over KV tensors in fake-CUDA device memory, carved at interior offsets out of one
cudaMalloc allocation as PyTorch's caching allocator does. The fake runtime is the one
LLMDIST_CUDA_LIBRARY names; its device memory is host memory, so the child reads the bytes
directly."""

from __future__ import annotations

import ctypes
import os
import time
import traceback

from . import vllm_support as vs

SHAPE = (2, vs.NUM_BLOCKS, vs.BLOCK_SIZE, 2, 32)  # the GPU backends' layout, bf16
ESIZE = 2
OFFSET = 4096 + 256  # the first tensor's offset in the allocation; tensors 512 bytes apart
GAP = 512


class _Device:
    type, index = "cuda", 0


class DeviceTensor:
    """What register_kv_caches reads of a torch CUDA tensor: shape, strides, device, address."""

    device = _Device()

    def __init__(self, addr: int) -> None:
        self.shape = SHAPE
        self.addr = addr
        self.strides = []
        acc = 1
        for d in reversed(SHAPE):
            self.strides.insert(0, acc)
            acc *= d

    def stride(self, d=None):
        return tuple(self.strides) if d is None else self.strides[d]

    def element_size(self):
        return ESIZE

    def data_ptr(self):
        return self.addr

    def dim(self):
        return len(self.shape)


def _nbytes() -> int:
    n = ESIZE
    for d in SHAPE:
        n *= d
    return n


def device_kv(seed: int):
    """(layer name -> DeviceTensor, the allocation as a bytearray view), random bytes."""
    import numpy as np

    cuda = ctypes.CDLL(os.environ["LLMDIST_CUDA_LIBRARY"])
    n = _nbytes()
    total = OFFSET + vs.LAYERS * (n + GAP)
    ptr = ctypes.c_void_p()
    assert cuda.cudaSetDevice(0) == 0
    assert cuda.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(total)) == 0
    mem = np.ctypeslib.as_array((ctypes.c_uint8 * total).from_address(ptr.value))
    mem[:] = np.random.default_rng(seed).integers(0, 256, total, dtype=np.uint8)
    kv = {
        f"model.layers.{i}.self_attn.attn": DeviceTensor(ptr.value + OFFSET + i * (n + GAP))
        for i in range(vs.LAYERS)
    }
    return kv, mem


def block_bytes(mem, blocks):
    """The bytes of each block of every layer, K then V (as vs.block_bytes orders them)."""
    n = _nbytes()
    half = n // 2
    bb = half // vs.NUM_BLOCKS
    out = []
    for i in range(vs.LAYERS):
        base = OFFSET + i * (n + GAP)
        for b in blocks:
            k = bytes(mem[base + b * bb : base + (b + 1) * bb])
            v = bytes(mem[base + half + b * bb : base + half + (b + 1) * bb])
            out.append(k + v)
    return out


def worker_main(conn, role: str, mode: str, seed: int) -> None:
    """A worker connector over device_kv(seed). Commands: ("send", req id, blocks, transfer
    id): the prefill finished a request (push) or computed it (layerwise), returns whether it
    was sent; ("recv", req id, local blocks, remote blocks, prefill engine id, port): the
    decode registers and waits, returns (received, failed); ("blocks", ids); ("mem",): the
    whole allocation's bytes; ("imports",): live IPC imports of this process."""
    try:
        from llmdist import _core
        from llmdist.integrations.vllm import LLMDistConnectorMetadata, RecvJob

        c, engine_id = vs.worker_connector(role, {"mode": mode})
        kv, mem = device_kv(seed)
        c.register_kv_caches(kv)
        w = c._worker
        model_stream = _core.Stream(w.dd.runtime)
        w.streams.stream_of = lambda: model_stream.handle  # torch.cuda.current_stream() on a GPU
        conn.send(("ready", engine_id, c.get_handshake_metadata().port, w.dd.runtime.name))
        cuda = ctypes.CDLL(os.environ["LLMDIST_CUDA_LIBRARY"])
        cuda.fake_cuda_live.argtypes = [ctypes.c_char_p]
        cuda.fake_cuda_live.restype = ctypes.c_long
        while True:
            cmd, *args = conn.recv()
            if cmd == "exit":
                break
            if cmd == "blocks":
                conn.send(("ok", block_bytes(mem, args[0])))
            elif cmd == "mem":
                conn.send(("ok", bytes(mem)))
            elif cmd == "imports":
                conn.send(("ok", cuda.fake_cuda_live(b"ipc_import")))
            elif cmd == "send":
                rid, blocks, tid = args
                if mode == "layerwise":
                    meta = LLMDistConnectorMetadata(
                        reqs_to_send={rid: time.time() + 30},
                        layerwise={rid: (tid, list(blocks))},
                        transfer_ids={rid: tid},
                    )
                    c.bind_connector_metadata(meta)
                    c.start_load_kv(None)
                    for name in kv:
                        c.save_kv_layer(name, None, None)
                    c.wait_for_save()
                    c.clear_connector_metadata()
                    meta = LLMDistConnectorMetadata()
                else:
                    meta = LLMDistConnectorMetadata(
                        reqs_to_send={rid: time.time() + 30},
                        send_blocks={rid: list(blocks)},
                        transfer_ids={rid: tid},
                    )
                sent, _, _ = vs.run_step(c, meta, 30.0, lambda s, r, f: rid in s)
                conn.send(("ok", rid in sent))
            elif cmd == "recv":
                rid, local, remote, peer_engine, port = args
                job = RecvJob(
                    req_id=rid,
                    local_block_ids=list(local),
                    remote_block_ids=list(remote),
                    remote_engine_id=peer_engine,
                    remote_host="127.0.0.1",
                    remote_ports=[port],
                    remote_tp_size=1,
                    transfer_id=rid,
                    report=True,
                    mode=mode,
                )
                meta = LLMDistConnectorMetadata(reqs_to_recv={rid: job})
                _, recved, failed = vs.run_step(c, meta, 30.0, lambda s, r, f: rid in r)
                conn.send(("ok", (rid in recved, rid in failed)))
        c.shutdown()
    except BaseException:
        conn.send(("err", traceback.format_exc()))
