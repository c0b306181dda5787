"""Child-process entry points for test_rank_table_flows.py: real clients' rank-table call sequences
(spec section 10), written the way the clients write them, with numpy arrays in place of NPU
tensors. Each flow runs one cluster in its own process and reports ("ok", result) or
("err", traceback) over a Pipe; events passed in the parameters order the members where the
real programs wait for each other (a prefill keeps its caches until the decode has pulled).

A cache's bytes are a function of (cluster id, model id, tensor index), so a decode can check
every byte it pulled without asking the prefill."""

from __future__ import annotations

import time
import traceback

WAIT_S = 30.0  # bound on every wait of a flow


def pattern(cluster_id: int, model_id: int, tensor: int, nbytes: int):
    import numpy as np

    return np.random.default_rng((cluster_id, model_id, tensor)).integers(
        0, 256, nbytes, dtype=np.uint8
    )


def make_datadist(
    role,
    cluster_id: int,
    options: dict,
    remote: bool = True,
    link_total_time=None,
    link_retry_count=None,
):
    """LLMDataDist configured as the connectors do: cache manager on, no listener."""
    from llmdist import LLMConfig, LLMDataDist

    cfg = LLMConfig()
    cfg.device_id = 0
    cfg.sync_kv_timeout = 20000
    cfg.enable_switch_role = True
    cfg.enable_cache_manager = True
    cfg.enable_remote_cache_accessible = remote
    if link_total_time is not None:
        cfg.link_total_time = link_total_time
    if link_retry_count is not None:
        cfg.link_retry_count = link_retry_count
    opts = cfg.generate_options()
    opts.update(options)
    dd = LLMDataDist(role, cluster_id)
    dd.init(opts)
    return dd


def wait_linked(dd, comm_id: int) -> float:
    """Poll query_register_mem_status as the clients do; seconds until OK."""
    from llmdist import RegisterMemStatus

    t0 = time.monotonic()
    while True:
        st = dd.query_register_mem_status(comm_id)
        if st == RegisterMemStatus.OK:
            return time.monotonic() - t0
        if st == RegisterMemStatus.FAILED:
            raise RuntimeError(f"comm {comm_id} FAILED")
        if time.monotonic() - t0 > WAIT_S:
            raise RuntimeError(f"comm {comm_id} still PREPARING after {WAIT_S} s")
        time.sleep(0.01)


