"""`python -m llmdist bench`: the command runs every scenario at tiny sizes on the host runtime
and on the fake ACL runtime (the figures mean nothing there; the paths and byte checks run), its
JSON file follows the schema of docs/bench.md, the plot is drawn, `--compare` reports changes,
bad options are refused by name, and the memory plan shrinks the pool, never the pairs."""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from llmdist import CacheManager
from llmdist.bench.settings import GiB, MemoryBudget, Need, parse_size

from .runtime_params import fake_cuda_env

REPO = Path(__file__).resolve().parents[1]
TINY = ["--blocks", "4K,8K", "--layers", "2", "--pairs", "8", "--repeat", "1", "--quiet"]
HAS_PUSH_PULL = hasattr(CacheManager, "push_blocks") and hasattr(CacheManager, "pull_blocks")
HAS_SWAP = hasattr(CacheManager, "swap_blocks")


def bench(*args, env=None, timeout=85):
    e = dict(os.environ)
    e.setdefault("LLMDIST_RUNTIME", "host")
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "llmdist", "bench", *args],
        cwd=REPO,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ------------------------------------------------------------------------------------------
# The schema of docs/bench.md

NUM = (int, float)


def check_schema(data: dict) -> None:
    assert data["schema"] == "llmdist-bench/1"
    assert isinstance(data["started"], str) and data["started"].endswith("Z")
    assert isinstance(data["seconds"], NUM) and data["seconds"] > 0
    m = data["machine"]
    for k in ("hostname", "platform", "cpu", "python"):
        assert isinstance(m[k], str)
    assert isinstance(m["cpus"], int) and isinstance(m["memory_bytes"], int)
    assert len(m["load_average"]) == 3 and len(m["load_average_end"]) == 3
    rt = data["runtime"]
    assert rt["name"] in ("host", "acl", "cuda")
    assert isinstance(rt["version"], str) and isinstance(rt["library"], str)
    assert isinstance(rt["device_id"], int) and rt["info"]["active"] == rt["name"]
    v = data["versions"]
    for k in (
        "llmdist",
        "numpy",
        "torch",
        "torch_npu",
        "mooncake",
        "nixl",
        "llm_datadist",
        "matplotlib",
    ):
        assert k in v and (v[k] is None or isinstance(v[k], str))
    s = data["settings"]
    assert set(s) == {
        "scenarios",
        "blocks",
        "layers",
        "pairs",
        "repeat",
        "tensors_per_layer",
        "dtype",
        "preset",
        "mem_budget",
        "seed",
    }
    assert all(isinstance(b, int) and b > 0 for b in s["blocks"])
    mem = data["memory"]
    assert set(mem) == {"device", "host", "shared", "host_free", "device_free", "how"}
    assert isinstance(data["notes"], list) and all(isinstance(n, str) for n in data["notes"])
    assert data["results"]
    for r in data["results"]:
        assert set(r) == {
            "scenario",
            "case",
            "block_size",
            "bytes",
            "paths",
            "ratios",
            "skipped",
            "verified",
            "extra",
        }
        assert r["scenario"] in s["scenarios"]
        assert r["block_size"] is None or r["block_size"] > 0
        assert r["verified"] in (True, False, None)
        if not r["paths"]:
            assert "llmdist" in r["skipped"] and r["bytes"] == 0
            continue
        me = r["paths"]["llmdist"]
        for name, p in r["paths"].items():
            assert set(p) == {"seconds", "samples", "gbps"}
            rounds = r["extra"].get("rounds", s["repeat"])  # link rows: rounds of their own
            assert len(p["samples"]) == rounds or r["scenario"] in ("overhead", "overlap")
            assert p["seconds"] > 0
            if r["bytes"]:
                assert p["gbps"] == pytest.approx(r["bytes"] / p["seconds"] / 1e9)
            else:
                assert p["gbps"] is None
            if name != "llmdist":
                assert r["ratios"][name] == pytest.approx(p["seconds"] / me["seconds"])
        assert set(r["ratios"]) == set(r["paths"]) - {"llmdist"}
        assert all(isinstance(w, str) and w for w in r["skipped"].values())


def by_case(data, scenario):
    return {(r["case"], r["block_size"]): r for r in data["results"] if r["scenario"] == scenario}


# ------------------------------------------------------------------------------------------
# Host runtime


