"""Two processes on one host: this process (a prefill) moves blocks to and from a decode cluster
in a child process, through every route llmdist has to it, with every call that moves blocks:

- routes: ``mapped`` (the decode's allocated cache, mapped here: shared memory on the host
  runtime, device IPC on a device runtime), ``process`` (memory the decode registered, reached
  with process_vm_writev/readv), ``engine`` (Mooncake Transfer Engine over 127.0.0.1, when
  installed);
- calls: ``transfer_cache_async`` (every layer ready at once), ``push_blocks``, ``pull_blocks``
  (the last two when this build has them; otherwise reported as not available).

Baselines in the same rounds: one contiguous copy of the same bytes and the per-block copy loop
in this process (what the path would cost without another process), and the peers' own engines
when installed: a raw Mooncake engine writing the same blocks (engine route), NIXL writing them
from a process of its own (process route). The bytes of every call are checked (per-block
digests) before it is timed.

The shared key's cost: a second decode and a second prefill per transport hold a key
(``llmdist.auth_key``); their link time and their transfer_cache_async on every route are
measured in the same rounds as the unkeyed ones (rows "..., keyed", see .keyed)."""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

from ..config import LLMClusterInfo
from ..descs import BlocksCacheKey, Cache, LLMRole, Placement
from ..transfer_types import TransferWithCacheKeyConfig
from . import keyed, procs
from .local import layer_kwargs
from .nixl_baseline import NIXL, NixlPrefill
from .peers import mooncake_available, nixl_available
from .results import SUBJECT, Result, Run, path_of
from .settings import Need, size_name
from .workload import CONTIGUOUS, OK, PER_BLOCK, Bench, Go, block_pairs, check

DECODE_IDS = {False: 61, True: 71}  # unkeyed, keyed
PREFILL_IDS = {
    ("direct", False): 62,
    ("mooncake", False): 63,
    ("direct", True): 72,
    ("mooncake", True): 73,
}
LINK_MS = 5000
TASK_MS = 120_000
SRC_MODEL, LOCAL_MODEL = 0, 1  # the prefill's caches: source, pull destination
OPS = ("transfer_cache_async", "push_blocks", "pull_blocks")
ROUTES = {
    # route: (prefill transport, how the decode makes its cache)
    "mapped": ("direct", "alloc"),
    "process": ("direct", "register"),
    "engine": ("mooncake", "alloc"),
}
MOONCAKE_RAW = "mooncake engine (raw)"
KEYED = "llmdist, keyed"  # measured with the unkeyed call, reported in its own row
BARE_PROCESS_VM = "process_vm bare, 2 threads"


def cluster_steps(bench: Bench) -> int:
    return len(bench.settings.blocks)


class Prefill:
    """A prefill cluster on one transport, remote-accessible, linked to a decode (keyed when
    auth_key is given, as that decode is); it registers this run's source and pull-destination
    memory under its own keys."""

    def __init__(self, transport: str, port: int, auth_key: Optional[str] = None) -> None:
        self.transport = transport
        self.keyed = auth_key is not None
        self.cid = PREFILL_IDS[(transport, self.keyed)]
        self.decode_id = DECODE_IDS[self.keyed]
        self.linked = False
        self.src: Optional[Cache] = None
        self.local: Optional[Cache] = None
        self.dd = procs.start_cluster(
            LLMRole.PROMPT, self.cid, transport, sync_timeout=TASK_MS, auth_key=auth_key
        )
        self.cm = self.dd.cache_manager
        self.info = LLMClusterInfo()
        self.info.remote_cluster_id = self.decode_id
        self.info.append_remote_ip_info("127.0.0.1", port)
        try:
            self.link()
        except RuntimeError:
            self.dd.finalize()
            raise

    def link(self) -> float:
        """link_clusters to the decode; its seconds. RuntimeError when it fails."""
        t0 = time.perf_counter()
        status, _ = self.dd.link_clusters([self.info], LINK_MS)
        seconds = time.perf_counter() - t0
        if status != OK:
            raise RuntimeError(
                f"prefill {self.cid} ({self.transport}) could not link: {status.name}"
            )
        self.linked = True
        return seconds

    def relink(self) -> float:
        """Unlink, then link again: the seconds of the link."""
        status, _ = self.dd.unlink_clusters([self.info], LINK_MS)
        if status != OK:
            raise RuntimeError(
                f"prefill {self.cid} ({self.transport}) could not unlink: {status.name}"
            )
        self.linked = False
        return self.link()

    def register(self, src: Cache, local: Cache) -> None:
        """This run's source and local caches (allocated by the bench's own cluster) under keys
        of this cluster."""
        self.src = self.cm.register_blocks_cache(
            src.cache_desc, list(src.tensor_addrs), BlocksCacheKey(self.cid, SRC_MODEL)
        )
        self.local = self.cm.register_blocks_cache(
            local.cache_desc, list(local.tensor_addrs), BlocksCacheKey(self.cid, LOCAL_MODEL)
        )

    def unregister(self) -> None:
        for c in (self.src, self.local):
            if c is not None and c.tensor_addrs:
                self.cm.unregister_cache(c.cache_id)
        self.src = self.local = None

    def path(self) -> str:
        info = self.dd.peer_info(self.decode_id)
        return str(info.get("path", "?")) if info else "?"

    def close(self) -> None:
        try:
            self.unregister()
            if self.linked:
                self.dd.unlink_clusters([self.info], LINK_MS, force=True)
        finally:
            self.dd.finalize()


