"""Upstream programs running unchanged (spec section 7): a blocks source without block indices,
one tensor per layer in transfer_cache_async, the rest of LLMConfig and init's derivations, and
the remaining top-level names."""

import warnings

import numpy as np
import pytest

import llmdist
from llmdist import (
    BlocksCacheKey,
    CacheKeyByIdAndIndex,
    LLMClusterInfo,
    LLMConfig,
    LLMDataDist,
    LLMException,
    LLMRole,
    LLMStatusCode,
    MemInfo,
    Memtype,
    Status,
    TransferConfig,
    TransferWithCacheKeyConfig,
)

from .helpers import OWN_CLUSTER, RecordingSync, assert_mem_equal, env_ctx, wait_results  # noqa: F401

PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
SUCCESS = LLMStatusCode.LLM_SUCCESS


def _expect_rows(src, dst, pairs, tpl=2, src_layers=None, dst_layers=None, dst_offset=0):
    """The destination's memory after copying, for each (src tensor, dst tensor), the source
    row/block given in pairs[...] = (src tensor, src row, dst tensor)."""
    want = dst.snapshot()
    stride = src.stride
    for s_t, row, d_t in pairs:
        key, off = dst.tensors[d_t]
        skey, soff = src.tensors[s_t]
        want[key][off + dst_offset : off + dst_offset + stride] = src.mem()[skey][
            soff + row * stride : soff + (row + 1) * stride
        ]
    return want


# ------------------------------------------------------------ blocks source without indices
@pytest.mark.parametrize("batch", [0, 2])
def test_blocks_source_without_indices_is_c2c(env, batch):
    """Upstream's flagship sample: a blocks cache as source, no block indices -> block
    src_batch_index of each tensor goes to the destination tensor start."""
    src = env.registered(4, [3, 40], blocks=True)
    dst = env.registered(4, [3, 40], blocks=True)
    want = _expect_rows(src, dst, [(t, batch, t) for t in range(4)])
    task = env.cm.transfer_cache_async(
        src.cache, RecordingSync(), [TransferConfig(OWN_CLUSTER, dst.addrs, None, batch)]
    )
    assert wait_results(task) == [SUCCESS]
    assert_mem_equal(dst.mem(), want)


def test_blocks_source_without_indices_keyed(env_remote):
    """The sample's own call: TransferWithCacheKeyConfig(BlocksCacheKey(d, 0), range(0, 1),
    range(0, 1)) and no indices: block 0 of layer 0 arrives in block 0 of layer 0; a
    CacheKeyByIdAndIndex destination is offset by batch_index rows."""
    env = env_remote
    src = env.registered(2, [3, 40], blocks=True, key=BlocksCacheKey(OWN_CLUSTER, 7))
    dst = env.registered(2, [3, 40], blocks=True, key=BlocksCacheKey(OWN_CLUSTER, 0))
    want = _expect_rows(src, dst, [(0, 0, 0), (1, 0, 1)])
    cfg = TransferWithCacheKeyConfig(BlocksCacheKey(OWN_CLUSTER, 0), range(0, 1), range(0, 1))
    assert wait_results(env.cm.transfer_cache_async(src.cache, RecordingSync(), [cfg])) == [SUCCESS]
    assert_mem_equal(dst.mem(), want)
    rows = env.registered(4, [4, 40])
    want = _expect_rows(src, rows, [(0, 1, 2), (1, 1, 3)], dst_offset=2 * 40)
    cfg = TransferWithCacheKeyConfig(
        CacheKeyByIdAndIndex(OWN_CLUSTER, rows.cache.cache_id, 2), range(0, 1), range(1, 2), 1
    )
    assert wait_results(env.cm.transfer_cache_async(src.cache, RecordingSync(), [cfg])) == [SUCCESS]
    assert_mem_equal(rows.mem(), want)


def test_blocks_source_batch_index_bound(env):
    src = env.registered(4, [3, 40], blocks=True)
    dst = env.registered(4, [3, 40], blocks=True)
    with pytest.raises(LLMException) as ei:
        env.cm.transfer_cache_async(
            src.cache, RecordingSync(), [TransferConfig(OWN_CLUSTER, dst.addrs, None, 3)]
        )
    assert ei.value.status_code == PARAM_INVALID


def test_src_indices_without_dst_indices_still_refused(env):
    src = env.registered(4, [3, 40], blocks=True)
    dst = env.registered(4, [3, 40])
    with pytest.raises(LLMException, match="PA source to non-PA") as ei:
        env.cm.transfer_cache_async(
            src.cache, RecordingSync(), [TransferConfig(OWN_CLUSTER, dst.addrs)], [0], None
        )
    assert ei.value.status_code == PARAM_INVALID


