"""Shares on the wire (shares.py), the peer path, and engine outcomes classified by the
engine channel itself (results.py imports no transport's codes)."""

from __future__ import annotations

import numpy as np
import pytest

from llmdist import LLMException, LLMStatusCode, _core, device_ipc
from llmdist._core import ConfigPlan, CopyKind, Direction, Failure, Lane
from llmdist.auth import ProtocolError
from llmdist.data_path import PeerPath, choose_path
from llmdist.results import config_results
from llmdist.shares import (
    DeviceIpcShare,
    DeviceIpcTensors,
    MemfdShare,
    ProcessShare,
    ShareKind,
    Unshared,
    share_from_wire,
    share_to_wire,
)
from llmdist.transport_mooncake import WAIT_FAILED, WAIT_TIMEOUT, EngineChannel


def test_each_share_reads_back_what_it_wrote():
    for share in (
        Unshared(),
        Unshared("exporting it failed"),
        ProcessShare(),
        DeviceIpcShare(ShareKind.CUDA_IPC, "0a1b", 4096, 8192, 3),
        DeviceIpcShare(ShareKind.ACL_IPC, "key-1", 1 << 20, 512, 0),
        DeviceIpcShare(ShareKind.CUDA_IPC, "0a1b", 4096 + 72, 256, 1, 72),
        DeviceIpcTensors(
            (
                DeviceIpcShare(ShareKind.CUDA_IPC, "0a1b", 4096 + 72, 256, 1, 72),
                DeviceIpcShare(ShareKind.CUDA_IPC, "0a1b", 4096 + 1024, 256, 1, 1024),
                DeviceIpcShare(ShareKind.CUDA_IPC, "ffee", 1 << 30, 256, 1, 0),
            )
        ),
    ):
        fds: list = []
        assert share_from_wire(share.to_wire(fds), fds) == share
        assert fds == []


def test_a_memfd_share_sends_its_descriptor_and_reads_back_the_one_received():
    fds = [11]
    w = MemfdShare(fd=42, base=0x1000, size=0x2000).to_wire(fds)
    assert w == {"kind": "memfd", "fd": 1, "base": 0x1000, "size": 0x2000}
    assert fds == [11, 42]
    received = [7, 9]  # the descriptors as they arrived here
    assert share_from_wire(w, received) == MemfdShare(fd=9, base=0x1000, size=0x2000)


def test_shared_memory_and_device_ids_go_over_a_unix_socket_only():
    for share in (MemfdShare(5, 4096, 4096), DeviceIpcShare(ShareKind.CUDA_IPC, "ab", 1, 2)):
        w = share_to_wire(share, None)  # over TCP
        assert w["kind"] == "none" and "Unix socket" in w["reason"]
        assert share_from_wire(w) == Unshared(w["reason"])
    assert share_to_wire(None, []) == {"kind": "none"}


@pytest.mark.parametrize(
    "wire, fds",
    [
        ({"kind": "tcp"}, []),
        ({"kind": True}, []),
        ({"kind": ["memfd"]}, []),
        (["memfd"], []),
        ({"kind": "memfd", "fd": 0, "base": 1, "size": 1}, []),  # no descriptor came
        ({"kind": "memfd", "fd": 1, "base": 1, "size": 1}, [3]),  # names one that did not
        ({"kind": "memfd", "fd": 0, "base": 0, "size": 1}, [3]),
        ({"kind": "cuda_ipc", "id": "", "base": 1, "size": 1}, []),
        ({"kind": "cuda_ipc", "id": "a\nb", "base": 1, "size": 1}, []),
        ({"kind": "acl_ipc", "id": "k" * 200, "base": 1, "size": 1}, []),
        ({"kind": "acl_ipc", "id": "k", "base": 1, "size": 1, "device": -1}, []),
        ({"kind": "none", "reason": 5}, []),
        ({"kind": "cuda_ipc", "id": "k", "base": 1, "size": 1, "offset": -1}, []),
        # an ACL key names its region itself: no offset into an allocation
        ({"kind": "acl_ipc", "id": "k", "base": 1, "size": 1, "offset": 64}, []),
        ({"kind": "device_tensors", "tensors": []}, []),
        ({"kind": "device_tensors", "tensors": [{"kind": "memfd"}]}, []),
        ({"kind": "device_tensors", "tensors": [{"kind": "device_tensors", "tensors": []}]}, []),
        (
            {
                "kind": "device_tensors",
                "tensors": [
                    {"kind": "cuda_ipc", "id": "a", "base": 1, "size": 1},
                    {"kind": "cuda_ipc", "id": "a", "base": 2, "size": 1, "device": 1},
                ],
            },
            [],
        ),
    ],
)
def test_a_malformed_share_is_a_protocol_error(wire, fds):
    with pytest.raises(ProtocolError):
        share_from_wire(wire, fds)


def test_device_tensor_exports_must_be_the_cache_tensors():
    """A registered cache's device share names each of its tensors exactly: a part at another
    address or of another size than its tensor is refused before anything is imported."""
    parts = tuple(
        DeviceIpcShare(ShareKind.CUDA_IPC, "ab", a, 2048, 0, a - 0x10000)
        for a in (0x10040, 0x12040)
    )
    share = DeviceIpcTensors(parts)
    share.check_tensors([0x10040, 0x12040], 2048)
    for addrs, size in (
        ([0x10040, 0x12000], 2048),
        ([0x10040], 2048),
        ([0x10040, 0x12040], 4096),
    ):
        with pytest.raises(ProtocolError):
            share.check_tensors(addrs, size)
    assert share_to_wire(share, None)["kind"] == "none"  # over TCP: never sent