def _calls(bench: Bench, p: Prefill, model: int, si: List[int], di: List[int]):
    """The three calls through prefill p to decode cache `model`: name -> callable, or the
    reason it is not there."""
    L = bench.settings.layers
    kw = layer_kwargs(bench)
    key = BlocksCacheKey(p.decode_id, model)
    out: Dict[str, object] = {}
    cfg = [TransferWithCacheKeyConfig(key, range(L), range(L))]

    def transfer():
        check(
            p.cm.transfer_cache_async(p.src, Go(), cfg, si, di, **kw).synchronize(TASK_MS),
            "transfer_cache_async",
        )

    out["transfer_cache_async"] = transfer
    if hasattr(p.cm, "push_blocks"):
        out["push_blocks"] = lambda: p.cm.push_blocks(key, p.src, si, di, **kw)
    else:
        out["push_blocks"] = "not available in this build"
    if hasattr(p.cm, "pull_blocks"):
        out["pull_blocks"] = lambda: p.cm.pull_blocks(key, p.local, di, si, **kw)
    else:
        out["pull_blocks"] = "not available in this build"
    return out


class _RawMooncake:
    """The same B2B writes through a Mooncake engine of this process's own (no llmdist): one
    synchronous batch per layer."""

    def __init__(
        self, session: str, src: Cache, dst_addrs: List[int], si, di, block: int, tpl: int
    ) -> None:
        from mooncake.engine import TransferEngine

        self.engine = TransferEngine()
        rc = self.engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")
        if rc != 0:
            raise RuntimeError(f"Mooncake initialize returned {rc}")
        self.session = session
        self.batches = []
        nt = len(src.tensor_addrs)
        for first in range(0, nt, tpl):
            srcs, dsts = [], []
            for t in range(first, first + tpl):
                srcs += [src.tensor_addrs[t] + s * block for s in si]
                dsts += [dst_addrs[t] + d * block for d in di]
            self.batches.append((srcs, dsts, [block] * len(srcs)))

    def __call__(self) -> None:
        for s, d, n in self.batches:
            rc = self.engine.batch_transfer_sync_write(self.session, s, d, n)
            if rc != 0:
                raise RuntimeError(f"Mooncake batch_transfer_sync_write returned {rc}")


class Clusters:
    """The decodes (child processes; the keyed one holds the run's key), the prefills of this
    process per (transport, keyed), the NIXL prefill, and why any of them is missing."""

    def __init__(self) -> None:
        self.key = keyed.new_key()
        self.decodes: Dict[bool, procs.Child] = {}
        self.ports: Dict[bool, int] = {}
        self.prefills: Dict[Tuple[str, bool], Prefill] = {}
        self.unavailable: Dict[Tuple[str, bool], str] = {}
        self.nixl = NixlPrefill()

    def start(self) -> None:
        for k in (False, True):
            cid = DECODE_IDS[k]
            args = (cid, procs.IDLE_S, self.key) if k else (cid,)
            name = f"decode-{cid}" + (" (keyed)" if k else "")
            self.decodes[k] = procs.Child(procs.decode_main, *args, name=name)
            self.ports[k] = self.decodes[k].recv(60)[1]
        for k in (False, True):
            for transport in ("direct", "mooncake"):
                why = mooncake_available() if transport == "mooncake" else None
                if why:
                    self.unavailable[(transport, k)] = why
                    continue
                try:
                    self.prefills[(transport, k)] = Prefill(
                        transport, self.ports[k], self.key if k else None
                    )
                except Exception as exc:  # noqa: BLE001 - reported as the route's reason
                    self.unavailable[(transport, k)] = f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        try:
            for p in self.prefills.values():
                p.close()
            self.nixl.close()
        finally:
            for d in self.decodes.values():
                d.close()