@pytest.fixture(scope="module")
def host_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "host.json"
    res = bench("all", *TINY, "--json", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    return res, json.loads(out.read_text()), out


def test_host_run_every_scenario(host_run):
    res, data, _ = host_run
    check_schema(data)
    assert data["runtime"]["name"] == "host"
    assert data["settings"]["scenarios"] == [
        "b2b",
        "c2b",
        "c2c",
        "swap",
        "overlap",
        "overhead",
        "cluster",
    ]
    for scenario in ("b2b", "c2b", "c2c"):
        rows = by_case(data, scenario)
        assert {b for _, b in rows} == {4096, 8192}
        for r in rows.values():
            assert r["verified"] is True
            assert set(r["paths"]) == {
                "llmdist",
                "contiguous copy",
                "per-block copy loop",
                "numpy indexing",
            }
            assert r["bytes"] == 2 * 2 * 8 * r["block_size"]  # tensors x pairs x block
    swaps = by_case(data, "swap")
    d2h = [r for (case, _), r in swaps.items() if case == "device->host"]
    assert len(d2h) == 2 and all(r["verified"] is True for r in d2h)
    h2d = [r for (case, _), r in swaps.items() if case == "host->device"]
    if HAS_SWAP:
        assert all(r["verified"] is True for r in h2d)
    else:
        assert all("swap_blocks is not available" in r["skipped"]["llmdist"] for r in h2d)
    overlap = data["results"][[r["scenario"] for r in data["results"]].index("overlap")]
    assert overlap["extra"]["tail_in_layer_copies"] > 0 and overlap["verified"] is True
    ov = by_case(data, "overhead")
    assert "one-layer call" in ov[("61 layers x 8 blocks, 1 config", 4096)]["paths"]
    pull = ov[("pull_blocks 61 layers x 8 blocks", 64)]
    assert pull["verified"] is True and "same runs, copy engine" in pull["paths"]
    assert isinstance(pull["extra"]["call_overhead_s"], float)
    for pairs in (8, 128, 2048):
        row = ov[(f"1 layer, {pairs} pairs", 64)]
        assert row["extra"]["ns_per_pair"] > 0
        assert (f"8-pair call x {pairs // 8}" in row["paths"]) == (pairs != 8)
    for table in ("B2B", "C2B", "C2C", "swap", "overlap", "call overhead", "two processes"):
        assert table in res.stdout


def test_host_run_cluster_routes(host_run):
    _, data, _ = host_run
    rows = by_case(data, "cluster")
    for block in (4096, 8192):
        for route in ("mapped", "process"):
            r = rows[(f"{route}: transfer_cache_async", block)]
            assert r["verified"] is True and r["bytes"] == 2 * 2 * 8 * block
            assert r["extra"]["llmdist_path"] != "?"
            if route == "process":  # the bare syscalls, their bytes checked like llmdist's
                assert "process_vm bare, 2 threads" in r["paths"]
            for op in ("push_blocks", "pull_blocks"):
                r = rows[(f"{route}: {op}", block)]
                if HAS_PUSH_PULL:
                    assert r["verified"] is True
                else:
                    assert r["skipped"] == {"llmdist": "not available in this build"}
        engine = rows[("engine: transfer_cache_async", block)]
        if data["versions"]["mooncake"]:
            assert engine["verified"] is True
            assert "mooncake engine (raw)" in engine["paths"]
        else:
            assert "mooncake" in engine["skipped"]["llmdist"]
        process = rows[("process: transfer_cache_async", block)]
        if data["versions"]["nixl"]:  # NIXL wrote the same blocks, its bytes checked
            assert "nixl (UCX)" in process["paths"] and "nixl (UCX)" not in process["skipped"]
        else:
            assert process["skipped"]["nixl (UCX)"] == "nixl is not installed"


def test_host_run_cluster_keyed_rows(host_run):
    """The shared key's cost: per route, the keyed transfer (its bytes checked at the keyed
    decode) against the unkeyed one of the same rounds; per transport, link times."""
    res, data, _ = host_run
    rows = by_case(data, "cluster")
    routes = ["mapped", "process"] + (["engine"] if data["versions"]["mooncake"] else [])
    for block in (4096, 8192):
        for route in routes:
            r = rows[(f"{route}: transfer_cache_async, keyed", block)]
            plain = rows[(f"{route}: transfer_cache_async", block)]
            assert r["verified"] is True and r["bytes"] == plain["bytes"]
            assert set(r["paths"]) == {"llmdist", "llmdist, no key"}
            assert r["paths"]["llmdist, no key"] == plain["paths"]["llmdist"]  # same rounds
            ratio = r["paths"]["llmdist"]["gbps"] / plain["paths"]["llmdist"]["gbps"]
            assert r["extra"]["keyed_over_unkeyed_bandwidth"] == pytest.approx(ratio)
            assert r["extra"]["llmdist_path"] == plain["extra"]["llmdist_path"]
            samples = zip(r["paths"]["llmdist"]["samples"], plain["paths"]["llmdist"]["samples"])
            per_round = statistics.median(u / k for k, u in samples)
            assert r["extra"]["keyed_over_unkeyed_bandwidth_per_round"] == pytest.approx(per_round)
            assert (
                f"{route}: transfer_cache_async, keyed: bandwidth keyed / unkeyed at "
                f"{block // 1024}K: {r['ratios']['llmdist, no key']:.3f}x (per round: "
                f"{per_round:.3f}x)"
            ) in res.stdout
    links = ["mapped/process"] + (["engine"] if data["versions"]["mooncake"] else [])
    for name in links:
        r = rows[(f"{name}: link_clusters, keyed", None)]
        assert set(r["paths"]) == {"llmdist", "llmdist, no key"} and r["bytes"] == 0
        keyed, plain = (r["paths"][k]["seconds"] for k in ("llmdist", "llmdist, no key"))
        assert r["extra"]["keyed_minus_unkeyed_ms"] == pytest.approx((keyed - plain) * 1e3)
        samples = zip(r["paths"]["llmdist"]["samples"], r["paths"]["llmdist, no key"]["samples"])
        per_round = statistics.median(k - u for k, u in samples) * 1e3
        assert r["extra"]["keyed_minus_unkeyed_ms_per_round"] == pytest.approx(per_round)
        assert len(r["paths"]["llmdist"]["samples"]) == r["extra"]["rounds"] >= 10
        assert f"{name}: link_clusters, keyed: link time keyed - unkeyed: " in res.stdout
    frame = rows[("control frame (cache_add, 64 tensors), keyed", None)]
    assert set(frame["paths"]) == {"llmdist", "llmdist, no key"}
    keyed, plain = (frame["paths"][k]["seconds"] for k in ("llmdist", "llmdist, no key"))
    assert frame["extra"]["keyed_minus_unkeyed_us"] == pytest.approx((keyed - plain) * 1e6)
    assert frame["extra"]["frames_per_round"] == 2000 and frame["extra"]["rounds"] >= 10
    if not data["versions"]["nixl"]:
        assert res.stdout.count("nixl is not installed") == 1


def test_plot_from_the_json(host_run, tmp_path):
    pytest.importorskip("matplotlib")
    from llmdist.bench.plot import plot, series

    _, data, _ = host_run
    panels = series(data["results"])
    assert {"b2b", "c2b", "c2c", "swap", "cluster"} <= set(panels)
    assert {"llmdist", "contiguous copy"} <= set(panels["b2b"])
    out = tmp_path / "bench.png"
    plot(data, str(out))
    head = out.read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_compare_two_files(host_run, tmp_path):
    _, data, path = host_run
    faster = copy.deepcopy(data)
    for r in faster["results"]:
        if r["scenario"] == "b2b" and r["block_size"] == 4096:
            r["paths"]["llmdist"]["seconds"] /= 2
    new = tmp_path / "new.json"
    new.write_text(json.dumps(faster))
    res = bench("--compare", str(path), str(new))
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("b2b") and " 4K " in ln]
    mine = [ln for ln in lines if " llmdist " in ln]
    assert mine and mine[0].rstrip().endswith("+100.0%")
    others = [ln for ln in lines if " llmdist " not in ln]
    assert others and all(ln.rstrip().endswith("+0.0%") for ln in others)


