"""The cases of one block size in the two-process scenario (.cluster): every (route, call) with
its baselines in the same rounds (contiguous and per-block copies here, the bare syscalls of the
process route, the peers' own engines) and its keyed row; each call's bytes are checked before
it is timed."""

from __future__ import annotations

from typing import Dict, List, Optional

from ..descs import Cache
from . import keyed, procs
from .cluster_setup import OPS, ROUTES, Clusters, prefill_calls
from .nixl_baseline import NIXL
from .peers import mooncake_available, nixl_available
from .results import SUBJECT, Result, Run, path_of
from .workload import CONTIGUOUS, PER_BLOCK, Bench

MOONCAKE_RAW = "mooncake engine (raw)"
KEYED = "llmdist, keyed"  # measured with the unkeyed call, reported in its own row
BARE_PROCESS_VM = "process_vm bare, 2 threads"


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
            prefill_calls(bench, p, model, self.si, self.di)
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
            fn = prefill_calls(self.bench, pk, model, self.si, self.di)["transfer_cache_async"]
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
