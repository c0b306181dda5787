"""``python -m llmdist demo``: a simulated prefill that streams its KV cache layer by layer.

A toy model (numpy matmuls) computes one layer after the other and writes each layer's K and V
into a paged ("blocks") source cache, then marks the layer done (one ``threading.Event`` per
layer). A ``LayerSynchronizer`` waits on those events, so ``transfer_cache_async`` copies layer
``l`` into the destination blocks cache while layer ``l + 1`` is being computed. At the end every
byte of the destination is checked, and the *tail* (end of prefill to end of transfer) is compared
with the time to send the whole cache after prefill.

Modes (a mode is a function ``run(args, out) -> exit code`` registered in ``MODES``):

- ``two-process`` (default): a decode cluster runs in a child process (multiprocessing, spawn)
  that listens on 127.0.0.1 and allocates the destination blocks cache; the prefill (this
  process) links to it and streams into that cache by key (``TransferWithCacheKeyConfig``).
  The decode side verifies every byte: the prefill sends it the block mapping and a BLAKE2b
  digest per moved block (16 bytes per block, not the data); every other block must still hold
  the canary byte. ``--transport`` picks the data path: ``direct`` (same host: copies into the
  decode's shared memory), ``mooncake`` (Mooncake Transfer Engine over loopback TCP) or
  ``auto`` (what llmdist picks: direct on one host).
- ``local``: one process, destination = a cache owned by the same LLMDataDist (local cluster
  id); the prefill checks the bytes itself.

Parts: ``model`` (layout, toy model, layer synchronizers), ``check`` (byte and digest checks),
``report`` (the printed report), ``local`` and ``two_process`` (the modes).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .local import run_local
from .model import DTYPES
from .two_process import TRANSPORTS, run_two_process

MODES: dict[str, Callable] = {
    "two-process": run_two_process,
    "local": run_local,
}
DEFAULT_MODE = "two-process"


# ------------------------------------------------------------------------------------------
# Command line


def _size(text: str) -> int:
    t = text.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    return int(t[:-1] if mult > 1 else t) * mult


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mode",
        choices=sorted(MODES),
        default=DEFAULT_MODE,
        help="where the destination lives: two-process (a decode cluster in a child "
        "process on 127.0.0.1) or local (this process) (default: %(default)s)",
    )
    p.add_argument("--layers", type=int, default=32, help="model layers (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=2048, help="prompt tokens (default: %(default)s)")
    p.add_argument(
        "--dim", type=int, default=512, help="K/V width per token, elements (default: %(default)s)"
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float16",
        help="KV cache element type (default: %(default)s)",
    )
    p.add_argument(
        "--block-size",
        type=_size,
        default=16 << 10,
        metavar="BYTES",
        help="bytes per cache block, e.g. 16384 or 16K (default: 16K)",
    )
    p.add_argument(
        "--blocks",
        type=int,
        default=0,
        metavar="N",
        help="blocks in each cache tensor's pool (default: twice what the prompt needs)",
    )
    p.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="auto",
        help="data path to the decode process (two-process mode): direct (same-host "
        "shared memory), mooncake (Mooncake Transfer Engine over loopback TCP) "
        "or auto, llmdist's choice (default: %(default)s)",
    )
    p.add_argument(
        "--cluster-id",
        type=int,
        default=1,
        help="the prefill's cluster id; the decode process is this + 1 (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument(
        "--auth-key",
        default=None,
        metavar="KEY",
        help="shared key both clusters authenticate their link with "
        "(llmdist.auth_key; two-process mode; default: none)",
    )


def main(args, out=sys.stdout) -> int:
    return MODES[args.mode](args, out=out)
