"""LLMDIST_HOST_TRACE: the host copy engine and the layer gate time their phases into a file
written at exit, and the copies they time still move the right bytes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from llmdist.bench import host_trace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# A child process: the trace switch is read when the library loads.
CHILD = textwrap.dedent("""
    import os, threading, time
    import numpy as np
    import llmdist
    from llmdist import _core

    rt = _core.Runtime.host()
    s = _core.Stream(rt)
    block, nblocks = 64 << 10, 32
    si, di = list(range(nblocks)), list(reversed(range(nblocks)))
    plan = _core.plan_b2b(_core.parse_indices("src", si), _core.parse_indices("dst", di), block)
    src = [np.random.default_rng(i).integers(0, 255, nblocks * block, dtype=np.uint8)
           for i in range(2)]
    dst = [np.zeros_like(a) for a in src]

    def check():
        for a, b in zip(src, dst):
            for x, y in zip(si, di):
                assert (b[y * block:(y + 1) * block] == a[x * block:(x + 1) * block]).all()

    # one team batch (4 MiB >= split_min_bytes), then one on this thread alone
    llmdist.set_host_tuning(copy_threads=2, split_min_bytes=1 << 20)
    _core.copy_pairs(rt, s, plan, [a.ctypes.data for a in src], [b.ctypes.data for b in dst],
                     _core.CopyKind.COPY_D2D, "copy")
    check()
    for b in dst:
        b[:] = 0
    llmdist.set_host_tuning(split_min_bytes=1 << 30)
    _core.copy_pairs(rt, s, plan, [a.ctypes.data for a in src], [b.ctypes.data for b in dst],
                     _core.CopyKind.COPY_D2D, "copy")
    check()
    # one process_vm read of the same blocks (from this process itself), shared with the team
    from llmdist._core import ConfigPlan, CopyKind, Direction, Lane

    class Always:
        def synchronize_layer(self, layer, timeout):
            return True

    for b in dst:
        b[:] = 0
    llmdist.set_host_tuning(split_min_bytes=1 << 20)
    cp = ConfigPlan(first_layer=0, stop_layer=1, row_shift=0, kind=CopyKind.COPY_H2H,
                    lane=Lane.LANE_PROCESS, direction=Direction.READ,
                    target_addrs=[a.ctypes.data for a in src],
                    target_limits=[a.ctypes.data + a.nbytes for a in src], pid=os.getpid(),
                    link=None, engine=None, single=False)
    job = _core.TransferJob(rt, plan, [b.ctypes.data for b in dst], [cp], Always(), None)
    job.run(s)
    assert job.done.is_set()
    check()
    # one single copy
    one = np.zeros(1 << 20, dtype=np.uint8)
    rt.memcpy(one.ctypes.data, src[0].ctypes.data, one.nbytes, s)
    s.synchronize()
    assert (one == src[0][:one.nbytes]).all()
    # a gate wait that the mark of layer 1 ends
    gate = _core.LayerGate(2)
    woke, waiting = [], threading.Event()

    def waiter():
        waiting.set()
        woke.append(gate.wait(1, 30_000))
    t = threading.Thread(target=waiter)
    t.start()
    waiting.wait()
    time.sleep(0.2)
    gate.mark(1)
    t.join()
    assert woke == [True]
    s.close()
    print(os.getpid())
