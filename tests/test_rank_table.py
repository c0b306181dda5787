"""Rank-table links (spec section 9): LLMDataDist.link / query_register_mem_status / unlink,
in one process with several clusters (the multi-process client flows are in
test_rank_table_flows.py). Links made by link() are checked to be real cluster links: the caches
each side registered before link() are known to the other side, and bytes go through them."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest

from llmdist import (
    LLMClusterInfo,
    LLMException,
    LLMRole,
    LLMStatusCode,
    RegisterMemStatus,
    TransferConfig,
    rank_table,
)

from .helpers import SUCCESS, RecordingSync, raises_llm, wait_results
from .rendezvous import (
    free_rendezvous_base,
    one_server_table,
    rendezvous_options,
    server_per_rank_table,
)

PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
OK, PREPARING, FAILED = RegisterMemStatus.OK, RegisterMemStatus.PREPARING, RegisterMemStatus.FAILED
WAIT_S = 20.0


def wait_status(env, comm_id, want, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while True:
        st = env.dd.query_register_mem_status(comm_id)
        if st == want or st != PREPARING or time.monotonic() > deadline:
            return st
        time.sleep(0.005)


@pytest.fixture
def base():
    return free_rendezvous_base()


def members(make_env, base, ids, roles=None, link_total_s=None):
    roles = roles or [LLMRole.PROMPT] + [LLMRole.DECODER] * (len(ids) - 1)
    return [
        make_env(cluster_id=cid, role=role, extra_options=rendezvous_options(base, link_total_s))
        for cid, role in zip(ids, roles)
    ]


def link_all(envs, name, table, info=None):
    info = info or {e.cluster_id: r for r, e in enumerate(envs)}
    return [e.dd.link(name, info, table) for e in envs]


# --------------------------------------------------------------------------------------------
# the rank table


def test_rank_table_hosts():
    hosts = rank_table.parse_rank_table(
        server_per_rank_table(["10.0.0.1", "node-b"], super_pod=True)
    )
    assert hosts == {0: "10.0.0.1", 1: "127.0.0.1"}
    t = json.loads(one_server_table(3, server_id="7"))
    t["server_list"][0]["host_ip"] = "10.1.2.3"
    assert rank_table.parse_rank_table(json.dumps(t)) == {
        0: "10.1.2.3",
        1: "10.1.2.3",
        2: "10.1.2.3",
    }
    t["server_list"][0]["device"][1]["rank_id"] = 5  # an int rank is read as well
    assert set(rank_table.parse_rank_table(json.dumps(t))) == {0, 5, 2}


@pytest.mark.parametrize(
    "table, what",
    [
        ("not json", "not JSON"),
        ("[]", "server_list"),
        ('{"server_list": [{"server_id": "1"}]}', "device"),
        ('{"server_list": [{"device": [{"device_ip": "1.2.3.4"}]}]}', "rank_id"),
        ('{"server_list": [{"device": [{"rank_id": "x"}]}]}', "rank_id"),
        ('{"server_list": [{"device": [{"rank_id": "0"}, {"rank_id": "0"}]}]}', "twice"),
    ],
)
def test_rank_table_errors(env, table, what):
    err = raises_llm(PARAM_INVALID, env.dd.link, "c", {env.cluster_id: 0, 9: 1}, table)
    assert what in str(err)


@pytest.mark.parametrize(
    "args, exc",
    [
        ((1, {7: 0, 9: 1}, "{}"), TypeError),
        (("c", [(7, 0), (9, 1)], "{}"), TypeError),
        (("c", {7: "0", 9: 1}, "{}"), TypeError),
        (("c", {7: 0, 9: 1}, {}), TypeError),
        (("c", {-7: 0, 9: 1}, "{}"), ValueError),
        (("c", {7: 0, 9: 2**32}, "{}"), ValueError),
    ],
)
def test_link_argument_types(env, args, exc):
    with pytest.raises(exc):
        env.dd.link(*args)


@pytest.mark.parametrize(
    "name, info, what",
    [
        ("", {7: 0, 9: 1}, "comm_name"),
        ("x" * 128, {7: 0, 9: 1}, "comm_name"),
        ("c", {7: 0}, "2 to 4"),
        ("c", {7: 0, 9: 1, 10: 2, 11: 3, 12: 4}, "2 to 4"),
        ("c", {7: 1, 9: 0}, "ascending"),
        ("c", {7: 0, 9: 0}, "distinct"),
        ("c", {8: 0, 9: 1}, "does not name this cluster"),
        ("c", {7: 0, 9: 3}, "rank 3"),
    ],
)
def test_link_refusals(env, name, info, what):
    err = raises_llm(PARAM_INVALID, env.dd.link, name, info, one_server_table(2))
    assert what in str(err)


def test_rendezvous_option_checks(make_env):
    with pytest.raises(LLMException) as ei:
        make_env(
            extra_options={"llmdist.rendezvous_port": "65000", "llmdist.rendezvous_slots": "200"}
        )
    assert ei.value.status_code == PARAM_INVALID and "65535" in str(ei.value)
    with pytest.raises(LLMException):
        make_env(extra_options={"llmdist.rendezvous_port": "abc"})


def test_rendezvous_port_is_derived_from_the_name(env):
    links = env.dd._comms
    a = links.port("pd_comm_1", 0)
    assert links.port("pd_comm_1", 1) == a + 1
    assert (a - rank_table.DEFAULT_RENDEZVOUS_PORT) % 4 == 0
    assert rank_table.DEFAULT_RENDEZVOUS_PORT <= a < rank_table.DEFAULT_RENDEZVOUS_PORT + 400


def test_unknown_comm_id(env):
    raises_llm(LLMStatusCode.LLM_NOT_YET_LINK, env.dd.query_register_mem_status, 5)
    raises_llm(LLMStatusCode.LLM_NOT_YET_LINK, env.dd.unlink, 5)
    with pytest.raises(TypeError):
        env.dd.query_register_mem_status("1")
    with pytest.raises(ValueError):
        env.dd.unlink(-1)


# --------------------------------------------------------------------------------------------
# forming comms


def send_rows(src_env, src, dst_env, dst):
    """transfer_cache_async of every layer of src into dst's tensors on dst_env's cluster."""
    task = src_env.cm.transfer_cache_async(
        src.cache, RecordingSync(), [TransferConfig(dst_env.cluster_id, dst.addrs)]
    )
    return wait_results(task)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_members_link_every_pair_and_exchange_caches(make_env, base, n):
    envs = members(make_env, base, [31 + i for i in range(n)])
    caches = [e.registered(2, [2, 64]) for e in envs]
    for e in envs[1:]:
        with pytest.raises(LLMException) as ei:  # not linked yet
            envs[0].cm.transfer_cache_async(
                caches[0].cache, RecordingSync(), [TransferConfig(e.cluster_id, caches[1].addrs)]
            )
        assert ei.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK
    ids = link_all(envs, "comm-a", one_server_table(n))
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert [wait_status(e, i, OK) for e, i in zip(envs, ids)] == [OK] * n
    for a in range(n):
        for b in range(n):
            if a != b:
                assert envs[a].dd.peer_info(envs[b].cluster_id) is not None
    # every member's caches registered before link are known to every other member
    for a in range(n):
        b = (a + 1) % n
        assert send_rows(envs[a], caches[a], envs[b], caches[b]) == [SUCCESS]
        for t in range(2):
            assert np.array_equal(caches[b].tensor(t)[:64], caches[a].tensor(t)[:64])
    for e, i in zip(envs, ids):
        e.dd.unlink(i)
    for a in range(n):
        for b in range(n):
            if a != b:
                assert envs[a].dd.peer_info(envs[b].cluster_id) is None


def test_two_servers_with_super_pod_list(make_env, base):
    envs = members(make_env, base, [41, 42])
    table = server_per_rank_table(["127.0.0.1", "127.0.0.1"], super_pod=True)
    ids = link_all(envs, "pods", table)
    assert [wait_status(e, i, OK) for e, i in zip(envs, ids)] == [OK, OK]
    envs[1].dd.unlink(ids[1])  # one side first; the other side's unlink still succeeds
    envs[0].dd.unlink(ids[0])


def test_member_that_never_arrives_fails_after_link_total_time(make_env, base, caplog):
    envs = members(make_env, base, [51, 52], link_total_s=1)
    info = {51: 0, 52: 1, 53: 2}
    caplog.set_level(logging.WARNING, logger="llmdist")
    t0 = time.monotonic()
    ids = [e.dd.link("three", info, one_server_table(3)) for e in envs]
    assert [e.dd.query_register_mem_status(i) for e, i in zip(envs, ids)] == [PREPARING] * 2
    got = [wait_status(e, i, FAILED, timeout=10) for e, i in zip(envs, ids)]
    took = time.monotonic() - t0
    assert got == [FAILED, FAILED]
    assert took < 8, took
    assert "[53]" in caplog.text and "did not link within 1 s" in caplog.text
    # the links the comm made are taken down, and the comm can be unlinked without error
    assert envs[0].dd.peer_info(52) is None and envs[1].dd.peer_info(51) is None
    for e, i in zip(envs, ids):
        e.dd.unlink(i)


def test_already_linked_members(make_env, base):
    envs = members(make_env, base, [61, 62])
    ids = link_all(envs, "first", one_server_table(2))
    assert [wait_status(e, i, OK) for e, i in zip(envs, ids)] == [OK, OK]
    again = link_all(envs, "second", one_server_table(2))
    assert again == [LLMStatusCode.LLM_ALREADY_LINK] * 2
    for e, i in zip(envs, ids):
        e.dd.unlink(i)
    # the same name again after unlink forms a new comm
    ids = link_all(envs, "first", one_server_table(2))
    assert [wait_status(e, i, OK) for e, i in zip(envs, ids)] == [OK, OK]
    for e, i in zip(envs, ids):
        e.dd.unlink(i)


def test_link_after_link_clusters_is_already_linked(make_env, base):
    d = make_env(
        cluster_id=72,
        role=LLMRole.DECODER,
        extra_options={"llm.listenIpInfo": "127.0.0.1:0", **rendezvous_options(base)},
    )
    p = make_env(cluster_id=71, extra_options=rendezvous_options(base))
    info = LLMClusterInfo()
    info.remote_cluster_id = 72
    info.append_remote_ip_info("127.0.0.1", d.dd.listen_port)
    assert p.dd.link_clusters([info], 5000)[0] == SUCCESS
    assert p.dd.link("c", {71: 0, 72: 1}, one_server_table(2)) == LLMStatusCode.LLM_ALREADY_LINK
    assert d.dd.link("c", {71: 0, 72: 1}, one_server_table(2)) == LLMStatusCode.LLM_ALREADY_LINK


def test_two_comms_sharing_the_rendezvous_ports(make_env, base):
    """With one slot every comm uses the same four ports: members of a comm of another name are
    refused by the listener and retry, a busy port is retried, and both comms form."""
    a = members(make_env, base, [81, 82])
    b = members(make_env, base, [83, 84])
    ids_a = link_all(a, "name-a", one_server_table(2))
    ids_b = link_all(b, "name-b", one_server_table(2))
    got = [wait_status(e, i, OK) for e, i in zip(a + b, ids_a + ids_b)]
    assert got == [OK] * 4
    assert a[0].dd.peer_info(83) is None and b[0].dd.peer_info(81) is None
    for e, i in zip(a + b, ids_a + ids_b):
        e.dd.unlink(i)


def test_finalize_ends_forming_comms(make_env, base):
    (e,) = members(make_env, base, [91], link_total_s=60)
    cid = e.dd.link("lonely", {91: 0, 92: 1}, one_server_table(2))
    assert e.dd.query_register_mem_status(cid) == PREPARING
    t0 = time.monotonic()
    e.dd.finalize()
    assert time.monotonic() - t0 < 5


from .helpers import keyed_and_unkeyed  # noqa: E402

auth_mode = keyed_and_unkeyed()  # every test here runs without and with a shared key
