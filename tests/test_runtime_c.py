"""The C runtime layer on its own, below Cython: tests/runtime_c/runtime_check.c exercises the
helpers the runtimes share (run tables, the per-run fallback, polling an event against a
deadline, a symbol list's lookup and missing-symbol report) and copy_runs of the host runtime
through its llmd_runtime table, compiled with the project's C sources."""

from __future__ import annotations

import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_runtime_layer_in_c(tmp_path):
    exe = str(tmp_path / "runtime_check")
    build = subprocess.run(
        [
            os.environ.get("CC", "cc"),
            "-std=gnu11",
            "-O1",
            "-Wall",
            "-Werror",
            "-I",
            os.path.join(ROOT, "include"),
            "-I",
            os.path.join(ROOT, "src"),
            os.path.join(HERE, "runtime_c", "runtime_check.c"),
            os.path.join(ROOT, "src", "runtime_common.c"),
            os.path.join(ROOT, "src", "host_runtime.c"),
            os.path.join(ROOT, "src", "buffer_pool.c"),
            os.path.join(ROOT, "src", "host_trace.c"),
            "-o",
            exe,
            "-lpthread",
            "-ldl",
            "-lrt",
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    res = subprocess.run([exe], check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
