"""LLMConfig (builds the init options dict) and LLMClusterInfo (describes a cluster to link)."""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Dict, List, Optional, Tuple, Union

from ._check import (
    check_int32,
    check_int64,
    check_isinstance,
    check_uint16,
    check_uint32,
    check_uint64,
    require,
)
from .descs import LLMRole
from .status import LLMException, LLMStatusCode

__all__ = ["LLMConfig", "LlmConfig", "LLMClusterInfo"]


def _ip_to_str(name: str, ip: Union[str, int]) -> str:
    """Normalise an IPv4 address given as dotted text or as upstream's uint32 to dotted text."""
    check_isinstance(name, ip, (str, int))
    if isinstance(ip, int):
        # Upstream's int form is the in_addr bytes read little-endian: "1.2.3.4" -> 0x04030201.
        check_uint32(name, ip)
        return str(ipaddress.IPv4Address(ip.to_bytes(4, "little")))
    try:
        return str(ipaddress.IPv4Address(ip))
    except ValueError:
        raise LLMException(
            f"{name} {ip!r} is not a dotted IPv4 address",
            status_code=LLMStatusCode.LLM_PARAM_INVALID,
        ) from None


def _upstream_ip_port(entry: Dict[str, Any]) -> Tuple[int, int]:
    """An address as upstream's LLMClusterInfo keeps it: (in_addr bytes read little-endian,
    port)."""
    return int.from_bytes(ipaddress.IPv4Address(entry["ip"]).packed, "little"), entry["port"]


def parse_ip_port(name: str, text: str) -> Tuple[str, int]:
    """Split and check an "ip:port" string (IPv4 dotted address, uint16 port)."""
    check_isinstance(name, text, str)
    ip, sep, port = text.rpartition(":")
    require(
        sep == ":" and port.isdigit() and port.isascii(),
        f"{name} must look like 'ip:port', but got {text!r}",
    )
    require(int(port) <= 0xFFFF, f"{name} port {port} is out of range [0, 65535]")
    return _ip_to_str(name, ip), int(port)


def _check_mem_pool_cfg(name: str, value: str) -> str:
    """Check a memory-pool option: "" (unset) or a JSON object with a positive "memory_size"."""
    check_isinstance(name, value, str)
    if value == "":
        return value
    try:
        cfg = json.loads(value)
    except ValueError:
        cfg = None
    require(isinstance(cfg, dict), f"{name} must be a JSON object, but got {value!r}")
    size = cfg.get("memory_size")
    require(
        isinstance(size, int) and not isinstance(size, bool) and 0 < size < 2**64,
        f'{name} needs an integer "memory_size" in [1, 2**64-1], but got {value!r}',
    )
    return value


