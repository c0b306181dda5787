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
when installed: a raw Mooncake engine writing the same blocks (engine route), NIXL (process
route). The bytes of every call are checked (per-block digests) before it is timed."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

from ..config import LLMClusterInfo
from ..descs import BlocksCacheKey, Cache, Placement
from ..descs import LLMRole
from ..transfer_types import TransferWithCacheKeyConfig
from . import procs
from .local import layer_kwargs
from .peers import mooncake_available, nixl_available
from .results import SUBJECT, Result, Run, path_of
from .settings import Need, size_name
from .workload import CONTIGUOUS, OK, PER_BLOCK, Bench, Go, block_pairs, check

DECODE_ID = 61
PREFILL_IDS = {"direct": 62, "mooncake": 63}
LINK_MS = 5000
TASK_MS = 120_000
SRC_MODEL, LOCAL_MODEL = 0, 1           # the prefill's caches: source, pull destination
OPS = ("transfer_cache_async", "push_blocks", "pull_blocks")
ROUTES = {
    # route: (prefill transport, how the decode makes its cache)
    "mapped": ("direct", "alloc"),
    "process": ("direct", "register"),
    "engine": ("mooncake", "alloc"),
}
MOONCAKE_RAW = "mooncake engine (raw)"
NIXL = "nixl (UCX)"
BARE_PROCESS_VM = "process_vm bare, 2 threads"


def cluster_steps(bench: Bench) -> int:
    return len(bench.settings.blocks)


class Prefill:
    """A prefill cluster on one transport, remote-accessible, linked to the decode; it registers
    this run's source and pull-destination memory under its own keys."""

    def __init__(self, transport: str, port: int) -> None:
        self.transport = transport
        self.cid = PREFILL_IDS[transport]
        self.linked = False
        self.src: Optional[Cache] = None
        self.local: Optional[Cache] = None
        self.dd = procs.start_cluster(LLMRole.PROMPT, self.cid, transport, sync_timeout=TASK_MS)
        self.cm = self.dd.cache_manager
        self.info = LLMClusterInfo()
        self.info.remote_cluster_id = DECODE_ID
        self.info.append_remote_ip_info("127.0.0.1", port)
        status, _ = self.dd.link_clusters([self.info], LINK_MS)
        if status != OK:
            self.dd.finalize()
            raise RuntimeError(f"prefill {self.cid} ({transport}) could not link: {status.name}")
        self.linked = True

    def register(self, src: Cache, local: Cache) -> None:
        """This run's source and local caches (allocated by the bench's own cluster) under keys
        of this cluster."""
        self.src = self.cm.register_blocks_cache(src.cache_desc, list(src.tensor_addrs),
                                                 BlocksCacheKey(self.cid, SRC_MODEL))
        self.local = self.cm.register_blocks_cache(local.cache_desc, list(local.tensor_addrs),
                                                   BlocksCacheKey(self.cid, LOCAL_MODEL))

    def unregister(self) -> None:
        for c in (self.src, self.local):
            if c is not None and c.tensor_addrs:
                self.cm.unregister_cache(c.cache_id)
        self.src = self.local = None

    def path(self) -> str:
        info = self.dd.peer_info(DECODE_ID)
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
    key = BlocksCacheKey(DECODE_ID, model)
    out: Dict[str, object] = {}
    cfg = [TransferWithCacheKeyConfig(key, range(L), range(L))]

    def transfer():
        check(p.cm.transfer_cache_async(p.src, Go(), cfg, si, di, **kw).synchronize(TASK_MS),
              "transfer_cache_async")
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

    def __init__(self, session: str, src: Cache, dst_addrs: List[int], si, di, block: int,
                 tpl: int) -> None:
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


def cluster(bench: Bench, run: Run) -> None:
    s = bench.settings
    tpl = s.tensors_per_layer
    nt = s.layers * tpl
    decode = procs.Child(procs.decode_main, DECODE_ID, name=f"decode-{DECODE_ID}")
    prefills: Dict[str, Prefill] = {}
    unavailable: Dict[str, str] = {}
    try:
        msg = decode.recv(60)
        port = msg[1]
        for transport in ("direct", "mooncake"):
            why = mooncake_available() if transport == "mooncake" else None
            if why:
                unavailable[transport] = why
                continue
            try:
                prefills[transport] = Prefill(transport, port)
            except Exception as exc:  # noqa: BLE001 - reported as the route's reason
                unavailable[transport] = f"{type(exc).__name__}: {exc}"
        for block in s.blocks:
            _one_size(bench, run, decode, prefills, unavailable, block, nt, tpl)
    finally:
        for p in prefills.values():
            p.close()
        decode.close()


