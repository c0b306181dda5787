"""LLMDistConnector: a vLLM v1 KV connector that moves KV blocks with llmdist.

Load it with `KVTransferConfig(kv_connector="LLMDistConnector",
kv_connector_module_path="llmdist.integrations.vllm", kv_role=..., kv_connector_extra_config=
{"mode": "pull" | "push" | "layerwise", ...})`. Pull and push follow the standard
prefill-then-decode proxy:
- the prefill (P) keeps a finished request's blocks (request_finished returns True) and hands the
  proxy kv_transfer_params: its engine id, host, the llmdist port of each TP rank, the block ids,
  its TP size, its request id (the transfer id) and the mode;
- pull: the decode (D) parks the request, links rank i to P's rank i once (on a background
  thread, never in a step), pulls the blocks with pull_blocks(..., notify=) and reports them
  received; the notification arrives at P only once every byte was read out of its memory, and
  P reports the request sent so vLLM frees its blocks;
- push: D links and sends P a notification with its block ids; P writes its blocks into them
  with push_blocks(..., notify=) and frees them; D reports the request received on that
  notification (or failed on P's failure notice or at the lease);
- layerwise: the proxy sends the request to both at once with one transfer id ("transfer_id" in
  P's params, "remote_request_id" in D's, with P's address); D registers its blocks as in push;
  P takes registrations on a thread as they arrive and starts one transfer_cache_async per
  request with a synchronizer that releases each layer once the forward saved it (at the first
  save_kv_layer when the registration came first; the layers saved so far at once when it
  comes later), and D hears of it by the task's notification (a prompt split over steps is
  sent when the request finished, as in push);
- without a notification P frees at the lease (extra_config "lease_s", default 30 s); a failed
  link, pull or push reports the request received with its blocks in
  get_block_ids_with_load_errors and in failed_recving, so vLLM recomputes or fails it
  (kv_load_failure_policy); a decode that needs no block (prefix cache, abort) only notifies.
Each worker is one llmdist cluster (host runtime for CPU tensors, CUDA or ACL for device ones)
that registers every layer's KV tensor in one blocks cache (see kv_layout.py). Equal TP sizes
only: rank i pairs with rank i."""

from __future__ import annotations

from typing import Any, Dict, Optional, Set, Tuple

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

try:  # vLLM >= 0.32: completions and receive failures in one result
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
except ImportError:  # pragma: no cover - older vLLM
    KVConnectorTransferResults = None

from ...descs import LLMRole
from .metadata import (
    LLMDistConnectorMetadata,
    LLMDistHandshake,
    Options,
    RecvJob,
    cluster_id_of,
)
from .scheduler import SchedulerSide
from .worker import WorkerSide

__all__ = [
    "LLMDistConnector",
    "LLMDistConnectorMetadata",
    "LLMDistHandshake",
    "Options",
    "RecvJob",
    "cluster_id_of",
]


class LLMDistConnector(KVConnectorBase_V1):
    """vLLM's KV connector API on llmdist (see the module docstring)."""

    def __init__(self, vllm_config, role, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        cfg = vllm_config.kv_transfer_config
        self.options = Options.parse(cfg.kv_connector_extra_config)
        self.engine_id: str = cfg.engine_id
        self.tp_size: int = vllm_config.parallel_config.tensor_parallel_size
        self._sched: Optional[SchedulerSide] = None
        self._worker: Optional[WorkerSide] = None
        if role == KVConnectorRole.SCHEDULER:
            self._sched = SchedulerSide(self.engine_id, self.tp_size, self.options)
        else:
            num_blocks = getattr(kv_cache_config, "num_blocks", None)
            role_ = (
                LLMRole.PROMPT
                if cfg.kv_role == "kv_producer"
                else LLMRole.DECODER
                if cfg.kv_role == "kv_consumer"
                else LLMRole.MIX
            )
            self._worker = WorkerSide(self.engine_id, self.tp_size, self.options, role_, num_blocks)

    # -- scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> Tuple[int, bool]:
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> LLMDistConnectorMetadata:
        return self._sched.build_meta(scheduler_output)

    def request_finished(self, request, block_ids) -> Tuple[bool, Optional[Dict[str, Any]]]:
        return self._sched.request_finished(request, block_ids)

    def set_xfer_handshake_metadata(self, metadata) -> None:
        self._sched.set_handshake(metadata)

    # -- worker side
    @property
    def worker_side(self) -> Optional["WorkerSide"]:
        """This connector's worker half (None on the scheduler): its layout and layerwise
        counts, which the benchmark reads."""
        return self._worker

    def register_kv_caches(self, kv_caches) -> None:
        self._worker.register(kv_caches)

    def get_handshake_metadata(self) -> Optional[LLMDistHandshake]:
        return self._worker.handshake() if self._worker is not None else None

    def start_load_kv(self, forward_context, **kwargs) -> None:
        self._worker.start(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        # the step's metadata is bound before the forward; start_load_kv runs after it
        self._worker.streams.layer_saved(layer_name, self._get_connector_metadata())

    def wait_for_save(self) -> None:
        self._worker.streams.step_saved()

    def get_finished(self, finished_req_ids: Set[str]):
        sending, recving, _ = self._worker.results()
        return sending or None, recving or None

    def get_transfer_results(self, finished_req_ids: Set[str]):
        sending, recving, failed = self._worker.results()
        return KVConnectorTransferResults(
            finished_sending=sending, finished_recving=recving, failed_recving=failed
        )

    def get_block_ids_with_load_errors(self) -> Set[int]:
        return self._worker.load_errors() if self._worker is not None else set()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