class LLMConfig:
    """Typed builder of the options dict passed to LLMDataDist.init; each setter validates."""

    def __init__(self) -> None:
        self._device_id: Optional[int] = None
        self._sync_kv_timeout: Optional[Union[int, str]] = None
        self._listen_ip_info = ""
        self._enable_cache_manager: Optional[bool] = None
        self._enable_remote_cache_accessible: Optional[bool] = None
        self._mem_pool_cfg = ""
        self._host_mem_pool_cfg = ""
        self._link_total_time: Optional[int] = None
        self._link_retry_count: Optional[int] = None
        self._ge_options: Dict[str, str] = {}
        # Upstream's remaining knobs: recorded and passed on as options (None = not set).
        self._local_comm_res: Optional[str] = None
        self._transfer_backend: Optional[str] = None
        self._enable_switch_role: Optional[bool] = None
        self._rdma_traffic_class: Optional[int] = None
        self._rdma_service_level: Optional[int] = None
        self._global_resource_config: Optional[str] = None
        self._mem_utilization: Optional[float] = None
        self._buf_pool_cfg: Optional[str] = None
        self._output_max_size: Optional[int] = None
        self._deploy_res_path: Optional[str] = None
        self._cluster_info: Optional[str] = None
        self._options: Dict[str, str] = {}

    @property
    def device_id(self) -> Optional[int]:
        """Device this process drives (ge.exec.deviceId); None until set."""
        return self._device_id

    @device_id.setter
    def device_id(self, value: int) -> None:
        check_int32("device_id", value)
        require(value >= 0, f"device_id must be >= 0, but got {value}")
        self._device_id = value

    @property
    def sync_kv_timeout(self) -> Optional[Union[int, str]]:
        """Wait time in ms of synchronous cache operations (llm.SyncKvCacheWaitTime)."""
        return self._sync_kv_timeout

    @sync_kv_timeout.setter
    def sync_kv_timeout(self, value: Union[int, str]) -> None:
        check_isinstance("sync_kv_timeout", value, (int, str))
        if isinstance(value, str):
            require(
                value.isdigit() and value.isascii(),
                f"sync_kv_timeout must be a decimal number, but got {value!r}",
            )
        check_int32("sync_kv_timeout", int(value))
        require(int(value) > 0, f"sync_kv_timeout must be > 0, but got {value}")
        self._sync_kv_timeout = value

    @property
    def listen_ip_info(self) -> str:
        """ "ip:port" this instance accepts links on (llm.listenIpInfo); "" until set."""
        return self._listen_ip_info

    @listen_ip_info.setter
    def listen_ip_info(self, value: str) -> None:
        parse_ip_port("listen_ip_info", value)
        self._listen_ip_info = value

    @property
    def enable_cache_manager(self) -> bool:
        """Whether the CacheManager API is enabled (llm.EnableCacheManager); False until set."""
        return bool(self._enable_cache_manager)

    @enable_cache_manager.setter
    def enable_cache_manager(self, value: bool) -> None:
        self._enable_cache_manager = check_isinstance("enable_cache_manager", value, bool)

    @property
    def enable_remote_cache_accessible(self) -> bool:
        """Whether peers may write into this instance's caches by key; False until set."""
        return bool(self._enable_remote_cache_accessible)

    @enable_remote_cache_accessible.setter
    def enable_remote_cache_accessible(self, value: bool) -> None:
        self._enable_remote_cache_accessible = check_isinstance(
            "enable_remote_cache_accessible", value, bool
        )

    @property
    def mem_pool_cfg(self) -> str:
        """Device memory pool JSON, e.g. '{"memory_size": 1073741824}' (llm.MemPoolConfig)."""
        return self._mem_pool_cfg

    @mem_pool_cfg.setter
    def mem_pool_cfg(self, value: str) -> None:
        self._mem_pool_cfg = _check_mem_pool_cfg("mem_pool_cfg", value)

    @property
    def host_mem_pool_cfg(self) -> str:
        """Host memory pool JSON, same format as mem_pool_cfg (llm.HostMemPoolConfig)."""
        return self._host_mem_pool_cfg

    @host_mem_pool_cfg.setter
    def host_mem_pool_cfg(self, value: str) -> None:
        self._host_mem_pool_cfg = _check_mem_pool_cfg("host_mem_pool_cfg", value)

    @property
    def link_total_time(self) -> int:
        """Total time budget of a link in seconds, as upstream (llm.LinkTotalTime); 0 until set,
        and 0 means the default (HCCL_CONNECT_TIMEOUT, else 120 s; see rank-table links)."""
        return 0 if self._link_total_time is None else self._link_total_time

    @link_total_time.setter
    def link_total_time(self, value: int) -> None:
        self._link_total_time = check_uint32("link_total_time", value)

    @property
    def link_retry_count(self) -> int:
        """Attempts per link, 1..100 (llm.LinkRetryCount); 1 until set."""
        return 1 if self._link_retry_count is None else self._link_retry_count

    @link_retry_count.setter
    def link_retry_count(self, value: int) -> None:
        check_isinstance("link_retry_count", value, int)
        require(1 <= value <= 100, f"link_retry_count must be in [1, 100], but got {value}")
        self._link_retry_count = value

    @property
    def ge_options(self) -> Dict[str, str]:
        """Extra raw options (str to str) passed through as they are, e.g. llmdist.* keys. The
        dict itself is returned: cfg.ge_options[k] = v takes effect, as upstream."""
        return self._ge_options

    @ge_options.setter
    def ge_options(self, value: Dict[str, str]) -> None:
        check_isinstance("ge_options", value, dict)
        for k, v in value.items():
            check_isinstance("ge_options key", k, str)
            check_isinstance(f"ge_options[{k!r}]", v, str)
        self._ge_options = value

    @property
    def local_comm_res(self) -> str:
        """Communication resources of this instance (llm.LocalCommRes); "" = automatic. Setting it
        (even to "") switches on the cache manager and remote-accessible mode at init."""
        return self._local_comm_res or ""

    @local_comm_res.setter
    def local_comm_res(self, value: str) -> None:
        self._local_comm_res = check_isinstance("local_comm_res", value, str)

    @property
    def transfer_backend(self) -> str:
        """Transfer backend name (llm.TransferBackend), e.g. "hixl"; "" until set. Setting it
        switches on remote-accessible mode at init and needs listen_ip_info."""
        return self._transfer_backend or ""

    @transfer_backend.setter
    def transfer_backend(self, value: str) -> None:
        self._transfer_backend = check_isinstance("transfer_backend", value, str)

    @property
    def enable_switch_role(self) -> bool:
        """Upstream's llm.EnableSwitchRole flag (emitted when True; switch_role needs none)."""
        return bool(self._enable_switch_role)

    @enable_switch_role.setter
    def enable_switch_role(self, value: bool) -> None:
        self._enable_switch_role = check_isinstance("enable_switch_role", value, bool)

    @property
    def rdma_traffic_class(self) -> Optional[int]:
        """RDMA traffic class (llm.RdmaTrafficClass, uint32); recorded, not used by llmdist."""
        return self._rdma_traffic_class

    @rdma_traffic_class.setter
    def rdma_traffic_class(self, value: int) -> None:
        self._rdma_traffic_class = check_uint32("rdma_traffic_class", value)

    @property
    def rdma_service_level(self) -> Optional[int]:
        """RDMA service level (llm.RdmaServiceLevel, uint32); recorded, not used by llmdist."""
        return self._rdma_service_level

    @rdma_service_level.setter
    def rdma_service_level(self, value: int) -> None:
        self._rdma_service_level = check_uint32("rdma_service_level", value)

    @property
    def global_resource_config(self) -> str:
        """HCCL-style resource JSON (llm.GlobalResourceConfig); recorded, not used by llmdist."""
        return self._global_resource_config or ""

    @global_resource_config.setter
    def global_resource_config(self, value: str) -> None:
        self._global_resource_config = check_isinstance("global_resource_config", value, str)

    @property
    def mem_utilization(self) -> float:
        """Share of device memory upstream's pool may take (llm.MemoryUtilization), in [0, 1];
        0.95 until set. Recorded, not used by llmdist."""
        return 0.95 if self._mem_utilization is None else self._mem_utilization

    @mem_utilization.setter
    def mem_utilization(self, value: float) -> None:
        check_isinstance("mem_utilization", value, float)
        require(0.0 <= value <= 1.0, f"mem_utilization must be in [0, 1], but got {value}")
        self._mem_utilization = value

    @property
    def buf_pool_cfg(self) -> str:
        """Buffer pool JSON (llm.BufPoolCfg); recorded, not used by llmdist."""
        return self._buf_pool_cfg or ""

    @buf_pool_cfg.setter
    def buf_pool_cfg(self, value: str) -> None:
        self._buf_pool_cfg = check_isinstance("buf_pool_cfg", value, str)

    @property
    def output_max_size(self) -> Optional[int]:
        """Upstream's output size cap (llm.OutputMaxSize); recorded, not used by llmdist."""
        return self._output_max_size

    @output_max_size.setter
    def output_max_size(self, value: int) -> None:
        self._output_max_size = check_int64("output_max_size", value)

    @property
    def deploy_res_path(self) -> str:
        """Upstream's deployment resource path (llm.deployResPath); recorded, not used."""
        return self._deploy_res_path or ""

    @deploy_res_path.setter
    def deploy_res_path(self, value: str) -> None:
        self._deploy_res_path = check_isinstance("deploy_res_path", value, str)

    @property
    def cluster_info(self) -> str:
        """Upstream's cluster description JSON (llm.ClusterInfo); recorded, not used."""
        return self._cluster_info or ""

    @cluster_info.setter
    def cluster_info(self, value: str) -> None:
        check_isinstance("cluster_info", value, str)
        try:
            json.loads(value)
        except ValueError:
            raise LLMException(
                f"cluster_info must be JSON, but got {value!r}",
                status_code=LLMStatusCode.LLM_PARAM_INVALID,
            ) from None
        self._cluster_info = value

    @property
    def options(self) -> Dict[str, str]:
        """The options of the last generate_options() call (a copy; {} before the first)."""
        return dict(self._options)

    def generate_options(self) -> Dict[str, str]:
        """Return a new options dict holding only what was set; bools become "1"/"0"."""
        opts: Dict[str, str] = dict(self._ge_options)
        if self._device_id is not None:
            opts["ge.exec.deviceId"] = str(self._device_id)
        if self._sync_kv_timeout is not None:
            opts["llm.SyncKvCacheWaitTime"] = str(int(self._sync_kv_timeout))
        if self._listen_ip_info:
            opts["llm.listenIpInfo"] = self._listen_ip_info
        if self._enable_cache_manager is not None:
            opts["llm.EnableCacheManager"] = "1" if self._enable_cache_manager else "0"
        if self._enable_remote_cache_accessible is not None:
            opts["llm.EnableRemoteCacheAccessible"] = (
                "1" if self._enable_remote_cache_accessible else "0"
            )
        if self._mem_pool_cfg:
            opts["llm.MemPoolConfig"] = self._mem_pool_cfg
        if self._host_mem_pool_cfg:
            opts["llm.HostMemPoolConfig"] = self._host_mem_pool_cfg
        if self._link_total_time is not None:
            opts["llm.LinkTotalTime"] = str(self._link_total_time)
        if self._link_retry_count is not None:
            opts["llm.LinkRetryCount"] = str(self._link_retry_count)
        recorded = (
            ("llm.LocalCommRes", self._local_comm_res),
            ("llm.TransferBackend", self._transfer_backend),
            ("llm.RdmaTrafficClass", self._rdma_traffic_class),
            ("llm.RdmaServiceLevel", self._rdma_service_level),
            ("llm.GlobalResourceConfig", self._global_resource_config),
            ("llm.MemoryUtilization", self._mem_utilization),
            ("llm.BufPoolCfg", self._buf_pool_cfg or None),
            ("llm.OutputMaxSize", self._output_max_size),
            ("llm.deployResPath", self._deploy_res_path or None),
            ("llm.ClusterInfo", self._cluster_info or None),
        )
        for key, value in recorded:
            if value is not None:
                opts[key] = str(value)
        if self._enable_switch_role:
            opts["llm.EnableSwitchRole"] = "1"
        self._options = dict(opts)
        return opts

    def gen_options(self) -> Dict[str, str]:
        """Same as generate_options (upstream's other name for it)."""
        return self.generate_options()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.generate_options()!r})"


