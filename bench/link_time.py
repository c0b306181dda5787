"""How long rank-table link() takes to reach OK, with every member in its own process on this
host: python bench/link_time.py [--members 2 4] [--rounds 20].

Each round, the members pass a barrier, call link() with a fresh comm name and poll
query_register_mem_status every millisecond; a round's time is the slowest member's time from
its link() call to OK. The members then unlink. Prints the median and the spread over rounds.
The rendezvous uses a free port range (llmdist.rendezvous_slots=1), like the tests."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))


def member(cluster_id, ids, base, rounds, barrier, out):
    sys.path.insert(0, os.path.join(HERE, ".."))
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from rendezvous import one_server_table, rendezvous_options

    from llmdist import LLMDataDist, LLMRole, RegisterMemStatus

    dd = LLMDataDist(LLMRole.PROMPT if cluster_id == ids[0] else LLMRole.DECODER, cluster_id)
    dd.init({"llm.EnableCacheManager": "1", **rendezvous_options(base, 30)})
    table = one_server_table(len(ids))
    info = {c: r for r, c in enumerate(ids)}
    times = []
    for r in range(rounds):
        barrier.wait(60)
        t0 = time.perf_counter()
        comm = dd.link(f"bench-{r}", info, table)
        while dd.query_register_mem_status(comm) != RegisterMemStatus.OK:
            if dd.query_register_mem_status(comm) == RegisterMemStatus.FAILED:
                raise RuntimeError("link FAILED")
            time.sleep(0.001)
        times.append(time.perf_counter() - t0)
        barrier.wait(60)
        dd.unlink(comm)
        # wait until the other members are unlinked too before the next round
        deadline = time.monotonic() + 10
        while any(dd.peer_info(c) is not None for c in ids if c != cluster_id):
            if time.monotonic() > deadline:
                raise RuntimeError("unlink did not finish")
            time.sleep(0.001)
    dd.finalize()
    out.put((cluster_id, times))


def measure(n: int, rounds: int):
    from rendezvous import free_rendezvous_base

    ctx = mp.get_context("spawn")
    ids = [1000 + i for i in range(n)]
    barrier = ctx.Barrier(n)
    out = ctx.Queue()
    base = free_rendezvous_base()
    procs = [ctx.Process(target=member, args=(c, ids, base, rounds, barrier, out)) for c in ids]
    for p in procs:
        p.start()
    per = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(30)
    slowest = [max(per[c][r] for c in ids) * 1000 for r in range(rounds)]
    return slowest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    for n in args.members:
        ms = measure(n, args.rounds)
        q = statistics.quantiles(ms, n=10)
        print(
            f"{n} members: link() to OK median {statistics.median(ms):.1f} ms, "
            f"p10 {q[0]:.1f} ms, p90 {q[-1]:.1f} ms, max {max(ms):.1f} ms "
            f"({args.rounds} rounds, slowest member per round)"
        )


if __name__ == "__main__":
    main()
