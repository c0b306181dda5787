"""The transfer planner: one cluster's transfers in both directions (Direction.WRITE for
transfer_cache_async and the pushes, Direction.READ for the pulls).

It owns the task slots (llmdist.max_inflight_tasks), the table of jobs in flight, their launch
on the transfer workers, their cancellation when a cache or peer goes, and the wait of the
synchronous calls. Every config of every call is planned by plan_config: the route to the other
cluster's memory (route_rules.choose_route) and the layer loop's ConfigPlan. A push is a write
job with every layer ready, waited for; a pull is a read job whose destination is the cache
here. Synchronous calls wait at most llm.SyncKvCacheWaitTime ms (spec section 8)."""

from __future__ import annotations

import logging
import operator
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

from . import _core, notifications
from ._check import require
from ._core import CopyKind, Direction, Lane
from .deadlines import Deadlines
from .descs import Cache, Placement, is_live
from .plan_memo import PlanMemo
from .registry import ClusterMemory, MemoryEntry, Region
from .results import config_results
from .route_rules import (
    Access,
    Reach,
    Refusal,
    RouteKind,
    SelectionContext,
    choose_route,
)
from .routes import ImportNeeded, LocalRoute, Route
from .status import LLMException, LLMStatusCode

BUSY_WAIT_S = 0.2  # how long a call waits for a task slot when at the bound
DEFAULT_WAIT_MS = 1000  # upstream's llm.SyncKvCacheWaitTime when the option is not given
IMPORT_TRIES = 4  # plannings of one call that may stop for device IPC imports
# A synchronous job run on its caller's thread that moves at most this many bytes keeps the GIL:
# released, the GIL can take another busy Python thread's switch interval (5 ms) to come back,
# against tens of microseconds for the copy itself.
KEEP_GIL_BYTES = 1 << 20

log = logging.getLogger(__name__)

_PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
_NOT_EXIST = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
_REGION_CACHE = operator.attrgetter("cache")
_ROUTE_ORDER = (RouteKind.PROCESS, RouteKind.ENGINE, RouteKind.MAPPED, RouteKind.LOCAL)


def _fail(message: str, code: LLMStatusCode = _PARAM_INVALID) -> LLMException:
    return LLMException(message, status_code=code)


def live_entry(mem: ClusterMemory, name: str, cache: Cache) -> MemoryEntry:
    """The entry of a cache this cluster still holds; LLM_KV_CACHE_NOT_EXIST naming name."""
    entry = mem.entries.get(cache.cache_id)
    if not is_live(cache) or entry is None or entry.cache is not cache:
        raise _fail(
            f"{name} {cache.cache_id} is not allocated or registered in this cache manager",
            _NOT_EXIST,
        )
    return entry


def find_key(mem: ClusterMemory, key, where: str = "") -> Tuple[MemoryEntry, int]:
    """The cache a key names on its cluster and the row it names (0 for blocks)."""
    entry, row = mem.find(key)
    if entry is None:
        raise _fail(f"{where}no cache for {key!r} on cluster {key.cluster_id}", _NOT_EXIST)
    return entry, row


