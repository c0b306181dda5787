"""Real clients' rank-table flows, one cluster per process on 127.0.0.1 (spec section 10): the
vllm-ascend LLMDataDist connector (plain and MLA), MindIE-LLM (K and V caches by model id,
a MIX decode, LLM_ALREADY_LINK on a second link), a comm of three, a member that never arrives,
and upstream's pull_blocks_sample.py with its swap_blocks round trip. The flows themselves are
in rank_table_flows.py; every byte a decode receives is checked there."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from typing import Dict, List

import pytest

from llmdist import LLMStatusCode

from . import rank_table_flows
from .rendezvous import (
    free_rendezvous_base,
    one_server_table,
    rendezvous_options,
    server_per_rank_table,
)

CTX = mp.get_context("spawn")
RESULT_S = 90.0


def run_flows(flow: str, params: List[Dict]) -> List[Dict]:
    """Start one process per params dict, return their results (in order); fail with the
    child's traceback, and never wait without a bound."""
    procs = []
    for p in params:
        parent, child = CTX.Pipe()
        proc = CTX.Process(target=rank_table_flows.flow_main, args=(child, flow, p), daemon=True)
        proc.start()
        child.close()
        procs.append((proc, parent))
    results, errors = [], []
    deadline = time.monotonic() + RESULT_S
    try:
        for proc, conn in procs:
            if not conn.poll(max(0.1, deadline - time.monotonic())):
                errors.append(f"process {proc.pid} gave no result within {RESULT_S} s")
                results.append(None)
                continue
            kind, value = conn.recv()
            if kind == "err":
                errors.append(value)
            results.append(value if kind == "ok" else None)
    finally:
        for proc, _ in procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                errors.append(f"process {proc.pid} did not exit")
    assert not errors, "\n".join(errors)
    assert [proc.exitcode for proc, _ in procs] == [0] * len(procs)
    return results


def members(base, **common):
    opts = rendezvous_options(base)
    return {**common, "options": opts}


@pytest.fixture
def base():
    return free_rendezvous_base()


@pytest.mark.parametrize("mla", [False, True])
def test_vllm_ascend_connector_flow(base, mla):
    done = CTX.Event()
    common = members(
        base,
        p=501,
        d=502,
        mla=mla,
        layers=3,
        blocks=8,
        block_bytes=256,
        comm="pd_comm_192.168.1.1_192.168.1.2",
        table=one_server_table(2),
        remote_blocks=[1, 2, 3, 6],
        local_blocks=[7, 0, 4, 5],
        done=done,
    )
    res = run_flows("vllm_connector", [{**common, "role": "prefill"}, {**common, "role": "decode"}])
    tensors = 2 * 3  # MLA: two caches (model id 0, 1) of one tensor per layer
    assert res[1]["checked"] == tensors * 8 * 256


def mindie_table(ip_p: str, ip_d: str):
    """The table and rank info MindIE-LLM builds for two devices of one server (the lower
    device ip is rank 0)."""
    ranks = {ip_p: 0, ip_d: 1} if ip_p < ip_d else {ip_p: 1, ip_d: 0}
    devices = sorted(
        [
            {"device_id": "0", "device_ip": ip_p, "rank_id": str(ranks[ip_p])},
            {"device_id": "1", "device_ip": ip_d, "rank_id": str(ranks[ip_d])},
        ],
        key=lambda d: d["rank_id"],
    )
    table = json.dumps(
        {
            "server_count": "1",
            "status": "completed",
            "version": "1.0",
            "server_list": [{"device": devices, "server_id": "127.0.0.1"}],
        }
    )
    name = f"link{max(ip_p, ip_d)}:{min(ip_p, ip_d)}"
    return table, name, ranks


def test_mindie_flow(base):
    table, name, ranks = mindie_table("192.168.1.9", "192.168.1.3")
    p, d = 601, 602
    rank_info = dict(
        sorted({p: ranks["192.168.1.9"], d: ranks["192.168.1.3"]}.items(), key=lambda kv: kv[1])
    )
    done = CTX.Event()
    common = members(
        base,
        p=p,
        d=d,
        layers=4,
        blocks=6,
        block_bytes=128,
        comm=name,
        table=table,
        rank_info=rank_info,
        src_blocks=[0, 5, 2],
        dst_blocks=[3, 4, 1],
        done=done,
    )
    res = run_flows("mindie", [{**common, "role": "prefill"}, {**common, "role": "decode"}])
    assert [r["again"] for r in res] == [int(LLMStatusCode.LLM_ALREADY_LINK)] * 2
    assert res[1]["checked"] == 2 * 4 * 6 * 128


def test_comm_of_three(base):
    ids = [701, 702, 703]
    common = members(
        base,
        p=701,
        decodes=[702, 703],
        layers=2,
        blocks=5,
        block_bytes=64,
        rank_info={c: r for r, c in enumerate(ids)},
        table=one_server_table(3),
        src_blocks=[4, 0],
        dst_blocks=[1, 2],
        sent=[CTX.Event(), CTX.Event()],
        checked=[CTX.Event(), CTX.Event()],
        seen=CTX.Barrier(3),
    )
    res = run_flows("trio", [{**common, "me": c} for c in ids])
    assert [r["linked"] for r in res] == [[702, 703], [701, 703], [701, 702]]
    assert [r["checked"] for r in res] == [0, 4 * 5 * 64, 4 * 5 * 64]


def test_member_that_never_arrives(base):
    common = members(base, rank_info={801: 0, 802: 1, 803: 2}, table=one_server_table(3))
    t0 = time.monotonic()
    res = run_flows("never_arrives", [{**common, "me": 801}, {**common, "me": 802}])
    assert [r["seen"] for r in res] == [["PREPARING", "FAILED"]] * 2
    assert all(r["took"] < 10 for r in res), res
    assert time.monotonic() - t0 < 60


def test_upstream_pull_blocks_sample(base):
    done = CTX.Event()
    common = members(base, table=server_per_rank_table(["1", "2"]), elems=1024 * 64, done=done)
    res = run_flows("pull_blocks_sample", [{**common, "me": 1}, {**common, "me": 2}])
    assert res[1]["checked"] == 2 * 1024 * 64 * 4


from .helpers import keyed_and_unkeyed  # noqa: E402

auth_mode = keyed_and_unkeyed()  # every test here runs without and with a shared key
