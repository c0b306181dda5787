"""The ``runtime`` parameter: the device-path suites run on every runtime in one pytest run.

A test module marked ``pytestmark = pytest.mark.all_runtimes`` gets every test once per runtime:
``host``, ``acl`` (tests/fake_acl), ``cuda-kernel`` and ``cuda-dma`` (tests/fake_cuda, device to
device copies by the copy kernel or by DMA). A process drives one runtime, and the tests and their
helpers learn it from the environment (LLMDIST_RUNTIME, LLMDIST_ACL_LIBRARY, ...), so the tests of
the runtime this process was started for run here and those of each other runtime run in one
pytest child per runtime with that runtime's environment; the child's reports are replayed here,
test by test, as if the tests had run in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import pytest
from pytest import TestReport

HERE = os.path.dirname(os.path.abspath(__file__))

RUNTIMES = ("host", "acl", "cuda-kernel", "cuda-dma")
MARK = "all_runtimes"

# Variables that choose the runtime; a child gets its runtime's values and none of the others.
RUNTIME_VARS = (
    "LLMDIST_RUNTIME",
    "LLMDIST_ACL_LIBRARY",
    "LLMDIST_CUDA_LIBRARY",
    "LLMDIST_CUDA_DRIVER_LIBRARY",
    "LLMDIST_DEVICE_COPY",
    "LLMDIST_EXPECT_CUDA_PATHS",
)
# A child's list of test ids to run, and the file it writes its reports to.
CHILD_IDS_VAR = "LLMDIST_TEST_CHILD_IDS"
CHILD_REPORTS_VAR = "LLMDIST_TEST_CHILD_REPORTS"
CHILD_TIMEOUT_S = 3600
SELECT_VAR = "LLMDIST_TEST_RUNTIMES"


def selected_runtimes() -> Tuple[str, ...]:
    """The runtimes the marked suites run on: all, or those LLMDIST_TEST_RUNTIMES names
    (comma-separated, e.g. "host" for a quick run or the sanitizer's)."""
    value = os.environ.get(SELECT_VAR, "").strip()
    if not value:
        return RUNTIMES
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown:
        raise pytest.UsageError(
            f"{SELECT_VAR} names unknown runtimes {unknown}; choose from {', '.join(RUNTIMES)}"
        )
    return names


def process_runtime() -> str:
    """The runtime id this process's environment selects."""
    name = os.environ.get("LLMDIST_RUNTIME", "")
    if name == "acl":
        return "acl"
    if name == "cuda":
        return "cuda-dma" if os.environ.get("LLMDIST_DEVICE_COPY") == "dma" else "cuda-kernel"
    return "host"


def item_runtime(item: pytest.Item) -> Optional[str]:
    """The runtime param of a test, None for a test not parametrized by runtime."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    return callspec.params.get("runtime")


# --------------------------------------------------------------------------------------------
# the fake vendor libraries
# --------------------------------------------------------------------------------------------
def build_fake_runtime(name: str, out_dir, **env: str) -> str:
    """Build tests/<name>/build.sh into out_dir (env: e.g. FAKE_ACL_CFLAGS); the library's
    path."""
    res = subprocess.run(
        ["sh", os.path.join(HERE, name, "build.sh"), str(out_dir)],
        check=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, **env),
    )
    return res.stdout.strip().splitlines()[-1]


def compiler_missing() -> Optional[str]:
    """Why the fake libraries cannot be built here, or None."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return f"no C compiler ({cc}) to build the fake vendor libraries"
    return None


def fake_cuda_env(fake_cuda: str) -> Dict[str, str]:
    """The variables that load the fake CUDA runtime (libcudart) and its fake driver library
    (libcuda.so.1 beside it, which measures device IPC mappings)."""
    return {
        "LLMDIST_CUDA_LIBRARY": fake_cuda,
        "LLMDIST_CUDA_DRIVER_LIBRARY": os.path.join(os.path.dirname(fake_cuda), "libcuda.so.1"),
    }


def runtime_env(runtime: str, libs: Dict[str, str]) -> Dict[str, str]:
    """The environment of a child that runs the tests of ``runtime``."""
    env = {k: v for k, v in os.environ.items() if k not in RUNTIME_VARS}
    if runtime == "host":
        env["LLMDIST_RUNTIME"] = "host"
    elif runtime == "acl":
        env.update(LLMDIST_RUNTIME="acl", LLMDIST_ACL_LIBRARY=libs["fake_acl"])
    else:
        env.update(fake_cuda_env(libs["fake_cuda"]))
        env.update(LLMDIST_RUNTIME="cuda", LLMDIST_DEVICE_COPY=runtime.split("-", 1)[1])
    return env


# --------------------------------------------------------------------------------------------
# hooks (tests/conftest.py imports them)
# --------------------------------------------------------------------------------------------
DELEGATE = pytest.StashKey["Delegate"]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARK}: run every test of the module on each of {', '.join(RUNTIMES)}"
    )
    config.stash[DELEGATE] = Delegate(config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker(MARK) is not None:
        metafunc.parametrize("runtime", selected_runtimes(), indirect=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: List[pytest.Item]
):
    yield  # after -k / -m selection: `items` is what runs
    config.stash[DELEGATE].plan(items)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem) -> Optional[bool]:
    return item.config.stash[DELEGATE].replay(item)