def _one_size(bench: Bench, run: Run, decode: procs.Child, prefills: Dict[str, Prefill],
              unavailable: Dict[str, str], block: int, nt: int, tpl: int) -> None:
    s = bench.settings
    label = f"cluster {size_name(block)}"
    bench.progress.step(label)
    moved = nt * s.pairs * block
    # this process: source and pull destination; the decode: two caches
    plan = bench.budget.fit_pool(label, Need(4 * nt * block, 0))
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
        want = procs.block_digests([bench.read(src, t).reshape(plan.pool, block)
                                    for t in check_tensors], si)
        dst_addrs = {}
        for how, model in models.items():
            placement = desc.placement
            if how == "register" and not bench.host_memory:
                placement = Placement.HOST       # a device runtime's peer registers host memory
            try:
                dst_addrs[how] = decode.call(how, model, nt, desc.shape, desc.data_type.value,
                                             int(placement))
            except procs.ChildError as exc:
                dst_addrs[how] = str(exc).strip().splitlines()[-1]
            releases.append(lambda m=model, h=how: isinstance(dst_addrs[h], list)
                            and decode.call("free", m))
        for p in prefills.values():
            p.register(src, local)
            releases.append(p.unregister)
        contiguous = bench.contiguous(moved, src, local)
        dsts = [a + d * block for a in local.tensor_addrs for d in di]
        srcs = [a + x * block for a in src.tensor_addrs for x in si]
        per_block = bench.per_block(dsts, srcs, block)

        for route, (transport, how) in ROUTES.items():
            model = models[how]
            p = prefills.get(transport)
            reason = unavailable.get(transport) if p is None else None
            if reason is None and not isinstance(dst_addrs[how], list):
                reason = f"the decode could not make its cache: {dst_addrs[how]}"
            calls = _calls(bench, p, model, si, di) if reason is None else {op: reason for op in OPS}
            for op in OPS:
                bench.progress.show(f"{label}: {route} {op}")
                fn = calls[op]
                case = f"{route}: {op}"
                if not callable(fn):
                    run.results.append(Result("cluster", case, block, 0, {}, skipped={SUBJECT: fn}))
                    continue
                paths = {SUBJECT: fn, CONTIGUOUS: contiguous, PER_BLOCK: per_block}
                skipped: Dict[str, str] = {}
                try:
                    ok = _check_call(bench, decode, fn, op, model, local, si, di, want, check_tensors,
                                     plan.pool, block)
                except Exception as exc:  # noqa: BLE001 - a refused route is a result
                    run.results.append(Result("cluster", case, block, 0, {}, skipped={
                        SUBJECT: f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}))
                    continue
                if route == "process":
                    _bare_process_vm(bench, decode, op, model, src, local, dst_addrs[how], si, di,
                                     block, paths, skipped)
                if op == "transfer_cache_async":
                    _peers(bench, decode, route, model, src, dst_addrs[how], si, di, block, tpl,
                           paths, skipped, releases)
                times = bench.rounds(f"{label}: {route} {op}", paths)
                run.results.append(Result(
                    "cluster", case, block, moved, {k: path_of(v, moved) for k, v in times.items()},
                    skipped=skipped, verified=ok,
                    extra={"llmdist_path": p.path(), "pool": plan.pool, "pairs": s.pairs,
                           "tensors": nt}).finish())
    finally:
        for r in reversed(releases):
            r()


def _check_call(bench: Bench, decode, fn, op: str, model: int, local: Cache, si, di, want,
                tensors, pool: int, block: int) -> bool:
    """Run the call once and compare the bytes that arrived with the source's."""
    if op == "pull_blocks":
        bench.fill(local, start=1 << 40)        # anything but what the pull must bring
        fn()
        src_side = decode.call("digests", model, di, tensors)
        got = procs.block_digests([bench.read(local, t).reshape(pool, block) for t in tensors], si)
        return got == src_side and src_side == want
    decode.call("clear", model)
    fn()
    return decode.call("digests", model, di, tensors) == want


def _bare_process_vm(bench: Bench, decode, op: str, model: int, src: Cache, local: Cache,
                     remote_addrs, si, di, block: int, paths: dict, skipped: dict) -> None:
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
        ok = procs.block_digests([bench.read(local, t).reshape(-1, block) for t in tensors], si) == want
    else:
        decode.call("clear", model)
        bare()
        ok = decode.call("digests", model, di, tensors) == want
    if ok:
        paths[BARE_PROCESS_VM] = bare
    else:
        skipped[BARE_PROCESS_VM] = "its bytes did not arrive as llmdist's do (check failed)"


def _peers(bench: Bench, decode, route: str, model: int, src: Cache, dst_addrs, si, di,
           block: int, tpl: int, paths: dict, skipped: dict, releases: list) -> None:
    """The peers' own engines on the same blocks, when installed (and host memory)."""
    if route == "engine":
        why = mooncake_available()
        if why is None and not bench.host_memory:
            why = "the raw engine baseline runs on host memory only (TCP transport)"
        if why is None:
            try:
                session = decode.call("mooncake_init", model)
                raw = _RawMooncake(session, src, dst_addrs, si, di, block, tpl)
                decode.call("clear", model)
                raw()
                tensors = sorted({0, len(src.tensor_addrs) - 1})
                want = procs.block_digests([bench.read(src, t).reshape(-1, block) for t in tensors], si)
                if decode.call("digests", model, di, tensors) != want:
                    raise RuntimeError("the raw Mooncake writes left wrong bytes")
                paths[MOONCAKE_RAW] = raw
            except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        if why:
            skipped[MOONCAKE_RAW] = why
    if route == "process":
        why = nixl_available()
        if why is None:
            skipped[NIXL] = ("installed, but this command does not run the NIXL baseline "
                             "(it needs its own prefill process)")
        else:
            skipped[NIXL] = why
