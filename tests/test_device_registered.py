"""Device IPC into DEVICE memory a cluster registered (a framework's tensors, not allocated by
llmdist), between two processes of this host on the fake ACL and CUDA runtimes: push_blocks,
transfer_cache_async layer by layer and pull_blocks reach tensors that sit at an interior offset
of a larger allocation; every byte of that allocation outside the tensors stays as it was.
Memory that cannot be exported (a VMM allocation on CUDA, a tensor not on a page on ACL) keeps
the clear refusal, and unregistering closes the peer's import."""

from __future__ import annotations

import ctypes
import os
from dataclasses import replace

import pytest

from llmdist import (
    BlocksCacheKey,
    LLMException,
    LLMRole,
    LLMStatusCode,
    TransferWithCacheKeyConfig,
    device_ipc,
    runtimes,
)
from llmdist.shares import share_from_wire

from .helpers import RecordingSync, assert_mem_equal
from .pull_push_routes import DEVICE_RUNTIME, FP16, _ids, _seeds, expect_blocks, link_to

pytestmark = [
    pytest.mark.all_runtimes,
    pytest.mark.skipif(
        not DEVICE_RUNTIME,
        reason="device IPC exists on the device runtimes; the host runtime reaches registered "
        "memory by process transfers (test_pull_push.py)",
    ),
]

RUNTIME = os.environ.get("LLMDIST_RUNTIME")
SUCCESS = LLMStatusCode.LLM_SUCCESS
BLOCK = 256  # bytes per block of [8, 128] fp16 tensors


def decode_proc(cleanup, device: int = 0):
    """A listening DECODER in a child process on device, reached over the Unix socket."""
    options = {"llmdist.transport": "direct", "ge.exec.deviceId": str(device)}
    return cleanup.spawn(next(_ids), options=options).wait_ready()


def register_device(proc, seed, offset=8192, gap=6144, vmm=False, num_tensors=4):
    """Blocks cache of num_tensors [8, 128] fp16 tensors in one device allocation of proc."""
    name = f"dev{seed}"
    r = proc.call(
        "register_device", name, num_tensors, [8, 128], ("blocks", seed), seed, offset, gap, vmm
    )
    return name, r


def pushed(dst, src, pairs, layers=range(2)):
    """What the destination allocation holds after pairs (src block, dst block) of layers."""
    return expect_blocks(
        dst["buffers"],
        dst["tensors"],
        BLOCK,
        src.mem(),
        src.tensors,
        BLOCK,
        layers,
        layers,
        2,
        pairs=pairs,
    )


def imports_here() -> int:
    """Peer allocations this process has imported (the fake runtime's count)."""
    name = "fake_acl_live" if RUNTIME == "acl" else "fake_cuda_live"
    lib = ctypes.CDLL(
        os.environ["LLMDIST_ACL_LIBRARY" if RUNTIME == "acl" else "LLMDIST_CUDA_LIBRARY"]
    )
    fn = getattr(lib, name)
    fn.argtypes = [ctypes.c_char_p]
    fn.restype = ctypes.c_long
    return fn(b"ipc_import")


@pytest.mark.parametrize("device", [0, 1], ids=["same-device", "other-device"])
def test_push_blocks_into_registered_device_memory(cleanup, local, monkeypatch, device):
    """P pushes blocks into tensors D registered inside one allocation (8 KiB apart, from 8 KiB
    in; on CUDA not on a page), on this process's device or another one; a second push reuses
    the import; unregistering closes P's import before D closes its export."""
    for var in ("FAKE_CUDA_DEVICE_COUNT", "FAKE_ACL_DEVICE_COUNT"):
        monkeypatch.setenv(var, "2")
    dproc = decode_proc(cleanup, device)
    model = next(_seeds)
    offset = 8192 + 64 if RUNTIME == "cuda" else 8192  # ACL exports regions on a page only
    name, dst = register_device(dproc, model, offset)
    share = dproc.call("share", name)
    assert share["kind"] == "device_tensors"
    assert {t["device"] for t in share["tensors"]} == {device}
    want_offsets = [offset + i * 8192 for i in range(4)] if RUNTIME == "cuda" else [0] * 4
    assert [t["offset"] for t in share["tensors"]] == want_offsets
    p = local(remote=True, role=LLMRole.PROMPT)
    link_to(p, dproc)
    src = p.registered(4, [8, 128], dtype=FP16, blocks=True)
    key = BlocksCacheKey(dproc.cluster_id, model)
    before = imports_here()
    p.cm.push_blocks(key, src.cache, [0, 5], [7, 2])
    want = pushed(dst, src, [(0, 7), (5, 2)])
    assert_mem_equal(dproc.call("read", name), want, "first push")
    p.cm.push_blocks(key, src.cache, [3], [0])
    want = pushed({"buffers": want, "tensors": dst["tensors"]}, src, [(3, 0)])
    assert_mem_equal(dproc.call("read", name), want, "second push")
    # CUDA: one handle for the allocation holding the four tensors; ACL: one key per tensor
    assert imports_here() == before + (1 if RUNTIME == "cuda" else 4)
    dproc.call("release", name)  # returns once P closed its imports, then D closed the exports
    assert imports_here() == before
    if RUNTIME == "acl":
        assert dproc.call("device_live", "ipc_key") == 0


