"""What the shared key (``llmdist.auth_key``) costs in the cluster scenario: link time and
transfer bandwidth of keyed pairs of clusters against unkeyed ones, in the same rounds.

A keyed row's subject is llmdist with the key; its one baseline is the same measure without the
key, so its ratio (unkeyed time / keyed time) is the keyed bandwidth over the unkeyed one. Both
are timed next to each other in alternating order (keyed first in even rounds, unkeyed first in
odd ones), so that a shared machine's drift hits both alike; besides the ratio of the medians,
each row gives the median of the per-round comparisons, which slow drift does not reach."""

from __future__ import annotations

import secrets
import socket
import statistics
import threading
import time
from typing import Callable

from .results import SUBJECT, Result, path_of
from .settings import size_name

UNKEYED = "llmdist, no key"
MIN_LINK_ROUNDS = 10
FRAMES_PER_ROUND = 2000
FRAME_CASE = "control frame (cache_add, 64 tensors), keyed"


def new_key() -> str:
    """A fresh key for one run (the clusters of the run share it)."""
    return secrets.token_hex(16)


def link_rounds(
    keyed_link: Callable[[], float], unkeyed_link: Callable[[], float], rounds: int
) -> dict[str, list[float]]:
    """One untimed link of each, then `rounds` rounds of both in alternating order; each
    callable relinks its pair and returns the seconds link_clusters took."""
    keyed_link()
    unkeyed_link()
    times: dict[str, list[float]] = {SUBJECT: [], UNKEYED: []}
    order = [(SUBJECT, keyed_link), (UNKEYED, unkeyed_link)]
    for i in range(rounds):
        for name, fn in order if i % 2 == 0 else order[::-1]:
            times[name].append(fn())
    return times


def link_result(case: str, times: dict[str, list[float]], extra: dict) -> Result:
    """The row of link times: keyed (subject) and unkeyed, and their difference in ms."""
    keyed, plain = (statistics.median(times[k]) for k in (SUBJECT, UNKEYED))
    diff_ms = (keyed - plain) * 1e3
    paired_ms = statistics.median(k - u for k, u in zip(times[SUBJECT], times[UNKEYED])) * 1e3
    return Result(
        "cluster",
        case,
        None,
        0,
        {k: path_of(v) for k, v in times.items()},
        extra={
            **extra,
            "keyed_minus_unkeyed_ms": diff_ms,
            "keyed_minus_unkeyed_ms_per_round": paired_ms,
            "summary": f"link time keyed - unkeyed: {diff_ms:+.2f} ms (medians of "
            f"{len(times[SUBJECT])} alternating rounds each; per round: "
            f"{paired_ms:+.2f} ms)",
        },
    ).finish()


def transfer_result(
    case: str,
    block: int,
    moved: int,
    keyed: list[float],
    plain: list[float],
    verified: bool,
    extra: dict,
) -> Result:
    """The row of one call's keyed and unkeyed times from the same rounds; the ratio is the
    keyed bandwidth over the unkeyed one."""
    r = Result(
        "cluster",
        case,
        block,
        moved,
        {SUBJECT: path_of(keyed, moved), UNKEYED: path_of(plain, moved)},
        verified=verified,
        extra=dict(extra),
    ).finish()
    ratio = r.ratios[UNKEYED]
    paired = statistics.median(u / k for k, u in zip(keyed, plain))
    r.extra["keyed_over_unkeyed_bandwidth"] = ratio
    r.extra["keyed_over_unkeyed_bandwidth_per_round"] = paired
    r.extra["summary"] = (
        f"bandwidth keyed / unkeyed at {size_name(block)}: {ratio:.3f}x (per round: {paired:.3f}x)"
    )
    return r


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _frame_seconds(keyed: bool, frames: int) -> float:
    """Seconds per control frame: a cache announcement of 64 tensors sent on one end of a
    socket pair and received on the other (by a thread), with or without the MACs of a keyed
    link."""
    from .. import auth

    msg = {
        "type": "cache_add",
        "seq": 1,
        "cache": {
            "id": 1,
            "num_tensors": 64,
            "shape": [256, 8192],
            "keys": [["blocks", 1, 0]],
            "addrs": list(range(1 << 40, (1 << 40) + 64 * 4096, 4096)),
        },
    }
    a, b = socket.socketpair()
    try:
        out, into = auth.Channel(a), auth.Channel(b)
        if keyed:
            k = secrets.token_bytes(32)
            out.out.set(k)
            into.into.set(k)
        reader = threading.Thread(target=lambda: [into.recv() for _ in range(frames)])
        reader.start()
        t0 = time.perf_counter()
        for _ in range(frames):
            out.send(msg)
        reader.join()
        return (time.perf_counter() - t0) / frames
    finally:
        a.close()
        b.close()


def frame_result(rounds: int, frames: int = FRAMES_PER_ROUND) -> Result:
    """The row of one control frame's cost, keyed against unkeyed, in alternating rounds: what
    the key adds to every frame of a link (its handshake, its announcements)."""
    times = link_rounds(
        lambda: _frame_seconds(True, frames), lambda: _frame_seconds(False, frames), rounds
    )
    keyed, plain = (statistics.median(times[k]) for k in (SUBJECT, UNKEYED))
    diff_us = (keyed - plain) * 1e6
    return Result(
        "cluster",
        FRAME_CASE,
        None,
        0,
        {k: path_of(v) for k, v in times.items()},
        extra={
            "rounds": rounds,
            "frames_per_round": frames,
            "keyed_minus_unkeyed_us": diff_us,
            "summary": f"control frame keyed - unkeyed: {diff_us:+.1f} us (send and "
            f"receive; medians of {rounds} alternating rounds of "
            f"{frames} frames)",
        },
    ).finish()