def test_the_path_follows_the_transport_option_and_the_hosts():
    assert choose_path("auto", same_host=True) is PeerPath.DIRECT
    assert choose_path("auto", same_host=False) is PeerPath.MOONCAKE
    assert choose_path("direct", same_host=False) is PeerPath.DIRECT
    assert choose_path("mooncake", same_host=True) is PeerPath.MOONCAKE
    assert choose_path("direct", same_host=True, peer_wants_engine=True) is PeerPath.MOONCAKE


class _Failing:
    """A transport whose every batch fails with code at its wait."""

    def __init__(self, code: int) -> None:
        self.code = code

    def write_batch(self, session, src, dst, lengths):
        return 1

    def wait(self, handle, timeout_ms):
        return self.code


def test_the_engine_channel_classifies_its_own_codes():
    ch = EngineChannel(_Failing(WAIT_TIMEOUT), "peer:1", 10)
    assert ch.verdict(WAIT_TIMEOUT) == (
        LLMStatusCode.LLM_TIMEOUT,
        ("the transfer engine did not deliver the bytes (timed out)"),
    )
    assert ch.verdict(WAIT_FAILED) == (
        LLMStatusCode.LLM_LINK_FAILED,
        "the transfer engine did not deliver the bytes (code -1)",
    )
    ch.error = "transfer engine refused a write: gone"
    assert ch.verdict(WAIT_FAILED) == (LLMStatusCode.LLM_LINK_FAILED, ch.error)


class _Channel:
    """An engine channel that fails every write with code 77 and classifies it as given."""

    def __init__(self, status: LLMStatusCode, text: str) -> None:
        self.status, self.text, self.error, self.codes = status, text, None, []

    def write(self, local, peer, lengths):
        return 77

    def read(self, local, peer, lengths):
        return 77

    def settle(self):
        return 0

    def verdict(self, code):
        self.codes.append(code)
        return self.status, self.text


class _Always:
    """A layer synchronizer that releases every layer at once."""

    def synchronize_layer(self, layer, timeout):
        return True


def _engine_job(channel) -> "_core.TransferJob":
    """Push one 256-byte block of a layer's two tensors through channel on the engine lane;
    the finished job."""
    rt = _core.Runtime.host()
    local = np.zeros((2, 512), dtype=np.uint8)
    plan = _core.plan_b2b(_core.parse_indices("src", [0]), _core.parse_indices("dst", [1]), 256)
    target = 1 << 40  # the peer's address: never touched here
    cp = ConfigPlan(
        first_layer=0,
        stop_layer=1,
        row_shift=0,
        kind=CopyKind.COPY_H2H,
        lane=Lane.LANE_ENGINE,
        direction=Direction.WRITE,
        target_addrs=[target, target + 512],
        target_limits=[target + 512, target + 1024],
        pid=0,
        link=None,
        engine=channel,
        single=False,
    )
    job = _core.TransferJob(
        rt, plan, [local[0].ctypes.data, local[1].ctypes.data], [cp], _Always(), None
    )
    stream = _core.Stream(rt)
    try:
        job.run(stream)
    finally:
        stream.close()
    return job


@pytest.mark.parametrize("status", [LLMStatusCode.LLM_TIMEOUT, LLMStatusCode.LLM_FAILED])
def test_an_engine_failure_takes_the_status_its_channel_gives(status):
    ch = _Channel(status, f"channel says {status.name}")
    job = _engine_job(ch)
    assert job.outcomes[0].failure == Failure.FAIL_ENGINE
    assert config_results(job) == ([status], [f"channel says {status.name}"])
    assert ch.codes == [77]


class UnmeasuredRuntime:
    """What ImportTable needs of a CUDA runtime, without the driver library that measures a
    mapping: imports map at a fixed address and are counted."""

    def __init__(self) -> None:
        self.open = 0

    def ipc_import(self, ident: str) -> int:
        self.open += 1
        return 0x7000_0000_0000

    def ipc_range(self, ptr: int, size: int):
        raise LLMException("ipc_range: not supported", status_code=LLMStatusCode.LLM_FAILED)

    def ipc_close_import(self, ident: str, address: int) -> None:
        self.open -= 1


@pytest.mark.parametrize("offset", [0, 4096])
def test_a_cuda_share_whose_mapping_cannot_be_measured_is_refused(offset):
    """Without the driver's measure of the mapping, the size a peer announces cannot be
    checked: the import is refused (LLM_PARAM_INVALID) and closed, at any offset, rather than
    copying up to that size past the end of the allocation."""
    rt = UnmeasuredRuntime()
    table = device_ipc.ImportTable()
    share = DeviceIpcShare(ShareKind.CUDA_IPC, "ab" * 64, 0x1000, 1 << 30, 0, offset)
    with pytest.raises(LLMException) as ei:
        table.acquire(rt, share)
    assert ei.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    assert "cannot be measured" in str(ei.value)
    assert rt.open == 0 and table.count() == 0
