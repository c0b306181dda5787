"""Fixtures, options and the summary table of the llmdist benchmarks (pytest-benchmark).

Run with ``python -m pytest bench -q --benchmark-only``. Every benchmark times llmdist and its
baseline in the same process and run, stores both and their ratio in ``benchmark.extra_info``,
and adds a row to the table printed at the end of the session. Nothing here asserts on a time:
targets are reported, never enforced.

Options (all optional):
  --llmdist-mem-gib G       budget for source + destination caches of one workload (default 8)
  --llmdist-sizes LIST      block sizes of the B2B benchmarks a/b, e.g. "4K,64K" (default: all)
  --llmdist-rounds-scale X  multiply the number of timed rounds (default 1.0)

The helpers live in test_bench_transfer.py, not here: in a run that collects tests/ and bench/
together only one module can be named ``conftest``, so nothing imports this one by name.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass, field

import pytest

import llmdist
from llmdist import LLMConfig, LLMDataDist, LLMRole

CLUSTER_ID = 7
DEFAULT_SIZES = "4K,16K,64K,256K,1M"
_HERE = pathlib.Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------
# Options


def pytest_addoption(parser):
    group = parser.getgroup("llmdist", "llmdist benchmarks")
    group.addoption(
        "--llmdist-mem-gib",
        type=float,
        default=8.0,
        help="memory budget (GiB) for source + destination caches of one workload",
    )
    group.addoption(
        "--llmdist-sizes",
        default=DEFAULT_SIZES,
        help="comma-separated block sizes of the B2B benchmarks (default: %(default)s)",
    )
    group.addoption(
        "--llmdist-rounds-scale",
        type=float,
        default=1.0,
        help="multiply the number of timed rounds of every benchmark",
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """Benchmarks that need no 32-layer B2B workload first, then the others grouped by block
    size (ascending), so that each multi-GiB workload is built once and freed before the next.
    Items outside bench/ keep their place."""
    mine = [
        i for i, it in enumerate(items) if _HERE in pathlib.Path(str(it.path)).resolve().parents
    ]

    def key(item):
        cs = getattr(item, "callspec", None)
        size = cs.params.get("block_size") if cs is not None else None
        return (0, 0) if size is None else (1, size)

    ordered = sorted((items[i] for i in mine), key=key)  # stable: file order inside a group
    for i, it in zip(mine, ordered):
        items[i] = it


@pytest.fixture(scope="session")
def mem_budget(pytestconfig) -> int:
    return int(pytestconfig.getoption("--llmdist-mem-gib") * (1 << 30))


@pytest.fixture(scope="session")
def rounds_scale(pytestconfig) -> float:
    return pytestconfig.getoption("--llmdist-rounds-scale")


# ------------------------------------------------------------------------------------------
# The engine


@pytest.fixture(scope="session")
def datadist():
    dd = LLMDataDist(LLMRole.PROMPT, CLUSTER_ID)
    cfg = LLMConfig()
    cfg.device_id = 0
    cfg.enable_cache_manager = True
    dd.init(cfg.generate_options())
    yield dd
    dd.finalize()


@pytest.fixture(scope="session")
def cache_manager(datadist):
    return datadist.cache_manager


@pytest.fixture
def default_tuning():
    """The host copy engine's knobs as they were; restored after the test."""
    saved = dict(llmdist.host_tuning())
    yield saved
    llmdist.set_host_tuning(**saved)


# ------------------------------------------------------------------------------------------
# The result table printed at the end


@dataclass
class Row:
    section: str
    case: str
    llmdist: str
    baseline: str
    ratio: str
    target: str
    note: str = ""


@dataclass
class Report:
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def add(self, section, case, llmdist, baseline, ratio, target="", note=""):
        self.rows.append(Row(section, case, llmdist, baseline, ratio, target, note))

    def note(self, text):
        if text and text not in self.notes:
            self.notes.append(text)


REPORT = Report()


def pytest_sessionstart(session):
    REPORT.load_start = os.getloadavg()


@pytest.fixture(scope="session")
def report() -> Report:
    return REPORT


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not REPORT.rows and not REPORT.notes:
        return
    tr = terminalreporter
    tr.write_sep("=", "llmdist benchmark summary (medians; ratios against the same-run baseline)")
    headers = ("case", "llmdist", "baseline", "ratio", "target", "note")
    for sec in sorted({r.section for r in REPORT.rows}):
        rows = [r for r in REPORT.rows if r.section == sec]
        cells = [headers] + [
            (r.case, r.llmdist, r.baseline, r.ratio, r.target, r.note) for r in rows
        ]
        widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
        tr.write_line("")
        tr.write_line(sec)
        for i, c in enumerate(cells):
            tr.write_line("  " + "  ".join(s.ljust(w) for s, w in zip(c, widths)).rstrip())
            if i == 0:
                tr.write_line("  " + "  ".join("-" * w for w in widths))
    load_start = getattr(REPORT, "load_start", None)
    if load_start is not None:
        REPORT.note(
            f"load average (1/5/15 min) {'/'.join(f'{x:.2f}' for x in load_start)} at start, "
            f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())} at end, on {os.cpu_count()} "
            f"CPUs: other processes share the cores and memory bandwidth, so compare only "
            f"numbers of one run"
        )
    if REPORT.notes:
        tr.write_line("")
        tr.write_line("scaling / notes:")
        for n in REPORT.notes:
            tr.write_line("  - " + n)
    tr.write_line("")