LlmConfig = LLMConfig


class LLMClusterInfo:
    """A cluster to link with: its id and the local/remote IPv4 addresses and ports to use."""

    def __init__(self) -> None:
        self._remote_cluster_id: Optional[int] = None
        self._remote_role_type: Optional[Union[LLMRole, int]] = None
        self._local_ip_info: List[Dict[str, Any]] = []
        self._remote_ip_info: List[Dict[str, Any]] = []

    @property
    def remote_cluster_id(self) -> Optional[int]:
        """Cluster id of the peer (uint64); None until set."""
        return self._remote_cluster_id

    @remote_cluster_id.setter
    def remote_cluster_id(self, value: int) -> None:
        self._remote_cluster_id = check_uint64("remote_cluster_id", value)

    @property
    def remote_role_type(self) -> Optional[Union[LLMRole, int]]:
        """The peer's role as the caller states it (upstream records it); None until set."""
        return self._remote_role_type

    @remote_role_type.setter
    def remote_role_type(self, value: Union[LLMRole, int]) -> None:
        self._remote_role_type = check_isinstance("remote_role_type", value, (LLMRole, int))

    @staticmethod
    def _entry(ip: Union[str, int], port: int) -> Dict[str, Any]:
        check_isinstance("ip", ip, (str, int))
        check_uint16("port", port)
        return {"ip": _ip_to_str("ip", ip), "port": port}

    def append_local_ip_info(self, ip: Union[str, int], port: int) -> None:
        """Add a local address (dotted IPv4 or upstream uint32) and port to connect from."""
        self._local_ip_info.append(self._entry(ip, port))

    def append_remote_ip_info(self, ip: Union[str, int], port: int) -> None:
        """Add a peer address (dotted IPv4 or upstream uint32) and port to connect to."""
        self._remote_ip_info.append(self._entry(ip, port))

    @property
    def local_ip_info_list(self) -> List[Tuple[int, int]]:
        """Local addresses as upstream lists them: [(ip as the in_addr bytes read
        little-endian, port), ...] (a copy)."""
        return [_upstream_ip_port(e) for e in self._local_ip_info]

    @property
    def remote_ip_info_list(self) -> List[Tuple[int, int]]:
        """Peer addresses as upstream lists them (see local_ip_info_list; a copy)."""
        return [_upstream_ip_port(e) for e in self._remote_ip_info]

    def remote_addresses(self) -> List[Tuple[str, int]]:
        """Peer addresses as (dotted IPv4, port), in the order given."""
        return [(e["ip"], e["port"]) for e in self._remote_ip_info]

    def __repr__(self) -> str:
        local = [(e["ip"], e["port"]) for e in self._local_ip_info]
        return (
            f"LLMClusterInfo(remote_cluster_id={self._remote_cluster_id}, "
            f"local_ip_info={local}, remote_ip_info={self.remote_addresses()})"
        )
