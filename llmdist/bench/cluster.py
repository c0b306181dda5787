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
measured in the same rounds as the unkeyed ones (rows "..., keyed", see .keyed).

The clusters are made in .cluster_setup, the cases of one block size run in .cluster_cases."""

from __future__ import annotations

from typing import Callable, List

from ..descs import Placement
from . import keyed, procs
from .cluster_cases import CaseSet
from .cluster_setup import ROUTES, Clusters
from .peers import nixl_available
from .results import SUBJECT, Result, Run
from .settings import Need, size_name
from .workload import Bench, block_pairs


def cluster_steps(bench: Bench) -> int:
    return len(bench.settings.blocks)


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
