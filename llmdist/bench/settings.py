"""What a benchmark run moves: model presets, block sizes, and the memory plan that fits the
machine (the block pool shrinks to fit free memory; the pairs moved never do)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np

from ..descs import DataType
from ..status import LLMException

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

DEFAULT_BLOCKS = "4K,16K,64K"
DEFAULT_LAYERS = 32
DEFAULT_PAIRS = 256
FULL_POOL = 1024  # blocks per tensor when memory allows
OVERHEAD_LAYERS = 61  # the call-overhead case: 61 layers x 256 blocks
OVERHEAD_BLOCK = 4 * KiB
OVERHEAD_PULL_BLOCK = 64  # the pull case moves its blocks: small ones keep the copy short
SCALING_FACTORS = (1, 16, 256)  # the scaling case: pairs x these (256, 4K, 64K by default)
MEMORY_FRACTION = 0.5  # share of the free memory a run may take, unless --mem-gib

_DTYPES = {
    "uint8": (np.uint8, DataType.DT_UINT8),
    "bf16": (np.uint16, DataType.DT_BF16),
    "fp16": (np.float16, DataType.DT_FLOAT16),
    "fp32": (np.float32, DataType.DT_FLOAT),
}


@dataclass(frozen=True)
class Preset:
    """The KV cache shape of one model on one device: per layer `tensors_per_layer` tensors
    (K and V, or one latent tensor for MLA), each block `block_tokens x kv_heads x head_dim`."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    block_tokens: int
    tensors_per_layer: int
    about: str

    @property
    def block_size(self) -> int:
        return (
            self.block_tokens
            * self.kv_heads
            * self.head_dim
            * np.dtype(_DTYPES[self.dtype][0]).itemsize
        )


PRESETS: Dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("llama3-8b", 32, 8, 128, "bf16", 128, 2, "Llama 3 8B, one device: 8 KV heads"),
        Preset(
            "llama3-70b-tp8",
            80,
            1,
            128,
            "bf16",
            128,
            2,
            "Llama 3 70B with tensor parallel 8: 1 of 8 KV heads per device",
        ),
        Preset(
            "deepseek-v3-mla",
            61,
            1,
            576,
            "bf16",
            128,
            1,
            "DeepSeek V3 MLA: one latent tensor per layer (512 + 64 rope dims)",
        ),
    )
}


def parse_size(text: str) -> int:
    """'4K', '64KiB', '1M', '4096' -> bytes; ValueError naming the rule otherwise."""
    t = text.strip().upper()
    for suffix in ("IB", "B"):
        if t.endswith(suffix) and len(t) > len(suffix):
            t = t[: -len(suffix)]
            break
    mult = {"K": KiB, "M": MiB, "G": GiB}.get(t[-1:], 1)
    digits = t[:-1] if mult > 1 else t
    if not digits.isdigit() or int(digits) <= 0:
        raise ValueError(f"--blocks: {text!r} is not a positive size (e.g. 4K, 64K, 1M)")
    return int(digits) * mult


