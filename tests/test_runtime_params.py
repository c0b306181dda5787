"""The runtime parameter (runtime_params.py): a test of a module marked all_runtimes runs on each
runtime it names, on that runtime, and what its child run reports is what this run reports:
a failure on one runtime fails that test id alone, a skip stays a skip with its reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import llmdist

from .helpers import HERE, ROOT
from .runtime_params import compiler_missing

PROBE = textwrap.dedent("""
    import pytest

    pytestmark = pytest.mark.all_runtimes


    def test_runs_on_its_runtime(runtime, env):
        name = {"host": "host", "acl": "acl", "cuda-kernel": "cuda", "cuda-dma": "cuda"}[runtime]
        assert env.dd.runtime.name == name
        if runtime.startswith("cuda"):
            assert env.dd.runtime.device_copy == runtime.split("-")[1]


    def test_fails_on_acl_only(runtime):
        assert runtime != "acl", "the acl child's own failure"


    def test_skips_with_its_reason(runtime):
        pytest.skip(f"reason given on {runtime}")
""")


@pytest.fixture(scope="module")
def probe_tree(tmp_path_factory):
    """A copy of the test package with a probe module, run by a pytest of its own."""
    if compiler_missing():
        pytest.skip(compiler_missing())
    root = tmp_path_factory.mktemp("probe")
    shutil.copytree(HERE, root / "tests", ignore=shutil.ignore_patterns("__pycache__", "test_*.py"))
    shutil.copytree(os.path.join(ROOT, "include"), root / "include")
    (root / "tests" / "test_probe.py").write_text(PROBE)
    return root


def run_probe(root, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LLMDIST_")}
    # the llmdist these tests import (a checkout or an installed one)
    full["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(llmdist.__file__)))]
        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    full.update(env)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-v",
            "-p",
            "no:cacheprovider",
            "-rs",
            "tests/test_probe.py",
        ],
        cwd=root,
        env=full,
        capture_output=True,
        text=True,
        timeout=600,
    )


def outcomes(res: subprocess.CompletedProcess) -> dict:
    """test id -> PASSED / FAILED / SKIPPED, from pytest -v."""
    out = {}
    for line in res.stdout.splitlines():
        if "test_probe.py::" in line and " " in line:
            test, word = line.split(" ")[:2]
            out[test.split("::", 1)[1]] = word
    return out


def test_every_runtime_runs_and_reports_its_own_outcome(probe_tree):
    res = run_probe(probe_tree)
    got = outcomes(res)
    want = {}
    for rt in ("host", "acl", "cuda-kernel", "cuda-dma"):
        want[f"test_runs_on_its_runtime[{rt}]"] = "PASSED"
        want[f"test_fails_on_acl_only[{rt}]"] = "FAILED" if rt == "acl" else "PASSED"
        want[f"test_skips_with_its_reason[{rt}]"] = "SKIPPED"
    assert got == want, res.stdout[-3000:] + res.stderr[-2000:]
    assert res.returncode == 1
    assert "the acl child's own failure" in res.stdout
    for rt in ("host", "acl", "cuda-kernel", "cuda-dma"):
        assert f"reason given on {rt}" in res.stdout, res.stdout[-3000:]


def test_a_selection_of_runtimes(probe_tree):
    res = run_probe(probe_tree, LLMDIST_TEST_RUNTIMES="host,cuda-dma")
    assert set(outcomes(res)) == {
        f"{t}[{rt}]"
        for rt in ("host", "cuda-dma")
        for t in (
            "test_runs_on_its_runtime",
            "test_fails_on_acl_only",
            "test_skips_with_its_reason",
        )
    }
    assert res.returncode == 0, res.stdout[-3000:]


def test_an_unknown_runtime_is_a_usage_error(probe_tree):
    res = run_probe(probe_tree, LLMDIST_TEST_RUNTIMES="host,npu")
    assert res.returncode != 0
    assert "LLMDIST_TEST_RUNTIMES names unknown runtimes ['npu']" in res.stdout + res.stderr
