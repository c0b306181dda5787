"""The worker half of LLMDistConnector: one llmdist cluster per worker that registers the
KV tensors, pulls (decode, pull mode), pushes or streams layers (prefill, push and layerwise
modes) and reports what was sent and received."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Dict, List, Optional, Set, Tuple

from ...config import LLMClusterInfo
from ...descs import BlocksCacheKey, LLMRole
from ...llm_datadist import LLMDataDist
from ...status import LLMStatusCode
from ..kv_layout import KVLayout, clip_remote, layout_of, runtime_of
from .metadata import (
    IDLE_WAIT_MS,
    LISTEN_POLL_MS,
    MODEL_ID,
    NOTIFY_PREFIX,
    PUSH_FAILED_PREFIX,
    PUSH_PREFIX,
    PUSHED_PREFIX,
    LLMDistConnectorMetadata,
    LLMDistHandshake,
    Options,
    RecvJob,
    cluster_id_of,
    pushed_payload,
    pushed_requests,
    registered_pairs,
)
from .streams import LayerStreams

log = logging.getLogger(__name__)


def tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except (AssertionError, AttributeError, RuntimeError, ImportError):
        return 0  # no parallel state (one worker)


class WorkerSide:
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
        self.tp_rank = tp_rank()
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
        # layerwise, prefill: the transfer id of each request, its layer streams
        self.transfer_ids: Dict[str, str] = {}
        self.streams = LayerStreams(self)
        self.pushed: Dict[str, bool] = {}  # decode: request id -> written or not
        self.listener: Optional[threading.Thread] = None
        # decode: pulls queued or running; set when a received request is reported; whether
        # this step scheduled nothing
        self.loading = 0
        self.progress = threading.Event()
        self.step_idle = False
        self.closing = threading.Event()
        # seconds per pull or push: the data movement alone, and with the notification that
        # tells the peer (confirmed)
        self.transfer_times: List[float] = []
        self.call_times: List[float] = []
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
        self.streams.layer_index = {name: i for i, name in enumerate(kv_caches)}
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
                with self.lock:  # an idle step waits for it from now on (results)
                    self.awaiting[job.req_id] = (time.time() + self.options.lease_s, job)
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
            error, peer, t0 = None, None, 0.0
            try:
                peer, t0 = self._load(job)
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
            # the blocks are here: the request may run while the prefill hears of it
            self._done(job, error is None)
            if peer is not None:
                self._notify_loaded(job, peer, t0)

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

    def _load(self, job: RecvJob) -> Tuple[int, float]:
        """Pull mode: pull the job's blocks (nothing when the decode needs no block); the
        prefill's cluster id and when the pull started."""
        peer = self._link_to(job)
        t0 = time.perf_counter()
        if not job.local_block_ids:
            return peer, t0
        remote = clip_remote(job.remote_block_ids, job.local_block_ids)
        if len(remote) != len(job.local_block_ids):
            raise ValueError(
                f"the prefill holds {len(job.remote_block_ids)} blocks, this "
                f"decode expects {len(job.local_block_ids)}"
            )
        self.dd.cache_manager.pull_blocks(
            BlocksCacheKey(peer, MODEL_ID),
            self.cache,
            remote,
            job.local_block_ids,
            tensor_num_per_layer=self.layout.tensors_per_layer,
        )
        took = time.perf_counter() - t0
        self.transfer_times.append(took)
        log.debug("request %s: pulled %d blocks in %.2f ms", job.req_id, len(remote), took * 1e3)
        return peer, t0

    def _notify_loaded(self, job: RecvJob, peer: int, t0: float) -> None:
        """Tell the prefill that the decode has read its blocks (sent only once the pull
        returned, so every byte was read out of its memory): it frees them. When the
        notification is lost, the prefill frees them at the lease."""
        try:
            self.dd.send_notification(peer, NOTIFY_PREFIX + job.transfer_id.encode())
        except Exception as exc:  # noqa: BLE001 - the lease frees the prefill's blocks
            log.warning(
                "request %s: telling the prefill it may free its blocks failed: %s: %s",
                job.req_id,
                type(exc).__name__,
                exc,
            )
            return
        if job.local_block_ids:
            self.call_times.append(time.perf_counter() - t0)

    def tell_failed(self, peer: int, dst_req: str, rid: str) -> None:
        """Tell a decode that its request's KV will not be written."""
        try:
            self.dd.send_notification(peer, PUSH_FAILED_PREFIX + dst_req.encode())
        except Exception as exc:  # noqa: BLE001
            log.warning("request %s: telling cluster %d failed: %s", rid, peer, exc)

    def _push(self, rid: str, peer: int, reg: dict, blocks: List[int]) -> None:
        """Prefill, push mode: write a finished request's blocks into the decode's blocks it
        registered, then tell it; a failure is told too."""
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
            )
            t1 = time.perf_counter()
            # sent once the bytes are in the decode's memory (push_blocks returned)
            self.dd.send_notification(peer, pushed_payload([dst_req]))
            self.transfer_times.append(t1 - t0)
            self.call_times.append(time.perf_counter() - t0)
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
                self.closing.wait(LISTEN_POLL_MS / 1000.0)  # back off; close ends it
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
        starts: Dict[int, list] = {}  # decode cluster -> computed requests it registered
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
                            computed = self.streams.registered(tid)
                            if computed is not None:
                                starts.setdefault(peer, []).append((computed, reg))
                            else:
                                self.registrations[tid] = (peer, reg, now)
                    elif p.startswith(PUSHED_PREFIX):
                        try:
                            for req in pushed_requests(p):
                                self.pushed[req] = True
                        except ValueError:
                            log.warning("cluster %d sent a bad pushed notification", peer)
                    elif p.startswith(PUSH_FAILED_PREFIX):
                        self.pushed[p[len(PUSH_FAILED_PREFIX) :].decode(errors="replace")] = False
        for peer, regs in starts.items():
            self.streams.start(peer, regs)

    def _queue_ready_pushes(self) -> None:
        """Prefill, push: finished requests whose decode registered go to the load thread."""
        with self.lock:
            ready = [
                (rid, tid)
                for rid, tid in ((r, self.transfer_ids.get(r, r)) for r in self.send_blocks)
                if tid in self.registrations and rid not in self.streams.tasks
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
        self.streams.tasks_done(now)
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
            self.streams.expire(now, self.options.lease_s, sent)
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
        requests wait for a prefill's write: wait up to IDLE_WAIT_MS for every running pull to
        end or a notification to arrive, instead of spinning through empty steps (which takes
        the CPU from the prefill and the GIL from the transfers it waits for). Waiting for all
        the pulls lets the next step compute their requests together."""
        idle, self.step_idle = self.step_idle, False
        if not idle or self.dd is None:
            return
        with self.lock:
            loading, awaiting = self.loading > 0, bool(self.awaiting)
            if self.recved and not loading:
                return
        if not loading and awaiting:
            # push and layerwise: the prefill's notification that it wrote the blocks
            self._handle(self.dd.wait_notifications(IDLE_WAIT_MS), time.time())
            return
        deadline = time.monotonic() + IDLE_WAIT_MS / 1000.0
        while True:
            self.progress.clear()
            with self.lock:
                if self.loading == 0:
                    return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.progress.wait(left)

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