class BlocksCaches:
    """Blocks caches of one cluster registered by model id, with numpy arrays behind them."""

    def __init__(self, dd, cluster_id: int, fill: bool) -> None:
        self.dd = dd
        self.cluster_id = cluster_id
        self.fill = fill
        self.arrays = {}  # model id -> list of uint8 arrays (one per tensor)
        self.caches = {}  # model id -> Cache

    def register(
        self, model_id: int, num_tensors: int, num_blocks: int, block_bytes: int, key: bool = True
    ):
        import numpy as np

        from llmdist import BlocksCacheKey, CacheDesc, DataType, Placement

        arrays = [
            pattern(self.cluster_id, model_id, t, num_blocks * block_bytes)
            if self.fill
            else np.zeros(num_blocks * block_bytes, dtype=np.uint8)
            for t in range(num_tensors)
        ]
        desc = CacheDesc(
            num_tensors, [num_blocks, block_bytes // 2], DataType.DT_FLOAT16, Placement.DEVICE
        )
        k = BlocksCacheKey(self.cluster_id, model_id) if key else None
        cache = self.dd.cache_manager.register_blocks_cache(
            desc, [a.ctypes.data for a in arrays], k
        )
        self.arrays[model_id] = arrays
        self.caches[model_id] = cache
        return cache

    def check_pulled(self, model_id: int, remote_id: int, src_blocks, dst_blocks) -> int:
        """Every destination block holds the remote's source block; every other block is
        still zero. Returns the number of bytes checked."""
        import numpy as np

        checked = 0
        for t, arr in enumerate(self.arrays[model_id]):
            nb = self.caches[model_id].cache_desc.shape[0]
            rows = arr.reshape(nb, -1)
            remote = pattern(remote_id, model_id, t, arr.size).reshape(nb, -1)
            for s, d in zip(src_blocks, dst_blocks):
                if not np.array_equal(rows[d], remote[s]):
                    raise AssertionError(
                        f"model {model_id} tensor {t}: block {d} is not remote block {s}"
                    )
            others = [b for b in range(nb) if b not in set(dst_blocks)]
            if rows[others].any():
                raise AssertionError(
                    f"model {model_id} tensor {t}: a block outside {list(dst_blocks)} changed"
                )
            checked += arr.size
        return checked


# --------------------------------------------------------------------------------------------
# vllm-ascend LLMDataDist connector


def vllm_connector(p: dict) -> dict:
    """Both sides register their own BlocksCacheKey (MLA: one tensor per layer, one cache per
    model id), both link with the same table and poll, the decode pulls per model id, both
    unlink."""
    from llmdist import BlocksCacheKey, LLMRole

    prefill = p["role"] == "prefill"
    me, other = (p["p"], p["d"]) if prefill else (p["d"], p["p"])
    dd = make_datadist(LLMRole.PROMPT if prefill else LLMRole.DECODER, me, p["options"])
    caches = BlocksCaches(dd, me, fill=prefill)
    models = (0, 1) if p["mla"] else (0,)
    tensors = p["layers"] if p["mla"] else 2 * p["layers"]
    for m in models:
        caches.register(m, tensors, p["blocks"], p["block_bytes"])
    comm_id = dd.link(p["comm"], {p["p"]: 0, p["d"]: 1}, p["table"])
    took = wait_linked(dd, comm_id)
    checked = 0
    if not prefill:
        remote_blocks, local_blocks = p["remote_blocks"], p["local_blocks"]
        for m in models:
            dd.cache_manager.pull_blocks(
                BlocksCacheKey(cluster_id=other, model_id=m),
                caches.caches[m],
                remote_blocks,
                local_blocks,
            )
            checked += caches.check_pulled(m, other, remote_blocks, local_blocks)
        p["done"].set()
    elif not p["done"].wait(WAIT_S):
        raise RuntimeError("the decode did not finish")
    dd.unlink(comm_id)
    dd.finalize()
    return {"link_s": took, "checked": checked}


# --------------------------------------------------------------------------------------------
# MindIE-LLM


def mindie(p: dict) -> dict:
    """K and V as separate caches (model id 0 and 1); the link name and ranks come from the
    device ips as MindIE-LLM builds them; a second link of a linked pair returns
    LLM_ALREADY_LINK, which MindIE-LLM checks for; the decode pulls per model id."""
    from llmdist import BlocksCacheKey, LLMRole, LLMStatusCode

    prefill = p["role"] == "prefill"
    me, other = (p["p"], p["d"]) if prefill else (p["d"], p["p"])
    dd = make_datadist(
        LLMRole.PROMPT if prefill else LLMRole.MIX,
        me,
        p["options"],
        link_total_time=135,
        link_retry_count=10,
    )
    caches = BlocksCaches(dd, me, fill=prefill)
    for m in (0, 1):  # K, then V
        caches.register(m, p["layers"], p["blocks"], p["block_bytes"])
    result = dd.link(p["comm"], p["rank_info"], p["table"])
    if result == LLMStatusCode.LLM_ALREADY_LINK:
        raise RuntimeError("the first link reported LLM_ALREADY_LINK")
    took = wait_linked(dd, result)
    again = dd.link(p["comm"], p["rank_info"], p["table"])
    checked = 0
    if not prefill:
        for m in (0, 1):
            dd.cache_manager.pull_blocks(
                BlocksCacheKey(cluster_id=other, model_id=m),
                caches.caches[m],
                p["src_blocks"],
                p["dst_blocks"],
            )
            checked += caches.check_pulled(m, other, p["src_blocks"], p["dst_blocks"])
        p["done"].set()
    elif not p["done"].wait(WAIT_S):
        raise RuntimeError("the decode did not finish")
    dd.unlink(result)
    dd.finalize()
    return {"link_s": took, "again": int(again), "checked": checked}


# --------------------------------------------------------------------------------------------
# A comm of three


def trio(p: dict) -> dict:
    """One prefill and two decodes in one comm: every pair is linked (the decodes too), and
    the prefill sends blocks to each decode by key through the links the comm made."""
    from llmdist import BlocksCacheKey, LLMRole, TransferWithCacheKeyConfig

    from .helpers import RecordingSync

    me = p["me"]
    prefill = me == p["p"]
    dd = make_datadist(LLMRole.PROMPT if prefill else LLMRole.DECODER, me, p["options"])
    caches = BlocksCaches(dd, me, fill=prefill)
    cache = caches.register(0, 2 * p["layers"], p["blocks"], p["block_bytes"])
    comm_id = dd.link("trio", p["rank_info"], p["table"])
    took = wait_linked(dd, comm_id)
    linked = sorted(c for c in p["rank_info"] if c != me and dd.peer_info(c) is not None)
    p["seen"].wait(WAIT_S)  # every member looked at its links before any moves on
    checked = 0
    if prefill:
        for d in p["decodes"]:
            cfg = TransferWithCacheKeyConfig(
                BlocksCacheKey(d, 0), range(p["layers"]), range(p["layers"])
            )
            task = dd.cache_manager.transfer_cache_async(
                cache, RecordingSync(), [cfg], p["src_blocks"], p["dst_blocks"]
            )
            res = task.get_results(int(WAIT_S * 1000))
            if [int(r) for r in res] != [0]:
                raise RuntimeError(f"transfer to {d}: {res}")
        for ev in p["sent"]:
            ev.set()
        for ev in p["checked"]:
            if not ev.wait(WAIT_S):
                raise RuntimeError("a decode did not check its blocks")
    else:
        if not p["sent"][p["decodes"].index(me)].wait(WAIT_S):
            raise RuntimeError("the prefill did not send")
        checked = caches.check_pulled(0, p["p"], p["src_blocks"], p["dst_blocks"])
        p["checked"][p["decodes"].index(me)].set()
    dd.unlink(comm_id)
    dd.finalize()
    return {"link_s": took, "linked": linked, "checked": checked}


# --------------------------------------------------------------------------------------------
# A member that never arrives


def never_arrives(p: dict) -> dict:
    """A three-member comm of which only two members run: FAILED after link_total_time."""
    from llmdist import LLMRole, RegisterMemStatus

    dd = make_datadist(
        LLMRole.PROMPT if p["me"] == min(p["rank_info"]) else LLMRole.DECODER,
        p["me"],
        p["options"],
        link_total_time=1,
    )
    comm_id = dd.link("incomplete", p["rank_info"], p["table"])
    t0 = time.monotonic()
    seen = [dd.query_register_mem_status(comm_id).name]
    while dd.query_register_mem_status(comm_id) == RegisterMemStatus.PREPARING:
        if time.monotonic() - t0 > WAIT_S:
            raise RuntimeError("still PREPARING")
        time.sleep(0.01)
    seen.append(dd.query_register_mem_status(comm_id).name)
    took = time.monotonic() - t0
    dd.unlink(comm_id)
    dd.finalize()
    return {"seen": seen, "took": took}


# --------------------------------------------------------------------------------------------
# upstream examples/python/pull_blocks_sample.py (numpy in place of NPU tensors)


def pull_blocks_sample(p: dict) -> dict:
    """Cluster 1 (PROMPT) registers a blocks cache with BlocksCacheKey(1, 0); cluster 2
    (DECODER) registers one without key, both link "link" with {1: 0, 2: 1}, the decode pulls
    blocks 0 and 1, swaps them out to a CPU cache and back in."""
    import numpy as np

    from llmdist import BlocksCacheKey, Cache, CacheDesc, DataType, LLMRole, Placement

    cluster_id = p["me"]
    prefill = cluster_id == 1
    dd = make_datadist(
        LLMRole.PROMPT if prefill else LLMRole.DECODER, cluster_id, p["options"], remote=False
    )
    cm = dd.cache_manager
    n = p["elems"]
    desc = CacheDesc(
        num_tensors=1, shape=[2, n], data_type=DataType.DT_FLOAT, placement=Placement.DEVICE
    )
    if prefill:
        tensor = np.ones((2, n), dtype=np.float32)
        tensor[1] = 2.0
        cache = cm.register_blocks_cache(desc, [tensor.ctypes.data], BlocksCacheKey(1, 0))
    else:
        tensor = np.zeros((2, n), dtype=np.float32)
        cache = cm.register_blocks_cache(desc, [tensor.ctypes.data])
    comm_id = dd.link("link", {1: 0, 2: 1}, p["table"])
    took = wait_linked(dd, comm_id)
    result = {"link_s": took}
    if prefill:
        if not p["done"].wait(WAIT_S):
            raise RuntimeError("the decode did not finish")
    else:
        cm.pull_blocks(BlocksCacheKey(1, 0), cache, src_blocks=[0, 1], dst_blocks=[0, 1])
        pulled = tensor.copy()
        if not (np.all(pulled[0] == 1.0) and np.all(pulled[1] == 2.0)):
            raise AssertionError("pull_blocks did not bring the prefill's blocks")
        cpu_tensors = [np.random.default_rng(5).random((2, n), dtype=np.float32)]
        cpu_desc = CacheDesc(
            num_tensors=1, shape=[2, n], data_type=DataType.DT_FLOAT, placement=Placement.HOST
        )
        cpu_cache = Cache.create_cpu_cache(cpu_desc, [t.ctypes.data for t in cpu_tensors])
        cm.swap_blocks(cache, cpu_cache, {0: 0, 1: 1})  # swap out
        if not np.array_equal(cpu_tensors[0], pulled):
            raise AssertionError("swap out did not copy the device blocks")
        tensor[:] = 0
        cm.swap_blocks(cpu_cache, cache, {0: 0, 1: 1})  # swap in
        if not np.array_equal(tensor, pulled):
            raise AssertionError("swap in did not restore the device blocks")
        result["checked"] = int(tensor.nbytes)
        p["done"].set()
    dd.unlink(comm_id)
    dd.finalize()
    return result


FLOWS = {f.__name__: f for f in (vllm_connector, mindie, trio, never_arrives, pull_blocks_sample)}


def flow_main(conn, flow: str, params: dict) -> None:
    """Child entry point: run one flow and report its result."""
    try:
        conn.send(("ok", FLOWS[flow](params)))
    except BaseException:
        conn.send(("err", traceback.format_exc()))