class Planner:
    """Plans, launches, tracks and waits for the transfers of one cluster's caches. mem and
    lock are the cache manager's: the planner reads caches under that lock."""

    def __init__(
        self,
        cluster_id: int,
        runtime: "_core.Runtime",
        workers,
        mem: ClusterMemory,
        lock: threading.RLock,
        node,
        sync_timeout: Optional[int],
        max_inflight: int,
    ) -> None:
        self.cluster_id = cluster_id
        self.runtime = runtime
        self.workers = workers
        self.mem = mem
        self.lock = lock
        self.node = node
        self.sync_timeout = sync_timeout
        self.closed = False
        self.local_route = LocalRoute(runtime)
        self._local_kinds: Dict[tuple, RouteKind] = {}
        self.memo = PlanMemo(mem)  # configs' resolutions, read and written under lock
        # job -> (source cache key, [destination cache keys per config]); a key is
        # (cluster id, cache id).
        self.inflight: Dict[object, Tuple[Tuple[int, int], List[set]]] = {}
        self.max_inflight = max_inflight
        self.slots = _core.Slots(max_inflight)
        self._here: set = set()  # jobs launched to run on their caller's thread
        self._streams = threading.local()  # each calling thread's stream for them
        self.deadlines = Deadlines()

    def check_open(self) -> None:
        if self.closed:
            raise _fail("llm datadist is finalized", LLMStatusCode.LLM_ENGINE_FINALIZED)

    def linked_peer(self, cluster_id: int, where: str = ""):
        """The peer of a linked cluster; LLM_NOT_YET_LINK (after where) when it is not."""
        peer = self.node.peer(cluster_id) if self.node is not None else None
        if peer is None:
            raise _fail(
                f"{where}cluster {cluster_id} is not linked", LLMStatusCode.LLM_NOT_YET_LINK
            )
        return peer

    def ready_peer(self, cluster_id: int, where: str = ""):
        """linked_peer whose link carries transfers now (waits for device IPC readiness, so
        call it holding no lock)."""
        peer = self.linked_peer(cluster_id, where)
        peer.await_ipc_ready(self.runtime)
        refusal = peer.link_refusal(self.runtime)
        if refusal is not None:
            raise _fail(f"{where}{refusal}", refusal.status_code)
        return peer

    # ------------------------------------------------------------------ slots and jobs

    def take_slot(self) -> None:
        """Wait briefly for room under llmdist.max_inflight_tasks; LLM_LINK_BUSY without it,
        so that tasks nobody waits for cannot pile up without bound."""
        if not self.slots.acquire(timeout=BUSY_WAIT_S):
            raise _fail(
                f"{self.max_inflight} transfer tasks are in flight, the bound set by "
                f"option llmdist.max_inflight_tasks; none finished within "
                f"{BUSY_WAIT_S * 1000:.0f} ms: wait for some tasks and retry",
                LLMStatusCode.LLM_LINK_BUSY,
            )

    def job_done(self, job) -> None:
        """A job ended (its on_finish): out of the in-flight table, its task slot back."""
        with self.lock:
            self.inflight.pop(job, None)
        self.slots.release()

    def launch(
        self, job, cache_id: int, touched: List[set], notice=None, here: bool = False
    ) -> None:
        """Record job as in flight (driven by this cluster's cache cache_id, touching the
        (cluster, cache) pairs of touched per config) and hand it to the workers (lock held),
        or, here, keep it for finish to run on the calling thread. The caller holds a task
        slot, which the job gives back when it ends; notice (a TaskNotice) fires when it ends."""
        self.inflight[job] = ((self.cluster_id, cache_id), touched)
        if notice is None:
            job.on_finish = self.job_done
        else:

            def finished(job) -> None:
                self.job_done(job)
                ok = all(r == LLMStatusCode.LLM_SUCCESS for r in config_results(job)[0])
                notice.fire(ok)

            job.on_finish = finished
        if here:
            self._here.add(job)
            return
        try:
            self.workers.submit(job)
        except BaseException:
            job.on_finish = None  # it never runs: its slot goes back in the caller
            self.inflight.pop(job, None)
            raise

    def cancel_to(self, cluster_id: int, cache_id: Optional[int], code) -> None:
        """End the configs of jobs touching a cache of cluster_id (any cache when cache_id is
        None) and wait until their queued copies have landed."""
        with self.lock:
            work = []
            for job, (_, dsts) in self.inflight.items():
                hit = [
                    i
                    for i, keys in enumerate(dsts)
                    if any(
                        k[0] == cluster_id and (cache_id is None or k[1] == cache_id) for k in keys
                    )
                ]
                if hit:
                    work.append((job, hit))
        for job, hit in work:
            job.cancel(code, hit)

    def cancel_driven_by(self, cache_id: int, code) -> None:
        """End every job driven by this cluster's cache cache_id."""
        me = (self.cluster_id, cache_id)
        with self.lock:
            jobs = [job for job, (driver, _) in self.inflight.items() if driver == me]
        for job in jobs:
            job.cancel(code)

    def close(self) -> None:
        """Refuse new transfers and end every job with LLM_ENGINE_FINALIZED."""
        with self.lock:
            self.closed = True
            jobs = list(self.inflight)
        for job in jobs:
            job.cancel(LLMStatusCode.LLM_ENGINE_FINALIZED)
        self.deadlines.close()

    def runs_here(self, plans: Sequence["_core.ConfigPlan"]) -> bool:
        """Whether a synchronous job of plans runs on its caller's thread, which saves the round
        trip through a worker: on the host runtime (whose streams any thread may use), off the
        Mooncake engine (whose batches go through the workers' channels), and when a worker is
        idle (so that it does not pass jobs queued before it)."""
        return (
            self.runtime.is_host
            and self.workers.idle > 0
            and all(p.lane != Lane.LANE_ENGINE for p in plans)
        )

    def finish(self, job, what: str) -> None:
        """Run or wait for a synchronous job (llm.SyncKvCacheWaitTime ms at most); raise its
        failure. A job still running at the deadline is cancelled (its queued copies land
        first) and reported as LLM_TIMEOUT."""
        wait_ms = self.sync_timeout if self.sync_timeout is not None else DEFAULT_WAIT_MS
        with self.lock:
            here = job in self._here
            self._here.discard(job)
        if here:
            t0 = time.monotonic()
            self.run_here(job, wait_ms)
            self.verdict(job, what, wait_ms, t0)
            return
        if not job.done.wait(wait_ms / 1000.0):
            job.cancel(LLMStatusCode.LLM_TIMEOUT)
            job.done.wait(max(wait_ms / 1000.0, 1.0))
            raise _fail(
                f"{what} did not finish within {wait_ms} ms (llm.SyncKvCacheWaitTime)",
                LLMStatusCode.LLM_TIMEOUT,
            )
        self.verdict(job, what, wait_ms, None)

    def verdict(self, job, what: str, wait_ms: int, t0: Optional[float]) -> None:
        """Raise the failure of a finished synchronous job, if any. t0: when a job run on its
        caller's thread started; as for a waiting caller, not done by the deadline is
        LLM_TIMEOUT, whether the deadline thread got to cancel the rest or the copies landed
        meanwhile."""
        if t0 is not None and (
            job.cancel_code == LLMStatusCode.LLM_TIMEOUT
            or time.monotonic() - t0 >= wait_ms / 1000.0
        ):
            raise _fail(
                f"{what} did not finish within {wait_ms} ms (llm.SyncKvCacheWaitTime)",
                LLMStatusCode.LLM_TIMEOUT,
            )
        results, errors = config_results(job)
        code = results[0] if results else None
        if code == LLMStatusCode.LLM_SUCCESS:
            return
        if code is None:  # cancelled before any copy was issued
            code = job.cancel_code if job.cancel_code is not None else LLMStatusCode.LLM_FAILED
        raise _fail(f"{what} failed: {errors[0] if errors else None or code}", code)

    def run_here(self, job, wait_ms: int) -> None:
        """Run job's layer loop on this thread, on its own stream; the deadline thread cancels
        it at wait_ms as a waiting caller would, when it can stop part way
        (TransferJob.needs_deadline): a job that keeps the GIL or issues every copy in one
        call only ends late, which verdict reports."""
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = _core.Stream(self.runtime)
        entry = None
        if job.needs_deadline(KEEP_GIL_BYTES):
            entry = self.deadlines.add(job, wait_ms / 1000.0)
        try:
            job.run(stream, None, KEEP_GIL_BYTES)
        except BaseException:  # a bug in the loop must still end the job
            log.exception("transfer job failed unexpectedly")
            job.cancel(LLMStatusCode.LLM_FAILED)
        finally:
            if entry is not None:
                self.deadlines.done(entry)
        job.done.wait()  # a cancellation from another thread reports it

    def run_planned(self, plan_job, peers: Sequence):
        """Call plan_job() under the lock (and the locks of peers, whose reader threads update
        their caches) until it needs no device IPC import; imports happen outside the locks."""
        for _ in range(IMPORT_TRIES):
            try:
                with self.lock:
                    if not peers:
                        return plan_job()
                    with _PeerLocks(peers):
                        return plan_job()
            except ImportNeeded as need:
                need.peer.import_device(need.entries, self.runtime)
        raise _fail(
            "the peer's caches changed while this transfer was planned: retry",
            LLMStatusCode.LLM_LINK_BUSY,
        )

    # ------------------------------------------------------------------ notifications

    def hub(self) -> "notifications.Notifications":
        """The cluster's notifications; LLM_FEATURE_NOT_ENABLED without a cluster."""
        if self.node is None:
            raise _fail(
                "notifications need a cluster (LLMDataDist.init)",
                LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
            )
        return self.node.notifications

    def notify_target(self, cluster_id: int):
        """(peer, cluster_id) to notify; peer None for this cluster itself."""
        self.hub()
        if cluster_id == self.cluster_id:
            return None, cluster_id
        return self.linked_peer(cluster_id), cluster_id

    def task_notice(self, transfer_configs, payload: bytes) -> "notifications.TaskNotice":
        """The notice a transfer_cache_async task sends each destination cluster once."""
        targets, seen = [], set()
        for cfg in transfer_configs:
            cid = getattr(cfg, "dst_cluster_id", None)
            if isinstance(cid, int) and cid not in seen:
                seen.add(cid)
                targets.append(self.notify_target(cid))
        return notifications.TaskNotice(self.hub(), targets, payload)

    def notify_now(self, cluster_id: int, payload: bytes, what: str) -> None:
        """Send a notification after a synchronous transfer and wait for its confirmation."""
        peer, _ = self.notify_target(cluster_id)
        try:
            self.hub().send(peer, cluster_id, payload).wait()
        except LLMException as exc:
            raise _fail(
                f"{what} succeeded, but its notification to cluster {cluster_id} was "
                f"not delivered: {exc}",
                exc.status_code,
            ) from None

    # ------------------------------------------------------------------ one config

    def choose(
        self,
        direction: Direction,
        peer,
        here: Placement,
        regions: Sequence[Region],
        where: str = "",
    ) -> set:
        """The kinds of route that reach the caches of regions, one region per cache (peer
        None: this cluster's); LLMException with the refusal after where."""
        return {self._choose(direction, peer, here, r, where) for r in regions}

    def build_route(self, peer, kinds: set, regions: Sequence[Region]) -> Route:
        """The route of the chosen kinds to regions (a process route reaches every byte of
        the peer's process, mapped or not, so it wins over a mapping)."""
        if peer is None:
            return self.local_route
        kind = min(kinds, key=_ROUTE_ORDER.index)
        return peer.route_to(kind, list(regions), self.runtime)

    def _choose(self, direction: Direction, peer, here: Placement, region: Region, where: str):
        other = region.cache
        there = other.cache_desc.placement
        src, dst = (here, there) if direction == Direction.WRITE else (there, here)
        if peer is None:
            # this cluster's choices depend on the placements only: each is made once
            kind = self._local_kinds.get((direction, src, dst))
            if kind is not None:
                return kind
            ctx = SelectionContext(
                direction,
                src,
                dst,
                Reach.SELF,
                not self.runtime.is_host,
                self.runtime.name,
                Access.OWN,
                f"cache {other.cache_id}",
            )
        else:
            access, why = peer.access(peer.mem.entries[other.cache_id], self.runtime)
            reach = Reach.ENGINE if peer.path == "mooncake" else Reach.SAME_HOST
            ctx = SelectionContext(
                direction,
                src,
                dst,
                reach,
                not self.runtime.is_host,
                self.runtime.name,
                access,
                f"cache {other.cache_id} of cluster {peer.cluster_id}",
                why,
                peer.runtime,
            )
        got = choose_route(ctx)
        if isinstance(got, Refusal):
            raise _fail(f"{where}{got.message}", got.status_code)
        if peer is None:
            self._local_kinds[(direction, src, dst)] = got
        return got

    def plan_config(
        self,
        direction: Direction,
        route: Route,
        layers: range,
        shift: int,
        kind: CopyKind,
        addrs: Sequence[int],
        regions: Sequence[Region],
        tpl: int,
    ) -> "_core.ConfigPlan":
        """The layer loop's plan for one checked config in direction: the layers and row of the
        cache here, and the other cache's tensors (addrs, in regions) as route reaches them."""
        target_addrs, target_limits = route.reach(addrs, regions)
        return _core.ConfigPlan(
            first_layer=layers.start,
            stop_layer=layers.stop,
            row_shift=shift,
            kind=kind,
            lane=route.lane(kind),
            direction=direction,
            target_addrs=target_addrs,
            target_limits=target_limits,
            pid=route.pid,
            link=route.link,
            engine=route.channel(self.sync_timeout),
            single=route.single,
            tensors_per_layer=tpl,
        )

    def resolve_key(
        self, where: str, key, layers: range, mem: ClusterMemory, tpl: int
    ) -> Tuple[MemoryEntry, int]:
        """The remote-accessible cache a write's key names, checked to hold layers and the row;
        returns it and the row's byte offset inside each tensor."""
        entry, row = find_key(mem, key, where)
        cid = entry.cache.cache_id
        desc = entry.cache.cache_desc
        require(entry.remote_accessible, f"{where}cache {cid} is not remote accessible")
        require(
            desc.num_tensors % tpl == 0 and layers.stop <= desc.num_tensors // tpl,
            f"{where}dst_layer_range {layers} is outside the {desc.num_tensors // tpl} layers "
            f"of {tpl} tensors of cache {cid}",
        )
        require(
            row < desc.batch_size,  # a BlocksCacheKey names row 0
            f"{where}batch_index {row} must be < the batch size {desc.batch_size} of cache {cid}",
        )
        return entry, row * desc.stride


class _PeerLocks:
    """Hold the locks of several peers (in a fixed order, so that two calls cannot deadlock)."""

    def __init__(self, peers: Sequence) -> None:
        self._locks = [p.lock for p in sorted(peers, key=operator.attrgetter("cluster_id"))]

    def __enter__(self) -> None:
        for lock in self._locks:
            lock.acquire()

    def __exit__(self, *exc) -> None:
        for lock in reversed(self._locks):
            lock.release()
