"""The scheduler half of LLMDistConnector: which requests load KV from a prefill, which
finished prefills keep their blocks for a decode, and the metadata of each step."""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional, Tuple

from .metadata import PARAM_KEYS, LLMDistConnectorMetadata, LLMDistHandshake, Options, RecvJob

log = logging.getLogger(__name__)


class SchedulerSide:
    def __init__(self, engine_id: str, tp_size: int, options: Options) -> None:
        self.engine_id = engine_id
        self.tp_size = tp_size
        self.options = options
        self.ports: Dict[int, int] = {}
        if options.base_port:
            self.ports = {r: options.base_port + r for r in range(tp_size)}
        self.recv: Dict[str, RecvJob] = {}
        self.send: Dict[str, float] = {}
        self.send_blocks: Dict[str, List[int]] = {}
        self.layerwise: Dict[str, str] = {}  # prefill request id -> transfer id
        # layerwise prefills cut into chunks, until their last chunk is scheduled: request id
        # -> (prompt length, its blocks so far)
        self.chunked: Dict[str, Tuple[int, List[int]]] = {}
        self.new_transfer_ids: Dict[str, str] = {}

    def set_handshake(self, metadata: Dict[int, LLMDistHandshake]) -> None:
        for rank, meta in metadata.items():
            self.ports[rank] = meta.port

    @staticmethod
    def _wants_pull(params) -> bool:
        return (
            bool(params)
            and bool(params.get("do_remote_prefill"))
            and all(params.get(k) is not None for k in PARAM_KEYS)
        )

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> Tuple[int, bool]:
        params = request.kv_transfer_params
        if self._wants_pull(params):
            count = len(request.prompt_token_ids or ()) - num_computed_tokens
            if count > 0:
                return count, True
        return 0, False

    def _job(self, request, params, local: List[int], report: bool) -> RecvJob:
        return RecvJob(
            req_id=request.request_id,
            local_block_ids=list(local),
            remote_block_ids=list(params["remote_block_ids"]),
            remote_engine_id=str(params["remote_engine_id"]),
            remote_host=str(params["remote_host"]),
            remote_ports=[int(p) for p in params["remote_ports"]],
            remote_tp_size=int(params["tp_size"]),
            transfer_id=str(params["remote_request_id"]),
            report=report,
            mode=str(params.get("transfer_mode", "pull")),
        )

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if (
            self.options.mode == "layerwise"
            and params
            and params.get("do_remote_decode")
            and request.request_id not in self.layerwise
        ):
            # the prefill of a layerwise request: its layers go out as they are computed
            tid = str(params.get("transfer_id") or request.request_id)
            self.layerwise[request.request_id] = tid
            self.new_transfer_ids[request.request_id] = tid
        if not self._wants_pull(params):
            return
        params["do_remote_prefill"] = False  # one transfer per request
        # a full prefix hit (nothing to load) still tells the prefill it may free
        local = blocks.get_unhashed_block_ids() if num_external_tokens > 0 else []
        self.recv[request.request_id] = self._job(
            request, params, local, report=num_external_tokens > 0
        )

    def request_finished(self, request, block_ids) -> Tuple[bool, Optional[Dict[str, Any]]]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        if not params:
            return False, None
        if self._wants_pull(params):
            # a decode request that ended before its blocks were allocated (aborted): the
            # prefill may free at once
            params["do_remote_prefill"] = False
            self.recv[request.request_id] = self._job(request, params, [], report=False)
            return False, None
        if not params.get("do_remote_decode"):
            return False, None
        if (
            request.status
            not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED)
            or not block_ids
        ):
            self.layerwise.pop(request.request_id, None)
            self.chunked.pop(request.request_id, None)
            return False, None  # aborted prefill: free now
        ports = [self.ports.get(r) for r in range(self.tp_size)]
        if any(p is None for p in ports):
            log.error(
                "request %s: the llmdist ports of this engine's workers are unknown (no "
                "handshake metadata and no base_port); the decode cannot pull",
                request.request_id,
            )
            return False, None
        self.send[request.request_id] = time.time() + self.options.lease_s
        if self.options.mode in ("push", "layerwise"):
            self.send_blocks[request.request_id] = list(block_ids)
        self.layerwise.pop(request.request_id, None)
        self.chunked.pop(request.request_id, None)
        return True, dict(
            do_remote_prefill=True,
            do_remote_decode=False,
            remote_block_ids=list(block_ids),
            remote_engine_id=self.engine_id,
            remote_request_id=request.request_id,
            remote_host=self.options.host,
            remote_ports=ports,
            tp_size=self.tp_size,
            transfer_mode=self.options.mode,
        )

    def build_meta(self, scheduler_output=None) -> LLMDistConnectorMetadata:
        layer = {}
        if self.layerwise and scheduler_output is not None:
            layer = self._last_chunks(scheduler_output)
        idle = (
            scheduler_output is not None
            and getattr(scheduler_output, "total_num_scheduled_tokens", 1) == 0
        )
        meta = LLMDistConnectorMetadata(
            self.recv, self.send, self.send_blocks, layer, self.new_transfer_ids, idle
        )
        self.recv, self.send, self.send_blocks, self.new_transfer_ids = {}, {}, {}, {}
        return meta

    def _last_chunks(self, out) -> Dict[str, Tuple[str, List[int]]]:
        """The layerwise prefills whose prompt this step finishes computing, with all their
        blocks: their layers go as the step's forward saves them. A prompt cut into chunks goes
        with its last chunk (the earlier chunks' KV is in its blocks by then)."""
        layer: Dict[str, Tuple[str, List[int]]] = {}
        counts = out.num_scheduled_tokens
        for new in out.scheduled_new_reqs:
            tid = self.layerwise.get(new.req_id)
            if tid is None:
                continue
            prompt = len(new.prompt_token_ids or ())
            blocks = list(new.block_ids[0])
            if new.num_computed_tokens + counts.get(new.req_id, 0) >= prompt:
                layer[new.req_id] = (tid, blocks)
            else:
                self.chunked[new.req_id] = (prompt, blocks)
        cached = out.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            got = self.chunked.get(rid)
            tid = self.layerwise.get(rid)
            if got is None or tid is None:
                continue
            prompt, blocks = got
            added = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                blocks = list(added[0]) if added is not None else []
            elif added is not None:
                blocks = blocks + list(added[0])
            if cached.num_computed_tokens[i] + counts.get(rid, 0) >= prompt:
                del self.chunked[rid]
                layer[rid] = (tid, blocks)
            else:
                self.chunked[rid] = (prompt, blocks)
        return layer