def cluster(bench: Bench, run: Run) -> None:
    c = Clusters()
    try:
        c.start()
        for block in bench.settings.blocks:
            _one_size(bench, run, c, block)
    finally:
        c.close()


def _nixl_runs(bench: Bench) -> bool:
    return nixl_available() is None and bench.host_memory


def _one_size(bench: Bench, run: Run, c: Clusters, block: int) -> None:
    s = bench.settings
    tpl = s.tensors_per_layer
    nt = s.layers * tpl
    label = f"cluster {size_name(block)}"
    bench.progress.step(label)
    moved = nt * s.pairs * block
    # this process: source and pull destination; each decode: two caches; NIXL: its source
    caches = 2 + 2 * len(c.decodes) + (1 if _nixl_runs(bench) else 0)
    plan = bench.budget.fit_pool(label, Need(caches * nt * block, 0))
    run.note(plan.note)
    src = bench.blocks_cache(nt, plan.pool, block)
    local = bench.blocks_cache(nt, plan.pool, block)
    desc = src.cache_desc
    models = {"alloc": 2 * s.blocks.index(block) + 10, "register": 2 * s.blocks.index(block) + 11}
    releases: List[Callable[[], None]] = [lambda: bench.free(src, local)]
    try:
        bench.fill(src)
        si, di = block_pairs(plan.pool, s.pairs, s.seed)
        check_tensors = sorted({0, nt - 1})
        want = procs.block_digests(
            [bench.read(src, t).reshape(plan.pool, block) for t in check_tensors], si
        )
        dst_addrs = {}
        for k, decode in c.decodes.items():
            for how, model in models.items():
                placement = desc.placement
                if how == "register" and not bench.host_memory:
                    placement = Placement.HOST  # a device runtime's peer registers host memory
                try:
                    dst_addrs[(k, how)] = decode.call(
                        how, model, nt, desc.shape, desc.data_type.value, int(placement)
                    )
                except procs.ChildError as exc:
                    dst_addrs[(k, how)] = str(exc).strip().splitlines()[-1]
                releases.append(
                    lambda m=model, d=decode, a=(k, how): (
                        isinstance(dst_addrs[a], list) and d.call("free", m)
                    )
                )
        for p in c.prefills.values():
            p.register(src, local)
            releases.append(p.unregister)
        if block == s.blocks[0]:
            _link_rows(bench, run, c)
        contiguous = bench.contiguous(moved, src, local)
        dsts = [a + d * block for a in local.tensor_addrs for d in di]
        srcs = [a + x * block for a in src.tensor_addrs for x in si]
        per_block = bench.per_block(dsts, srcs, block)
        case_set = CaseSet(
            bench,
            run,
            c,
            label,
            block,
            moved,
            plan.pool,
            src,
            local,
            si,
            di,
            want,
            check_tensors,
            dst_addrs,
        )
        for route in ROUTES:
            case_set.route(route, models, contiguous, per_block)
    finally:
        for r in reversed(releases):
            r()


def _link_rows(bench: Bench, run: Run, c: Clusters) -> None:
    """Per transport, link_clusters of the keyed prefill against the unkeyed one; then one
    control frame, keyed against unkeyed."""
    rounds = max(keyed.MIN_LINK_ROUNDS, bench.settings.repeat)
    bench.progress.show(f"cluster: {keyed.FRAME_CASE}")
    run.results.append(keyed.frame_result(rounds))
    for transport in ("direct", "mooncake"):
        routes = "/".join(r for r, (t, _) in ROUTES.items() if t == transport)
        case = f"{routes}: link_clusters, keyed"
        pk, pu = c.prefills.get((transport, True)), c.prefills.get((transport, False))
        if pk is None or pu is None:
            why = c.unavailable.get((transport, True)) or c.unavailable.get((transport, False))
            run.results.append(Result("cluster", case, None, 0, {}, skipped={SUBJECT: why}))
            continue
        bench.progress.show(f"cluster: {case}")
        try:
            times = keyed.link_rounds(pk.relink, pu.relink, rounds)
        except RuntimeError as exc:
            run.results.append(Result("cluster", case, None, 0, {}, skipped={SUBJECT: str(exc)}))
            continue
        run.results.append(
            keyed.link_result(case, times, {"transport": transport, "rounds": rounds})
        )


