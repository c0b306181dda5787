"""Summary of a host copy engine trace: run any program with LLMDIST_HOST_TRACE=FILE (the library
writes FILE when the process exits), then `python -m llmdist.bench.host_trace FILE`. It shows how
fast batches ran, how much of each team batch the helper threads took, how long the issuing thread
waited for them, and how soon a layer gate's waiter woke after the mark."""

from __future__ import annotations

import bisect
import statistics
import sys
from dataclasses import dataclass

BATCH, BATCH_SOLO, PART, COPY, GATE_MARK, GATE_WAKE = 1, 2, 3, 4, 5, 6
PROCESS_BATCH, PROCESS_BATCH_SOLO = 7, 8


@dataclass
class Record:
    kind: int
    t_start: int  # ns, CLOCK_MONOTONIC
    t_end: int
    nbytes: int
    arg: int
    tid: int


def read(path: str) -> list[Record]:
    """The records of a trace file, in start order."""
    out = []
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            k, t0, t1, n, arg, tid = line.split()
            out.append(Record(int(k), int(t0), int(t1), int(n), int(arg), int(tid)))
    out.sort(key=lambda r: r.t_start)
    return out


def _dist(values_s: list[float]) -> dict[str, float] | None:
    if not values_s:
        return None
    v = sorted(values_s)
    return {
        "n": len(v),
        "median_s": statistics.median(v),
        "p90_s": v[int(0.9 * (len(v) - 1))],
        "max_s": v[-1],
        "sum_s": sum(v),
    }


def _batch_figures(batches: list[Record], team_kind: int, parts: list[Record]) -> dict:
    """Figures of one family of batches (copies, or process_vm transfers); seconds."""
    team = [r for r in batches if r.kind == team_kind]
    res: dict = {
        "batches": len(batches),
        "team_batches": len(team),
        "batch_bytes": sum(r.nbytes for r in batches),
        "batch_s": _dist([(r.t_end - r.t_start) / 1e9 for r in batches]),
        "batch_gb_per_s": (
            sum(r.nbytes for r in batches) / max(sum(r.t_end - r.t_start for r in batches), 1)
        ),
    }
    # Team batches: the parts the issuing thread ran (its own tid) against all parts that ran
    # inside the batch's span (one team batch runs at a time); the time it waited after its last
    # part for the helpers'. A batch whose parts all ran on one thread got no second core.
    helper_share, waits, alone, helpers_alone = [], [], 0, 0
    part_starts = [p.t_start for p in parts]
    for b in team:
        lo, hi = (
            bisect.bisect_left(part_starts, b.t_start),
            bisect.bisect_right(part_starts, b.t_end),
        )
        inside = [p for p in parts[lo:hi] if p.t_end <= b.t_end]
        own = [p for p in inside if p.tid == b.tid]
        if inside:
            helper_share.append(1 - len(own) / len(inside))
        if own and len(own) == len(inside):
            alone += 1
        if inside and not own:
            helpers_alone += 1
        if own:
            waits.append((b.t_end - max(p.t_end for p in own)) / 1e9)
    res["team_batches_issuer_alone"] = alone
    res["team_batches_helpers_alone"] = helpers_alone
    res["helper_share_median"] = statistics.median(helper_share) if helper_share else None
    res["issuer_wait_s"] = _dist(waits)
    return res


def summarize(records: list[Record]) -> dict:
    """Figures per kind; durations in seconds. Batches of copies at the top level, process_vm
    batches under "process"."""
    parts = [r for r in records if r.kind == PART]
    copies = [r for r in records if r.kind == COPY]
    batches = [r for r in records if r.kind in (BATCH, BATCH_SOLO)]
    res = _batch_figures(batches, BATCH, parts)
    res["process"] = _batch_figures(
        [r for r in records if r.kind in (PROCESS_BATCH, PROCESS_BATCH_SOLO)], PROCESS_BATCH, parts
    )
    res["copies"] = len(copies)
    res["copy_bytes"] = sum(r.nbytes for r in copies)
    res["copy_s"] = _dist([(r.t_end - r.t_start) / 1e9 for r in copies])
    # Gate: for each wake whose wait began before the layer's mark, mark -> end of the wait.
    marks: dict[int, list[int]] = {}
    for r in records:
        if r.kind == GATE_MARK:
            marks.setdefault(r.arg, []).append(r.t_start)
    lat = []
    for r in records:
        if r.kind != GATE_WAKE:
            continue
        m = [t for t in marks.get(r.arg, []) if r.t_start <= t <= r.t_end]
        if m:
            lat.append((r.t_end - m[-1]) / 1e9)
    res["gate_marks"] = sum(len(v) for v in marks.values())
    res["gate_wake_after_mark_s"] = _dist(lat)
    # Batches that ran while a single copy ran (the event-gated overlap's stand-in for a layer's
    # compute) against the others.
    spans = sorted((c.t_start, c.t_end) for c in copies)
    starts = [a for a, _ in spans]
    longest = max((e - a for a, e in spans), default=0)

    def overlaps(r: Record) -> bool:
        i = bisect.bisect_left(starts, r.t_end)
        j = bisect.bisect_left(starts, r.t_start - longest)
        return any(spans[k][1] > r.t_start for k in range(j, i))

    res["batch_s_during_copies"] = _dist(
        [(r.t_end - r.t_start) / 1e9 for r in batches if overlaps(r)]
    )
    res["batch_s_otherwise"] = _dist(
        [(r.t_end - r.t_start) / 1e9 for r in batches if not overlaps(r)]
    )
    return res


def _fmt(d: dict[str, float] | None) -> str:
    if d is None:
        return "-"
    return (
        f"median {d['median_s'] * 1e3:.3f} ms, p90 {d['p90_s'] * 1e3:.3f} ms, "
        f"max {d['max_s'] * 1e3:.3f} ms, sum {d['sum_s'] * 1e3:.1f} ms (n={d['n']})"
    )


def _print_batches(title: str, f: dict) -> None:
    print(
        f"{title}: {f['batches']} ({f['team_batches']} on the team), "
        f"{f['batch_bytes'] / 1e6:.1f} MB at {f['batch_gb_per_s']:.2f} GB/s while running"
    )
    print(f"  duration: {_fmt(f['batch_s'])}")
    if f["team_batches"]:
        share = f["helper_share_median"]
        print(
            f"  team batches that one thread ran alone: {f['team_batches_issuer_alone']} the "
            f"issuing thread, {f['team_batches_helpers_alone']} the helpers, of "
            f"{f['team_batches']}; helpers' share of parts, median "
            + ("-" if share is None else f"{share:.2f}")
        )
        print(f"  issuing thread waiting for helpers after its parts: {_fmt(f['issuer_wait_s'])}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m llmdist.bench.host_trace TRACE_FILE", file=sys.stderr)
        return 2
    s = summarize(read(args[0]))
    _print_batches("batches", s)
    print(f"  while a single copy ran: {_fmt(s['batch_s_during_copies'])}")
    print(f"  otherwise: {_fmt(s['batch_s_otherwise'])}")
    if s["process"]["batches"]:
        _print_batches("process_vm batches", s["process"])
    print(f"single copies: {s['copies']}, {s['copy_bytes'] / 1e6:.1f} MB; {_fmt(s['copy_s'])}")
    print(
        f"gate marks: {s['gate_marks']}; a waiting worker woke after the mark: "
        f"{_fmt(s['gate_wake_after_mark_s'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