def size_name(n: int) -> str:
    for unit, name in ((GiB, "G"), (MiB, "M"), (KiB, "K")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{name}"
    return str(n)


@dataclass
class Settings:
    """Everything a run was asked for (after presets and defaults are applied)."""

    scenarios: List[str]
    blocks: List[int]
    layers: int
    pairs: int
    repeat: int
    tensors_per_layer: int = 2
    dtype: str = "uint8"
    preset: Optional[str] = None
    mem_budget: Optional[int] = None  # bytes; None: a share of the free memory
    seed: int = 1234
    notes: List[str] = field(default_factory=list)

    @property
    def np_dtype(self):
        return np.dtype(_DTYPES[self.dtype][0])

    @property
    def data_type(self) -> DataType:
        return _DTYPES[self.dtype][1]

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("notes")
        return d


# ------------------------------------------------------------------------------------------
# Free memory


def host_available() -> int:
    """MemAvailable of /proc/meminfo (bytes), or physical pages free when it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * KiB
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_free(runtime) -> Optional[int]:
    """Free device memory of the runtime's device (bytes); host memory on the host runtime;
    None when the runtime cannot say."""
    if runtime.is_host:
        return host_available()
    try:
        info = runtime.mem_info()
    except LLMException:
        return None
    return info[0] if info is not None else None


# ------------------------------------------------------------------------------------------
# The pool that fits


@dataclass
class PoolPlan:
    """Blocks per tensor for one workload, and what was scaled to get there."""

    pool: int
    full_pool: int
    note: str = ""

    @property
    def scaled(self) -> bool:
        return self.pool < self.full_pool


@dataclass
class Need:
    """What a workload takes in one kind of memory: `fixed` bytes plus `per_block` bytes for
    each block of its pool (summed over all its caches of that placement)."""

    per_block: int = 0
    fixed: int = 0

    def at(self, pool: int) -> int:
        return self.fixed + pool * self.per_block


@dataclass
class MemoryBudget:
    """The bytes a run may take: DEVICE-placed memory and HOST-placed memory (staging, swap
    destinations). On the host runtime both are the same RAM, so one budget covers their sum."""

    device: int
    host: int
    shared: bool
    host_free: int
    device_free: Optional[int]
    how: str

    def fit_pool(
        self,
        what: str,
        device: Need,
        host: Need = Need(),
        full_pool: int = FULL_POOL,
        minimum: int = 1,
    ) -> PoolPlan:
        """The largest pool <= full_pool that fits; MemoryError naming the workload when not even
        `minimum` blocks per tensor fit."""
        if self.shared:
            limits = [
                (self.device, Need(device.per_block + host.per_block, device.fixed + host.fixed))
            ]
        else:
            limits = [(self.device, device), (self.host, host)]
        pool = full_pool
        for cap, need in limits:
            if need.per_block:
                pool = min(pool, max(0, (cap - need.fixed) // need.per_block))
            elif need.fixed > cap:
                pool = 0
        if pool < minimum:
            wants = ", ".join(
                f"{n.at(minimum) / GiB:.2f} of {cap / GiB:.2f} GiB" for cap, n in limits
            )
            raise MemoryError(
                f"{what}: does not fit ({wants}); lower --pairs, --layers or "
                f"--blocks, or raise --mem-gib"
            )
        note = ""
        if pool < full_pool:
            note = (
                f"{what}: pool shrunk to {pool} blocks per tensor (not {full_pool}) to fit "
                f"the memory budget ({self.how}); the pairs moved are unchanged"
            )
        return PoolPlan(pool, full_pool, note)

    def to_json(self) -> dict:
        return asdict(self)


def budget_for(runtime, requested: Optional[int]) -> MemoryBudget:
    """What a run may take: `requested` bytes of each kind when given, else a share of what is
    free now."""
    host_free = host_available()
    dev_free = device_free(runtime)
    shared = runtime.is_host
    if requested is not None:
        return MemoryBudget(
            requested, requested, shared, host_free, dev_free, f"--mem-gib {requested / GiB:g}"
        )
    host_budget = int(host_free * MEMORY_FRACTION)
    if shared:
        return MemoryBudget(
            host_budget,
            host_budget,
            True,
            host_free,
            dev_free,
            f"{MEMORY_FRACTION:.0%} of {host_free / GiB:.1f} GiB free host memory",
        )
    if dev_free is None:
        return MemoryBudget(
            8 * GiB,
            host_budget,
            False,
            host_free,
            None,
            "8 GiB of device memory assumed: the runtime does not report free memory",
        )
    return MemoryBudget(
        int(dev_free * MEMORY_FRACTION),
        host_budget,
        False,
        host_free,
        dev_free,
        f"{MEMORY_FRACTION:.0%} of {dev_free / GiB:.1f} GiB free device memory",
    )
