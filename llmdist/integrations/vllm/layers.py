"""Layer synchronizers of the layerwise mode: a prefill step's layers released to its
transfers as the forward saves them (host events for host tensors, device events on the
model stream for CUDA/NPU tensors)."""

from __future__ import annotations

import threading
from typing import Callable

from ...events import EventSynchronizer
from ...transfer_types import LayerSynchronizer


class StepLayers(LayerSynchronizer):
    """Host tensors: releases layer i of a step's layerwise transfers once the forward saved it
    (the forward has written it then); a transfer started later finds the layers saved so far
    released at once."""

    def __init__(self, num_layers: int, timeout_ms: int) -> None:
        self.saved = [threading.Event() for _ in range(num_layers)]
        self.timeout_s = timeout_ms / 1000.0

    def release(self, i: int) -> None:
        self.saved[i].set()

    def release_all(self) -> None:
        for e in self.saved:
            e.set()

    def released(self) -> int:
        return sum(e.is_set() for e in self.saved)

    def synchronize_layer(self, layer_index: int, timeout_in_millis) -> bool:
        return self.saved[layer_index].wait(self.timeout_s)


class DeviceStepLayers(EventSynchronizer):
    """CUDA/NPU tensors: the forward only queued layer i on the model's stream when it is saved,
    so release(i) records layer i's event on that stream; the transfer's stream waits on the
    event (no host thread blocks). stream_of() is the model stream's raw handle."""

    def __init__(self, runtime, num_layers: int, stream_of: Callable[[], int]) -> None:
        super().__init__(runtime, num_layers)
        self.stream_of = stream_of
        self.marked = [False] * num_layers

    def release(self, i: int) -> None:
        if not self.marked[i]:
            self.events[i].record_on(self.stream_of())
            self.mark_recorded(i)
            self.marked[i] = True

    def release_all(self) -> None:
        # layers without a hook call: everything the forward queued is before this point
        for i in range(len(self.marked)):
            self.release(i)

    def released(self) -> int:
        return sum(self.marked)


def model_stream_of(device: str) -> Callable[[], int]:
    """The function returning the raw handle of the model's current stream on device: torch's
    current CUDA stream, or torch_npu's current NPU stream."""
    import torch

    if device == "cuda":
        return lambda: torch.cuda.current_stream().cuda_stream
    if device == "npu":
        import torch_npu  # noqa: F401 - registers torch.npu

        return lambda: torch.npu.current_stream().npu_stream
    raise ValueError(f"no model stream on device {device!r}")
