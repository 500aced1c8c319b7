"""A unit's chains grouped by facet, for the atlas: the same rule as the ``facets`` score
(``ldam_sweep/sampling/diversity.py``: low-pass, then single linkage below ``FACET_THRESHOLD``),
recomputed from the stored final samples in numpy, so building an atlas never imports torch."""

from __future__ import annotations

import numpy as np
from scipy.sparse.csgraph import connected_components

from ldam_sweep.settings import FACET_THRESHOLD


def _box3(x: np.ndarray) -> np.ndarray:
    """3x3 box blur of (..., H, W) where the edges average only the pixels inside the image
    (``avg_pool2d(x, 3, 1, 1, count_include_pad=False)``)."""
    h, w = x.shape[-2:]
    pad = [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)]
    xs, ones = np.pad(x, pad), np.pad(np.ones((h, w)), 1)
    total = sum(xs[..., i : i + h, j : j + w] for i in range(3) for j in range(3))
    count = sum(ones[i : i + h, j : j + w] for i in range(3) for j in range(3))
    return total / count


def facet_groups(final: np.ndarray, value_range: tuple[float, float],
                 threshold: float = FACET_THRESHOLD) -> list[list[int]]:
    """(K, C, H, W) final samples of one unit -> the chains of each facet, largest first (chains
    with non-finite samples belong to none)."""
    x = np.asarray(final, dtype=np.float64)
    valid = np.isfinite(x.reshape(len(x), -1)).all(1)
    x = _box3(_box3(np.where(np.isfinite(x), x, 0.0))).reshape(len(x), -1)
    dist = np.sqrt(((x[:, None] - x[None]) ** 2).mean(-1)) / (value_range[1] - value_range[0])
    close = (dist < threshold) & valid[:, None] & valid[None]
    _, labels = connected_components(close, directed=False)
    groups: dict[int, list[int]] = {}
    for chain in np.flatnonzero(valid):
        groups.setdefault(int(labels[chain]), []).append(int(chain))
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))
