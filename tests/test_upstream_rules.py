"""Upstream LLM-DataDist behaviours real clients rely on: links between clusters of the same
role (PROMPT-PROMPT, DECODER-DECODER, MIX), a key registered again naming the newest cache (the
last registration wins, here and on linked peers before register_* returns), and the lifetime
of caches allocated under CacheKeys (deallocate_cache defers the free until the keys are pulled
or removed)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from llmdist import (BlocksCacheKey, CacheKey, CacheKeyByIdAndIndex, LLMClusterInfo, LLMRole,
                     LLMStatusCode)

from helpers import free_port, raises_llm

SUCCESS = LLMStatusCode.LLM_SUCCESS
NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
_ids = itertools.count(900)


def info(cluster_id, port):
    c = LLMClusterInfo()
    c.remote_cluster_id = cluster_id
    c.append_remote_ip_info("127.0.0.1", port)
    return c


def pair(make_env, role_a, role_b, remote=True):
    """Cluster a listens, cluster b links to it; both remote accessible unless told."""
    port = free_port()
    a = make_env(remote=remote, role=role_a, cluster_id=next(_ids),
                 extra_options={"llm.listenIpInfo": f"127.0.0.1:{port}"})
    b = make_env(remote=remote, role=role_b, cluster_id=next(_ids))
    assert b.dd.link_clusters([info(a.cluster_id, port)], 5000) == (SUCCESS, [SUCCESS])
    return a, b


def blocks_of(tc, block, nblocks=8):
    """Block `block` of every tensor of a blocks cache (shape [nblocks, n])."""
    return [tc.tensor(t).reshape(nblocks, -1)[block].copy() for t in range(tc.desc.num_tensors)]


# --------------------------------------------------------------------------------------------
# same-role links
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("roles", [(LLMRole.PROMPT, LLMRole.PROMPT),
                                   (LLMRole.DECODER, LLMRole.DECODER),
                                   (LLMRole.MIX, LLMRole.MIX),
                                   (LLMRole.MIX, LLMRole.DECODER)],
                         ids=["prompt-prompt", "decoder-decoder", "mix-mix", "mix-decoder"])
def test_same_role_links_pull_and_push(make_env, roles):
    """Roles do not restrict links (upstream: decode-to-decode and prefill-to-prefill links
    serve migration and prefix sharing): both clusters pull from and push to each other."""
    a, b = pair(make_env, *roles)
    ca = a.registered(4, [8, 64], blocks=True, key=BlocksCacheKey(a.cluster_id, 1))
    cb = b.registered(4, [8, 64], blocks=True, key=BlocksCacheKey(b.cluster_id, 1))
    want = blocks_of(ca, 3)
    b.cm.pull_blocks(BlocksCacheKey(a.cluster_id, 1), cb.cache, [3], [6])
    assert all(np.array_equal(x, y) for x, y in zip(blocks_of(cb, 6), want))
    want = blocks_of(cb, 0)
    b.cm.push_blocks(BlocksCacheKey(a.cluster_id, 1), cb.cache, [0], [5])
    assert all(np.array_equal(x, y) for x, y in zip(blocks_of(ca, 5), want))
    # and from the listening side
    want = blocks_of(cb, 2)
    a.cm.pull_blocks(BlocksCacheKey(b.cluster_id, 1), ca.cache, [2], [7])
    assert all(np.array_equal(x, y) for x, y in zip(blocks_of(ca, 7), want))
    want = blocks_of(ca, 4)
    a.cm.push_blocks(BlocksCacheKey(b.cluster_id, 1), ca.cache, [4], [1])
    assert all(np.array_equal(x, y) for x, y in zip(blocks_of(cb, 1), want))
