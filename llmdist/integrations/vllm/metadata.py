"""What LLMDistConnector's halves share: its options (kv_connector_extra_config), the
notification payloads between prefill and decode workers, and the metadata the scheduler
hands the workers each step."""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
)

from ..kv_layout import clip_remote

log = logging.getLogger(__name__)

MODES = ("pull", "push", "layerwise")
DEFAULT_LEASE_S = 30.0
MODEL_ID = 0  # the BlocksCacheKey model id of every worker's KV cache
NOTIFY_PREFIX = b"llmdist-vllm:done:"  # D to P: free the request's blocks
PUSH_PREFIX = b"llmdist-vllm:push:"  # D to P (push): write into these blocks
PUSHED_PREFIX = b"llmdist-vllm:pushed:"  # P to D: these requests' blocks are written
PUSH_FAILED_PREFIX = b"llmdist-vllm:failed:"  # P to D (push): they will not be
IDLE_WAIT_MS = 5  # longest wait of a decode step that scheduled nothing
LISTEN_POLL_MS = 100  # how often the prefill's notification listener checks for close
PARAM_KEYS = (
    "remote_block_ids",
    "remote_engine_id",
    "remote_request_id",
    "remote_host",
    "remote_ports",
    "tp_size",
)


def cluster_id_of(engine_id: str, tp_rank: int) -> int:
    """The llmdist cluster id of an engine's TP rank: both ends derive it from the engine id."""
    return (zlib.crc32(engine_id.encode()) << 16) | tp_rank


def pushed_payload(dst_reqs: List[str]) -> bytes:
    """The notification telling a decode that its requests dst_reqs are written."""
    return PUSHED_PREFIX + json.dumps(list(dst_reqs)).encode()


def pushed_requests(payload: bytes) -> List[str]:
    """The decode's request ids in a pushed_payload; ValueError when it is not one."""
    reqs = json.loads(payload[len(PUSHED_PREFIX) :])
    if not isinstance(reqs, list):
        raise ValueError("a pushed notification names a list of requests")
    return [str(r) for r in reqs]


def registered_pairs(blocks: List[int], reg: dict) -> Tuple[List[int], List[int]]:
    """(this prefill's blocks, the decode's) for a decode's registration of its blocks;
    ValueError when they do not pair up."""
    local = [int(b) for b in reg["blocks"]]
    remote = clip_remote(blocks, local)
    if len(remote) != len(local):
        raise ValueError(
            f"this prefill holds {len(blocks)} blocks, the decode registered {len(local)}"
        )
    return remote, local


@dataclass
class Options:
    """kv_connector_extra_config, checked."""

    mode: str = "pull"
    host: str = "127.0.0.1"  # the address workers listen on and give to peers
    base_port: int = 0  # rank i listens on base_port + i (0: any free port)
    lease_s: float = DEFAULT_LEASE_S
    transfer_timeout_ms: int = 10000
    link_timeout_ms: int = 5000

    @classmethod
    def parse(cls, extra: Optional[Dict[str, Any]]) -> "Options":
        extra = dict(extra or {})
        o = cls()
        for key, kind in (
            ("mode", str),
            ("host", str),
            ("base_port", int),
            ("lease_s", float),
            ("transfer_timeout_ms", int),
            ("link_timeout_ms", int),
        ):
            if key in extra:
                value = extra.pop(key)
                try:
                    setattr(o, key, kind(value))
                except (TypeError, ValueError):
                    raise ValueError(
                        f"kv_connector_extra_config[{key!r}] must be a {kind.__name__}, "
                        f"got {value!r}"
                    ) from None
        if o.mode not in MODES:
            raise ValueError(
                f"kv_connector_extra_config['mode'] must be one of {MODES}, got {o.mode!r}"
            )
        if o.lease_s <= 0 or o.transfer_timeout_ms <= 0 or o.link_timeout_ms <= 0:
            raise ValueError(
                "kv_connector_extra_config: lease_s, transfer_timeout_ms and "
                "link_timeout_ms must be > 0"
            )
        if not 0 <= o.base_port < 65536:
            raise ValueError(
                f"kv_connector_extra_config['base_port'] must be a port, got {o.base_port}"
            )
        for key in extra:
            log.warning("LLMDistConnector ignores kv_connector_extra_config[%r]", key)
        return o


@dataclass
class LLMDistHandshake(KVConnectorHandshakeMetadata):
    """What a worker tells its scheduler: where its llmdist cluster listens."""

    host: str
    port: int
    cluster_id: int


@dataclass
class RecvJob:
    """A pull a decode worker runs for one request (empty local_block_ids: notify only)."""

    req_id: str
    local_block_ids: List[int]
    remote_block_ids: List[int]
    remote_engine_id: str
    remote_host: str
    remote_ports: List[int]
    remote_tp_size: int
    transfer_id: str  # the prefill's request id
    report: bool  # the request waits for it (finished_recving)
    mode: str = "pull"  # pull: D reads; push: D registers its blocks, P writes


@dataclass
class LLMDistConnectorMetadata(KVConnectorMetadata):
    """One step's work, scheduler to workers."""

    reqs_to_recv: Dict[str, RecvJob] = field(default_factory=dict)
    reqs_to_send: Dict[str, float] = field(default_factory=dict)  # request id -> lease end
    # push and layerwise modes, prefill: the blocks of each finished request, to write when D
    # registers
    send_blocks: Dict[str, List[int]] = field(default_factory=dict)
    # layerwise, prefill: requests computed in this step: request id -> (transfer id, blocks)
    layerwise: Dict[str, Tuple[str, List[int]]] = field(default_factory=dict)
    # layerwise, prefill: the transfer id of each request (its request id when absent)
    transfer_ids: Dict[str, str] = field(default_factory=dict)
    # the step scheduled no token (every request waits): a decode worker may wait briefly for
    # its transfers instead of returning to a step loop that only spins
    idle: bool = False