class CaseSet:
    """The cases of one block size: every (route, call), with its baselines and keyed row."""

    def __init__(
        self,
        bench: Bench,
        run: Run,
        c: Clusters,
        label: str,
        block: int,
        moved: int,
        pool: int,
        src: Cache,
        local: Cache,
        si,
        di,
        want,
        check_tensors,
        dst_addrs: dict,
    ) -> None:
        self.bench, self.run, self.c, self.label = bench, run, c, label
        self.block, self.moved, self.pool = block, moved, pool
        self.src, self.local, self.si, self.di = src, local, si, di
        self.want, self.check_tensors, self.dst_addrs = want, check_tensors, dst_addrs

    def _reason(self, transport: str, k: bool, how: str) -> Optional[str]:
        if (transport, k) not in self.c.prefills:
            return self.c.unavailable.get((transport, k), "no prefill")
        addrs = self.dst_addrs.get((k, how))
        if not isinstance(addrs, list):
            return f"the decode could not make its cache: {addrs}"
        return None

    def _check(self, k: bool, fn, op: str, model: int) -> bool:
        return _check_call(
            self.bench,
            self.c.decodes[k],
            fn,
            op,
            model,
            self.local,
            self.si,
            self.di,
            self.want,
            self.check_tensors,
            self.pool,
            self.block,
        )

    def route(self, route: str, models: Dict[str, int], contiguous, per_block) -> None:
        bench, run, s = self.bench, self.run, self.bench.settings
        transport, how = ROUTES[route]
        model = models[how]
        reason = self._reason(transport, False, how)
        p = self.c.prefills.get((transport, False))
        calls = (
            _calls(bench, p, model, self.si, self.di)
            if reason is None
            else {op: reason for op in OPS}
        )
        for op in OPS:
            bench.progress.show(f"{self.label}: {route} {op}")
            fn = calls[op]
            case = f"{route}: {op}"
            if not callable(fn):
                run.results.append(
                    Result("cluster", case, self.block, 0, {}, skipped={SUBJECT: fn})
                )
                continue
            paths = {SUBJECT: fn}
            skipped: Dict[str, str] = {}
            own_seconds: Dict[str, List[float]] = {}
            try:
                ok = self._check(False, fn, op, model)
            except Exception as exc:  # noqa: BLE001 - a refused route is a result
                run.results.append(
                    Result(
                        "cluster",
                        case,
                        self.block,
                        0,
                        {},
                        skipped={SUBJECT: f"{type(exc).__name__}: {str(exc).splitlines()[0]}"},
                    )
                )
                continue
            keyed_ok = None
            if op == "transfer_cache_async":  # next to the unkeyed call in every round
                keyed_ok = self._keyed(transport, how, model, paths, skipped)
            paths.update({CONTIGUOUS: contiguous, PER_BLOCK: per_block})
            if route == "process":
                _bare_process_vm(
                    bench,
                    self.c.decodes[False],
                    op,
                    model,
                    self.src,
                    self.local,
                    self.dst_addrs[(False, how)],
                    self.si,
                    self.di,
                    self.block,
                    paths,
                    skipped,
                )
            if op == "transfer_cache_async":
                self._peers(route, model, self.dst_addrs[(False, how)], paths, skipped, own_seconds)
            times = bench.rounds(f"{self.label}: {route} {op}", paths, alternate=True)
            for name, secs in own_seconds.items():
                times[name] = secs[-len(times[name]) :]
            keyed_times = times.pop(KEYED, None)
            extra = {
                "llmdist_path": p.path(),
                "pool": self.pool,
                "pairs": s.pairs,
                "tensors": len(self.src.tensor_addrs),
            }
            run.results.append(
                Result(
                    "cluster",
                    case,
                    self.block,
                    self.moved,
                    {k: path_of(v, self.moved) for k, v in times.items()},
                    skipped={k: v for k, v in skipped.items() if k != KEYED},
                    verified=ok,
                    extra=extra,
                ).finish()
            )
            if keyed_times is not None:
                run.results.append(
                    keyed.transfer_result(
                        f"{case}, keyed",
                        self.block,
                        self.moved,
                        keyed_times,
                        times[SUBJECT],
                        keyed_ok,
                        {**extra, "llmdist_path": self.c.prefills[(transport, True)].path()},
                    )
                )
            elif KEYED in skipped:
                run.results.append(
                    Result(
                        "cluster",
                        f"{case}, keyed",
                        self.block,
                        0,
                        {},
                        skipped={SUBJECT: skipped[KEYED]},
                    )
                )

    def _keyed(
        self, transport: str, how: str, model: int, paths: dict, skipped: dict
    ) -> Optional[bool]:
        """The keyed prefill's call into the keyed decode's cache, checked, added to paths (or
        its reason to skipped); whether its bytes arrived."""
        why = self._reason(transport, True, how)
        if why is None:
            pk = self.c.prefills[(transport, True)]
            fn = _calls(self.bench, pk, model, self.si, self.di)["transfer_cache_async"]
            try:
                ok = self._check(True, fn, "transfer_cache_async", model)
            except Exception as exc:  # noqa: BLE001 - reported in the keyed row
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            else:
                paths[KEYED] = fn
                return ok
        skipped[KEYED] = why
        return None

    def _peers(
        self, route: str, model: int, dst_addrs, paths: dict, skipped: dict, own_seconds: dict
    ) -> None:
        """The peers' own engines on the same blocks, when installed (and host memory)."""
        bench, decode = self.bench, self.c.decodes[False]
        tensors = self.check_tensors
        if route == "engine":
            why = mooncake_available()
            if why is None and not bench.host_memory:
                why = "the raw engine baseline runs on host memory only (TCP transport)"
            if why is None:
                try:
                    session = decode.call("mooncake_init", model)
                    raw = _RawMooncake(
                        session,
                        self.src,
                        dst_addrs,
                        self.si,
                        self.di,
                        self.block,
                        bench.settings.tensors_per_layer,
                    )
                    decode.call("clear", model)
                    raw()
                    if decode.call("digests", model, self.di, tensors) != self.want:
                        raise RuntimeError("the raw Mooncake writes left wrong bytes")
                    paths[MOONCAKE_RAW] = raw
                except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported
                    why = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            if why:
                skipped[MOONCAKE_RAW] = why
        if route == "process":
            why = nixl_available()
            if why is None and not bench.host_memory:
                why = "the NIXL baseline runs on host memory only"
            if why is None:
                try:
                    write, seconds = self.c.nixl.writer(
                        decode,
                        model,
                        dst_addrs,
                        bench.settings.layers,
                        bench.settings.tensors_per_layer,
                        self.pool,
                        self.block,
                        self.si,
                        self.di,
                    )
                    decode.call("clear", model)
                    write()
                    if decode.call("digests", model, self.di, tensors) != self.want:
                        raise RuntimeError("the NIXL writes left wrong bytes")
                    paths[NIXL] = write
                    own_seconds[NIXL] = seconds
                except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported
                    lines = str(exc).strip().splitlines()
                    why = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
            if why:
                skipped[NIXL] = why