def pytest_runtest_logreport(report: TestReport) -> None:
    path = os.environ.get(CHILD_REPORTS_VAR)
    if path and DELEGATE_CONFIG:
        config = DELEGATE_CONFIG[0]
        data = config.hook.pytest_report_to_serializable(config=config, report=report)
        with open(path, "a") as f:
            f.write(json.dumps(data) + "\n")


DELEGATE_CONFIG: List[pytest.Config] = []  # the config of this process's run


class Delegate:
    """Runs the tests of other runtimes in children and replays their reports."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        DELEGATE_CONFIG[:] = [config]
        self.own = process_runtime()
        self.child = os.environ.get(CHILD_IDS_VAR)
        self.pending: Dict[str, List[pytest.Item]] = {}  # runtime -> items still to run
        self.reports: Dict[str, List[TestReport]] = {}  # nodeid -> the child's reports
        self.child_log: Dict[str, str] = {}  # runtime -> end of its child's output
        self.libs: Dict[str, str] = {}

    def plan(self, items: List[pytest.Item]) -> None:
        """In a child: keep only the tests it was given. Else: the tests of other runtimes go
        last, grouped by runtime, so each runtime's child runs once."""
        if self.child:
            with open(self.child) as f:
                wanted = set(f.read().split("\n"))
            keep = [i for i in items if i.nodeid in wanted]
            wrong = [i.nodeid for i in keep if item_runtime(i) not in (None, self.own)]
            if wrong:
                raise pytest.UsageError(f"a child for {self.own} was given {wrong[0]}")
            items[:] = keep
            return
        mine = [i for i in items if item_runtime(i) in (None, self.own)]
        others: List[pytest.Item] = []
        for rt in RUNTIMES:
            group = [i for i in items if item_runtime(i) == rt and rt != self.own]
            if group:
                self.pending[rt] = group
                others.extend(group)
        items[:] = mine + others

    def replay(self, item: pytest.Item) -> Optional[bool]:
        """Report a test of another runtime from its child's reports (running the child at
        the first such test); None for a test that runs in this process."""
        rt = item_runtime(item)
        if self.child or rt is None or rt == self.own:
            return None
        if rt in self.pending:
            self.run_child(rt, self.pending.pop(rt))
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports = self.reports.pop(item.nodeid, None)
        if reports is None:
            why = self.child_log.get(rt, "")
            reports = [
                TestReport(
                    item.nodeid,
                    item.location,
                    {},
                    "failed",
                    f"the {rt} child reported nothing for this test; its output ends:\n{why}",
                    "call",
                    [],
                )
            ]
        for rep in reports:
            ihook.pytest_runtest_logreport(report=rep)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def fake_libs(self) -> Dict[str, str]:
        """The fake vendor libraries, built once per run."""
        if not self.libs:
            out = tempfile.mkdtemp(prefix="llmdist-fakes-")
            self.config.add_cleanup(lambda: shutil.rmtree(out, ignore_errors=True))
            self.libs = {
                name: build_fake_runtime(name, os.path.join(out, name))
                for name in ("fake_acl", "fake_cuda")
            }
        return self.libs

    def run_child(self, rt: str, items: List[pytest.Item]) -> None:
        """One pytest child runs ``items`` with the environment of runtime ``rt``."""
        missing = compiler_missing() if rt != "host" else None
        if missing:
            for i in items:
                self.reports[i.nodeid] = [
                    TestReport(
                        i.nodeid,
                        i.location,
                        {},
                        "skipped",
                        (str(i.path), i.location[1] or 0, f"Skipped: {missing}"),
                        "setup",
                        [],
                    )
                ]
            return
        tmp = tempfile.mkdtemp(prefix=f"llmdist-{rt}-")
        ids, reports, log = (os.path.join(tmp, n) for n in ("ids", "reports", "log"))
        with open(ids, "w") as f:
            f.write("\n".join(i.nodeid for i in items))
        env = runtime_env(rt, self.fake_libs() if rt != "host" else {})
        env[CHILD_IDS_VAR] = ids
        env[CHILD_REPORTS_VAR] = reports
        if rt.startswith("cuda") and self.whole_transfer_suite(items):
            env["LLMDIST_EXPECT_CUDA_PATHS"] = "1"
        files = sorted({str(i.path) for i in items})
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(self.config.rootpath),
            *files,
        ]
        try:
            with open(log, "w") as out:
                rc = subprocess.run(
                    cmd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=str(self.config.rootpath),
                    timeout=CHILD_TIMEOUT_S,
                ).returncode
        except subprocess.TimeoutExpired:
            rc = "a timeout"
        with open(log) as f:
            self.child_log[rt] = f"(exit status {rc})\n" + f.read()[-4000:]
        if os.path.exists(reports):
            with open(reports) as f:
                for line in f:
                    rep = self.config.hook.pytest_report_from_serializable(
                        config=self.config, data=json.loads(line)
                    )
                    if isinstance(rep.longrepr, list):  # a skip's (file, line, reason)
                        rep.longrepr = tuple(rep.longrepr)
                    self.reports.setdefault(rep.nodeid, []).append(rep)
        shutil.rmtree(tmp, ignore_errors=True)

    def whole_transfer_suite(self, items: List[pytest.Item]) -> bool:
        """Whether items hold the whole transfer suite (test_transfer.py, with no -k, -m or test
        ids): a runtime's run of it has to drive every device copy path."""
        opt = self.config.option
        if opt.keyword or opt.markexpr or any("::" in a for a in self.config.args):
            return False
        return any(i.path.name == "test_transfer.py" for i in items)
