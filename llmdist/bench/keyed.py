"""What the shared key (``llmdist.auth_key``) costs in the cluster scenario: link time and
transfer bandwidth of keyed pairs of clusters against unkeyed ones, in the same rounds.

A keyed row's subject is llmdist with the key; its one baseline is the same measure without the
key, so its ratio (unkeyed time / keyed time) is the keyed bandwidth over the unkeyed one. Both
are timed next to each other in alternating order (keyed first in even rounds, unkeyed first in
odd ones), so that a shared machine's drift hits both alike; besides the ratio of the medians,
each row gives the median of the per-round comparisons, which slow drift does not reach."""

from __future__ import annotations

import secrets
import statistics
import time
from typing import Callable

from .results import SUBJECT, Result, path_of
from .settings import size_name

UNKEYED = "llmdist, no key"
MIN_LINK_ROUNDS = 10


def new_key() -> str:
    """A fresh key for one run (the clusters of the run share it)."""
    return secrets.token_hex(16)


def link_rounds(keyed_link: Callable[[], float], unkeyed_link: Callable[[], float],
                rounds: int) -> dict[str, list[float]]:
    """One untimed link of each, then `rounds` rounds of both in alternating order; each
    callable relinks its pair and returns the seconds link_clusters took."""
    keyed_link()
    unkeyed_link()
    times: dict[str, list[float]] = {SUBJECT: [], UNKEYED: []}
    order = [(SUBJECT, keyed_link), (UNKEYED, unkeyed_link)]
    for i in range(rounds):
        for name, fn in (order if i % 2 == 0 else order[::-1]):
            times[name].append(fn())
    return times


def link_result(case: str, times: dict[str, list[float]], extra: dict) -> Result:
    """The row of link times: keyed (subject) and unkeyed, and their difference in ms."""
    keyed, plain = (statistics.median(times[k]) for k in (SUBJECT, UNKEYED))
    diff_ms = (keyed - plain) * 1e3
    paired_ms = statistics.median(k - u for k, u in zip(times[SUBJECT], times[UNKEYED])) * 1e3
    return Result("cluster", case, None, 0, {k: path_of(v) for k, v in times.items()},
                  extra={**extra, "keyed_minus_unkeyed_ms": diff_ms,
                         "keyed_minus_unkeyed_ms_per_round": paired_ms,
                         "summary": f"link time keyed - unkeyed: {diff_ms:+.2f} ms (medians of "
                                    f"{len(times[SUBJECT])} alternating rounds each; per round: "
                                    f"{paired_ms:+.2f} ms)"}).finish()


def transfer_result(case: str, block: int, moved: int, keyed: list[float], plain: list[float],
                    verified: bool, extra: dict) -> Result:
    """The row of one call's keyed and unkeyed times from the same rounds; the ratio is the
    keyed bandwidth over the unkeyed one."""
    r = Result("cluster", case, block, moved,
               {SUBJECT: path_of(keyed, moved), UNKEYED: path_of(plain, moved)},
               verified=verified, extra=dict(extra)).finish()
    ratio = r.ratios[UNKEYED]
    paired = statistics.median(u / k for k, u in zip(keyed, plain))
    r.extra["keyed_over_unkeyed_bandwidth"] = ratio
    r.extra["keyed_over_unkeyed_bandwidth_per_round"] = paired
    r.extra["summary"] = (f"bandwidth keyed / unkeyed at {size_name(block)}: {ratio:.3f}x "
                          f"(per round: {paired:.3f}x)")
    return r


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
