"""The NIXL baseline of the cluster scenario: a NIXL prefill in a child process of its own
(``procs.nixl_prefill_main``) writes the same block pairs, layer by layer, into the memory the
decode registered (the process route), through NIXL's UCX backend.

NIXL is only loaded in child processes (see llmdist.bench.procs). Each round's time is the one
the NIXL process measures around its transfer (the pipe to it is not counted), so that NIXL is
charged for its transfer only, as llmdist is for its call."""

from __future__ import annotations

from typing import Callable

from . import procs

NIXL = "nixl (UCX)"
START_S = 120.0


class NixlPrefill:
    """The parent's handle on the NIXL prefill child, started on first use."""

    def __init__(self) -> None:
        self.child: procs.Child | None = None

    def writer(
        self,
        decode: procs.Child,
        model: int,
        dst_addrs: list[int],
        layers: int,
        tensors_per_layer: int,
        pool: int,
        block: int,
        si,
        di,
    ) -> tuple[Callable[[], None], list[float]]:
        """A callable that writes the blocks once through NIXL into the decode's cache `model`
        (registered memory at dst_addrs), and the list where it appends each write's seconds.
        Raises procs.ChildError when NIXL cannot start or set up."""
        if self.child is None:
            self.child = procs.Child(procs.nixl_prefill_main, name="nixl-prefill")
            self.child.recv(START_S)
        meta = decode.call("nixl_init", model, timeout=START_S)
        self.child.call(
            "setup",
            meta,
            dst_addrs,
            layers,
            tensors_per_layer,
            pool,
            block,
            list(si),
            list(di),
            timeout=START_S,
        )
        seconds: list[float] = []
        child = self.child

        def run() -> None:
            seconds.append(child.call("xfer"))

        return run, seconds

    def close(self) -> None:
        if self.child is not None:
            self.child.close()
            self.child = None