# ------------------------------------------------------------ one tensor per layer
def test_one_tensor_per_layer_c2c_and_b2b(env):
    """MLA caches: 3 tensors = 3 layers; layer l is tensor l on both sides."""
    src = env.registered(3, [4, 32], blocks=True)
    dst = env.registered(3, [6, 32], blocks=True)
    want = dst.snapshot()
    for layer in (1, 2):
        skey, soff = src.tensors[layer]
        dkey, doff = dst.tensors[layer - 1]
        for s, d in ((0, 5), (3, 1)):
            want[dkey][doff + d * 32 : doff + (d + 1) * 32] = src.mem()[skey][
                soff + s * 32 : soff + (s + 1) * 32
            ]
    cfg = TransferConfig(OWN_CLUSTER, dst.addrs[:2], range(1, 3))
    task = env.cm.transfer_cache_async(
        src.cache, RecordingSync(), [cfg], [0, 3], [5, 1], tensor_num_per_layer=1
    )
    assert wait_results(task) == [SUCCESS]
    assert_mem_equal(dst.mem(), want)


def test_one_tensor_per_layer_keyed(env_remote):
    env = env_remote
    src = env.registered(3, [2, 24])
    dst = env.registered(5, [2, 24], blocks=True, key=BlocksCacheKey(OWN_CLUSTER, 3))
    want = _expect_rows(src, dst, [(0, 0, 2), (1, 0, 3), (2, 0, 4)])
    cfg = TransferWithCacheKeyConfig(BlocksCacheKey(OWN_CLUSTER, 3), range(0, 3), range(2, 5))
    sync = RecordingSync()
    task = env.cm.transfer_cache_async(src.cache, sync, [cfg], tensor_num_per_layer=1)
    assert wait_results(task) == [SUCCESS]
    assert sync.calls == [0, 1, 2]
    assert_mem_equal(dst.mem(), want)


@pytest.mark.parametrize(
    "bad,exc",
    [
        (0, LLMException),
        (3, LLMException),
        (-1, ValueError),
        ("2", TypeError),
        (True, TypeError),
        (2.0, TypeError),
    ],
)
def test_tensor_num_per_layer_checked(env, bad, exc):
    src = env.registered(4, [2, 16])
    dst = env.registered(4, [2, 16])
    with pytest.raises(exc) as ei:
        env.cm.transfer_cache_async(
            src.cache,
            RecordingSync(),
            [TransferConfig(OWN_CLUSTER, dst.addrs)],
            tensor_num_per_layer=bad,
        )
    if exc is LLMException:
        assert ei.value.status_code == PARAM_INVALID
        assert "tensor_num_per_layer" in str(ei.value)


def test_odd_tensors_still_need_tensor_num_per_layer_1(env):
    src = env.registered(3, [2, 16])
    dst = env.registered(3, [2, 16])
    with pytest.raises(LLMException) as ei:
        env.cm.transfer_cache_async(
            src.cache, RecordingSync(), [TransferConfig(OWN_CLUSTER, dst.addrs[:2], range(0, 1))]
        )
    assert ei.value.status_code == PARAM_INVALID
    with pytest.raises(LLMException, match="dst_addrs has 2 addresses"):
        env.cm.transfer_cache_async(
            src.cache,
            RecordingSync(),
            [TransferConfig(OWN_CLUSTER, dst.addrs[:2], range(0, 1))],
            tensor_num_per_layer=1,
        )


# ------------------------------------------------------------ LLMConfig
def test_llm_config_upstream_properties():
    cfg = LLMConfig()
    assert (cfg.local_comm_res, cfg.transfer_backend, cfg.enable_switch_role) == ("", "", False)
    assert cfg.mem_utilization == 0.95 and cfg.options == {}
    cfg.local_comm_res = ""
    cfg.transfer_backend = "hixl"
    cfg.enable_switch_role = True
    cfg.rdma_traffic_class = 132
    cfg.rdma_service_level = 4
    cfg.global_resource_config = '{"comm_resource_config.protocol_desc": ["roce:device"]}'
    cfg.mem_utilization = 0.5
    cfg.buf_pool_cfg = '{"buf_cfg": []}'
    cfg.output_max_size = 1024
    cfg.deploy_res_path = "/tmp/x"
    cfg.cluster_info = '{"cluster_id": 1}'
    opts = cfg.gen_options()
    assert opts == {
        "llm.LocalCommRes": "",
        "llm.TransferBackend": "hixl",
        "llm.EnableSwitchRole": "1",
        "llm.RdmaTrafficClass": "132",
        "llm.RdmaServiceLevel": "4",
        "llm.GlobalResourceConfig": '{"comm_resource_config.protocol_desc": ["roce:device"]}',
        "llm.MemoryUtilization": "0.5",
        "llm.BufPoolCfg": '{"buf_cfg": []}',
        "llm.OutputMaxSize": "1024",
        "llm.deployResPath": "/tmp/x",
        "llm.ClusterInfo": '{"cluster_id": 1}',
    }
    assert cfg.generate_options() == opts
    assert cfg.options == opts
    with pytest.raises(AttributeError):
        cfg.options = {}


