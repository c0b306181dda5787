"""Route choice as data: route_rules.CAPABILITIES and choose_route, the one function that
returns the route of a transfer or the refusal; and the placement rule it gives one answer in
both directions (a HOST source never goes to a DEVICE destination, pulls included)."""

from __future__ import annotations

import itertools

import pytest

from llmdist import BlocksCacheKey, LLMException, LLMStatusCode, Placement
from llmdist._core import Direction
from llmdist.route_rules import (
    CAPABILITIES,
    Access,
    Reach,
    Refusal,
    RouteKind,
    SelectionContext,
    choose_route,
)

from .helpers import Env, assert_mem_equal

H, D = Placement.HOST, Placement.DEVICE
FEATURE = LLMStatusCode.LLM_FEATURE_NOT_ENABLED
PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID


def ctx(
    direction=Direction.WRITE,
    source=D,
    destination=D,
    reach=Reach.SELF,
    device_runtime=False,
    access=Access.OWN,
    why="",
    peer_runtime=None,
    runtime=None,
) -> SelectionContext:
    return SelectionContext(
        direction,
        source,
        destination,
        reach,
        device_runtime,
        runtime or ("acl" if device_runtime else "host"),
        access,
        "cache 7 of cluster 3",
        why,
        peer_runtime,
    )


def test_every_row_of_the_table_is_chosen_for_the_transfers_it_states():
    for kind, caps in CAPABILITIES:
        for direction, (src, dst), reach, dev in itertools.product(
            caps.directions, caps.placements, caps.reaches, caps.device_runtime
        ):
            got = choose_route(ctx(direction, src, dst, reach, dev, caps.access))
            assert got is kind, (kind, caps, got)


@pytest.mark.parametrize("direction", [Direction.WRITE, Direction.READ])
@pytest.mark.parametrize(
    "reach,access",
    [
        (Reach.SELF, Access.OWN),
        (Reach.SAME_HOST, Access.SHARED_MEMORY),
        (Reach.SAME_HOST, Access.PROCESS),
        (Reach.ENGINE, Access.ENGINE),
    ],
)
def test_host_source_to_device_destination_is_refused_in_both_directions(direction, reach, access):
    got = choose_route(ctx(direction, H, D, reach, False, access))
    assert isinstance(got, Refusal) and got.status_code == PARAM_INVALID
    assert "HOST source" in got.message and "cache 7 of cluster 3" in got.message
    # the other three placement pairs move
    for src, dst in ((H, H), (D, H), (D, D)):
        assert isinstance(choose_route(ctx(direction, src, dst, reach, False, access)), RouteKind)


@pytest.mark.parametrize(
    "direction,verb", [(Direction.WRITE, "write into"), (Direction.READ, "read from")]
)
def test_device_memory_of_another_runtime_is_refused_both_ways(direction, verb):
    src, dst = (D, D)
    got = choose_route(
        ctx(
            direction,
            src,
            dst,
            Reach.SAME_HOST,
            True,
            Access.DEVICE_IPC,
            peer_runtime="cuda",
            runtime="acl",
        )
    )
    assert isinstance(got, Refusal) and got.status_code == FEATURE
    assert "cuda runtime" in got.message and "acl runtime" in got.message and verb in got.message
    assert (
        choose_route(
            ctx(
                direction,
                src,
                dst,
                Reach.SAME_HOST,
                True,
                Access.DEVICE_IPC,
                peer_runtime="acl",
                runtime="acl",
            )
        )
        is RouteKind.MAPPED
    )


