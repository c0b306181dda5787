"""The routes between two processes that the pull/push and notification suites run on, and
their shared helpers: a listening peer in a child process, linking to it, and the expected
destination bytes of a pull or push."""

from __future__ import annotations

import importlib.util
import itertools
import os

import pytest

from llmdist import DataType, LLMRole, LLMStatusCode

from .decode_procs import Cleanup, DecodeProc, cluster_info
from .helpers import Env

SUCCESS = LLMStatusCode.LLM_SUCCESS
FP16 = DataType.DT_FLOAT16
LINK_MS = 5000
HAVE_MOONCAKE = importlib.util.find_spec("mooncake") is not None

_ids = itertools.count(300)
_seeds = itertools.count(11)

# The suites run on the host runtime and on the fake ACL and CUDA runtimes (each in a process of
# its own, see runtime_params.py), where the mapped route is device IPC.
DEVICE_RUNTIME = os.environ.get("LLMDIST_RUNTIME") in ("acl", "cuda")
HOST_ONLY = pytest.mark.skipif(
    DEVICE_RUNTIME,
    reason="a device runtime reaches another process's "
    "memory by device IPC only (test_device_runtime_refusals)",
)
NO_ENGINE = [pytest.mark.skipif(not HAVE_MOONCAKE, reason="mooncake is not installed"), HOST_ONLY]

# Routes: (memory of the peer's cache, transport).
ROUTES = [
    ("allocated", "direct"),
    pytest.param(("registered", "direct"), marks=HOST_ONLY),
    pytest.param(("registered", "mooncake"), marks=NO_ENGINE),
    pytest.param(("allocated", "mooncake"), marks=NO_ENGINE),
]
ROUTE_IDS = ["mapped", "process", "mooncake-registered", "mooncake-allocated"]


# The peer memory the tests that need one route pull from: on a device runtime another process's
# memory is reachable only when that process allocated it (device IPC).
PEER_MEM = "allocated" if DEVICE_RUNTIME else "registered"


def peer_proc(cleanup: Cleanup, transport: str, remote: bool = True) -> DecodeProc:
    """A listening cluster in a child process (a PROMPT, the side decodes pull from)."""
    p = cleanup.spawn(
        next(_ids),
        role=LLMRole.PROMPT,
        options={
            "llmdist.transport": transport,
            "llm.EnableRemoteCacheAccessible": "1" if remote else "0",
        },
    )
    return p.wait_ready()


def link_to(env: Env, proc: DecodeProc) -> None:
    code, codes = env.dd.link_clusters([cluster_info(proc.cluster_id, proc.port)], LINK_MS)
    assert (code, codes) == (SUCCESS, [SUCCESS])


def expect_blocks(
    dst_before,
    dst_tensors,
    dst_stride,
    src_mem,
    src_tensors,
    src_stride,
    src_layers,
    dst_layers,
    tpl,
    pairs=None,
    c2b=None,
    row=0,
    nbytes=None,
    dst_row=None,
):
    """The destination buffers after a pull/push. pairs: (src block, dst block) for B2B;
    c2b: dst blocks the source row is cut into; else C2C of row into dst_row."""
    want = {k: v.copy() for k, v in dst_before.items()}
    for sl, dl in zip(src_layers, dst_layers):
        for t in range(tpl):
            skey, soff = src_tensors[tpl * sl + t]
            dkey, doff = dst_tensors[tpl * dl + t]
            s = src_mem[skey]
            d = want[dkey]
            if pairs is not None:
                for sb, db in pairs:
                    d[doff + db * dst_stride : doff + (db + 1) * dst_stride] = s[
                        soff + sb * src_stride : soff + (sb + 1) * src_stride
                    ]
            elif c2b is not None:
                base = soff + row * src_stride
                for j, db in enumerate(c2b):
                    n = min(dst_stride, src_stride - j * dst_stride)
                    d[doff + db * dst_stride : doff + db * dst_stride + n] = s[
                        base + j * dst_stride : base + j * dst_stride + n
                    ]
            else:
                n = src_stride if nbytes is None else nbytes
                d[doff + dst_row * dst_stride : doff + dst_row * dst_stride + n] = s[
                    soff + row * src_stride : soff + row * src_stride + n
                ]
    return want
