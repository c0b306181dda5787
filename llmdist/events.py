"""Event-based layer readiness: the transfer stream waits on each layer's runtime event on the
device, so no host thread blocks per layer and no GIL is taken."""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

from . import _core
from ._check import check_isinstance, check_uint32
from .transfer_types import LayerSynchronizer


class EventSynchronizer(LayerSynchronizer):
    """One runtime event per layer. The model calls record(layer, stream) after queuing a layer
    (or records its framework's event itself and calls mark_recorded(layer)); the transfer
    worker then makes its stream wait on that event. reset() before the next forward pass.

    events: llmdist Event objects, or raw event handles (ints) of the same runtime, e.g.
    torch.cuda.Event().cuda_event, one per layer of the source cache."""

    def __init__(
        self, runtime: "_core.Runtime", events: Union[int, Sequence[Union["_core.Event", int]]]
    ) -> None:
        check_isinstance("runtime", runtime, _core.Runtime)
        if isinstance(events, int) and not isinstance(events, bool):
            check_uint32("events", events)
            events = [_core.Event(runtime) for _ in range(events)]
        check_isinstance("events", events, (list, tuple))
        wrapped: List[_core.Event] = []
        for i, ev in enumerate(events):
            if isinstance(ev, _core.Event):
                if ev.runtime.name != runtime.name:
                    raise ValueError(
                        f"events[{i}] belongs to the {ev.runtime.name} runtime, not {runtime.name}"
                    )
                wrapped.append(ev)
            else:
                check_isinstance(f"events[{i}]", ev, (int, _core.Event))
                wrapped.append(_core.Event(runtime, ev))
        if not wrapped:
            raise ValueError("events must hold one event per layer, got none")
        self.runtime = runtime
        self.events = wrapped
        self.gate = _core.LayerGate(len(wrapped))

    def record(self, layer_index: int, stream: "_core.Stream") -> None:
        """Record layer_index's event on the model's stream and mark it recorded."""
        self.events[layer_index].record(stream)
        self.gate.mark(layer_index)

    def mark_recorded(self, layer_index: int) -> None:
        """Say that layer_index's event (a framework event) has been recorded."""
        self.gate.mark(layer_index)

    def reset(self) -> None:
        """Forget the marks, for the next forward pass (after the last transfer using them)."""
        self.gate.reset()

    def synchronize_layer(self, layer_index: int, timeout_in_millis: Optional[int]) -> bool:
        """Blocking form, for callers that drive the synchronizer themselves."""
        ms = -1 if timeout_in_millis is None else timeout_in_millis
        if not self.gate.wait(layer_index, ms):
            return False
        return self.events[layer_index].synchronize(ms)