def _check_call(
    bench: Bench,
    decode,
    fn,
    op: str,
    model: int,
    local: Cache,
    si,
    di,
    want,
    tensors,
    pool: int,
    block: int,
) -> bool:
    """Run the call once and compare the bytes that arrived with the source's."""
    if op == "pull_blocks":
        bench.fill(local, start=1 << 40)  # anything but what the pull must bring
        fn()
        src_side = decode.call("digests", model, di, tensors)
        got = procs.block_digests([bench.read(local, t).reshape(pool, block) for t in tensors], si)
        return got == src_side and src_side == want
    decode.call("clear", model)
    fn()
    return decode.call("digests", model, di, tensors) == want


def _bare_process_vm(
    bench: Bench,
    decode,
    op: str,
    model: int,
    src: Cache,
    local: Cache,
    remote_addrs,
    si,
    di,
    block: int,
    paths: dict,
    skipped: dict,
) -> None:
    """The process route's limit: the same iovecs through process_vm_writev (pull:
    process_vm_readv) straight from C on 2 threads, up to 1024 per call; its bytes are checked
    like llmdist's."""
    from .._core import ProcessVmBaseline

    if not bench.host_memory:
        skipped[BARE_PROCESS_VM] = "the bare syscall baseline runs on host memory only"
        return
    pull = op == "pull_blocks"
    here = local if pull else src
    local_addrs = [a + x * block for a in here.tensor_addrs for x in si]
    remote = [a + d * block for a in remote_addrs for d in di]
    bare = ProcessVmBaseline(decode.pid, not pull, local_addrs, remote, block, threads=2)
    tensors = sorted({0, len(src.tensor_addrs) - 1})
    want = procs.block_digests([bench.read(src, t).reshape(-1, block) for t in tensors], si)
    if pull:
        bench.fill(local, start=1 << 40)
        bare()
        ok = (
            procs.block_digests([bench.read(local, t).reshape(-1, block) for t in tensors], si)
            == want
        )
    else:
        decode.call("clear", model)
        bare()
        ok = decode.call("digests", model, di, tensors) == want
    if ok:
        paths[BARE_PROCESS_VM] = bare
    else:
        skipped[BARE_PROCESS_VM] = "its bytes did not arrive as llmdist's do (check failed)"
