"""bench/gpu_check.py runs end to end on the fake CUDA runtime (tests/fake_cuda): every byte it
checks is right, and the table and the JSON file carry every section, so the script a GPU
session runs cannot rot. The figures mean nothing here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_gpu_check_runs_on_the_fake_cuda_runtime(fake_cuda, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMDIST_", "FAKE_CUDA_"))}
    env.update(LLMDIST_RUNTIME="cuda", LLMDIST_CUDA_LIBRARY=fake_cuda,
               PYTHONPATH=os.pathsep.join([ROOT] + env.get("PYTHONPATH", "").split(os.pathsep)))
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--reps", "1",
         "--layers", "2", "--pool", "16", "--pairs", "4", "--prefill-work", "64",
         "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=240, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WRONG" not in proc.stdout
    assert proc.stdout.count(" ok") >= 9          # 4 cases x 2 copy modes + IPC
    for line in ("B2B 4 KiB", "B2B 16 KiB", "B2B 64 KiB", "IPC B2B 64 KiB (kernel)",
                 "prefill tail (kernel)", "prefill tail (dma)"):
        assert line in proc.stdout, proc.stdout
    figures = json.loads(out.read_text())
    assert figures["failures"] == 0
    assert figures["runtime"]["runtimes"]["cuda"]["device_copy"] == "kernel"
    assert [r["block"] for r in figures["bandwidth"]] == [4096, 16384, 65536]
    assert all(r["kernel"] > 0 and r["dma"] > 0 and r["contiguous"] > 0
               for r in figures["bandwidth"])
    assert figures["ipc"]["ok"] is True and figures["ipc"]["ipc"] > 0
    assert figures["prefill"]["kernel"]["tail"] >= 0 and figures["prefill"]["layer_copy"] > 0
