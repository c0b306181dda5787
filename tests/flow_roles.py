"""The roles of tests/test_client_flows.py (run by flow_procs.run_role in child processes).

Each upstream sample role keeps the sample's calls in the sample's order; torch NPU tensors
become numpy arrays (their addresses stand in for data_ptr()), torch.distributed barriers become
ctx.barrier(), the samples' sleeps waiting for the other side become barriers too, and fixed
ports become free ports the parent picked. What the samples only log, the roles check."""

from __future__ import annotations

import socket
import struct

import numpy as np

from llmdist import (
    BlocksCacheKey,
    CacheDesc,
    CacheKeyByIdAndIndex,
    DataType,
    LayerSynchronizer,
    LLMClusterInfo,
    LLMConfig,
    LLMDataDist,
    LLMException,
    LLMRole,
    LLMStatusCode,
    Placement,
    TransferWithCacheKeyConfig,
)

HOST = "127.0.0.1"
NUM_TENSORS = 2
BLOCKS_NUM = 3
KV_SHAPE = 10


def _addr(arr: np.ndarray) -> int:
    return int(arr.ctypes.data)


def _link_by_address(dd, remote_id, port) -> LLMClusterInfo:
    """link_clusters to the cluster listening on HOST:port; its LLMClusterInfo."""
    info = LLMClusterInfo()
    info.remote_cluster_id = remote_id
    info.append_remote_ip_info(HOST, port)
    ret, _ = dd.link_clusters([info], 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"link failed: {ret}")
    return info


def _unlink_by_address(ctx, dd, info) -> None:
    ret, _ = dd.unlink_clusters([info], 5000, force=True)
    ctx.check(ret == LLMStatusCode.LLM_SUCCESS, f"unlink: {ret}")


def _expect_not_exist(ctx, what: str, call, *args, **kwargs) -> None:
    """call(*args, **kwargs) must fail with LLM_KV_CACHE_NOT_EXIST."""
    try:
        call(*args, **kwargs)
        ctx.check(False, f"{what} succeeded")
    except LLMException as exc:
        ctx.check(
            exc.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, f"{what}: {exc.status_code}"
        )


# ------------------------------------------------------------------------------------------
# transfer_cache_async_sample.py
class _Sync(LayerSynchronizer):
    def __init__(self, ret=True):
        self._ret = ret

    def synchronize_layer(self, layer_index, timeout_in_millis):
        return self._ret


def _sample_cache(cache_manager, fill: float, key):
    """The samples' cache: NUM_TENSORS numpy arrays of BLOCKS_NUM x KV_SHAPE float32, all fill,
    registered as a blocks cache under key. Returns the cache and the first two arrays."""
    cache_desc = CacheDesc(
        num_tensors=NUM_TENSORS,
        shape=[BLOCKS_NUM, KV_SHAPE],
        data_type=DataType.DT_FLOAT,
        placement=Placement.DEVICE,
    )
    tensors = [np.full((BLOCKS_NUM, KV_SHAPE), fill, dtype=np.float32) for _ in range(NUM_TENSORS)]
    cache = cache_manager.register_blocks_cache(cache_desc, [_addr(t) for t in tensors], key)
    return cache, tensors[0], tensors[1]


def _sample_end(datadist, cache, remote_cluster_id):
    """A sample's end: force-unlink the other side, unregister the cache, finalize."""
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = remote_cluster_id
    ret, _ = datadist.unlink_clusters([cluster], 5000, force=True)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"unlink failed: {ret}")
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()
    return "ok"


def _remote_init(role, cluster_id, port=None, transfer_backend=None):
    """A remote-accessible cluster (local_comm_res ""), listening on port when given."""
    dd = LLMDataDist(role, cluster_id)
    cfg = LLMConfig()
    cfg.device_id = 0
    cfg.local_comm_res = ""
    if transfer_backend is not None:
        cfg.transfer_backend = transfer_backend
    if port is not None:
        cfg.listen_ip_info = f"{HOST}:{port}"
    dd.init(cfg.generate_options())
    return dd


def _tca_init(role, cluster_id, port):
    datadist = LLMDataDist(role, cluster_id)
    llm_config = LLMConfig()
    llm_config.device_id = 0
    if role == LLMRole.DECODER:
        llm_config.listen_ip_info = f"{HOST}:{port}"
    llm_config.enable_cache_manager = True
    llm_config.enable_remote_cache_accessible = True
    datadist.init(llm_config.generate_options())
    return datadist


