"""The planner's run template for blocks-to-blocks transfers, against a plain Python model."""

from __future__ import annotations

import random

import pytest

import llmdist
from llmdist import _core

BLOCK = 4096


def model_runs(src, dst, block):
    """(src_off, dst_off, nbytes) runs: pairs in source order (stable) when no destination
    block repeats, else in the given order; neighbours in both source and destination merge."""
    pairs = list(zip(src, dst))
    if len(set(dst)) == len(dst):
        pairs.sort(key=lambda p: p[0])
    runs = []
    for s, d in pairs:
        if (
            runs
            and runs[-1][0] + runs[-1][2] == s * block
            and runs[-1][1] + runs[-1][2] == d * block
        ):
            runs[-1][2] += block
        else:
            runs.append([s * block, d * block, block])
    return [tuple(r) for r in runs]


def plan(src, dst, block=BLOCK):
    return _core.plan_b2b(_core.parse_indices("src", src), _core.parse_indices("dst", dst), block)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 64, 255, 256, 257, 1000])
@pytest.mark.parametrize(
    "kind", ["distinct", "src_repeats", "dst_repeats", "runs", "sparse", "sparse_src_repeats"]
)
def test_b2b_runs_match_the_model(n, kind):
    rng = random.Random(n * 31 + len(kind))
    pool = max(2 * n, 4)
    if kind == "distinct":
        src, dst = rng.sample(range(pool), n), rng.sample(range(pool), n)
    elif kind == "src_repeats":  # one source block to several destinations: order kept stable
        src, dst = [rng.randrange(max(n // 4, 1)) for _ in range(n)], rng.sample(range(pool), n)
    elif kind == "dst_repeats":  # the given order is kept (the last write wins)
        src, dst = rng.sample(range(pool), n), [rng.randrange(max(n // 4, 1)) for _ in range(n)]
    elif kind == "sparse":  # indices far above 64 per pair: radix sorts, no bitmap
        src, dst = rng.sample(range(1 << 40), n), rng.sample(range(1 << 40), n)
    elif kind == "sparse_src_repeats":  # dense distinct destinations, sparse repeated sources
        src = [rng.randrange(1 << 40) for _ in range(max(n // 4, 1))] * 4
        src, dst = src[:n], rng.sample(range(pool), n)
    else:  # consecutive stretches, shuffled, that merge back into runs
        starts = list(range(0, 4 * n, 8))
        rng.shuffle(starts)
        src = [s + k for s in starts for k in range(4)][:n]
        dst = [s + 100 + k for s in starts for k in range(4)][:n]
    p = plan(src, dst)
    assert p.runs == model_runs(src, dst, BLOCK)
    touched = [r[1] for r in p.runs] or [0]
    assert p.dst_lo == min(touched)
    assert p.dst_hi == max([r[1] + r[2] for r in p.runs] or [0])


def test_b2b_merges_a_sorted_stretch_into_one_run():
    p = plan(list(range(10, 74)), list(range(200, 264)))
    assert p.runs == [(10 * BLOCK, 200 * BLOCK, 64 * BLOCK)]


def first_repeat_model(values):
    """The first value equal to an earlier one, in list order, or None."""
    seen = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None


@pytest.mark.parametrize("spread", ["dense", "sparse", "huge"])
def test_repeated_index_matches_the_model(spread):
    # dense and sparse values take the bitmap pass; huge ones (up to 2**64-1) the sort
    rng = random.Random(21)
    top = {"dense": 40, "sparse": 1 << 20, "huge": (1 << 64) - 1}[spread]
    for _ in range(3000):
        n = rng.randint(0, 40)
        values = [rng.randint(0, top) for _ in range(n)]
        for _ in range(rng.randint(0, 3)):
            if n > 1:
                values[rng.randrange(n)] = values[rng.randrange(n)]
        got = _core.repeated_index(_core.parse_indices("dst", values))
        assert got == first_repeat_model(values), values


def test_repeated_index_names_the_first_repeat_not_the_smallest():
    assert _core.repeated_index(_core.parse_indices("dst", [9, 5, 5, 9])) == 5
    assert _core.repeated_index(_core.parse_indices("dst", [9, 5, 9, 5])) == 9
    big = (1 << 64) - 1
    assert _core.repeated_index(_core.parse_indices("dst", [big, 7, 3, 7, big])) == 7
    assert _core.repeated_index(_core.parse_indices("dst", list(range(70000)))) is None


@pytest.mark.parametrize("kind", ["distinct", "dst_repeats", "sparse", "sparse_dst_repeats"])
def test_b2b_plan_says_whether_a_destination_repeats(kind):
    # the bitmap pass (dense), the sort (sparse) and one pair
    rng = random.Random(kind)
    top = 1 << 40 if kind.startswith("sparse") else 300
    for n in (1, 2, 3, 64, 257):
        src = [rng.randint(0, top) for _ in range(n)]
        dst = rng.sample(range(top + 1), n)
        if kind.endswith("repeats") and n > 1:
            dst[rng.randrange(1, n)] = dst[0]
        assert plan(src, dst).dst_distinct == (len(set(dst)) == n), (src, dst)


@pytest.mark.parametrize("block", [1, 64, 4096, 3 << 20])
def test_a_block_whose_offset_does_not_fit_is_refused_by_either_list(block):
    # the largest index whose block [i*B, i*B + B) still ends within 2**64 - 1
    last = ((1 << 64) - 1 - block) // block
    assert plan([last, 0], [0, last], block).dst_hi == last * block + block
    assert _core.plan_c2b(_core.parse_indices("dst", [1, last]), 2 * block, block).dst_hi == (
        last * block + block
    )
    for src, dst in (
        ([last + 1, 0], [0, 1]),
        ([0, 1], [1, last + 1]),
        ([2, 1, 0], [0, 1, 2**64 - 1]),
    ):
        with pytest.raises(llmdist.LLMException, match="does not fit the address space") as ei:
            plan(src, dst, block)
        assert ei.value.status_code == llmdist.LLMStatusCode.LLM_PARAM_INVALID
    with pytest.raises(llmdist.LLMException, match="does not fit the address space"):
        _core.plan_c2b(_core.parse_indices("dst", [0, last + 1]), 2 * block, block)


def test_index_lists_take_ints_and_name_the_element_they_refuse():
    class Index(int):
        pass

    assert _core.parse_indices("dst", (Index(5), 0, (1 << 64) - 1)).tolist() == [
        5,
        0,
        (1 << 64) - 1,
    ]
    for bad, err, text in (
        ([0, True], TypeError, "dst[1] only support [int], but got <class 'bool'>"),
        ([0, 1, 2.0], TypeError, "dst[2] only support [int], but got <class 'float'>"),
        ([-1], ValueError, f"dst[0] must be in [0, {(1 << 64) - 1}], but got -1"),
        ([3, 1 << 64], ValueError, f"dst[1] must be in [0, {(1 << 64) - 1}], but got {1 << 64}"),
    ):
        with pytest.raises(err) as ei:
            _core.parse_indices("dst", bad)
        assert str(ei.value) == text


def test_an_element_claiming_to_be_an_int_is_refused_without_running_its_code():
    # the checks are C type checks: a __class__ property (Python code that could change the
    # list while its item array is read) is never called
    seq: list = []
    calls = []

    class Claims:
        @property
        def __class__(self):
            calls.append(1)
            seq.clear()
            return int

    seq[:] = [0, Claims(), 2]
    with pytest.raises(
        TypeError, match=r"dst\[1\] only support \[int\], but got <class '.*Claims'>"
    ):
        _core.parse_indices("dst", seq)
    assert calls == [] and len(seq) == 3
