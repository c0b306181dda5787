"""bench/gpu_check.py runs end to end on the fake CUDA runtime (tests/fake_cuda): every byte it
checks is right in both copy modes, and the figures of `python -m llmdist bench` it then runs
carry the copy kernel, its DMA variant, the event-gated prefill and device IPC, so the script a
GPU session runs cannot rot. The figures mean nothing here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .runtime_params import fake_cuda_env

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_gpu_check_runs_on_the_fake_cuda_runtime(fake_cuda, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMDIST_", "FAKE_CUDA_"))}
    env.update(
        LLMDIST_RUNTIME="cuda",
        **fake_cuda_env(fake_cuda),
        PYTHONPATH=os.pathsep.join([ROOT] + env.get("PYTHONPATH", "").split(os.pathsep)),
    )
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "gpu_check.py"),
            "b2b",
            "overlap",
            "cluster",
            "--blocks",
            "4K,16K",
            "--layers",
            "2",
            "--pairs",
            "4",
            "--repeat",
            "1",
            "--quiet",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WRONG" not in proc.stdout
    assert proc.stdout.count(" ok") == 8  # 4 cases x 2 copy modes
    assert "device copies by kernel:" in proc.stdout and "device copies by dma:" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["runtime"]["info"]["runtimes"]["cuda"]["device_copy"] == "kernel"
    b2b = [r for r in figures["results"] if r["scenario"] == "b2b"]
    assert [r["block_size"] for r in b2b] == [4096, 16384]
    for r in b2b:  # kernel and DMA both checked byte by byte, then timed
        assert r["verified"] is True
        assert {"llmdist", "llmdist, DMA copies", "per-block copy loop", "contiguous copy"} <= set(
            r["paths"]
        )
    cases = {r["case"] for r in figures["results"] if r["scenario"] == "overlap"}
    assert {
        "device copy, event-gated, 2 layers",
        "device copy, event-gated, DMA copies, 2 layers",
    } <= cases
    for r in figures["results"]:
        if r["scenario"] == "overlap":
            assert r["verified"] is True and r["extra"]["tail_in_layer_copies"] >= 0
    ipc = [
        r
        for r in figures["results"]
        if r["scenario"] == "cluster" and r["case"] == "mapped: transfer_cache_async"
    ]
    assert len(ipc) == 2 and all(r["verified"] is True for r in ipc)  # device IPC