@pytest.mark.parametrize(
    "prop,value,exc",
    [
        ("local_comm_res", None, TypeError),
        ("transfer_backend", 1, TypeError),
        ("enable_switch_role", 1, TypeError),
        ("rdma_traffic_class", -1, ValueError),
        ("rdma_service_level", "1", TypeError),
        ("mem_utilization", 1, TypeError),
        ("mem_utilization", 1.5, LLMException),
        ("cluster_info", "{", LLMException),
        ("output_max_size", True, TypeError),
        ("global_resource_config", {}, TypeError),
    ],
)
def test_llm_config_upstream_property_errors(prop, value, exc):
    cfg = LLMConfig()
    with pytest.raises(exc):
        setattr(cfg, prop, value)
    assert cfg.generate_options() == {}


def test_llm_config_ge_options_is_live():
    cfg = LLMConfig()
    cfg.ge_options["llmdist.runtime"] = "host"
    assert cfg.generate_options() == {"llmdist.runtime": "host"}
    given = {"a": "1"}
    cfg.ge_options = given
    given["b"] = "2"
    assert cfg.generate_options() == {"a": "1", "b": "2"}


def _init(cfg: LLMConfig, cluster_id: int = 901) -> LLMDataDist:
    dd = LLMDataDist(LLMRole.PROMPT, cluster_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # options LLMConfig makes are never warned about
        dd.init(cfg.generate_options())
    return dd


def _remote_mode(dd: LLMDataDist) -> bool:
    """Whether dd runs remote-accessible mode, seen through the API: it accepts only keyed
    configs then (and only plain ones otherwise)."""
    arr = np.zeros(64, dtype=np.uint8)
    cm = dd.cache_manager
    cache = cm.register_cache(
        llmdist.CacheDesc(2, [1, 16], llmdist.DataType.DT_UINT8),
        [arr.ctypes.data, arr.ctypes.data + 32],
    )
    try:
        cm.transfer_cache_async(cache, RecordingSync(), [TransferConfig(dd.cluster_id, [8, 16])])
    except TypeError:
        return True
    except LLMException:
        return False
    finally:
        cm.unregister_cache(cache.cache_id)
    raise AssertionError("a transfer to unregistered memory was accepted")


@pytest.mark.parametrize(
    "setup,remote",
    [
        ({}, False),
        ({"local_comm_res": ""}, True),
        ({"local_comm_res": '{"version": "1.3"}', "enable_remote_cache_accessible": False}, False),
        ({"transfer_backend": "hixl", "listen_ip_info": "127.0.0.1:0"}, True),
        (
            {
                "transfer_backend": "hixl",
                "listen_ip_info": "127.0.0.1:0",
                "enable_remote_cache_accessible": False,
            },
            False,
        ),
        ({"rdma_traffic_class": 1, "rdma_service_level": 2, "enable_switch_role": True}, False),
    ],
)
def test_init_derives_remote_accessible_mode(setup, remote):
    cfg = LLMConfig()
    cfg.device_id = 0
    for k, v in setup.items():
        setattr(cfg, k, v)
    dd = _init(cfg)
    try:
        assert _remote_mode(dd) is remote
    finally:
        dd.finalize()


def test_transfer_backend_needs_a_listener():
    cfg = LLMConfig()
    cfg.transfer_backend = "hixl"
    dd = LLMDataDist(LLMRole.DECODER, 902)
    with pytest.raises(LLMException, match="listenIpInfo") as ei:
        dd.init(cfg.generate_options())
    assert ei.value.status_code == PARAM_INVALID
    with pytest.raises(RuntimeError):
        dd.cache_manager


# ------------------------------------------------------------ other names
def test_status_memtype_meminfo_v2_list():
    assert Status(LLMStatusCode.LLM_SUCCESS).is_ok()
    st = Status(int(LLMStatusCode.LLM_TIMEOUT))
    assert not st.is_ok() and st.status_code is LLMStatusCode.LLM_TIMEOUT
    assert [m.value for m in Memtype] == [0, 1]
    mi = MemInfo(Memtype.MEM_TYPE_DEVICE, 4096, 128)
    assert (mi.mem_type, mi.addr, mi.size) == (Memtype.MEM_TYPE_DEVICE, 4096, 128)
    with pytest.raises(TypeError):
        MemInfo(0, 1, 2)
    with pytest.raises(TypeError):
        MemInfo(Memtype.MEM_TYPE_HOST, "1", 2)
    assert isinstance(llmdist.v2_list, list)
    for name in llmdist.v2_list:
        assert hasattr(llmdist, name), name
    for name in ("Status", "Memtype", "MemInfo", "v2_list"):
        assert name in llmdist.__all__


def test_cluster_info_remote_role_type():
    info = LLMClusterInfo()
    assert info.remote_role_type is None
    info.remote_role_type = LLMRole.PROMPT
    assert info.remote_role_type is LLMRole.PROMPT
    info.remote_role_type = 2
    assert info.remote_role_type == 2
    with pytest.raises(TypeError):
        info.remote_role_type = "PROMPT"