def test_compare_refuses_other_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something-else"}))
    res = bench("--compare", str(bad), str(bad))
    assert res.returncode == 2
    assert "not an llmdist benchmark file" in res.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["nosuch"], "unknown scenario 'nosuch'"),
        (["b2b", "--blocks", "0"], "--blocks: '0' is not a positive size"),
        (["b2b", "--blocks", "4Q"], "--blocks: '4Q' is not a positive size"),
        (["b2b", "--pairs", "0"], "--pairs must be >= 1"),
        (["b2b", "--repeat", "0"], "--repeat must be >= 1"),
        (["b2b", "--layers", "0"], "--layers must be >= 1"),
        (["b2b", "--mem-gib", "0"], "--mem-gib must be > 0"),
    ],
)
def test_bad_options_are_named(args, message):
    res = bench(*args)
    assert res.returncode == 2
    assert message in res.stderr


def test_preset_mla_moves_the_same_bytes_per_layer(tmp_path):
    out = tmp_path / "mla.json"
    res = bench(
        "b2b",
        "--preset",
        "deepseek-v3-mla",
        "--layers",
        "2",
        "--pairs",
        "4",
        "--repeat",
        "1",
        "--quiet",
        "--json",
        str(out),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    check_schema(data)
    s = data["settings"]
    assert s["preset"] == "deepseek-v3-mla" and s["dtype"] == "bf16" and s["layers"] == 2
    (r,) = data["results"]
    assert r["verified"] is True
    layer_block = 128 * 576 * 2
    assert r["bytes"] == 2 * 4 * layer_block  # layers x pairs x latent block
    if s["tensors_per_layer"] == 2:
        assert r["block_size"] == layer_block // 2
        assert any("tensor_num_per_layer=1) is not available" in n for n in data["notes"])
    else:
        assert s["tensors_per_layer"] == 1 and r["block_size"] == layer_block


# ------------------------------------------------------------------------------------------
# The memory plan


def test_pool_shrinks_to_fit_and_says_so():
    b = MemoryBudget(
        device=100 * 4096, host=0, shared=True, host_free=0, device_free=None, how="test"
    )
    plan = b.fit_pool("w", Need(per_block=4096, fixed=20 * 4096), full_pool=1024)
    assert plan.pool == 80 and plan.scaled and "pool shrunk to 80" in plan.note
    assert "pairs moved are unchanged" in plan.note
    full = b.fit_pool("w", Need(per_block=64, fixed=0), full_pool=1024)
    assert full.pool == 1024 and not full.scaled and full.note == ""


def test_pool_counts_host_and_device_apart_on_a_device_runtime():
    b = MemoryBudget(
        device=GiB, host=10 * 4096, shared=False, host_free=0, device_free=GiB, how="test"
    )
    plan = b.fit_pool("w", Need(4096, 0), Need(4096, 0))
    assert plan.pool == 10  # the host side is the limit
    shared = MemoryBudget(
        device=20 * 4096, host=20 * 4096, shared=True, host_free=0, device_free=None, how="test"
    )
    assert shared.fit_pool("w", Need(4096, 0), Need(4096, 0)).pool == 10  # one RAM for both


def test_pool_that_cannot_fit_is_an_error_naming_the_workload():
    b = MemoryBudget(device=4096, host=4096, shared=True, host_free=0, device_free=None, how="t")
    with pytest.raises(MemoryError, match=r"b2b 64K: does not fit .*--mem-gib"):
        b.fit_pool("b2b 64K", Need(65536, 0), minimum=1)


def test_parse_size():
    assert parse_size("4K") == 4096 and parse_size("64KiB") == 65536
    assert parse_size("1M") == 1 << 20 and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="--blocks"):
        parse_size("-4K")


