"""What the demo prints: the layout, the timings (prefill, tail, overlap) and the verdicts."""

from __future__ import annotations

from dataclasses import dataclass

from .. import LLMStatusCode
from .check import Verdict
from .model import PagedLayout

# ------------------------------------------------------------------------------------------
# Report


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def fmt_t(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1.0 else f"{s:.3f} s"


@dataclass
class Timings:
    prefill_s: float  # first layer's compute starts .. last layer marked done
    tail_s: float  # last layer marked done .. layer-wise transfer complete
    last_sync_tail_s: float  # last synchronize_layer returned .. transfer complete
    streamed_total_s: float  # transfer_cache_async called .. layer-wise transfer complete
    full_s: float  # all layers ready: call .. complete (sending everything after prefill)
    call_s: float  # time for transfer_cache_async to return (layer-wise call)


def print_report(
    out,
    mode: str,
    layout: PagedLayout,
    tm: Timings,
    verdicts: list[Verdict],
    model_ok: bool,
    statuses,
    extra: list[str] = (),
    checker: str = "",
) -> bool:
    ok = (
        all(v.ok for v in verdicts)
        and model_ok
        and all(s == LLMStatusCode.LLM_SUCCESS for s in statuses)
    )
    moved = layout.bytes_to_move
    w = out.write
    w(f"llmdist demo, mode {mode}: simulated prefill streaming its KV cache layer by layer\n")
    w(
        f"  model      {layout.layers} layers, {layout.tokens} tokens x {layout.dim} dim, "
        f"KV {layout.dtype.name}\n"
    )
    w(
        f"  KV cache   {layout.num_tensors} tensors x {layout.blocks_needed} blocks of "
        f"{fmt_bytes(layout.block_size)} ({layout.tokens_per_block} tokens/block, pool "
        f"{layout.pool_blocks}); {fmt_bytes(moved)} to move\n"
    )
    for line in extra:
        w(f"  {line}\n")
    w(
        f"  prefill    {fmt_t(tm.prefill_s)} ({fmt_t(tm.prefill_s / layout.layers)}/layer); "
        f"transfer_cache_async returned in {tm.call_s * 1e6:.0f} us (first call)\n"
    )
    w(
        f"  tail       {fmt_t(tm.tail_s)} from end of prefill to end of transfer "
        f"({fmt_t(tm.last_sync_tail_s)} after the last layer was released)\n"
    )
    w(
        f"  after      {fmt_t(tm.full_s)} to send everything once prefill is done "
        f"({moved / tm.full_s / 1e9:.2f} GB/s)\n"
    )
    hidden = 1.0 - tm.tail_s / tm.full_s if tm.full_s > 0 else 0.0
    w(
        f"  overlap    layer-wise streaming hides {hidden * 100:.1f}% of the transfer time "
        f"(tail = {tm.tail_s / tm.full_s:.2f}x the post-prefill transfer)\n"
    )
    for name, v in zip(("streamed", "all-ready"), verdicts):
        w(f"  verify     {name}{checker}: {v.message}\n")
    if not model_ok:
        w("  verify     the pages do not decode to the model's K/V\n")
    bad = [s for s in statuses if s != LLMStatusCode.LLM_SUCCESS]
    if bad:
        w(f"  transfer   failed: {bad}\n")
    w("PASS\n" if ok else "FAIL\n")
    return ok