""")


def run_child(tmp_path, trace):
    env = dict(os.environ)
    env.pop("LLMDIST_HOST_TRACE", None)
    if trace is not None:
        env["LLMDIST_HOST_TRACE"] = str(trace)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    r = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1])


def test_trace_records_batches_parts_copies_and_the_gate(tmp_path):
    trace = tmp_path / "trace.txt"
    run_child(tmp_path, trace)
    records = host_trace.read(str(trace))
    kinds = [r.kind for r in records]
    batch_bytes = 2 * 32 * (64 << 10)
    team = [r for r in records if r.kind == host_trace.BATCH]
    solo = [r for r in records if r.kind == host_trace.BATCH_SOLO]
    assert [r.nbytes for r in team] == [batch_bytes]
    assert [r.nbytes for r in solo] == [batch_bytes]
    all_parts = [r for r in records if r.kind == host_trace.PART]
    # every part of the team batch ran once, inside the batch
    parts = [p for p in all_parts if team[0].t_start <= p.t_start <= team[0].t_end]
    assert sorted(p.arg for p in parts) == list(range(len(parts)))
    assert len(parts) >= 2
    assert all(p.t_end <= team[0].t_end for p in parts)
    own = sum(1 for p in parts if p.tid == team[0].tid)
    assert team[0].arg == own
    assert [r.nbytes for r in records if r.kind == host_trace.COPY] == [1 << 20]
    marks = [r for r in records if r.kind == host_trace.GATE_MARK]
    wakes = [r for r in records if r.kind == host_trace.GATE_WAKE]
    assert [m.arg for m in marks] == [1] and [w.arg for w in wakes] == [1]
    # the wait began before the mark and ended after it
    assert wakes[0].t_start <= marks[0].t_start <= wakes[0].t_end
    # the process_vm read is a batch of its own kind, its parts inside it
    process = [r for r in records if r.kind == host_trace.PROCESS_BATCH]
    assert [r.nbytes for r in process] == [batch_bytes]
    assert not [r for r in records if r.kind == host_trace.PROCESS_BATCH_SOLO]
    pparts = [r for r in all_parts if process[0].t_start <= r.t_start <= process[0].t_end]
    assert sorted(p.arg for p in pparts) == list(range(len(pparts))) and len(pparts) >= 2
    assert process[0].arg == sum(p.tid == process[0].tid for p in pparts)
    assert len(all_parts) == len(parts) + len(pparts)
    s = host_trace.summarize(records)
    assert s["batches"] == 2 and s["team_batches"] == 1
    assert s["batch_bytes"] == 2 * batch_bytes
    p = s["process"]
    assert p["batches"] == 1 and p["team_batches"] == 1 and p["batch_bytes"] == batch_bytes
    alone = p["team_batches_issuer_alone"] + p["team_batches_helpers_alone"]
    assert alone == (1 if p["helper_share_median"] in (0.0, 1.0) else 0)
    assert s["gate_wake_after_mark_s"]["n"] == 1
    assert s["copies"] == 1 and s["copy_bytes"] == 1 << 20
    assert kinds.count(host_trace.BATCH) + kinds.count(host_trace.BATCH_SOLO) == 2


def test_no_trace_without_the_switch(tmp_path):
    run_child(tmp_path, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.py"]


def test_percent_p_in_the_name_is_the_process_id(tmp_path):
    pid = run_child(tmp_path, tmp_path / "trace.%p.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.py", f"trace.{pid}.txt"]
    s = host_trace.summarize(host_trace.read(str(tmp_path / f"trace.{pid}.txt")))
    assert s["batches"] == 2


# A child: a synchronizer-gated process read of 4 layers queued behind a held stream. The
# stream is held by an event whose record waits behind a long copy on another stream (run by
# another thread), so that every layer is queued before the stream moves.
GATED_CHILD = textwrap.dedent("""
    import os, threading
    import numpy as np
    import llmdist
    from llmdist import _core
    from llmdist._core import ConfigPlan, CopyKind, Direction, Lane

    rt = _core.Runtime.host()
    llmdist.set_host_tuning(copy_threads=2, split_min_bytes=1 << 20)
    block, nblocks, layers = 64 << 10, 8, 4
    si = list(range(nblocks))
    plan = _core.plan_b2b(_core.parse_indices("src", si), _core.parse_indices("dst", si), block)
    src = [np.random.default_rng(i).integers(0, 255, nblocks * block, dtype=np.uint8)
           for i in range(layers)]
    dst = [np.zeros_like(a) for a in src]

    class Always:
        def __init__(self, gate):
            self.gate, self.held = gate, []
        def synchronize_layer(self, layer, timeout):
            self.held.append(not self.gate.query())  # the stream still held at this call
            return True

    a, b = _core.Stream(rt), _core.Stream(rt)
    big = 64 << 20
    for attempt in range(5):
        for d in dst:
            d[:] = 0
        busy_src, busy_dst = np.ones(big, np.uint8), np.zeros(big, np.uint8)
        gate = _core.Event(rt)
        started = threading.Event()

        def long_copy():
            started.set()
            rt.memcpy(busy_dst.ctypes.data, busy_src.ctypes.data, big, b)  # inline on b
        t = threading.Thread(target=long_copy)
        t.start()
        started.wait()
        gate.record(b)          # queued behind the long copy
        a.wait_event(gate)      # a holds until then
        cp = ConfigPlan(first_layer=0, stop_layer=layers, row_shift=0, kind=CopyKind.COPY_H2H,
                        lane=Lane.LANE_PROCESS, direction=Direction.READ,
                        target_addrs=[x.ctypes.data for x in src],
                        target_limits=[x.ctypes.data + x.nbytes for x in src], pid=os.getpid(),
                        link=None, engine=None, single=False, tensors_per_layer=1)
        sync = Always(gate)
        job = _core.TransferJob(rt, plan, [x.ctypes.data for x in dst], [cp], sync, None,
                                tensors_per_layer=1)
        job.run(a)
        t.join()
        assert job.done.is_set()
        for x, y in zip(src, dst):
            assert (x == y).all()
        if all(sync.held):
            break
        big *= 2
    print(attempt, threading.get_native_id())
""")


def test_gated_process_layers_queued_behind_each_other_move_as_one_batch(tmp_path):
    """A synchronizer-gated loop hands its process batches to the stream thread (not its own
    thread), and the layers queued while the stream was held run as one batch."""
    trace = tmp_path / "trace.txt"
    env = dict(os.environ, LLMDIST_HOST_TRACE=str(trace))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    script = tmp_path / "child.py"
    script.write_text(GATED_CHILD)
    r = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    attempt, caller = (int(x) for x in r.stdout.split()[-2:])
    process = [
        x
        for x in host_trace.read(str(trace))
        if x.kind in (host_trace.PROCESS_BATCH, host_trace.PROCESS_BATCH_SOLO)
    ]
    # earlier attempts (the stream was let go too soon) left batches of their own first
    layer_bytes = 8 * (64 << 10)
    assert sum(x.nbytes for x in process) == (attempt + 1) * 4 * layer_bytes
    last = process[-1]
    assert last.nbytes == 4 * layer_bytes
    assert last.tid != caller