def test_device_runtimes_reach_other_processes_through_device_ipc_only():
    # DEVICE to DEVICE through an import: mapped
    assert (
        choose_route(ctx(reach=Reach.SAME_HOST, device_runtime=True, access=Access.DEVICE_IPC))
        is RouteKind.MAPPED
    )
    # another process's HOST memory: refused with the reason, in both directions
    for direction, src, dst in ((Direction.WRITE, D, H), (Direction.READ, H, H)):
        got = choose_route(ctx(direction, src, dst, Reach.SAME_HOST, True, Access.PROCESS))
        assert isinstance(got, Refusal) and got.status_code == FEATURE
        assert "HOST memory of another process" in got.message
    # no access: the peer's reason is the refusal
    got = choose_route(
        ctx(
            reach=Reach.ENGINE,
            device_runtime=True,
            access=Access.NONE,
            why="cluster 3 is reached through Mooncake Transfer Engine",
        )
    )
    assert got == Refusal("cluster 3 is reached through Mooncake Transfer Engine", FEATURE)
    # the host runtime's shared memory and process routes are not a device runtime's
    for access in (Access.SHARED_MEMORY, Access.PROCESS, Access.ENGINE):
        assert isinstance(
            choose_route(ctx(reach=Reach.SAME_HOST, device_runtime=True, access=access)), Refusal
        )


def test_a_route_needs_the_access_it_states():
    assert choose_route(ctx(reach=Reach.SAME_HOST, access=Access.SHARED_MEMORY)) is RouteKind.MAPPED
    assert choose_route(ctx(reach=Reach.SAME_HOST, access=Access.PROCESS)) is RouteKind.PROCESS
    assert choose_route(ctx(reach=Reach.ENGINE, access=Access.ENGINE)) is RouteKind.ENGINE
    got = choose_route(ctx(reach=Reach.SAME_HOST, access=Access.NONE, why="not this uid"))
    assert got == Refusal("not this uid", FEATURE)
    # this cluster's own memory is reached only as this cluster's
    assert isinstance(choose_route(ctx(reach=Reach.SAME_HOST, access=Access.OWN)), Refusal)


def test_choose_route_is_a_function_of_its_context():
    c = ctx(Direction.READ, D, H, Reach.SAME_HOST, False, Access.PROCESS)
    assert [choose_route(c) for _ in range(3)] == [RouteKind.PROCESS] * 3
    assert c == ctx(Direction.READ, D, H, Reach.SAME_HOST, False, Access.PROCESS)


def test_a_local_pull_from_host_into_device_memory_is_refused():
    """One rule for both directions: a pull within this cluster from a HOST cache into a DEVICE
    cache is refused like a write (it was taken before), and nothing is written."""
    env = Env(remote=True, cluster_id=4101)
    try:
        key = BlocksCacheKey(env.cluster_id, 5)
        src = env.allocated(4, [8, 128], blocks=True, placement=H, key=key)
        dst = env.allocated(4, [8, 128], blocks=True, placement=D)
        before = dst.snapshot()
        with pytest.raises(LLMException) as ei:
            env.cm.pull_blocks(key, dst.cache, [0, 1], [2, 3])
        assert ei.value.status_code == PARAM_INVALID
        assert "HOST source cannot go to a DEVICE destination" in str(ei.value)
        assert_mem_equal(dst.mem(), before, "the DEVICE cache after a refused pull")
        # the same pull into HOST memory moves the blocks
        hdst = env.allocated(4, [8, 128], blocks=True, placement=H)
        env.cm.pull_blocks(key, hdst.cache, [0, 1], [2, 3])
        for t in range(4):
            row = 128
            assert bytes(hdst.tensor(t)[2 * row : 4 * row]) == bytes(src.tensor(t)[0 : 2 * row])
        # and a push from HOST into DEVICE is refused by the same rule
        dkey = BlocksCacheKey(env.cluster_id, 6)
        ddst = env.allocated(4, [8, 128], blocks=True, placement=D, key=dkey)
        before = ddst.snapshot()
        with pytest.raises(LLMException) as ei:
            env.cm.push_blocks(dkey, src.cache, [0], [1])
        assert ei.value.status_code == PARAM_INVALID
        assert "HOST source cannot go to a DEVICE destination" in str(ei.value)
        assert_mem_equal(ddst.mem(), before, "the DEVICE cache after a refused push")
    finally:
        env.close()
