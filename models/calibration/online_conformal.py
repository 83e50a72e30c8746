"""Online conformal p-values: each input ranked against the calibration scores and every input before it.

Served p-values all compare with one fixed set of n calibration scores, so they are dependent
through that set: conditionally on it they are i.i.d. but not uniform, and a test martingale
betting on a long stream of them learns the set's luck (``docs/drift.md`` measures how often that
raises a false alarm). Ranking each new score against the calibration scores *and all earlier
inputs*, then adding it to that bag, gives smoothed p-values that are independent and exactly
uniform whenever the calibration scores and the stream together are exchangeable (Vovk,
Gammerman, Shafer, *Algorithmic Learning in a Random World*, 2005, theorem 8.2 on smoothed
conformal p-values in the online mode): the premise of Ville's bound, met by construction.

The bag grows with the stream, so scores are counted in bins: the 65 536 float16 values, in
order. Rounding to float16 is a fixed monotone map applied to every score alike, so the binned
scores stay exchangeable, and the random tie-breaking of smoothed p-values keeps them exact; a
bin is 2**-11 of a score's magnitude wide. A Fenwick tree (Fenwick, "A new data structure for
cumulative frequency tables", 1994) counts the bins: rank and insert touch at most 17 nodes
each, all of them in a few array operations, for ``runs`` independent bags at once.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

BINS = 1 << 16
_SHIFTS = np.arange(BINS.bit_length())  # the Fenwick levels: indices 1..BINS have bits 0..16


def score_bins(scores: ArrayLike) -> NDArray[np.int64]:
    """Scores to bins 0..65535, in the order of their float16 values (-inf first, +inf last)."""
    with np.errstate(over="ignore"):  # beyond float16's range is its infinity: still in order
        halves = np.asarray(scores, dtype=np.float64).astype(np.float16)
    bits = halves.view(np.uint16).astype(np.int64)
    bits[bits == 0x8000] = 0  # -0 is 0
    negative = (bits & 0x8000) != 0
    return np.where(negative, 0x7FFF - (bits & 0x7FFF), bits | 0x8000)


class OnlineConformal:
    """One bag of scores per stream: calibration scores first, then every input ranked so far."""

    def __init__(self, calibration_scores: ArrayLike, runs: int = 1):
        """``calibration_scores``: shape (n,) shared by every stream, or (runs, n), one set per stream."""
        given = np.asarray(calibration_scores, dtype=np.float64)
        calibration = np.broadcast_to(given, (runs, given.shape[-1]))
        counts = np.zeros((runs, BINS + 1), dtype=np.int64)  # index 0 unused: Fenwick trees count from 1
        np.add.at(counts, (np.arange(runs)[:, None], score_bins(calibration) + 1), 1)
        cumulative = np.cumsum(counts, axis=1)
        index = np.arange(1, BINS + 1)
        self._tree = np.zeros_like(counts)
        self._tree[:, 1:] = cumulative[:, index] - cumulative[:, index - (index & -index)]
        self._size = np.full(runs, calibration.shape[1], dtype=np.int64)
        self._rows = np.arange(runs)

    def p_values(self, scores: ArrayLike, uniforms: ArrayLike) -> NDArray[np.float64]:
        """Smoothed p-values of ``B`` successive scores per stream, shape (runs, B) (or (B,) for one
        stream), each against its bag and joining it before the next:
        ``(#{bag > s} + u * (#{bag == s} + 1)) / (#bag + 1)`` in bins, ``u`` uniform on (0, 1]."""
        runs = self._rows.size
        b = score_bins(scores).reshape(runs, -1)
        u = np.asarray(uniforms, dtype=np.float64).reshape(runs, -1)
        earlier = np.tri(b.shape[1], k=-1, dtype=bool)  # [j, i]: item i comes before item j
        at_most, below = self._count_up_to(np.stack((b, b - 1)))  # bag scores in bins <= b, < b
        at_most += np.sum(earlier & (b[:, None, :] <= b[:, :, None]), axis=2)
        below += np.sum(earlier & (b[:, None, :] < b[:, :, None]), axis=2)
        size = self._size[:, None] + np.arange(b.shape[1])
        p = (size - at_most + u * (at_most - below + 1.0)) / (size + 1.0)
        self._insert(b)
        return p.reshape(np.shape(scores))

    def _count_up_to(self, bins: NDArray[np.int64]) -> NDArray[np.int64]:
        """Bag scores in bins ``<= bins`` (shape (..., runs, B); 0 for bin -1).

        The prefix of index ``i`` is the sum of the nodes ``i`` with its lowest set bits cleared
        one by one: ``(i >> j) << j`` for every set bit ``j``. All of them at once, in a few array
        operations rather than one round per level (node 0 is never written, so it adds 0)."""
        shifted = (bins + 1)[..., None] >> _SHIFTS  # (..., runs, B, levels)
        nodes = np.where(shifted & 1 == 1, shifted << _SHIFTS, 0)
        return self._tree[self._rows[:, None, None], nodes].sum(axis=-1)

    def _insert(self, bins: NDArray[np.int64]) -> None:
        """Count ``bins`` in the bag. The nodes covering index ``i`` are ``c << j`` for each level ``j``
        where ``c = ceil(i / 2**j)`` is odd (a node with lowest set bit ``2**j`` covers the
        ``2**j`` indices up to it); all of them are at most ``BINS``."""
        ceiling = (bins[..., None] >> _SHIFTS) + 1  # bins = i - 1: ceil(i / 2**j)
        covering = ceiling & 1 == 1
        rows = np.broadcast_to(self._rows[:, None, None], covering.shape)
        np.add.at(self._tree, (rows[covering], (ceiling << _SHIFTS)[covering]), 1)  # repeated bins each count
        self._size += bins.shape[1]
