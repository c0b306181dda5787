"""The layerwise mode's prefill side: each request computed in a step goes to the decode that
registered its blocks with one transfer_cache_async, layer by layer as the forward saves them
(the layers saved already at once when the registration arrives later)."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ...descs import BlocksCacheKey, Placement
from ...status import LLMStatusCode
from ...transfer_types import LayerSynchronizer, TransferWithCacheKeyConfig
from .layers import DeviceStepLayers, StepLayers, model_stream_of
from .metadata import MODEL_ID, LLMDistConnectorMetadata, pushed_payload, registered_pairs

log = logging.getLogger(__name__)

# a computed request: (its request id, its blocks, its step's layer synchronizer, when)
Computed = Tuple[str, List[int], LayerSynchronizer, float]


class LayerStreams:
    """The layer streams of one prefill worker. owner is its WorkerSide: the llmdist cluster,
    cache and layout, the lock that guards this state too, the decodes' registrations, and
    `notified` where a request whose stream ended is marked for freeing."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.layer_index: Dict[str, int] = {}  # the layer each KV tensor's name is
        self.step_gate: Optional[LayerSynchronizer] = None  # the running step's layers
        # requests computed whose decode has not registered yet, by transfer id
        self.computed: Dict[str, Computed] = {}
        # streams under way: request id -> (task, decode cluster, decode request id)
        self.tasks: Dict[str, Tuple[Any, int, str]] = {}
        self.started = 0  # transfers that went out layer by layer
        self.overlapped = 0  # ... of which started before the forward saved the last layer
        self.stream_of: Optional[Callable[[], int]] = None  # device tensors: model stream

    def layer_saved(self, layer_name: str, meta: LLMDistConnectorMetadata) -> None:
        """The forward saved a layer: release it to the step's streams (at the first layer,
        start the streams of the step's requests whose decode registered already)."""
        w = self.owner
        i = self.layer_index.get(layer_name)
        if i is None or w.dd is None:
            return
        peers: Dict[int, List[Tuple[Computed, dict]]] = {}
        if i == 0 and meta.layerwise and self.step_gate is None:
            # the step's requests: a decode that registered already gets its transfer now,
            # the others when their registration arrives (registered)
            gate = self._new_gate()
            now = time.time()
            with w.lock:
                self.step_gate = gate
                for rid, (tid, blocks) in meta.layerwise.items():
                    got = w.registrations.pop(tid, None)
                    if got is None:
                        self.computed[tid] = (rid, list(blocks), gate, now)
                    else:
                        peers.setdefault(got[0], []).append(
                            ((rid, list(blocks), gate, now), got[1])
                        )
        if self.step_gate is not None:
            self.step_gate.release(i)
        for peer, regs in peers.items():
            self.start(peer, regs)

    def _new_gate(self) -> LayerSynchronizer:
        """The layer synchronizer of one step: device events on the model stream for device
        tensors, host events for host ones."""
        w = self.owner
        n = len(self.layer_index)
        if w.layout.placement == Placement.DEVICE:
            if self.stream_of is None:
                self.stream_of = model_stream_of(w.layout.device)
            return DeviceStepLayers(w.dd.runtime, n, self.stream_of)
        return StepLayers(n, w.options.transfer_timeout_ms)

    def step_saved(self) -> None:
        """The step's forward is over: every layer is saved (also those without a hook call)."""
        gate, self.step_gate = self.step_gate, None
        if gate is not None:
            gate.release_all()

    def start(self, peer: int, regs: List[Tuple[Computed, dict]]) -> None:
        """Send computed requests' blocks to the decode (cluster peer) that registered them,
        each layer once its step's forward saved it (at once for the layers saved already):
        one transfer and one notification for the requests of each step, so that the decode
        gets them all in the same step."""
        steps: Dict[int, List[Tuple[Computed, dict]]] = {}
        for computed, reg in regs:
            steps.setdefault(id(computed[2]), []).append((computed, reg))
        for group in steps.values():
            self._start_step(peer, group)

    def _start_step(self, peer: int, group: List[Tuple[Computed, dict]]) -> None:
        """One transfer_cache_async for requests computed in the same step (one synchronizer)."""
        w = self.owner
        gate = group[0][0][2]
        # layers the forward had not saved yet: they go while it computes them
        during_forward = gate.released() < len(self.layer_index)
        src: List[int] = []
        dst: List[int] = []
        reqs: List[Tuple[str, str]] = []  # (request id, the decode's request id)
        for (rid, blocks, _, _), reg in group:
            dst_req = str(reg.get("dst_req"))
            try:
                remote, local = registered_pairs(blocks, reg)
            except ValueError as exc:
                self._failed(peer, [(rid, dst_req)], exc)
                continue
            src += remote
            dst += local
            reqs.append((rid, dst_req))
        if not reqs:
            return
        try:
            layers = range(len(self.layer_index))
            task = w.dd.cache_manager.transfer_cache_async(
                w.cache,
                gate,
                [TransferWithCacheKeyConfig(BlocksCacheKey(peer, MODEL_ID), layers, layers)],
                src,
                dst,
                tensor_num_per_layer=w.layout.tensors_per_layer,
                notify=pushed_payload([d for _, d in reqs]),
            )
        except Exception as exc:  # noqa: BLE001 - the decode hears of any failure
            self._failed(peer, reqs, exc)
            return
        with w.lock:
            for rid, dst_req in reqs:
                self.tasks[rid] = (task, peer, dst_req)
            self.started += len(reqs)
            self.overlapped += len(reqs) if during_forward else 0

    def _failed(self, peer: int, reqs: List[Tuple[str, str]], exc: Exception) -> None:
        """Requests whose stream could not start: their decode is told, their blocks freed."""
        w = self.owner
        for rid, dst_req in reqs:
            log.error(
                "request %s: sending its KV layer by layer failed: %s: %s",
                rid,
                type(exc).__name__,
                exc,
            )
            w.tell_failed(peer, dst_req, rid)
            with w.lock:
                w.notified[rid] = time.time()  # nothing more goes: free its blocks

    def registered(self, tid: str) -> Optional[Computed]:
        """A decode registered transfer id tid: the computed request waiting for it (taken),
        or None. Called with the owner's lock held."""
        return self.computed.pop(tid, None)

    def tasks_done(self, now: float) -> None:
        """Streams that ended: their requests are marked for freeing (a failed one is told to
        its decode)."""
        w = self.owner
        with w.lock:
            tasks = list(self.tasks.items())
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
            with w.lock:
                del self.tasks[rid]
            if status != LLMStatusCode.LLM_SUCCESS:
                log.error(
                    "request %s: sending its KV layer by layer failed: %s %s",
                    rid,
                    status.name,
                    task.errors or task.notification_error,
                )
                if task.notification_error is None:
                    w.tell_failed(peer, dst_req, rid)
            with w.lock:
                w.notified[rid] = now

    def expire(self, now: float, lease_s: float, freed) -> None:
        """Forget computed requests no decode registered for within the lease, and those whose
        blocks were freed (a registration arriving later finds nothing). Called with the
        owner's lock held."""
        for tid, (rid, _, _, t) in list(self.computed.items()):
            if now - t > lease_s or rid in freed:
                del self.computed[tid]
