"""Caches and cache keys as they go over a control connection (inside the frames of
frames.py), and back: every field a peer sends is checked for type and range before anything
uses it (wire_checks.py)."""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

from .descs import BlocksCacheKey, Cache, CacheDesc, CacheKey, DataType, Placement
from .registry import ALLOCATED, REGISTERED, MemoryEntry
from .shares import DeviceIpcTensors, share_from_wire, share_to_wire
from .status import LLMException
from .wire_checks import ProtocolError, check_enum, check_int, check_list

__all__ = [
    "cache_from_wire",
    "cache_to_wire",
    "key_from_wire",
    "key_to_wire",
    "share_to_wire",
]


def key_from_wire(w: object) -> Union[CacheKey, BlocksCacheKey]:
    w = check_list(w, 5)
    if len(w) == 3 and w[0] == "blocks":
        return BlocksCacheKey(check_int(w[1]), check_int(w[2]))
    if len(w) == 5 and w[0] == "cache":
        return CacheKey(check_int(w[1]), check_int(w[2]), check_int(w[3]), check_int(w[4]))
    raise ProtocolError(f"bad cache key {w!r:.60}")


def key_to_wire(key: Union[CacheKey, BlocksCacheKey]) -> list:
    if isinstance(key, BlocksCacheKey):
        return ["blocks", key.cluster_id, key.model_id]
    return ["cache", key.cluster_id, key.req_id, key.model_id, key.prefix_id]


def cache_to_wire(entry: MemoryEntry, fds: Optional[List[int]] = None) -> dict:
    """A cache as sent to a peer (fds: the descriptors going with the frame on a Unix socket,
    or None over TCP; see shares.py)."""
    c = entry.cache
    d = c.cache_desc
    return {
        "id": c.cache_id,
        "num_tensors": d.num_tensors,
        "shape": list(d.shape),
        "dtype": d.data_type.value,
        "placement": int(d.placement),
        "batch_dim": d.batch_dim,
        "seq_len_dim": d.seq_len_dim_index,
        "blocks": c.is_blocks_cache,
        "addrs": c.tensor_addrs,
        "origin": entry.origin,
        "remote_accessible": entry.remote_accessible,
        "keys": [key_to_wire(k) for k in entry.keys],
        "share": share_to_wire(entry.share, fds),
    }


def cache_from_wire(w: object, fds: List[int] = ()) -> Tuple[MemoryEntry, list]:
    """A peer's cache as a MemoryEntry (its addresses are the peer's) and its keys; a memfd
    share's "fd" becomes the descriptor of fds it names."""
    if type(w) is not dict:
        raise ProtocolError("cache is not an object")
    try:
        num_tensors = check_int(w["num_tensors"], 1, 2**32 - 1)
        desc = CacheDesc(
            num_tensors,
            [check_int(x, 1, 2**63 - 1) for x in check_list(w["shape"], 64)],
            check_enum(DataType, w["dtype"]),
            check_enum(Placement, w["placement"]),
            batch_dim_index=check_int(w["batch_dim"], 0, 64),
            seq_len_dim_index=check_int(w["seq_len_dim"], -1, 64),
        )
        if type(w["blocks"]) is not bool or type(w["remote_accessible"]) is not bool:
            raise ProtocolError("bad flags")
        if w["origin"] not in (ALLOCATED, REGISTERED):
            raise ProtocolError("bad origin")
        addrs = [check_int(a, 1) for a in check_list(w["addrs"], num_tensors)]
        cache = Cache(check_int(w["id"], 0, 2**63 - 1), desc, addrs, w["blocks"])
        keys = [key_from_wire(k) for k in check_list(w["keys"])]
        share = share_from_wire(w["share"], fds)
        if isinstance(share, DeviceIpcTensors):
            share.check_tensors(addrs, desc.size)
        region = share.region
        if region is not None:
            base, size = region
            # Writes land at a tensor's address moved into the mapping: every tensor must lie
            # inside the memory the share names, or they would land outside it.
            if any(a < base or a + desc.size > base + size for a in addrs):
                raise ProtocolError(
                    f"cache {cache.cache_id} has tensors outside the "
                    f"{size} bytes of its shared memory"
                )
        entry = MemoryEntry(cache, w["origin"], w["remote_accessible"], share=share)
        if region is not None:
            entry.base, entry.size = region
        return entry, keys
    except ProtocolError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, LLMException) as exc:
        raise ProtocolError(f"bad cache description: {exc}") from None