def tca_prompt(ctx, port):
    datadist = _tca_init(LLMRole.PROMPT, 0, port)
    cache_manager = datadist.cache_manager
    cache, tensor, tensor2 = _sample_cache(cache_manager, 1.0, BlocksCacheKey(0, 0))
    ctx.barrier()  # register end
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = 1
    cluster.append_local_ip_info(HOST, 26000)
    cluster.append_remote_ip_info(HOST, port)
    ret, _ = datadist.link_clusters([cluster], 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception("link failed")
    transfer_config = TransferWithCacheKeyConfig(BlocksCacheKey(1, 0), range(0, 1), range(0, 1))
    cache_task = cache_manager.transfer_cache_async(cache, _Sync(True), [transfer_config])
    results = cache_task.get_results()
    ctx.check(results == [LLMStatusCode.LLM_SUCCESS], f"transfer results {results}")
    ctx.barrier()  # transfer cache end
    return _sample_end(datadist, cache, 1)


def tca_decoder(ctx, port):
    datadist = _tca_init(LLMRole.DECODER, 1, port)
    cache_manager = datadist.cache_manager
    cache, tensor, tensor2 = _sample_cache(cache_manager, 0.0, BlocksCacheKey(1, 0))
    ctx.barrier()  # register end
    ctx.barrier()  # prompt transfer cache end
    want = np.zeros((BLOCKS_NUM, KV_SHAPE), dtype=np.float32)
    want[0] = 1  # block 0 of layer 0's K and V
    ctx.check(np.array_equal(tensor, want), f"tensor after the transfer: {tensor}")
    ctx.check(np.array_equal(tensor2, want), f"tensor2 after the transfer: {tensor2}")
    return _sample_end(datadist, cache, 0)


# ------------------------------------------------------------------------------------------
# hixl_transfer_backend_sample.py (both listen, both link, the prompt pulls, the decoder pushes)
def hixl_prompt(ctx, pport, dport):
    datadist = _remote_init(LLMRole.PROMPT, 0, pport, "hixl")
    cache_manager = datadist.cache_manager
    cache, tensor, tensor2 = _sample_cache(cache_manager, 1.0, BlocksCacheKey(0, 0))
    ctx.barrier()  # register end
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = 1
    cluster.append_local_ip_info(HOST, pport)
    cluster.append_remote_ip_info(HOST, dport)
    ret, _ = datadist.link_clusters([cluster], 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"link failed: {ret}")
    cache_manager.pull_blocks(BlocksCacheKey(1, 0), cache, src_blocks=[2], dst_blocks=[2])
    ctx.barrier()  # the decoder's push is done
    expect_tensor = np.full((BLOCKS_NUM, KV_SHAPE), 0, dtype=np.float32)
    if not np.array_equal(expect_tensor, tensor):
        raise Exception(f"check tensor val failed, tensor={tensor}")
    if not np.array_equal(expect_tensor, tensor2):
        raise Exception(f"check tensor val failed, tensor2={tensor2}")
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = 1
    ret, _ = datadist.unlink_clusters([cluster], 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"unlink failed: {ret}")
    ctx.barrier()  # wait peer unlink end
    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()
    return "ok"


def hixl_decoder(ctx, pport, dport):
    datadist = _remote_init(LLMRole.DECODER, 1, dport, "hixl")
    cache_manager = datadist.cache_manager
    cache, tensor, tensor2 = _sample_cache(cache_manager, 0.0, BlocksCacheKey(1, 0))
    ctx.barrier()  # register end
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = 0
    cluster.append_local_ip_info(HOST, dport)
    cluster.append_remote_ip_info(HOST, pport)
    ret, _ = datadist.link_clusters([cluster], 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"link failed: {ret}")
    cache_manager.push_blocks(BlocksCacheKey(0, 0), cache, src_blocks=[0, 1], dst_blocks=[0, 1])
    ctx.barrier()  # push_blocks end
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = 0
    ret, _ = datadist.unlink_clusters([cluster], 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"unlink failed: {ret}")
    ctx.barrier()  # wait peer unlink end
    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()
    return "ok"


# ------------------------------------------------------------------------------------------
# pull_blocks_xpyd_sample.py (one decoder pulls from several prompts; ids from ip:port)
def ip_port_to_int(ip_port):
    ip, port_str = ip_port.split(":")
    ip_int = struct.unpack("!I", socket.inet_aton(ip))[0]
    return (ip_int << 16) | int(port_str)


def _xpyd_init(role, local_ip_port):
    datadist = LLMDataDist(role, ip_port_to_int(local_ip_port))
    llm_config = LLMConfig()
    llm_config.device_id = 0
    llm_config.local_comm_res = ""
    if role == LLMRole.PROMPT:
        llm_config.listen_ip_info = local_ip_port
    datadist.init(llm_config.generate_options())
    return datadist


def xpyd_prompt(ctx, local_ip_port):
    datadist = _xpyd_init(LLMRole.PROMPT, local_ip_port)
    cache_manager = datadist.cache_manager
    cache_desc = CacheDesc(
        num_tensors=1,
        shape=[BLOCKS_NUM, KV_SHAPE],
        data_type=DataType.DT_FLOAT,
        placement=Placement.DEVICE,
    )
    tensor = np.full((BLOCKS_NUM, KV_SHAPE), ip_port_to_int(local_ip_port), dtype=np.float32)
    cache = cache_manager.register_blocks_cache(
        cache_desc, [_addr(tensor)], BlocksCacheKey(ip_port_to_int(local_ip_port), 0)
    )
    ctx.barrier()  # registered (the sample's decoder sleeps 5 s for this)
    ctx.barrier()  # the decoder is done (the sample's prompt sleeps 30 s for this)
    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()
    return "ok"


def xpyd_decoder(ctx, local_ip_port, remote_ip_port):
    datadist = _xpyd_init(LLMRole.DECODER, local_ip_port)
    cache_manager = datadist.cache_manager
    cache_desc = CacheDesc(
        num_tensors=1,
        shape=[BLOCKS_NUM, KV_SHAPE],
        data_type=DataType.DT_FLOAT,
        placement=Placement.DEVICE,
    )
    remote_list = remote_ip_port.split(";")
    tensor = np.full((BLOCKS_NUM, KV_SHAPE), 0, dtype=np.float32)
    cache = cache_manager.register_blocks_cache(
        cache_desc, [_addr(tensor)], BlocksCacheKey(ip_port_to_int(local_ip_port), 0)
    )
    ctx.barrier()  # register end
    cluster_list = []
    for remote in remote_list:
        cluster = LLMClusterInfo()
        cluster.remote_cluster_id = ip_port_to_int(remote)
        cluster.append_local_ip_info(local_ip_port.split(":")[0], 0)
        cluster.append_remote_ip_info(remote.split(":")[0], int(remote.split(":")[1]))
        cluster_list.append(cluster)
    ret, _ = datadist.link_clusters(cluster_list, 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"link failed: {ret}")
    for remote in remote_list:
        cache_manager.pull_blocks(
            BlocksCacheKey(ip_port_to_int(remote), 0), cache, src_blocks=[0, 1], dst_blocks=[0, 2]
        )
        value = np.float32(ip_port_to_int(remote))
        ctx.check(
            bool(
                np.all(tensor[0] == value) and np.all(tensor[2] == value) and np.all(tensor[1] == 0)
            ),
            f"after pulling from {remote}: {tensor}",
        )
    ret, _ = datadist.unlink_clusters(cluster_list, 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"unlink failed: {ret}")
    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()
    ctx.barrier()  # done
    return "ok"


# ------------------------------------------------------------------------------------------
# push_blocks_sample.py (the decoder links to the prompt and pushes blocks into it)
def push_prompt(ctx, pport):
    datadist = _remote_init(LLMRole.PROMPT, 0, pport)
    cache_manager = datadist.cache_manager
    cache, tensor, tensor2 = _sample_cache(cache_manager, 1.0, BlocksCacheKey(0, 0))
    ctx.barrier()  # register end
    ctx.barrier()  # decoder push blocks end
    want = np.ones((BLOCKS_NUM, KV_SHAPE), dtype=np.float32)
    want[0] = 0  # decoder block 0 -> block 0, decoder block 1 -> block 2 (all zeros)
    want[2] = 0
    ctx.check(np.array_equal(tensor, want), f"tensor after the push: {tensor}")
    ctx.check(np.array_equal(tensor2, want), f"tensor2 after the push: {tensor2}")
    return _sample_end(datadist, cache, 1)


def push_decoder(ctx, pport):
    datadist = _remote_init(LLMRole.DECODER, 1)
    cache_manager = datadist.cache_manager
    cache, tensor, tensor2 = _sample_cache(cache_manager, 0.0, BlocksCacheKey(1, 0))
    ctx.barrier()  # register end
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = 0
    cluster.append_local_ip_info(HOST, 26001)
    cluster.append_remote_ip_info(HOST, pport)
    ret, _ = datadist.link_clusters([cluster], 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"link failed: {ret}")
    cache_manager.push_blocks(BlocksCacheKey(0, 0), cache, src_blocks=[0, 1], dst_blocks=[0, 2])
    ctx.barrier()  # push_blocks end
    return _sample_end(datadist, cache, 0)


# ------------------------------------------------------------------------------------------
# push_cache_sample.py: as push_blocks_sample, with rows of non-blocks caches. The decoder pushes
# a row of its cache into a row of the prompt's, named by the prompt's cache id (which the
# prompt hands over in id_file, where the sample's ranks would share it).
PUSH_ROWS = 4


def _rows_fill(cluster_id: int, tensor: int) -> np.ndarray:
    """Rows a flow can tell apart: row r of tensor t of cluster c holds 100c + 10t + r."""
    rows = np.arange(PUSH_ROWS, dtype=np.float32)[:, None] + 10 * tensor + 100 * cluster_id
    return np.repeat(rows, KV_SHAPE, axis=1)


def _rows_start(role, cluster_id, pport):
    """A push sample's start with a cache of PUSH_ROWS rows over numpy arrays of _rows_fill."""
    datadist = _remote_init(role, cluster_id, pport if role == LLMRole.PROMPT else None)
    cache_desc = CacheDesc(
        num_tensors=NUM_TENSORS,
        shape=[PUSH_ROWS, KV_SHAPE],
        data_type=DataType.DT_FLOAT,
        placement=Placement.DEVICE,
    )
    tensors = [_rows_fill(cluster_id, t) for t in range(NUM_TENSORS)]
    cache = datadist.cache_manager.register_cache(cache_desc, [_addr(t) for t in tensors])
    return datadist, tensors, cache


def push_cache_prompt(ctx, pport, id_file):
    datadist, tensors, cache = _rows_start(LLMRole.PROMPT, 0, pport)
    with open(id_file, "w") as f:
        f.write(str(cache.cache_id))
    ctx.barrier()  # register end
    ctx.barrier()  # decoder push_cache end
    for t, tensor in enumerate(tensors):
        want = _rows_fill(0, t)
        want[2] = _rows_fill(1, t)[1]  # decoder row 1 -> row 2
        want[0] = _rows_fill(1, t)[3]  # decoder row 3 -> row 0
        ctx.check(np.array_equal(tensor, want), f"tensor {t} after the pushes: {tensor}")
    return _sample_end(datadist, cache, 1)


def push_cache_decoder(ctx, pport, id_file):
    datadist, tensors, cache = _rows_start(LLMRole.DECODER, 1, pport)
    cache_manager = datadist.cache_manager
    ctx.barrier()  # register end
    with open(id_file) as f:
        prompt_cache_id = int(f.read())
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = 0
    cluster.append_local_ip_info(HOST, 26001)
    cluster.append_remote_ip_info(HOST, pport)
    ret, _ = datadist.link_clusters([cluster], 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"link failed: {ret}")
    cache_manager.push_cache(CacheKeyByIdAndIndex(0, prompt_cache_id, 2), cache, 1)
    cache_manager.push_cache(
        CacheKeyByIdAndIndex(0, prompt_cache_id, 0),
        cache,
        src_batch_index=3,
        src_layer_range=range(0, 1),
        dst_layer_range=range(0, 1),
    )
    ctx.barrier()  # push_cache end
    return _sample_end(datadist, cache, 0)


# ------------------------------------------------------------------------------------------
# vllm-ascend's HIXL connector: both listen, the decode links and pulls MLA caches (one tensor
# per layer, an odd number of them, one cache per model id) layer range by layer range.
MLA_LAYERS = 5
MLA_BLOCKS = 16
MLA_BLOCK_ELEMS = 256  # 512-byte blocks (fp16)
MLA_MODELS = (0, 1)  # e.g. the latent KV and the rope part


def _mla_fill(cluster_id: int, model_id: int, layer: int) -> np.ndarray:
    rng = np.random.default_rng([cluster_id & 0xFFFF, model_id, layer])
    return rng.integers(0, 2**16, (MLA_BLOCKS, MLA_BLOCK_ELEMS), dtype=np.uint16)


def _register_mla(dd, cluster_id, fill: bool):
    caches, arrays = {}, {}
    desc = CacheDesc(
        MLA_LAYERS, [MLA_BLOCKS, MLA_BLOCK_ELEMS], DataType.DT_FLOAT16, Placement.DEVICE
    )
    for m in MLA_MODELS:
        arrs = [
            (
                _mla_fill(cluster_id, m, layer)
                if fill
                else np.zeros((MLA_BLOCKS, MLA_BLOCK_ELEMS), dtype=np.uint16)
            )
            for layer in range(MLA_LAYERS)
        ]
        caches[m] = dd.cache_manager.register_blocks_cache(
            desc, [_addr(a) for a in arrs], BlocksCacheKey(cluster_id, m), remote_accessible=True
        )
        arrays[m] = arrs
    return caches, arrays


def _check_mla(ctx, arrays, prefill_id, src_blocks, dst_blocks):
    """Blocks dst_blocks of every model's layers hold the prefill's src_blocks, the rest zero."""
    for m in MLA_MODELS:
        for layer in range(MLA_LAYERS):
            want = np.zeros((MLA_BLOCKS, MLA_BLOCK_ELEMS), dtype=np.uint16)
            want[dst_blocks] = _mla_fill(prefill_id, m, layer)[src_blocks]
            ctx.check(np.array_equal(arrays[m][layer], want), f"model {m} layer {layer}")


def _mla_end(dd, caches):
    for c in caches.values():
        dd.cache_manager.unregister_cache(c.cache_id)
    dd.finalize()
    return "ok"


def hixl_connector_prefill(ctx, cluster_id, port):
    dd = _remote_init(LLMRole.PROMPT, cluster_id, port, "hixl")
    caches, _ = _register_mla(dd, cluster_id, True)
    ctx.barrier()  # registered
    ctx.barrier()  # the decode pulled and unlinked
    return _mla_end(dd, caches)


def hixl_connector_decode(ctx, cluster_id, port, prefill_id, prefill_port):
    dd = _remote_init(LLMRole.DECODER, cluster_id, port, "hixl")
    caches, arrays = _register_mla(dd, cluster_id, False)
    ctx.barrier()  # registered
    info = _link_by_address(dd, prefill_id, prefill_port)
    remote_blocks, local_blocks = [3, 4, 5, 9], [0, 1, 2, 15]
    for m in MLA_MODELS:
        for layers in (range(0, 1), range(1, MLA_LAYERS)):  # layer range by layer range
            dd.cache_manager.pull_blocks(
                BlocksCacheKey(prefill_id, m),
                caches[m],
                remote_blocks,
                local_blocks,
                src_layer_range=layers,
                dst_layer_range=layers,
                tensor_num_per_layer=1,
            )
    _check_mla(ctx, arrays, prefill_id, remote_blocks, local_blocks)
    _unlink_by_address(ctx, dd, info)
    ctx.barrier()
    return _mla_end(dd, caches)


# ------------------------------------------------------------------------------------------
# SGLang-style push: the decode links with only the prefill's ip:port (no cluster id); the
# prefill pushes each model's MLA cache with push_blocks(..., range(n), range(n), 1).
def sglang_prefill(ctx, cluster_id, port, decode_id):
    dd = _remote_init(LLMRole.PROMPT, cluster_id, port)
    caches, _ = _register_mla(dd, cluster_id, True)
    ctx.barrier()  # registered
    ctx.barrier()  # the decode linked
    src, dst = [1, 2, 3, 12], [8, 9, 10, 0]
    for m in MLA_MODELS:
        dd.cache_manager.push_blocks(
            BlocksCacheKey(decode_id, m),
            caches[m],
            src,
            dst,
            range(MLA_LAYERS),
            range(MLA_LAYERS),
            1,
        )
    ctx.barrier()  # pushed
    ctx.barrier()  # checked and unlinked
    return _mla_end(dd, caches)


def sglang_decode(ctx, cluster_id, prefill_id, prefill_port):
    dd = _remote_init(LLMRole.DECODER, cluster_id)
    caches, arrays = _register_mla(dd, cluster_id, False)
    ctx.barrier()  # registered
    info = LLMClusterInfo()
    info.append_remote_ip_info(HOST, prefill_port)  # only the remote ip: no cluster id
    ret, codes = dd.link_clusters([info], 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"link failed: {ret} {codes}")
    ctx.barrier()  # linked
    ctx.barrier()  # pushed
    src, dst = [1, 2, 3, 12], [8, 9, 10, 0]
    _check_mla(ctx, arrays, prefill_id, src, dst)
    ret, _ = dd.unlink_clusters([info], 5000, force=True)  # by address, too
    ctx.check(ret == LLMStatusCode.LLM_SUCCESS, f"unlink: {ret}")
    ctx.barrier()
    return _mla_end(dd, caches)


# ------------------------------------------------------------------------------------------
# omni-infer's prefill (the decode runs in the test process): it serves its cache until the
# parent kills it; a restart serves different bytes under the same cluster id and port.
def omni_prefill(ctx, cluster_id, port, generation):
    dd = LLMDataDist(LLMRole.PROMPT, cluster_id)
    cfg = LLMConfig()
    cfg.device_id = 0
    cfg.enable_cache_manager = True
    cfg.listen_ip_info = f"{HOST}:{port}"
    dd.init(cfg.generate_options())
    desc = CacheDesc(4, [8, 128], DataType.DT_FLOAT16, Placement.DEVICE)
    arrs = [np.full((8, 128), generation * 100 + t, dtype=np.uint16) for t in range(4)]
    dd.cache_manager.register_blocks_cache(
        desc, [_addr(a) for a in arrs], BlocksCacheKey(cluster_id, 0)
    )
    ctx.tell("ready")
    ctx.barrier()  # until the parent ends it (or kills this process)
    dd.finalize()
    return "ok"


# ------------------------------------------------------------------------------------------
# pull_blocks_sample.py: rank-table link, the decoder pulls two blocks, then swaps them out to
# a CPU cache and back. The single-server table of the sample (host 127.0.0.1); the test's
# rendezvous options keep its ports away from other runs. The prompt's tensor holds distinct
# values (the sample's torch.ones on both sides could not show that anything arrived).
PB_SHAPE = [2, 256 * 1024]


def _pb_init(role, cluster_id, rendezvous):
    datadist = LLMDataDist(role, cluster_id)
    llm_config = LLMConfig()
    llm_config.device_id = 0
    llm_config.enable_cache_manager = True
    llm_config.ge_options = dict(rendezvous)
    datadist.init(llm_config.generate_options())
    return datadist


def _pb_link(datadist, rendezvous):
    import json
    import time

    from llmdist import RegisterMemStatus

    rank_table_dict = {
        "server_count": "1",
        "status": "completed",
        "version": "1.2",
        "server_list": [
            {
                "device": [
                    {"device_id": "0", "device_ip": "192.168.1.1", "rank_id": "0"},
                    {"device_id": "1", "device_ip": "192.168.1.2", "rank_id": "1"},
                ],
                "host_ip": HOST,
                "server_id": "1",
            }
        ],
    }
    cluster_rank_info = {1: 0, 2: 1}
    comm_id = datadist.link("link", cluster_rank_info, json.dumps(rank_table_dict))
    while True:
        ret = datadist.query_register_mem_status(comm_id)
        if ret == RegisterMemStatus.OK:
            break
        if ret == RegisterMemStatus.FAILED:
            raise RuntimeError("link failed")
        time.sleep(0.05)
    return comm_id


def pb_prompt(ctx, rendezvous):
    from llmdist import Cache  # noqa: F401  (the sample imports it)

    datadist = _pb_init(LLMRole.PROMPT, 1, rendezvous)
    cache_manager = datadist.cache_manager
    cache_desc = CacheDesc(
        num_tensors=1, shape=PB_SHAPE, data_type=DataType.DT_FLOAT, placement=Placement.DEVICE
    )
    tensor = np.arange(PB_SHAPE[0] * PB_SHAPE[1], dtype=np.float32).reshape(PB_SHAPE)
    cache = cache_manager.register_blocks_cache(cache_desc, [_addr(tensor)], BlocksCacheKey(1, 0))
    comm_id = _pb_link(datadist, rendezvous)
    ctx.barrier()  # prepared (the sample's decoder sleeps 5 s for this)
    ctx.barrier()  # the decoder is done (the sample's prompt sleeps 30 s)
    datadist.unlink(comm_id)
    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()
    return "ok"


def pb_decoder(ctx, rendezvous):
    from llmdist import Cache

    datadist = _pb_init(LLMRole.DECODER, 2, rendezvous)
    cache_manager = datadist.cache_manager
    cache_desc = CacheDesc(
        num_tensors=1, shape=PB_SHAPE, data_type=DataType.DT_FLOAT, placement=Placement.DEVICE
    )
    tensor = np.ones(PB_SHAPE, dtype=np.float32)
    cache = cache_manager.register_blocks_cache(cache_desc, [_addr(tensor)])
    comm_id = _pb_link(datadist, rendezvous)
    ctx.barrier()  # wait prompt prepared
    cache_manager.pull_blocks(BlocksCacheKey(1, 0), cache, src_blocks=[0, 1], dst_blocks=[0, 1])
    want = np.arange(PB_SHAPE[0] * PB_SHAPE[1], dtype=np.float32).reshape(PB_SHAPE)
    ctx.check(np.array_equal(tensor, want), "the pulled blocks")
    # swap blocks: out to a CPU cache and back in
    cpu_tensor = np.random.default_rng(3).random(PB_SHAPE, dtype=np.float32)
    cpu_cache = Cache.create_cpu_cache(
        CacheDesc(
            num_tensors=1, shape=PB_SHAPE, data_type=DataType.DT_FLOAT, placement=Placement.HOST
        ),
        [_addr(cpu_tensor)],
    )
    cache_manager.swap_blocks(cache, cpu_cache, {0: 0, 1: 1})
    ctx.check(np.array_equal(cpu_tensor, want), "the blocks swapped out")
    tensor[:] = 0
    cache_manager.swap_blocks(cpu_cache, cache, {0: 0, 1: 1})
    ctx.check(np.array_equal(tensor, want), "the blocks swapped back in")
    datadist.unlink(comm_id)
    datadist.finalize()
    ctx.barrier()  # done
    return "ok"


# ------------------------------------------------------------------------------------------
# pull_cache_sample.py: rank-table link first, then the prompt allocates a 2-row cache under two
# CacheKeys (one per row) and the decoder pulls each key's row into its own allocated cache.
# The prompt fills every tensor with distinct values (the sample fills tensor 0 with ones).
PC_SHAPE = [2, 256 * 1024]


def _pc_fill(cache, cluster_id):
    from llmdist.bench.procs import host_view

    n = cache.cache_desc.size
    for t, a in enumerate(cache.tensor_addrs):
        view = host_view(a, n).view(np.uint16)
        view[:] = np.random.default_rng([cluster_id, t]).integers(
            0, 2**16, view.size, dtype=np.uint16
        )


def pc_prompt(ctx, rendezvous):
    from llmdist import CacheKey

    datadist = _pb_init(LLMRole.PROMPT, 1, rendezvous)
    comm_id = _pb_link(datadist, rendezvous)
    cache_manager = datadist.cache_manager
    cache_desc = CacheDesc(
        num_tensors=4, shape=PC_SHAPE, data_type=DataType.DT_FLOAT16, placement=Placement.DEVICE
    )
    cache_key_0 = CacheKey(prompt_cluster_id=1, req_id=0, model_id=0)
    cache_key_1 = CacheKey(prompt_cluster_id=1, req_id=1, model_id=0)
    cache = cache_manager.allocate_cache(cache_desc, [cache_key_0, cache_key_1])
    _pc_fill(cache, 1)
    ctx.barrier()  # prepared (the sample's decoder sleeps 5 s)
    ctx.barrier()  # pulled (the sample's prompt sleeps 30 s)
    cache_manager.remove_cache_key(cache_key_0)
    cache_manager.remove_cache_key(cache_key_1)
    cache_manager.deallocate_cache(cache)
    datadist.unlink(comm_id)
    datadist.finalize()
    return "ok"


def pc_decoder(ctx, rendezvous):
    from llmdist import CacheKey
    from llmdist.bench.procs import host_view

    datadist = _pb_init(LLMRole.DECODER, 2, rendezvous)
    comm_id = _pb_link(datadist, rendezvous)
    cache_manager = datadist.cache_manager
    cache_desc = CacheDesc(
        num_tensors=4, shape=PC_SHAPE, data_type=DataType.DT_FLOAT16, placement=Placement.DEVICE
    )
    cache = cache_manager.allocate_cache(cache_desc)
    ctx.barrier()  # wait prompt prepared
    cache_key_0 = CacheKey(prompt_cluster_id=1, req_id=0, model_id=0)
    cache_key_1 = CacheKey(prompt_cluster_id=1, req_id=1, model_id=0)
    cache_manager.pull_cache(cache_key_0, cache, batch_index=1)  # row 0 into row 1
    cache_manager.pull_cache(cache_key_1, cache, batch_index=0)  # row 1 into row 0
    n = cache.cache_desc.size
    for t, a in enumerate(cache.tensor_addrs):
        want = np.random.default_rng([1, t]).integers(0, 2**16, n // 2, dtype=np.uint16)
        got = host_view(a, n).view(np.uint16)
        half = n // 4
        ctx.check(
            np.array_equal(got[:half], want[half:]) and np.array_equal(got[half:], want[:half]),
            f"tensor {t} after the pulls",
        )
    ctx.barrier()
    cache_manager.deallocate_cache(cache)
    datadist.unlink(comm_id)
    datadist.finalize()
    return "ok"


# ------------------------------------------------------------------------------------------
# vllm-ascend's HIXL connector on a hybrid (Mamba/GDN) model: per layer one raw buffer, and two
# as_strided views of it with the same page stride, the conv state at the start of each page and
# the ssm state after it (_adjust_kv_layout); each view is registered as its own blocks cache
# (one tensor per layer) under its own key, so the two registrations overlap. A block of either
# cache is a whole page from that view's start. The raw buffers carry HY_CONV bytes of padding
# at the end, so that the ssm view's last block stays inside them.
HY_LAYERS = 3
HY_BLOCKS = 8
HY_CONV, HY_SSM = 96, 160
HY_PAGE = HY_CONV + HY_SSM
HY_RAW = HY_BLOCKS * HY_PAGE + HY_CONV
HY_VIEWS = {0: 0, 1: HY_CONV}  # key id -> the view's byte offset in the raw buffer


def _hybrid_raw(cluster_id: int, fill: bool):
    if not fill:
        return [np.zeros(HY_RAW, dtype=np.uint8) for _ in range(HY_LAYERS)]
    return [
        np.random.default_rng([cluster_id & 0xFFFF, 77, layer]).integers(
            0, 256, HY_RAW, dtype=np.uint8
        )
        for layer in range(HY_LAYERS)
    ]


def _register_hybrid(dd, cluster_id, raws):
    """The conv (key 0) and ssm (key 1) caches over as_strided views of the raw buffers."""
    desc = CacheDesc(HY_LAYERS, [HY_BLOCKS, HY_PAGE], DataType.DT_UINT8, Placement.DEVICE)
    caches = {}
    for key_id, offset in HY_VIEWS.items():
        views = [
            np.lib.stride_tricks.as_strided(
                raw[offset:], shape=(HY_BLOCKS, HY_SSM if offset else HY_CONV), strides=(HY_PAGE, 1)
            )
            for raw in raws
        ]
        caches[key_id] = dd.cache_manager.register_blocks_cache(
            desc,
            [_addr(v) for v in views],
            BlocksCacheKey(cluster_id, key_id),
            remote_accessible=True,
        )
    return caches


def _hybrid_copy(model, src_raws, key_id, src_blocks, dst_blocks):
    """What a copy of blocks of view key_id does to the raw buffers of model (in place)."""
    off = HY_VIEWS[key_id]
    for layer in range(HY_LAYERS):
        for s, d in zip(src_blocks, dst_blocks):
            model[layer][off + d * HY_PAGE : off + (d + 1) * HY_PAGE] = src_raws[layer][
                off + s * HY_PAGE : off + (s + 1) * HY_PAGE
            ]


def _hybrid_check(ctx, raws, model, what):
    for layer in range(HY_LAYERS):
        ctx.check(np.array_equal(raws[layer], model[layer]), f"{what}: layer {layer}")


def hybrid_prefill(ctx, cluster_id, port, decode_id):
    dd = _remote_init(LLMRole.PROMPT, cluster_id, port, "hixl")
    raws = _hybrid_raw(cluster_id, True)
    caches = _register_hybrid(dd, cluster_id, raws)
    ctx.barrier()  # 1 registered
    ctx.barrier()  # 2 the decode linked and pulled
    cm = dd.cache_manager
    cm.push_blocks(
        BlocksCacheKey(decode_id, 1), caches[1], [0], [1], range(HY_LAYERS), range(HY_LAYERS), 1
    )
    cm.push_blocks(
        BlocksCacheKey(decode_id, 0), caches[0], [7], [2], range(HY_LAYERS), range(HY_LAYERS), 1
    )
    ctx.barrier()  # 3 pushed
    ctx.barrier()  # 4 the decode withdrew its conv cache
    _expect_not_exist(
        ctx,
        "a push to the withdrawn conv cache",
        cm.push_blocks,
        BlocksCacheKey(decode_id, 0),
        caches[0],
        [1],
        [1],
        range(HY_LAYERS),
        range(HY_LAYERS),
        1,
    )
    cm.push_blocks(
        BlocksCacheKey(decode_id, 1), caches[1], [3], [4], range(HY_LAYERS), range(HY_LAYERS), 1
    )
    ctx.barrier()  # 5 pushed into the ssm cache alone
    ctx.barrier()  # 6 the decode checked and unlinked
    for c in caches.values():
        cm.unregister_cache(c.cache_id)
    dd.finalize()
    return "ok"


def hybrid_decode(ctx, cluster_id, prefill_id, prefill_port):
    dd = _remote_init(LLMRole.DECODER, cluster_id, None, None)
    raws = _hybrid_raw(cluster_id, False)
    caches = _register_hybrid(dd, cluster_id, raws)
    src = _hybrid_raw(prefill_id, True)
    model = [r.copy() for r in raws]
    ctx.barrier()  # 1 registered
    info = _link_by_address(dd, prefill_id, prefill_port)
    cm = dd.cache_manager
    for key_id, sb, db in ((0, [1, 4], [0, 5]), (1, [2, 6], [3, 7])):
        cm.pull_blocks(
            BlocksCacheKey(prefill_id, key_id), caches[key_id], sb, db, tensor_num_per_layer=1
        )
        _hybrid_copy(model, src, key_id, sb, db)
    _hybrid_check(ctx, raws, model, "pulled conv and ssm blocks")
    ctx.barrier()  # 2 pulled
    ctx.barrier()  # 3 the prefill pushed
    _hybrid_copy(model, src, 1, [0], [1])
    _hybrid_copy(model, src, 0, [7], [2])
    _hybrid_check(ctx, raws, model, "pushed ssm and conv blocks")
    cm.unregister_cache(caches.pop(0).cache_id)
    ctx.barrier()  # 4 the conv cache is withdrawn
    ctx.barrier()  # 5 the prefill pushed into the ssm cache
    _hybrid_copy(model, src, 1, [3], [4])
    cm.pull_blocks(BlocksCacheKey(prefill_id, 1), caches[1], [5], [6], tensor_num_per_layer=1)
    _hybrid_copy(model, src, 1, [5], [6])
    _hybrid_check(ctx, raws, model, "the ssm cache after the conv cache went")
    _unlink_by_address(ctx, dd, info)
    ctx.barrier()  # 6
    cm.unregister_cache(caches[1].cache_id)
    dd.finalize()
    return "ok"


# ------------------------------------------------------------------------------------------
# omni-npu's DatadistEngine: every layer's K and V registered as one blocks cache; a pull that
# names a layer subset registers a further cache (_make_group(layer_ids)) over the same,
# already registered tensors of those layers, on both sides, and pulls by the group's key.
OG_LAYERS = 4
OG_BLOCKS = 8
OG_ELEMS = 64  # 128-byte blocks (fp16)
OG_GROUP = [1, 3]  # the layer subset
OG_GROUP_KEY = 10


def _og_arrays(cluster_id: int, fill: bool):
    if not fill:
        return [np.zeros((OG_BLOCKS, OG_ELEMS), dtype=np.uint16) for _ in range(2 * OG_LAYERS)]
    return [
        np.random.default_rng([cluster_id & 0xFFFF, 88, t]).integers(
            0, 2**16, (OG_BLOCKS, OG_ELEMS), dtype=np.uint16
        )
        for t in range(2 * OG_LAYERS)
    ]


def _og_register(dd, cluster_id, arrays):
    """The whole cache (key 0) and the group of layers OG_GROUP (key OG_GROUP_KEY)."""
    cm = dd.cache_manager
    full = cm.register_blocks_cache(
        CacheDesc(2 * OG_LAYERS, [OG_BLOCKS, OG_ELEMS], DataType.DT_FLOAT16, Placement.DEVICE),
        [_addr(a) for a in arrays],
        BlocksCacheKey(cluster_id, 0),
        remote_accessible=True,
    )
    tensors = [arrays[2 * layer + kv] for layer in OG_GROUP for kv in (0, 1)]
    group = cm.register_blocks_cache(
        CacheDesc(len(tensors), [OG_BLOCKS, OG_ELEMS], DataType.DT_FLOAT16, Placement.DEVICE),
        [_addr(a) for a in tensors],
        BlocksCacheKey(cluster_id, OG_GROUP_KEY),
        remote_accessible=True,
    )
    return full, group


def layer_group_prefill(ctx, cluster_id, port):
    dd = _remote_init(LLMRole.PROMPT, cluster_id, port, "hixl")
    arrays = _og_arrays(cluster_id, True)  # registered: kept alive until the end
    full, group = _og_register(dd, cluster_id, arrays)
    ctx.barrier()  # 1 registered
    ctx.barrier()  # 2 the decode pulled the group
    dd.cache_manager.unregister_cache(group.cache_id)
    ctx.barrier()  # 3 the group is withdrawn
    ctx.barrier()  # 4 the decode pulled the whole cache and unlinked
    dd.cache_manager.unregister_cache(full.cache_id)
    dd.finalize()
    return "ok"


def layer_group_decode(ctx, cluster_id, prefill_id, prefill_port):
    dd = _remote_init(LLMRole.DECODER, cluster_id, None, None)
    arrays = _og_arrays(cluster_id, False)
    full, group = _og_register(dd, cluster_id, arrays)
    src = _og_arrays(prefill_id, True)
    want = [a.copy() for a in arrays]
    ctx.barrier()  # 1 registered
    info = _link_by_address(dd, prefill_id, prefill_port)
    cm = dd.cache_manager
    cm.pull_blocks(BlocksCacheKey(prefill_id, OG_GROUP_KEY), group, [2, 5], [0, 7])
    for layer in OG_GROUP:
        for kv in (0, 1):
            want[2 * layer + kv][[0, 7]] = src[2 * layer + kv][[2, 5]]
    for t in range(2 * OG_LAYERS):
        ctx.check(np.array_equal(arrays[t], want[t]), f"group pull: tensor {t}")
    cm.unregister_cache(group.cache_id)
    ctx.barrier()  # 2 pulled
    ctx.barrier()  # 3 the prefill withdrew its group
    _expect_not_exist(
        ctx,
        "a pull from the withdrawn group",
        cm.pull_blocks,
        BlocksCacheKey(prefill_id, OG_GROUP_KEY),
        full,
        [1],
        [1],
    )
    cm.pull_blocks(BlocksCacheKey(prefill_id, 0), full, [6], [1])
    for t in range(2 * OG_LAYERS):
        want[t][1] = src[t][6]
        ctx.check(np.array_equal(arrays[t], want[t]), f"whole-cache pull: tensor {t}")
    _unlink_by_address(ctx, dd, info)
    ctx.barrier()  # 4
    cm.unregister_cache(full.cache_id)
    dd.finalize()
    return "ok"


# ------------------------------------------------------------------------------------------
# pull_from_cache_to_blocks.py: rank-table link first (pull_sample_common, with its memory
# pool), then the prompt allocates a cache under one CacheKey; the decoder pulls the key's row
# into block 0 of its registered blocks cache. The prompt's remove_cache_key afterwards is a
# no-op (the pull released the key), then it deallocates. The prompt fills its tensors with
# distinct values (the sample leaves them as allocated).
PFC_NUM_TENSORS = 4
PFC_SHAPE = [2, 16 * 1024]
PFC_POOL = 64 * 1024 * 1024


def _pfc_init(role, cluster_id, rendezvous):
    datadist = LLMDataDist(role, cluster_id)
    llm_config = LLMConfig()
    llm_config.device_id = 0
    llm_config.enable_cache_manager = True
    llm_config.mem_pool_cfg = f'{{"memory_size": {PFC_POOL}}}'
    llm_config.ge_options = dict(rendezvous)
    datadist.init(llm_config.generate_options())
    return datadist


def pfc_prompt(ctx, rendezvous):
    from llmdist import CacheKey

    datadist = _pfc_init(LLMRole.PROMPT, 1, rendezvous)
    comm_id = _pb_link(datadist, rendezvous)
    cache_manager = datadist.cache_manager
    cache_desc = CacheDesc(
        num_tensors=PFC_NUM_TENSORS,
        shape=PFC_SHAPE,
        data_type=DataType.DT_FLOAT16,
        placement=Placement.DEVICE,
    )
    cache_key = CacheKey(prompt_cluster_id=1, req_id=0, model_id=0)
    cache = cache_manager.allocate_cache(cache_desc, [cache_key])
    _pc_fill(cache, 1)
    ctx.barrier()  # cache ready
    ctx.barrier()  # decoder pull_blocks end
    datadist.unlink(comm_id)
    ctx.barrier()  # wait peer unlink end
    cache_manager.remove_cache_key(cache_key)  # a no-op after the pull, as upstream says
    cache_manager.deallocate_cache(cache)
    datadist.finalize()
    return "ok"


def pfc_decoder(ctx, rendezvous):
    from llmdist import CacheKey

    datadist = _pfc_init(LLMRole.DECODER, 2, rendezvous)
    cache_manager = datadist.cache_manager
    cache_desc = CacheDesc(
        num_tensors=PFC_NUM_TENSORS,
        shape=PFC_SHAPE,
        data_type=DataType.DT_FLOAT16,
        placement=Placement.DEVICE,
    )
    tensors = []
    addrs = []
    for _ in range(PFC_NUM_TENSORS):
        tensor = np.full(PFC_SHAPE, 0x3C00, dtype=np.uint16)  # fp16 ones
        addrs.append(_addr(tensor))
        tensors.append(tensor)
    cache = cache_manager.register_blocks_cache(cache_desc, addrs)
    comm_id = _pb_link(datadist, rendezvous)
    ctx.barrier()  # cache ready
    cache_key = CacheKey(prompt_cluster_id=1, req_id=0, model_id=0)
    cache_manager.pull_blocks(cache_key, cache, src_blocks=[], dst_blocks=[0])
    for t, tensor in enumerate(tensors):
        row0 = np.random.default_rng([1, t]).integers(
            0, 2**16, PFC_SHAPE[0] * PFC_SHAPE[1], dtype=np.uint16
        )[: PFC_SHAPE[1]]
        ctx.check(np.array_equal(tensor[0], row0), f"tensor {t}: block 0 holds the key's row")
        ctx.check(bool(np.all(tensor[1] == 0x3C00)), f"tensor {t}: block 1 unchanged")
    _expect_not_exist(
        ctx,
        "a second pull by the released key",
        cache_manager.pull_blocks,
        cache_key,
        cache,
        src_blocks=[],
        dst_blocks=[1],
    )
    ctx.barrier()  # pull_blocks end
    datadist.unlink(comm_id)
    ctx.barrier()  # wait peer unlink end
    datadist.finalize()
    return "ok"


# ------------------------------------------------------------------------------------------
# switch_role_sample.py: the decoder links to the listening prompt and pulls two blocks, unlinks;
# the prompt switches to DECODER (its listener stops), the decoder switches to PROMPT with a
# listener; the former prompt links to it and the former decoder pushes every block back. The
# two listeners get two free ports (the sample uses port 26000 on two hosts).
SW_PROMPT_ID, SW_DECODER_ID = 0, 1


def _sw_init(role, cluster_id, port):
    datadist = LLMDataDist(role, cluster_id)
    llm_config = LLMConfig()
    llm_config.device_id = 0
    llm_config.local_comm_res = ""
    if role == LLMRole.PROMPT:
        llm_config.listen_ip_info = f"{HOST}:{port}"
    datadist.init(llm_config.generate_options())
    return datadist


def _sw_cache(cache_manager, fill, cluster_id):
    cache_desc = CacheDesc(
        num_tensors=NUM_TENSORS,
        shape=[BLOCKS_NUM, KV_SHAPE],
        data_type=DataType.DT_FLOAT,
        placement=Placement.DEVICE,
    )
    tensor = np.full((BLOCKS_NUM, KV_SHAPE), fill, dtype=np.float32)
    tensor2 = np.full((BLOCKS_NUM, KV_SHAPE), fill, dtype=np.float32)
    cache = cache_manager.register_blocks_cache(
        cache_desc, [_addr(tensor), _addr(tensor2)], BlocksCacheKey(cluster_id, 0)
    )
    return cache, tensor, tensor2


def sw_prompt(ctx, pport, dport):
    datadist = _sw_init(LLMRole.PROMPT, SW_PROMPT_ID, pport)
    cache_manager = datadist.cache_manager
    cache, tensor, tensor2 = _sw_cache(cache_manager, 1.0, SW_PROMPT_ID)
    ctx.barrier()  # register end
    ctx.barrier()  # decoder unlink
    datadist.switch_role(LLMRole.DECODER)
    ctx.check(datadist.listen_port is None, "the listener stopped")
    ctx.barrier()  # prompt switch role end, close listen
    ctx.barrier()  # decoder switch role end, listen
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = SW_DECODER_ID
    cluster.append_local_ip_info(HOST, pport)
    cluster.append_remote_ip_info(HOST, dport)
    ret, _ = datadist.link_clusters([cluster], 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception("link failed")
    ctx.barrier()  # prompt link end
    ctx.barrier()  # decoder push blocks end
    # the decoder pulled blocks 0 and 1 into its blocks 0 and 2 and pushed all three back
    want = np.array([1.0, 0.0, 1.0], dtype=np.float32)[:, None] * np.ones(KV_SHAPE, np.float32)
    ctx.check(
        np.array_equal(tensor, want) and np.array_equal(tensor2, want),
        "the blocks the decoder pushed",
    )
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = SW_DECODER_ID
    ret, _ = datadist.unlink_clusters([cluster], 5000, force=True)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception("unlink failed")
    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()
    return "ok"


def sw_decoder(ctx, pport, dport):
    datadist = _sw_init(LLMRole.DECODER, SW_DECODER_ID, None)
    cache_manager = datadist.cache_manager
    cache, tensor, tensor2 = _sw_cache(cache_manager, 0.0, SW_DECODER_ID)
    ctx.barrier()  # register end
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = SW_PROMPT_ID
    cluster.append_local_ip_info(HOST, dport)
    cluster.append_remote_ip_info(HOST, pport)
    ret, _ = datadist.link_clusters([cluster], 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception("link failed")
    cache_manager.pull_blocks(
        BlocksCacheKey(SW_PROMPT_ID, 0), cache, src_blocks=[0, 1], dst_blocks=[0, 2]
    )
    want = np.array([1.0, 0.0, 1.0], dtype=np.float32)[:, None] * np.ones(KV_SHAPE, np.float32)
    ctx.check(np.array_equal(tensor, want) and np.array_equal(tensor2, want), "the pulled blocks")
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = SW_PROMPT_ID
    cluster.append_remote_ip_info(HOST, pport)
    ret, _ = datadist.unlink_clusters([cluster], 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception("unlink failed")
    ctx.barrier()  # decoder unlink
    ctx.barrier()  # prompt switch role end, close listen
    llm_config = LLMConfig()
    llm_config.listen_ip_info = f"{HOST}:{dport}"
    llm_options = llm_config.generate_options()
    datadist.switch_role(LLMRole.PROMPT, llm_options)
    ctx.barrier()  # decoder switch role end, listen
    ctx.barrier()  # prompt link end
    cache_manager.push_blocks(
        BlocksCacheKey(SW_PROMPT_ID, 0),
        cache,
        src_blocks=[0, 1, 2],
        dst_blocks=[0, 1, 2],
        src_layer_range=range(0, 2),
        dst_layer_range=range(0, 2),
        tensor_num_per_layer=1,
    )
    ctx.barrier()  # decoder push blocks end
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = SW_PROMPT_ID
    ret, _ = datadist.unlink_clusters([cluster], 5000, force=True)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception("unlink failed")
    cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()
    return "ok"
