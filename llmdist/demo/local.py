"""Mode ``local``: the prefill and the destination cache in one process."""

from __future__ import annotations

import os
import random
import sys
import time

from .. import BlocksCacheKey, LLMConfig, LLMDataDist, LLMRole, TransferConfig
from .check import CANARY, check_model_pages, verify
from .model import (
    AllReady,
    ToyModel,
    aligned_empty,
    layout_from_args,
    stream_prefill,
    tensor_views,
)
from .report import Timings, print_report


def run_local(args, out=sys.stdout) -> int:
    """One process: the source cache is numpy memory registered with LLMDataDist (like a
    framework's tensors), the destination a cache LLMDataDist allocates, on its own cluster."""
    if args.transport != "auto":
        out.write(
            "error: --transport applies to --mode two-process (a local transfer copies "
            "inside this process)\n"
        )
        return 2
    if args.auth_key:
        out.write(
            "error: --auth-key applies to --mode two-process (a local transfer makes no link)\n"
        )
        return 2
    layout = layout_from_args(args)
    problem = layout.check()
    if problem:
        out.write(f"error: {problem}\n")
        return 2

    rng = random.Random(args.seed)
    src_table = rng.sample(range(layout.pool_blocks), layout.blocks_needed)
    dst_table = rng.sample(range(layout.pool_blocks), layout.blocks_needed)
    model = ToyModel(layout, args.seed)

    cid = args.cluster_id
    dd = LLMDataDist(LLMRole.PROMPT, cid)
    cfg = LLMConfig()
    cfg.device_id = int(os.environ.get("LLMDIST_DEVICE", "0"))
    cfg.enable_cache_manager = True
    dd.init(cfg.generate_options())
    try:
        cm = dd.cache_manager
        desc = layout.cache_desc()

        src_mem = aligned_empty(layout.num_tensors * layout.tensor_bytes)
        src_mem.fill(0)
        src_views = list(src_mem.reshape(layout.num_tensors, layout.pool_blocks, layout.block_size))
        src_cache = cm.register_blocks_cache(
            desc, [int(v.ctypes.data) for v in src_views], BlocksCacheKey(cid, 0)
        )
        dst_cache = cm.allocate_blocks_cache(desc, BlocksCacheKey(cid, 1))
        dst_views = tensor_views(dst_cache.tensor_addrs, layout.tensor_bytes, layout.block_size)
        for v in dst_views:
            v.fill(CANARY)
        configs = [TransferConfig(cid, list(dst_cache.tensor_addrs))]

        # 1. prefill, streaming each layer as soon as it is written
        sync, task, t_call, t0, t_prefill_end, kv_first, kv_last = stream_prefill(
            cm, model, layout, src_cache, src_views, configs, src_table, dst_table, None
        )
        status_streamed = task.synchronize()
        t_done = time.perf_counter()
        results = task.get_results()
        verdict_streamed = verify(src_views, src_table, dst_views, dst_table)
        model_ok = check_model_pages(
            dst_views, layout, dst_table, 0, *kv_first
        ) and check_model_pages(dst_views, layout, dst_table, layout.layers - 1, *kv_last)

        # 2. the same transfer with every layer ready: the cost of sending after prefill
        for v in dst_views:
            v.fill(CANARY)
        t1 = time.perf_counter()
        status_full = cm.transfer_cache_async(
            src_cache, AllReady(), configs, src_table, dst_table
        ).synchronize()
        full_s = time.perf_counter() - t1
        verdict_full = verify(src_views, src_table, dst_views, dst_table)

        tm = Timings(
            prefill_s=t_prefill_end - t0,
            tail_s=t_done - t_prefill_end,
            last_sync_tail_s=t_done - sync.returned[-1],
            streamed_total_s=t_done - t_call,
            full_s=full_s,
            call_s=t0 - t_call,
        )
        ok = print_report(
            out,
            "local",
            layout,
            tm,
            [verdict_streamed, verdict_full],
            model_ok,
            [status_streamed, status_full] + [r for r in results if r is not None],
        )

        del dst_views
        cm.deallocate_blocks_cache(dst_cache)
        cm.unregister_cache(src_cache.cache_id)
        return 0 if ok else 1
    finally:
        dd.finalize()