# ------------------------------------------------------------------------------------------
# Fake ACL runtime


def test_fake_acl_run_shrinks_to_the_device(fake_acl, tmp_path):
    out = tmp_path / "acl.json"
    env = {
        "LLMDIST_RUNTIME": "acl",
        "LLMDIST_ACL_LIBRARY": fake_acl,
        "FAKE_ACL_HBM_BYTES": str(24 << 20),
    }
    res = bench(
        "b2b",
        "c2b",
        "c2c",
        "swap",
        "overlap",
        "overhead",
        "cluster",
        *TINY,
        "--json",
        str(out),
        env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    check_schema(data)
    assert data["runtime"]["name"] == "acl" and data["runtime"]["library"] == fake_acl
    assert data["memory"]["shared"] is False
    assert data["memory"]["device_free"] <= 24 << 20
    for scenario in ("b2b", "c2b", "c2c"):
        for (case, _), r in by_case(data, scenario).items():
            assert case.startswith("D2D") and r["verified"] is True
            assert set(r["paths"]) == {"llmdist", "contiguous copy", "per-block copy loop"}
            assert r["skipped"]["numpy indexing"] == "device memory is not host memory"
            assert "torch indexing" in r["skipped"]
    d2h = [r for (case, _), r in by_case(data, "swap").items() if case == "D2H"]
    assert d2h and all(r["verified"] is True for r in d2h)
    # 12 MiB of budget: the 61-layer overhead workload cannot keep 1024 blocks per tensor
    assert any(n.startswith("overhead") and "pool shrunk" in n for n in data["notes"])
    ov = by_case(data, "overhead")
    assert "one-layer call" in ov[("61 layers x 8 blocks, 1 config", 4096)]["paths"]
    assert ov[("pull_blocks 61 layers x 8 blocks", 64)]["verified"] is True
    mapped = by_case(data, "cluster")[("mapped: transfer_cache_async", 4096)]
    assert mapped["verified"] is True  # device IPC into the decode's allocated cache


def test_progress_line_names_each_step():
    res = bench(
        "b2b", "overhead", "--blocks", "4K,8K", "--layers", "1", "--pairs", "2", "--repeat", "1"
    )
    assert res.returncode == 0, res.stderr
    steps = [ln for ln in res.stderr.splitlines() if ln.startswith("[")]
    assert [s.split("] ", 1)[1] for s in steps] == [
        "b2b 4K",
        "b2b 8K",
        "overhead 61 layers x 2 blocks",
        "overhead pull 61 layers x 2 blocks",
        "overhead scaling 2-512 pairs",
    ]
    assert steps[0].startswith("[1/5 ") and steps[-1].startswith("[5/5 ")


def test_alternating_rounds_reverse_the_order_of_odd_rounds():
    """The cluster scenario's rounds (and the keyed link rounds) run their paths in reverse
    order every other round, so that no path always follows the same one."""
    from types import SimpleNamespace

    from llmdist.bench import keyed
    from llmdist.bench.workload import Bench

    calls = []
    stub = SimpleNamespace(
        settings=SimpleNamespace(repeat=3), progress=SimpleNamespace(show=lambda text: None)
    )
    paths = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    times = Bench.rounds(stub, "x", paths, alternate=True)
    assert calls == ["a", "b", "c"] + ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    calls.clear()
    Bench.rounds(stub, "x", paths)
    assert calls == ["a", "b", "c"] * 4
    links = []
    got = keyed.link_rounds(lambda: links.append("k") or 2.0, lambda: links.append("u") or 1.0, 3)
    assert links == ["k", "u", "k", "u", "u", "k", "k", "u"]
    assert got == {"llmdist": [2.0] * 3, "llmdist, no key": [1.0] * 3}


def test_contiguous_baseline_copies_the_same_bytes_from_alternating_ends():
    """The contiguous-copy baseline copies `nbytes` between the caches' own memory, from the start
    and then from the end (not the bytes the previous call left in the CPU cache)."""
    import numpy as np

    from llmdist.bench.settings import Settings
    from llmdist.bench.table import Progress
    from llmdist.bench.workload import Bench, host_view

    b = Bench(
        Settings(scenarios=["b2b"], blocks=[4096], layers=2, pairs=4, repeat=1),
        Progress(enabled=False),
    )
    try:
        src = b.blocks_cache(4, 16, 4096)
        dst = b.blocks_cache(4, 16, 4096)
        span = 4 * 16 * 4096
        b.fill(src)
        b.zero(dst)
        s = host_view(src.tensor_addrs[0], span)
        d = host_view(dst.tensor_addrs[0], span)
        n = span // 4
        run = b.contiguous(n, src, dst)
        run()
        assert np.array_equal(d[:n], s[:n]) and not d[n:].any()
        run()
        assert np.array_equal(d[span - n :], s[span - n :]) and not d[n : span - n].any()
        b.zero(dst)
        b.contiguous(3 * span, src, dst)()  # more than the caches hold: in pieces
        assert np.array_equal(d, s)
        b.free(src, dst)
    finally:
        b.close()


# ------------------------------------------------------------------------------------------
# Fake CUDA runtime


def test_fake_cuda_run(fake_cuda, tmp_path):
    out = tmp_path / "cuda.json"
    env = {"LLMDIST_RUNTIME": "cuda", **fake_cuda_env(fake_cuda)}
    res = bench(
        "b2b",
        "c2b",
        "c2c",
        "swap",
        "overlap",
        "overhead",
        "cluster",
        *TINY,
        "--json",
        str(out),
        env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    check_schema(data)
    rt = data["runtime"]
    assert rt["name"] == "cuda" and rt["library"] == fake_cuda
    assert data["memory"]["shared"] is False and data["memory"]["device_free"] > 0
    kernel = rt["info"]["runtimes"]["cuda"].get("device_copy") == "kernel"
    for scenario in ("b2b", "c2b", "c2c"):
        for (case, _), r in by_case(data, scenario).items():
            assert case.startswith("D2D") and r["verified"] is True
            expected = {"llmdist", "contiguous copy", "per-block copy loop"}
            if kernel:  # the copy kernel, and the same call by DMA copies
                expected.add("llmdist, DMA copies")
            assert set(r["paths"]) == expected
    swaps = by_case(data, "swap")
    assert {case for case, _ in swaps} == {"D2H", "H2D"}
    assert all(r["verified"] is True for r in swaps.values())
    mapped = by_case(data, "cluster")[("mapped: transfer_cache_async", 4096)]
    assert mapped["verified"] is True  # CUDA IPC into the decode's allocated cache
