"""The kv_transfer_params a proxy hands LLMDistConnector's engines (see docs/vllm.md). Importing
this module does not import vLLM: proxies and benchmarks use it without loading an engine."""

from __future__ import annotations

from typing import Dict, List, Tuple


def prefill_params() -> Dict[str, object]:
    """Pull and push: the prefill's params; its answer's kv_transfer_params go to the decode."""
    return {"do_remote_decode": True}


def layerwise_params(
    transfer_id: str, engine_id: str, host: str, ports: List[int]
) -> Tuple[Dict[str, object], Dict[str, object]]:
    """Layerwise: (the decode's params, the prefill's) of one request sent to both at once,
    tied by transfer_id. engine_id, host and ports (one per TP rank) are the prefill's: its
    kv_transfer_config's engine_id, kv_connector_extra_config's host and base_port + rank."""
    if not transfer_id:
        raise ValueError("transfer_id must be a non-empty string")
    if not ports:
        raise ValueError("ports must hold the prefill's llmdist port of each TP rank")
    decode = {
        "do_remote_prefill": True,
        "remote_engine_id": engine_id,
        "remote_host": host,
        "remote_ports": [int(p) for p in ports],
        "tp_size": len(ports),
        "remote_request_id": transfer_id,
        "remote_block_ids": [],
        "transfer_mode": "layerwise",
    }
    return decode, {"do_remote_decode": True, "transfer_id": transfer_id}
