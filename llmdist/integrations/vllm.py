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

import json
import logging
import queue
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
)

try:  # vLLM >= 0.32: completions and receive failures in one result
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
except ImportError:  # pragma: no cover - older vLLM
    KVConnectorTransferResults = None

from ..config import LLMClusterInfo
from ..descs import BlocksCacheKey, LLMRole, Placement
from ..events import EventSynchronizer
from ..llm_datadist import LLMDataDist
from ..status import LLMStatusCode
from ..transfer_types import LayerSynchronizer
from .kv_layout import KVLayout, clip_remote, layout_of, runtime_of

log = logging.getLogger(__name__)

MODES = ("pull", "push", "layerwise")
DEFAULT_LEASE_S = 30.0
MODEL_ID = 0  # the BlocksCacheKey model id of every worker's KV cache
NOTIFY_PREFIX = b"llmdist-vllm:done:"  # D to P: free the request's blocks
PUSH_PREFIX = b"llmdist-vllm:push:"  # D to P (push): write into these blocks
PUSHED_PREFIX = b"llmdist-vllm:pushed:"  # P to D (push): the blocks are written
PUSH_FAILED_PREFIX = b"llmdist-vllm:failed:"  # P to D (push): they will not be
IDLE_WAIT_MS = 5  # longest wait of a decode step that scheduled nothing
LISTEN_POLL_MS = 100  # how often the prefill's notification listener checks for close
_PARAM_KEYS = (
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


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except (AssertionError, AttributeError, RuntimeError, ImportError):
        return 0  # no parallel state (one worker)


class LLMDistConnector(KVConnectorBase_V1):
    """vLLM's KV connector API on llmdist (see the module docstring)."""

    def __init__(self, vllm_config, role, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        cfg = vllm_config.kv_transfer_config
        self.options = Options.parse(cfg.kv_connector_extra_config)
        self.engine_id: str = cfg.engine_id
        self.tp_size: int = vllm_config.parallel_config.tensor_parallel_size
        self._sched: Optional[_SchedulerSide] = None
        self._worker: Optional[_WorkerSide] = None
        if role == KVConnectorRole.SCHEDULER:
            self._sched = _SchedulerSide(self.engine_id, self.tp_size, self.options)
        else:
            num_blocks = getattr(kv_cache_config, "num_blocks", None)
            role_ = (
                LLMRole.PROMPT
                if cfg.kv_role == "kv_producer"
                else LLMRole.DECODER
                if cfg.kv_role == "kv_consumer"
                else LLMRole.MIX
            )
            self._worker = _WorkerSide(
                self.engine_id, self.tp_size, self.options, role_, num_blocks
            )

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
    def worker_side(self) -> Optional["_WorkerSide"]:
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
        self._worker.layer_saved(layer_name, self._get_connector_metadata())

    def wait_for_save(self) -> None:
        self._worker.step_saved()

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


# ------------------------------------------------------------------------------------------
# Scheduler side


class _SchedulerSide:
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
        self.new_transfer_ids: Dict[str, str] = {}

    def set_handshake(self, metadata: Dict[int, LLMDistHandshake]) -> None:
        for rank, meta in metadata.items():
            self.ports[rank] = meta.port

    @staticmethod
    def _wants_pull(params) -> bool:
        return (
            bool(params)
            and bool(params.get("do_remote_prefill"))
            and all(params.get(k) is not None for k in _PARAM_KEYS)
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
            for new in scheduler_output.scheduled_new_reqs:
                tid = self.layerwise.get(new.req_id)
                n = scheduler_output.num_scheduled_tokens.get(new.req_id, 0)
                # the whole prompt in this step: its layers can go as they are computed (a
                # prompt cut into chunks goes when it finished, as in push mode)
                if tid is not None and new.num_computed_tokens + n >= len(
                    new.prompt_token_ids or ()
                ):
                    layer[new.req_id] = (tid, list(new.block_ids[0]))
        idle = (
            scheduler_output is not None
            and getattr(scheduler_output, "total_num_scheduled_tokens", 1) == 0
        )
        meta = LLMDistConnectorMetadata(
            self.recv, self.send, self.send_blocks, layer, self.new_transfer_ids, idle
        )
        self.recv, self.send, self.send_blocks, self.new_transfer_ids = {}, {}, {}, {}
        return meta


# ------------------------------------------------------------------------------------------
# Worker side


class _StepLayers(LayerSynchronizer):
    """Host tensors: releases layer i of a step's layerwise transfers once the forward saved it
    (the forward has written it then); a transfer started later finds the layers saved so far
    released at once."""

    def __init__(self, num_layers: int, timeout_ms: int) -> None:
        self.saved = [threading.Event() for _ in range(num_layers)]
        self.timeout_s = timeout_ms / 1000.0

    def release(self, i: int) -> None:
        self.saved[i].set()

    def release_all(self) -> None:
        for e in self.saved:
            e.set()

    def released(self) -> int:
        return sum(e.is_set() for e in self.saved)

    def synchronize_layer(self, layer_index: int, timeout_in_millis) -> bool:
        return self.saved[layer_index].wait(self.timeout_s)


class _DeviceStepLayers(EventSynchronizer):
    """CUDA/NPU tensors: the forward only queued layer i on the model's stream when it is saved,
    so release(i) records layer i's event on that stream; the transfer's stream waits on the
    event (no host thread blocks). stream_of() is the model stream's raw handle."""

    def __init__(self, runtime, num_layers: int, stream_of: Callable[[], int]) -> None:
        super().__init__(runtime, num_layers)
        self.stream_of = stream_of
        self.marked = [False] * num_layers

    def release(self, i: int) -> None:
        if not self.marked[i]:
            self.events[i].record_on(self.stream_of())
            self.mark_recorded(i)
            self.marked[i] = True

    def release_all(self) -> None:
        # layers without a hook call: everything the forward queued is before this point
        for i in range(len(self.marked)):
            self.release(i)

    def released(self) -> int:
        return sum(self.marked)


def model_stream_of(device: str) -> Callable[[], int]:
    """The function returning the raw handle of the model's current stream on device: torch's
    current CUDA stream, or torch_npu's current NPU stream."""
    import torch

    if device == "cuda":
        return lambda: torch.cuda.current_stream().cuda_stream
    if device == "npu":
        import torch_npu  # noqa: F401 - registers torch.npu

        return lambda: torch.npu.current_stream().npu_stream
    raise ValueError(f"no model stream on device {device!r}")


class _WorkerSide:
    def __init__(
        self,
        engine_id: str,
        tp_size: int,
        options: Options,
        role: LLMRole,
        num_blocks: Optional[int],
    ) -> None:
        self.engine_id = engine_id
        self.tp_size = tp_size
        self.tp_rank = _tp_rank()
        self.options = options
        self.role = role
        self.num_blocks = num_blocks
        self.cluster_id = cluster_id_of(engine_id, self.tp_rank)
        self.dd: Optional[LLMDataDist] = None
        self.cache = None
        self.layout: Optional[KVLayout] = None
        self.lock = threading.Lock()
        self.recved: Set[str] = set()
        self.failed: Set[str] = set()
        self.bad_blocks: Set[int] = set()
        self.sending: Dict[str, float] = {}  # request id -> lease end
        self.notified: Dict[str, float] = {}  # notifications ahead of their lease
        # push mode: prefill: blocks of finished requests, registrations ahead of them;
        # decode: requests waiting for the prefill's write (request id -> deadline, job)
        self.send_blocks: Dict[str, List[int]] = {}
        self.registrations: Dict[str, Tuple[int, dict, float]] = {}
        self.awaiting: Dict[str, Tuple[float, RecvJob]] = {}
        # layerwise, prefill: the transfer id of each request, the layer each tensor name is,
        # the layers saved in the running step, the requests computed whose decode has not
        # registered yet (transfer id -> request id, blocks, their step's layers, when), and
        # the tasks sending layers (request id -> task, decode cluster, decode request id)
        self.transfer_ids: Dict[str, str] = {}
        self.layer_index: Dict[str, int] = {}
        self.step_gate: Optional[LayerSynchronizer] = None
        self.computed: Dict[str, Tuple[str, List[int], LayerSynchronizer, float]] = {}
        self.layer_tasks: Dict[str, Tuple[object, int, str]] = {}
        self.pushed: Dict[str, bool] = {}  # decode: request id -> written or not
        self.layerwise_started = 0  # transfers that went out layer by layer
        self.layerwise_overlapped = 0  # ... of which started before the last layer
        # was saved
        self.listener: Optional[threading.Thread] = None
        self.stream_of: Optional[Callable[[], int]] = None  # device tensors: model stream
        # decode: pulls queued or running; set when a received request is reported; whether
        # this step scheduled nothing
        self.loading = 0
        self.progress = threading.Event()
        self.step_idle = False
        self.closing = threading.Event()
        self.transfer_times: List[float] = []  # seconds per pull or push, notification in
        self.jobs: "queue.Queue[Optional[RecvJob]]" = queue.Queue()
        self.thread: Optional[threading.Thread] = None

    def register(self, kv_caches) -> None:
        layout = layout_of(dict(kv_caches), self.num_blocks)
        port = self.options.base_port + self.tp_rank if self.options.base_port else 0
        dd = LLMDataDist(self.role, self.cluster_id)
        dd.init(
            {
                "llm.listenIpInfo": f"{self.options.host}:{port}",
                "llmdist.runtime": runtime_of(layout),
                "ge.exec.deviceId": str(layout.device_index),
                "llm.EnableRemoteCacheAccessible": "1",
                "llm.SyncKvCacheWaitTime": str(self.options.transfer_timeout_ms),
            }
        )
        self.cache = dd.cache_manager.register_blocks_cache(
            layout.desc(),
            layout.addrs,
            BlocksCacheKey(self.cluster_id, MODEL_ID),
            remote_accessible=True,
        )
        self.dd, self.layout = dd, layout
        self.layer_index = {name: i for i, name in enumerate(kv_caches)}
        self.thread = threading.Thread(target=self._run, name="llmdist-vllm-load", daemon=True)
        self.thread.start()
        if self.role != LLMRole.DECODER and self.options.mode != "pull":
            self.listener = threading.Thread(
                target=self._listen, name="llmdist-vllm-notify", daemon=True
            )
            self.listener.start()
        log.info(
            "llmdist cluster %d listens on %s:%d: %d KV tensors of %d blocks of %d bytes "
            "(%d per layer)",
            self.cluster_id,
            self.options.host,
            dd.listen_port,
            len(layout.addrs),
            layout.num_blocks,
            layout.block_bytes,
            layout.tensors_per_layer,
        )

    def handshake(self) -> Optional[LLMDistHandshake]:
        if self.dd is None:
            return None
        return LLMDistHandshake(self.options.host, self.dd.listen_port, self.cluster_id)

    def start(self, meta: LLMDistConnectorMetadata) -> None:
        """Take the step's work; never blocks (pulls run on the load thread)."""
        with self.lock:
            self.sending.update(meta.reqs_to_send)
            self.send_blocks.update(meta.send_blocks)
            self.transfer_ids.update(meta.transfer_ids)
        regs: Dict[str, List[RecvJob]] = {}
        for job in meta.reqs_to_recv.values():
            if job.mode in ("push", "layerwise") and job.local_block_ids:
                regs.setdefault(job.remote_engine_id, []).append(job)
                continue
            if job.mode == "pull":
                with self.lock:
                    self.loading += 1
            self.jobs.put(job)
        for batch in regs.values():
            self.jobs.put(batch)  # one registration per prefill for the step's requests
        self.step_idle = meta.idle

    # -- the load thread
    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if isinstance(job, tuple):
                self._push(*job)
                continue
            if isinstance(job, list):
                self._register(job)
                continue
            error = None
            try:
                self._load(job)
            except Exception as exc:  # noqa: BLE001 - any failure is a failed load, never a hang
                error = exc
                log.error(
                    "request %s: loading its KV from engine %s failed: %s: %s",
                    job.req_id,
                    job.remote_engine_id,
                    type(exc).__name__,
                    exc,
                )
            if job.mode == "pull":
                with self.lock:
                    self.loading -= 1
            self._done(job, error is None)

    def _done(self, job: RecvJob, ok: bool) -> None:
        with self.lock:
            self.awaiting.pop(job.req_id, None)
            if not ok and job.report:
                self.failed.add(job.req_id)
                self.bad_blocks.update(job.local_block_ids)
            if job.report:
                self.recved.add(job.req_id)
        self.progress.set()

    def _register(self, jobs: List[RecvJob]) -> None:
        """Push and layerwise: send one prefill the block ids of this step's requests in one
        notification; each is received when the prefill says it wrote them."""
        try:
            peer = self._link_to(jobs[0])
            with self.lock:
                for job in jobs:
                    self.awaiting[job.req_id] = (time.time() + self.options.lease_s, job)
            self.dd.send_notification(
                peer,
                PUSH_PREFIX
                + json.dumps(
                    {
                        "regs": [
                            {
                                "req": job.transfer_id,
                                "dst_req": job.req_id,
                                "blocks": job.local_block_ids,
                            }
                            for job in jobs
                        ]
                    }
                ).encode(),
            )
        except Exception as exc:  # noqa: BLE001 - any failure is a failed load, never a hang
            log.error(
                "requests %s: registering their blocks with engine %s failed: %s: %s",
                [j.req_id for j in jobs],
                jobs[0].remote_engine_id,
                type(exc).__name__,
                exc,
            )
            for job in jobs:
                self._done(job, False)

    def _link_to(self, job: RecvJob) -> int:
        """Link to the prefill rank paired with this one; its cluster id."""
        if job.remote_tp_size != self.tp_size:
            raise ValueError(
                f"the prefill runs with tensor parallel size {job.remote_tp_size}, "
                f"this decode with {self.tp_size}: LLMDistConnector pairs rank i "
                f"with rank i and supports equal sizes only"
            )
        peer = cluster_id_of(job.remote_engine_id, self.tp_rank)
        self._link(peer, job.remote_host, job.remote_ports[self.tp_rank])
        return peer

    def _load(self, job: RecvJob) -> None:
        """Pull mode: pull the job's blocks with notify=; any mode: notify only when the
        decode needs no block."""
        peer = self._link_to(job)
        payload = NOTIFY_PREFIX + job.transfer_id.encode()
        if not job.local_block_ids:
            self.dd.send_notification(peer, payload)
            return
        remote = clip_remote(job.remote_block_ids, job.local_block_ids)
        if len(remote) != len(job.local_block_ids):
            raise ValueError(
                f"the prefill holds {len(job.remote_block_ids)} blocks, this "
                f"decode expects {len(job.local_block_ids)}"
            )
        t0 = time.perf_counter()
        self.dd.cache_manager.pull_blocks(
            BlocksCacheKey(peer, MODEL_ID),
            self.cache,
            remote,
            job.local_block_ids,
            tensor_num_per_layer=self.layout.tensors_per_layer,
            notify=payload,
        )
        took = time.perf_counter() - t0
        self.transfer_times.append(took)
        log.debug("request %s: pulled %d blocks in %.2f ms", job.req_id, len(remote), took * 1e3)

    # -- layerwise, prefill: each layer goes out as soon as the forward saved it
    def layer_saved(self, layer_name: str, meta: LLMDistConnectorMetadata) -> None:
        i = self.layer_index.get(layer_name)
        if i is None or self.dd is None:
            return
        starts = []
        if i == 0 and meta.layerwise and self.step_gate is None:
            # the step's requests: a decode that registered already gets its transfer now,
            # the others when their registration arrives (_handle)
            gate = self._new_gate()
            now = time.time()
            with self.lock:
                self.step_gate = gate
                for rid, (tid, blocks) in meta.layerwise.items():
                    got = self.registrations.pop(tid, None)
                    if got is None:
                        self.computed[tid] = (rid, list(blocks), gate, now)
                    else:
                        starts.append(((rid, list(blocks), gate, now), got[0], got[1]))
        if self.step_gate is not None:
            self.step_gate.release(i)
        for computed, peer, reg in starts:
            self._start_layerwise(computed, peer, reg)

    def _new_gate(self):
        """The layer synchronizer of one step: device events on the model stream for device
        tensors, host events for host ones."""
        n = len(self.layer_index)
        if self.layout.placement == Placement.DEVICE:
            if self.stream_of is None:
                self.stream_of = model_stream_of(self.layout.device)
            return _DeviceStepLayers(self.dd.runtime, n, self.stream_of)
        return _StepLayers(n, self.options.transfer_timeout_ms)

    def step_saved(self) -> None:
        """The step's forward is over: every layer is saved (also those without a hook call)."""
        gate, self.step_gate = self.step_gate, None
        if gate is not None:
            gate.release_all()

    def _start_layerwise(
        self, computed: Tuple[str, List[int], LayerSynchronizer, float], peer: int, reg: dict
    ) -> None:
        """Send a computed request's blocks to the decode that registered them, each layer once
        its step's forward saved it (at once for the layers saved already)."""
        from ..transfer_types import TransferWithCacheKeyConfig

        rid, blocks, gate, _ = computed
        dst_req = str(reg.get("dst_req"))
        # layers the forward had not saved yet: they go while it computes them
        during_forward = gate.released() < len(self.layer_index)
        try:
            remote, local = registered_pairs(blocks, reg)
            layers = range(len(self.layer_index))
            task = self.dd.cache_manager.transfer_cache_async(
                self.cache,
                gate,
                [TransferWithCacheKeyConfig(BlocksCacheKey(peer, MODEL_ID), layers, layers)],
                remote,
                local,
                tensor_num_per_layer=self.layout.tensors_per_layer,
                notify=PUSHED_PREFIX + dst_req.encode(),
            )
        except Exception as exc:  # noqa: BLE001 - the decode hears of any failure
            log.error(
                "request %s: sending its KV layer by layer failed: %s: %s",
                rid,
                type(exc).__name__,
                exc,
            )
            self._tell_failed(peer, dst_req, rid)
            with self.lock:
                self.notified[rid] = time.time()  # nothing more goes: free its blocks
            return
        with self.lock:
            self.layer_tasks[rid] = (task, peer, dst_req)
            self.layerwise_started += 1
            self.layerwise_overlapped += during_forward

    def _tell_failed(self, peer: int, dst_req: str, rid: str) -> None:
        try:
            self.dd.send_notification(peer, PUSH_FAILED_PREFIX + dst_req.encode())
        except Exception as exc:  # noqa: BLE001
            log.warning("request %s: telling cluster %d failed: %s", rid, peer, exc)

    def _layer_tasks_done(self, now: float) -> None:
        with self.lock:
            tasks = list(self.layer_tasks.items())
        for rid, (task, peer, dst_req) in tasks:
            if not task.done:
                continue
            status = task.synchronize(0)
            if (
                status == LLMStatusCode.LLM_TIMEOUT
                and task.notification_error is None
                and task.get_results(0) == [LLMStatusCode.LLM_SUCCESS]
            ):
                continue  # the bytes are there; the decode has not confirmed yet
            with self.lock:
                del self.layer_tasks[rid]
            if status != LLMStatusCode.LLM_SUCCESS:
                log.error(
                    "request %s: sending its KV layer by layer failed: %s %s",
                    rid,
                    status.name,
                    task.errors or task.notification_error,
                )
                if task.notification_error is None:
                    self._tell_failed(peer, dst_req, rid)
            with self.lock:
                self.notified[rid] = now

    def _push(self, rid: str, peer: int, reg: dict, blocks: List[int]) -> None:
        """Prefill, push mode: write a finished request's blocks into the decode's blocks it
        registered, then tell it (notify=); a failure is told too."""
        dst_req = str(reg.get("dst_req"))
        try:
            remote, local = registered_pairs(blocks, reg)
            t0 = time.perf_counter()
            self.dd.cache_manager.push_blocks(
                BlocksCacheKey(peer, MODEL_ID),
                self.cache,
                remote,
                local,
                tensor_num_per_layer=self.layout.tensors_per_layer,
                notify=PUSHED_PREFIX + dst_req.encode(),
            )
            self.transfer_times.append(time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - the decode must hear of any failure
            log.error(
                "request %s: pushing its KV to cluster %d failed: %s: %s",
                rid,
                peer,
                type(exc).__name__,
                exc,
            )
            try:
                self.dd.send_notification(peer, PUSH_FAILED_PREFIX + dst_req.encode())
            except Exception as exc2:  # noqa: BLE001
                log.warning("request %s: telling cluster %d failed: %s", rid, peer, exc2)
        with self.lock:
            self.notified[rid] = time.time()  # free its blocks either way

    def _link(self, peer: int, host: str, port: int) -> None:
        if self.dd.peer_info(peer) is not None:
            return
        info = LLMClusterInfo()
        info.remote_cluster_id = peer
        info.append_remote_ip_info(host, port)
        code, codes = self.dd.link_clusters([info], self.options.link_timeout_ms)
        if codes[0] not in (LLMStatusCode.LLM_SUCCESS, LLMStatusCode.LLM_ALREADY_LINK):
            raise ConnectionError(
                f"linking to cluster {peer} at {host}:{port} failed: {codes[0].name}"
            )

    def _listen(self) -> None:
        """Prefill, push and layerwise modes: take notifications as they arrive, so that a
        decode's registration starts its transfer at once, not at this engine's next step."""
        dd = self.dd
        while not self.closing.is_set():
            try:
                notes = dd.wait_notifications(LISTEN_POLL_MS)
            except Exception as exc:  # noqa: BLE001 - finalize ends the wait
                if self.closing.is_set():
                    return
                log.warning("waiting for notifications failed: %s: %s", type(exc).__name__, exc)
                time.sleep(LISTEN_POLL_MS / 1000.0)
                continue
            if notes:
                self._handle(notes, time.time())
                self._queue_ready_pushes()

    def _drain(self, now: float) -> None:
        """Take the notifications received so far (see _handle)."""
        if self.dd is not None:
            self._handle(self.dd.get_notifications(), now)

    def _handle(self, notes: Dict[int, List[bytes]], now: float) -> None:
        """Frees, push registrations (a computed layerwise request's transfer starts here),
        push outcomes."""
        starts = []
        with self.lock:
            for peer, payloads in notes.items():
                for p in payloads:
                    if p.startswith(NOTIFY_PREFIX):
                        self.notified[p[len(NOTIFY_PREFIX) :].decode(errors="replace")] = now
                    elif p.startswith(PUSH_PREFIX):
                        try:
                            regs = json.loads(p[len(PUSH_PREFIX) :])["regs"]
                            tids = [str(reg["req"]) for reg in regs]
                        except (ValueError, KeyError, TypeError):
                            log.warning("cluster %d sent a bad push registration", peer)
                            continue
                        for tid, reg in zip(tids, regs):
                            computed = self.computed.pop(tid, None)
                            if computed is not None:
                                starts.append((computed, peer, reg))
                            else:
                                self.registrations[tid] = (peer, reg, now)
                    elif p.startswith(PUSHED_PREFIX):
                        self.pushed[p[len(PUSHED_PREFIX) :].decode(errors="replace")] = True
                    elif p.startswith(PUSH_FAILED_PREFIX):
                        self.pushed[p[len(PUSH_FAILED_PREFIX) :].decode(errors="replace")] = False
        for computed, peer, reg in starts:
            self._start_layerwise(computed, peer, reg)

    def _queue_ready_pushes(self) -> None:
        """Prefill, push: finished requests whose decode registered go to the load thread."""
        with self.lock:
            ready = [
                (rid, tid)
                for rid, tid in ((r, self.transfer_ids.get(r, r)) for r in self.send_blocks)
                if tid in self.registrations and rid not in self.layer_tasks
            ]
            for rid, tid in ready:
                peer, reg, _ = self.registrations.pop(tid)
                self.transfer_ids.pop(rid, None)
                self.jobs.put((rid, peer, reg, self.send_blocks.pop(rid)))

    # -- per step results
    def results(self) -> Tuple[Set[str], Set[str], Set[str]]:
        """(sent, received, failed) since the last call; failed ones are received too."""
        self._wait_when_idle()
        now = time.time()
        self._drain(now)
        self._layer_tasks_done(now)
        self._queue_ready_pushes()
        with self.lock:
            pushed, self.pushed = self.pushed, {}
            expired = [job for deadline, job in self.awaiting.values() if deadline <= now]
            waiting = {rid: job for rid, (_, job) in self.awaiting.items()}
        for rid, ok in pushed.items():
            if rid in waiting:
                if not ok:
                    log.error("request %s: the prefill could not write its KV", rid)
                self._done(waiting[rid], ok)
        for job in expired:
            log.error("request %s: the prefill did not write its KV within the lease", job.req_id)
            self._done(job, False)
        with self.lock:
            for tid, (_, _, t) in list(self.registrations.items()):
                if now - t > self.options.lease_s:  # its request was aborted here
                    del self.registrations[tid]
            for tid, (_, _, _, t) in list(self.computed.items()):
                if now - t > self.options.lease_s:  # no decode registered
                    del self.computed[tid]
        sent: Set[str] = set()
        with self.lock:
            for rid in list(self.sending):
                if rid in self.notified:
                    sent.add(rid)
                    del self.notified[rid]
                elif self.sending[rid] <= now:
                    log.warning(
                        "request %s: no decode pulled its KV within the lease; freeing its blocks",
                        rid,
                    )
                    sent.add(rid)
            for rid in sent:
                self.sending.pop(rid, None)
                self.send_blocks.pop(rid, None)
            # freed blocks never go out: a registration arriving after the lease finds nothing
            for tid in [t for t, c in self.computed.items() if c[0] in sent]:
                del self.computed[tid]
            recved, failed = self.recved, self.failed
            self.recved, self.failed = set(), set()
        # a notification whose lease never came (the request was aborted here) is dropped
        # after a lease
        for rid, t in list(self.notified.items()):
            if now - t > self.options.lease_s:
                del self.notified[rid]
        return sent, recved, failed

    def _wait_when_idle(self) -> None:
        """A decode step that scheduled nothing while this worker's pulls run, or while its
        requests wait for a prefill's write: wait up to IDLE_WAIT_MS for a pull to end or a
        notification to arrive, instead of spinning through empty steps (which takes the CPU
        from the prefill and the GIL from the transfers it waits for)."""
        idle, self.step_idle = self.step_idle, False
        if not idle or self.dd is None:
            return
        with self.lock:
            if self.recved:
                return
            loading, awaiting = self.loading > 0, bool(self.awaiting)
        if not loading and awaiting:
            # push and layerwise: the prefill's notification that it wrote the blocks
            self._handle(self.dd.wait_notifications(IDLE_WAIT_MS), time.time())
        elif loading:
            self.progress.clear()
            with self.lock:
                if self.loading == 0 or self.recved:
                    return
            self.progress.wait(IDLE_WAIT_MS / 1000.0)

    def load_errors(self) -> Set[int]:
        with self.lock:
            bad, self.bad_blocks = self.bad_blocks, set()
        return bad

    def close(self) -> None:
        self.closing.set()
        self.jobs.put(None)
        if self.thread is not None:
            self.thread.join(5.0)
        if self.listener is not None:
            self.listener.join(5.0)
        if self.dd is not None:
            self.dd.finalize()
            self.dd = None
