"""LLMDataDist.switch_role (spec section 9), as upstream's current API: no option needed
(llm.EnableSwitchRole is read and ignored), the same role accepted, refused with LLM_EXIST_LINK
while links remain (link_clusters links and rank-table comms); it starts, moves or stops the
listener, handshakes in progress end unadmitted, and the new role is the one peers see in the
handshake."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from llmdist import LLMClusterInfo, LLMDataDist, LLMRole, LLMStatusCode, RegisterMemStatus

from .helpers import SUCCESS, free_port, raises_llm
from .rendezvous import free_rendezvous_base, one_server_table, rendezvous_options

SWITCH = {"llm.EnableSwitchRole": "1"}
LINK_FAILED = LLMStatusCode.LLM_LINK_FAILED


def info(cluster_id, port):
    c = LLMClusterInfo()
    c.remote_cluster_id = cluster_id
    c.append_remote_ip_info("127.0.0.1", port)
    return c


def refuses_connections(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def test_bad_listen_ip_info_names_the_option(make_env):
    """init and switch_role refuse an llm.listenIpInfo that is not "ip:port", naming where it
    came from."""
    dd = LLMDataDist(LLMRole.PROMPT, 7)
    err = raises_llm(LLMStatusCode.LLM_PARAM_INVALID, dd.init, {"llm.listenIpInfo": "nowhere"})
    assert "option llm.listenIpInfo must be \"ip:port\", got 'nowhere'" in str(err)
    e = make_env(role=LLMRole.MIX, extra_options=SWITCH)
    err = raises_llm(
        LLMStatusCode.LLM_PARAM_INVALID,
        e.dd.switch_role,
        LLMRole.PROMPT,
        {"llm.listenIpInfo": "127.0.0.1:x"},
    )
    assert str(err).startswith(
        "switch_options llm.listenIpInfo must be \"ip:port\", got '127.0.0.1:x'"
    )


@pytest.mark.parametrize("flag", [None, "0", "1"])
def test_switch_role_needs_no_option(make_env, flag):
    """Upstream's switch_role works whatever llm.EnableSwitchRole says (switch_role_sample.py
    does not set it); a switch to the role the cluster has is accepted."""
    e = make_env(extra_options={} if flag is None else {"llm.EnableSwitchRole": flag})
    e.dd.switch_role(LLMRole.DECODER)
    assert e.dd.role == LLMRole.DECODER
    e.dd.switch_role(LLMRole.DECODER)
    assert e.dd.role == LLMRole.DECODER
    e.dd.switch_role(LLMRole.PROMPT, {"llm.listenIpInfo": "127.0.0.1:0"})
    assert e.dd.role == LLMRole.PROMPT and e.dd.listen_port is not None


def test_switch_role_arguments(make_env):
    e = make_env(role=LLMRole.MIX, extra_options=SWITCH)
    with pytest.raises(TypeError):
        e.dd.switch_role(2)
    with pytest.raises(TypeError):
        e.dd.switch_role(LLMRole.DECODER, [("llm.listenIpInfo", "127.0.0.1:0")])
    with pytest.raises(TypeError):
        e.dd.switch_role(LLMRole.DECODER, {"llm.listenIpInfo": 5})
    raises_llm(
        LLMStatusCode.LLM_PARAM_INVALID,
        e.dd.switch_role,
        LLMRole.DECODER,
        {"llm.listenIpInfo": "localhost"},
    )
    assert e.dd.role == LLMRole.MIX
    # MIX -> DECODER -> PROMPT (with a listener) -> MIX, as upstream allows
    e.dd.switch_role(LLMRole.DECODER)
    e.dd.switch_role(LLMRole.PROMPT, {"llm.listenIpInfo": "127.0.0.1:0"})
    assert e.dd.listen_port is not None
    e.dd.switch_role(LLMRole.MIX)
    assert e.dd.role == LLMRole.MIX and e.dd.listen_port is None


def test_listener_starts_moves_and_stops(make_env):
    d = make_env(cluster_id=12, role=LLMRole.DECODER, extra_options=SWITCH)
    p = make_env(cluster_id=11, role=LLMRole.PROMPT)
    assert d.dd.listen_port is None
    port1 = free_port()
    d.dd.switch_role(LLMRole.PROMPT, {"llm.listenIpInfo": f"127.0.0.1:{port1}"})
    assert d.dd.listen_port == port1 and d.dd.role == LLMRole.PROMPT
    # the handshake carries the new role (and two PROMPT clusters link, as upstream)
    assert p.dd.link_clusters([info(12, port1)], 3000) == (SUCCESS, [SUCCESS])
    assert p.dd.peer_info(12)["role"] == LLMRole.PROMPT
    raises_llm(
        LLMStatusCode.LLM_EXIST_LINK,
        d.dd.switch_role,
        LLMRole.DECODER,
        {"llm.listenIpInfo": "127.0.0.1:0"},
    )
    assert p.dd.unlink_clusters([info(12, port1)], 3000)[0] == SUCCESS
    deadline = time.monotonic() + 5
    while d.dd.peer_info(11) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    d.dd.switch_role(LLMRole.DECODER, {"llm.listenIpInfo": "127.0.0.1:0"})
    port2 = d.dd.listen_port
    assert port2 not in (None, port1)
    assert refuses_connections(port1)
    assert p.dd.link_clusters([info(12, port2)], 3000) == (SUCCESS, [SUCCESS])
    assert p.dd.peer_info(12)["role"] == LLMRole.DECODER
    # refused while linked, from either side of the link
    raises_llm(LLMStatusCode.LLM_EXIST_LINK, d.dd.switch_role, LLMRole.PROMPT)
    assert d.dd.role == LLMRole.DECODER and d.dd.listen_port == port2
    assert p.dd.unlink_clusters([info(12, port2)], 3000)[0] == SUCCESS
    deadline = time.monotonic() + 5
    while d.dd.peer_info(11) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    d.dd.switch_role(LLMRole.PROMPT)  # no options: the listener stops
    assert d.dd.listen_port is None
    assert refuses_connections(port2)


def test_listen_address_in_use_is_refused_and_nothing_changes(make_env):
    e = make_env(role=LLMRole.DECODER, extra_options={**SWITCH, "llm.listenIpInfo": "127.0.0.1:0"})
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        old = e.dd.listen_port
        raises_llm(
            LLMStatusCode.LLM_PARAM_INVALID,
            e.dd.switch_role,
            LLMRole.PROMPT,
            {"llm.listenIpInfo": f"127.0.0.1:{busy.getsockname()[1]}"},
        )
        assert e.dd.role == LLMRole.DECODER and e.dd.listen_port == old
    finally:
        busy.close()


def test_refused_while_a_rank_table_comm_is_linked(make_env):
    base = free_rendezvous_base()
    envs = [
        make_env(cluster_id=cid, role=role, extra_options={**SWITCH, **rendezvous_options(base)})
        for cid, role in ((21, LLMRole.PROMPT), (22, LLMRole.DECODER))
    ]
    ids = [e.dd.link("sw", {21: 0, 22: 1}, one_server_table(2)) for e in envs]
    deadline = time.monotonic() + 20
    while (
        any(
            e.dd.query_register_mem_status(i) == RegisterMemStatus.PREPARING
            for e, i in zip(envs, ids)
        )
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    raises_llm(LLMStatusCode.LLM_EXIST_LINK, envs[0].dd.switch_role, LLMRole.DECODER)
    for e, i in zip(envs, ids):
        e.dd.unlink(i)
    envs[0].dd.switch_role(LLMRole.DECODER)
    envs[1].dd.switch_role(LLMRole.PROMPT)
    assert (envs[0].dd.role, envs[1].dd.role) == (LLMRole.DECODER, LLMRole.PROMPT)


@pytest.mark.parametrize("listen_after", [False, True])
def test_handshake_in_progress_does_not_survive_a_switch(make_env, listen_after):
    """A handshake the listener has read but not yet admitted when switch_role starts is not
    admitted after it: switch_role ends it before it checks links, so the switched cluster is
    left with no link (and, without options, no listener); the linker's call fails."""
    d = make_env(
        cluster_id=32,
        role=LLMRole.DECODER,
        extra_options={**SWITCH, "llm.listenIpInfo": "127.0.0.1:0"},
    )
    p = make_env(cluster_id=31, role=LLMRole.PROMPT)
    port = d.dd.listen_port
    node = d.dd._node
    entered, release = threading.Event(), threading.Event()
    begin = node._begin_accept

    def held(cid):
        entered.set()
        release.wait(10)
        return begin(cid)

    node._begin_accept = held
    got = {}
    linker = threading.Thread(
        target=lambda: got.update(link=p.dd.link_clusters([info(32, port)], 8000))
    )
    linker.start()
    assert entered.wait(10)
    options = {"llm.listenIpInfo": "127.0.0.1:0"} if listen_after else None
    switcher = threading.Thread(
        target=lambda: got.update(switch=d.dd.switch_role(LLMRole.MIX, options))
    )
    switcher.start()
    time.sleep(0.3)  # switch_role is under way, the handshake still held
    release.set()
    switcher.join(20)
    linker.join(20)
    assert not switcher.is_alive() and not linker.is_alive()
    assert "switch" in got and d.dd.role == LLMRole.MIX
    assert got["link"][0] != SUCCESS
    time.sleep(0.2)
    assert d.dd.peer_info(31) is None and p.dd.peer_info(32) is None
    if listen_after:
        # the new listener admits links again
        assert p.dd.link_clusters([info(32, d.dd.listen_port)], 3000) == (SUCCESS, [SUCCESS])
    else:
        assert d.dd.listen_port is None and refuses_connections(port)
