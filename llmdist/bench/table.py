"""Terminal output of a benchmark run: the progress line while it runs, the result table, and
the table of `--compare`."""

from __future__ import annotations

import sys
import time
from typing import Dict, List, Optional, TextIO

from .results import SUBJECT, Path, Result
from .settings import size_name

SCENARIO_TITLES = {
    "b2b": "B2B: random blocks into random blocks, every layer ready at once",
    "c2b": "C2B: one row cut into random destination blocks",
    "c2c": "C2C: one row of each tensor into a row",
    "swap": "swap: blocks between device and host memory",
    "overlap": "overlap: tail after the last layer, in units of one layer's copy",
    "overhead": (
        "call overhead: time for transfer_cache_async to return its task; pull_blocks against "
        "its copies; cost per block pair"
    ),
    "cluster": "two processes on one host (and Mooncake): every route",
}


class Progress:
    """One line on stderr saying where a run is; redrawn in place on a terminal, one line per
    step otherwise (a log stays readable)."""

    def __init__(self, stream: Optional[TextIO] = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total = 0
        self.done = 0
        self.t0 = time.perf_counter()
        self._width = 0

    def plan(self, steps: int) -> None:
        self.total += steps

    def step(self, text: str) -> None:
        """Start the next step."""
        self.done += 1
        self.show(text, force=True)

    def show(self, text: str, force: bool = False) -> None:
        """Where the current step is; off a terminal only the start of each step is written."""
        if not self.enabled or not (self.tty or force):
            return
        line = f"[{self.done}/{max(self.total, self.done)} {time.perf_counter() - self.t0:6.1f}s] {text}"
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_path(p: Path) -> str:
    return f"{p.gbps:.2f} GB/s" if p.gbps is not None else fmt_time(p.seconds)


def _cells(r: Result, names: List[str]) -> List[str]:
    me = r.paths.get(SUBJECT)
    out = [
        r.case,
        size_name(r.block_size) if r.block_size else "-",
        fmt_path(me) if me else ("n/a" if SUBJECT in r.skipped else "-"),
    ]
    for n in names:
        if n in r.paths:
            out.append(f"{fmt_path(r.paths[n])} ({r.ratios.get(n, 0):.2f}x)")
        elif n in r.skipped:
            out.append("n/a")
        else:
            out.append("")
    return out


def render(results: List[Result], notes: List[str]) -> str:
    """The table: one section per scenario, a column per path; each baseline cell carries the
    ratio baseline time / llmdist time. Then what was skipped and the notes."""
    lines: List[str] = []
    skipped: Dict[str, None] = {}
    for scenario in dict.fromkeys(r.scenario for r in results):
        rows = [r for r in results if r.scenario == scenario]
        names = list(
            dict.fromkeys(
                n for r in rows for n in list(r.paths) + list(r.skipped) if n != SUBJECT and r.paths
            )
        )
        head = ["case", "block", SUBJECT] + names
        body = [_cells(r, names) for r in rows]
        widths = [max(len(c[i]) for c in [head] + body) for i in range(len(head))]
        lines.append("")
        lines.append(SCENARIO_TITLES.get(scenario, scenario))
        for i, cells in enumerate([head] + body):
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
            if i == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        for r in rows:
            if r.verified is False:
                lines.append(f"  ! {r.case}: WRONG BYTES at the destination")
            for k, v in r.extra.items():
                if k == "summary":
                    lines.append(f"  {r.case}: {v}")
            for n, why in r.skipped.items():
                skipped[f"{r.case if n == SUBJECT else n}: {why}"] = None
    lines.append("")
    lines.append(
        "ratios: baseline time / llmdist time in the same rounds (above 1: llmdist is "
        "faster); bandwidths in decimal GB/s, medians"
    )
    if skipped:
        lines.append("not measured:")
        lines.extend(f"  - {s}" for s in skipped)
    if notes:
        lines.append("notes:")
        lines.extend(f"  - {n}" for n in notes)
    return "\n".join(lines) + "\n"


def render_compare(rows: List[dict], old_name: str, new_name: str) -> str:
    """The change between two runs, per case and path: old, new, and the speed change."""
    head = ["scenario", "case", "block", "path", "old", "new", "change"]
    body = []
    for r in rows:

        def cell(s, g):
            if s is None:
                return "-"
            return f"{g:.2f} GB/s" if g is not None else fmt_time(s)

        ch = r["speed_change"]
        body.append(
            [
                r["scenario"],
                r["case"],
                size_name(r["block_size"]) if r["block_size"] else "-",
                r["path"],
                cell(r["old_seconds"], r["old_gbps"]),
                cell(r["new_seconds"], r["new_gbps"]),
                "-" if ch is None else f"{(ch - 1) * 100:+.1f}%",
            ]
        )
    widths = [max(len(c[i]) for c in [head] + body) for i in range(len(head))]
    out = [
        f"old: {old_name}",
        f"new: {new_name}",
        "change: speed of new vs old (+: faster now)",
        "",
    ]
    for i, cells in enumerate([head] + body):
        out.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"