def test_transfer_cache_async_layers_into_registered_device_memory(cleanup, local):
    """transfer_cache_async streams each layer as the synchronizer releases it into D's
    registered device tensors; bytes checked, nothing else in the allocation touched."""
    dproc = decode_proc(cleanup)
    model = next(_seeds)
    name, dst = register_device(dproc, model, num_tensors=6)
    p = local(remote=True, role=LLMRole.PROMPT)
    link_to(p, dproc)
    src = p.registered(6, [8, 128], dtype=FP16, blocks=True)
    sync = RecordingSync()
    cfg = TransferWithCacheKeyConfig(BlocksCacheKey(dproc.cluster_id, model), range(3), range(3))
    task = p.cm.transfer_cache_async(src.cache, sync, [cfg], [1, 4, 6], [0, 3, 5])
    assert task.synchronize(10000) == SUCCESS
    assert sorted(set(sync.calls)) == [0, 1, 2]
    want = pushed(dst, src, [(1, 0), (4, 3), (6, 5)], layers=range(3))
    assert_mem_equal(dproc.call("read", name), want, "layers streamed")


def test_pull_blocks_from_registered_device_memory(cleanup, local):
    """A decode here pulls from a prefill's registered device tensors (interior offsets)."""
    pproc = cleanup.spawn(
        next(_ids),
        role=LLMRole.PROMPT,
        options={"llmdist.transport": "direct", "llm.EnableRemoteCacheAccessible": "1"},
    ).wait_ready()
    model = next(_seeds)
    name, src = register_device(pproc, model)
    d = local()
    link_to(d, pproc)
    dst = d.registered(4, [8, 128], dtype=FP16, blocks=True)
    before = dst.snapshot()
    d.cm.pull_blocks(BlocksCacheKey(pproc.cluster_id, model), dst.cache, [2, 6], [1, 4])
    want = expect_blocks(
        before,
        dst.tensors,
        BLOCK,
        src["buffers"],
        src["tensors"],
        BLOCK,
        range(2),
        range(2),
        2,
        pairs=[(2, 1), (6, 4)],
    )
    assert_mem_equal(dst.mem(), want, "pulled from registered device memory")


def unexportable(dproc, model):
    """A registration D cannot export: VMM memory (CUDA), a tensor not on a page (ACL)."""
    if RUNTIME == "cuda":
        return register_device(dproc, model, vmm=True)
    return register_device(dproc, model, offset=8192 + 64)


def test_unexportable_registration_keeps_the_refusal(cleanup, local):
    """Registered device memory that cannot be exported gets no device share: a push into it
    is refused with LLM_FEATURE_NOT_ENABLED and the runtime's reason, and nothing moves; a
    registration beside it that can be exported still takes pushes."""
    dproc = decode_proc(cleanup)
    bad_model, good_model = next(_seeds), next(_seeds)
    bad_name, bad = unexportable(dproc, bad_model)
    assert dproc.call("share", bad_name)["kind"] == "none"
    good_name, good = register_device(dproc, good_model)
    p = local(remote=True, role=LLMRole.PROMPT)
    link_to(p, dproc)
    src = p.registered(4, [8, 128], dtype=FP16, blocks=True)
    with pytest.raises(LLMException) as ei:
        p.cm.push_blocks(BlocksCacheKey(dproc.cluster_id, bad_model), src.cache, [0], [1])
    assert ei.value.status_code == LLMStatusCode.LLM_FEATURE_NOT_ENABLED
    assert "DEVICE memory the peer registered" in str(ei.value)
    assert "could not be exported" in str(ei.value)
    assert_mem_equal(dproc.call("read", bad_name), bad["buffers"], "refused push")
    p.cm.push_blocks(BlocksCacheKey(dproc.cluster_id, good_model), src.cache, [0], [1])
    assert_mem_equal(dproc.call("read", good_name), pushed(good, src, [(0, 1)]), "push beside")


@pytest.mark.skipif(
    RUNTIME != "cuda", reason="a CUDA handle names a whole allocation; an ACL key its region"
)
def test_an_offset_outside_the_imported_allocation_is_refused(cleanup):
    """A part whose offset + size runs past the allocation its handle names (as this process
    measures the mapping) is refused with LLM_PARAM_INVALID, and its import is closed again."""
    dproc = decode_proc(cleanup)
    name, _ = register_device(dproc, next(_seeds))
    part = share_from_wire(dproc.call("share", name)).parts[0]
    total = 8192 + 4 * 2048 + 3 * 6144 + 4096  # the allocation register_device made
    rt = runtimes.load("cuda", 0)
    before = imports_here()
    for offset, size in ((total - 1024, 2048), (total, 1), (1 << 40, 2048)):
        with pytest.raises(LLMException) as ei:
            device_ipc.IMPORTS.acquire(rt, replace(part, offset=offset, size=size))
        assert ei.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
        assert "outside" in str(ei.value)
        assert imports_here() == before
    edge = replace(part, offset=total - 2048, size=2048)  # the last bytes: inside
    local = device_ipc.IMPORTS.acquire(rt, edge)
    assert imports_here() == before + 1
    device_ipc.IMPORTS.release(rt, edge)
    assert local % 4096 == (total - 2048) % 4096
    assert imports_here() == before
