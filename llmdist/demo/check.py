"""How the demo checks the bytes that arrived: every destination byte against the source (local
mode), or per-block digests and the canary byte (checked by the decode process)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .model import PagedLayout

CANARY = 0x5A
DIGEST_BYTES = 16


# ------------------------------------------------------------------------------------------
# Verification


@dataclass
class Verdict:
    ok: bool
    bytes_checked: int
    moved_bytes: int
    untouched_bytes: int
    message: str


def verify(
    src_views: list[np.ndarray],
    src_table: list[int],
    dst_views: list[np.ndarray],
    dst_table: list[int],
    canary: int = CANARY,
) -> Verdict:
    """Every destination byte: blocks in ``dst_table`` equal their source blocks, all other
    destination blocks still hold the canary byte."""
    s = np.asarray(src_table, dtype=np.intp)
    d = np.asarray(dst_table, dtype=np.intp)
    pool = dst_views[0].shape[0]
    others = np.setdiff1d(np.arange(pool), d)
    moved = untouched = 0
    for t, (sv, dv) in enumerate(zip(src_views, dst_views)):
        got, want = dv[d], sv[s]
        if not np.array_equal(got, want):
            j = int(np.flatnonzero((got != want).any(axis=1))[0])
            off = int(np.flatnonzero(got[j] != want[j])[0])
            return Verdict(
                False,
                moved + untouched,
                moved,
                untouched,
                f"tensor {t} (layer {t // 2} {'KV'[t % 2]}): destination block "
                f"{d[j]} byte {off} is {got[j, off]:#04x}, source block {s[j]} has "
                f"{want[j, off]:#04x}",
            )
        moved += got.size
        rest = dv[others]
        if rest.size and not (rest == canary).all():
            j = int(np.flatnonzero((rest != canary).any(axis=1))[0])
            return Verdict(
                False,
                moved + untouched,
                moved,
                untouched,
                f"tensor {t}: destination block {others[j]} was not in the transfer but changed",
            )
        untouched += rest.size
    return Verdict(
        True,
        moved + untouched,
        moved,
        untouched,
        f"{moved} bytes in {len(d) * len(dst_views)} blocks match the source; "
        f"{untouched} other bytes untouched",
    )


def block_digests(views: list[np.ndarray], table: list[int], threads: int = 2) -> list[bytes]:
    """Per tensor, the BLAKE2b digests (``DIGEST_BYTES`` each, concatenated in table order) of
    the blocks listed in ``table``. hashlib drops the GIL on large buffers, so tensors are hashed
    on ``threads`` threads."""
    idx = [int(b) for b in table]

    def one(view: np.ndarray) -> bytes:
        return b"".join(hashlib.blake2b(view[b], digest_size=DIGEST_BYTES).digest() for b in idx)

    if threads <= 1 or len(views) < 2:
        return [one(v) for v in views]
    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(one, views))


def verify_digests(
    dst_views: list[np.ndarray],
    src_table: list[int],
    dst_table: list[int],
    digests: list[bytes],
    canary: int = CANARY,
) -> Verdict:
    """What the decode process checks, knowing only the block mapping and the source digests:
    every block in ``dst_table`` hashes to its source block's digest, every other destination
    block still holds the canary byte."""
    if len(digests) != len(dst_views) or any(
        len(g) != DIGEST_BYTES * len(dst_table) for g in digests
    ):
        return Verdict(
            False,
            0,
            0,
            0,
            f"expected {len(dst_views)} tensors x {len(dst_table)} "
            f"digests, got {len(digests)} tensors",
        )
    got = block_digests(dst_views, dst_table)
    d = np.asarray(dst_table, dtype=np.intp)
    pool, block = dst_views[0].shape
    others = np.setdiff1d(np.arange(pool), d)
    moved = untouched = 0
    for t, (g, want) in enumerate(zip(got, digests)):
        if g != want:
            j = next(
                j
                for j in range(len(d))
                if g[j * DIGEST_BYTES : (j + 1) * DIGEST_BYTES]
                != want[j * DIGEST_BYTES : (j + 1) * DIGEST_BYTES]
            )
            return Verdict(
                False,
                moved + untouched,
                moved,
                untouched,
                f"tensor {t} (layer {t // 2} {'KV'[t % 2]}): destination block {d[j]} "
                f"does not match source block {src_table[j]} (BLAKE2b digests differ)",
            )
        moved += len(d) * block
        rest = dst_views[t][others]
        if rest.size and not (rest == canary).all():
            j = int(np.flatnonzero((rest != canary).any(axis=1))[0])
            return Verdict(
                False,
                moved + untouched,
                moved,
                untouched,
                f"tensor {t}: destination block {others[j]} was not in the transfer but changed",
            )
        untouched += rest.size
    return Verdict(
        True,
        moved + untouched,
        moved,
        untouched,
        f"{moved} bytes in {len(d) * len(dst_views)} blocks match the source's "
        f"digests; {untouched} other bytes untouched",
    )


def check_model_pages(
    dst_views: list[np.ndarray],
    layout: PagedLayout,
    table: list[int],
    layer: int,
    k: np.ndarray,
    v: np.ndarray,
) -> bool:
    """The destination, read back through the block table, holds the model's K and V."""
    dim, dt = layout.dim, layout.dtype
    idx = np.asarray(table, dtype=np.intp)
    for t, data in ((2 * layer, k), (2 * layer + 1, v)):
        rows = dst_views[t].view(dt).reshape(layout.pool_blocks, -1, dim)[idx].reshape(-1, dim)
        if not np.array_equal(rows[: layout.tokens], data.astype(dt)):
            return False
    return True
