"""The low-pass view of images that the chains' repulsion and the diversity measure compare: a 3x3
box blur applied twice. Pixel-level differences (noise, single-pixel speckle) do not count as
variety; strokes in other places do."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lowpass(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> same shape: a 3x3 box blur applied twice (borders average over the inside)."""
    x = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def pair_sq_dist(y: torch.Tensor) -> torch.Tensor:
    """(U, K, D) -> (U, K, K) squared Euclidean distances among each group's K vectors."""
    sq = (y * y).sum(-1)
    return (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2.0 * y @ y.transpose(-1, -2)).clamp_min_(0.0)


def variety(x: torch.Tensor) -> torch.Tensor:
    """(U, K, C, H, W) -> (U,) mean pairwise RMS distance of each group's low-passed images (K >= 2)."""
    u, k = x.shape[:2]
    y = lowpass(x.flatten(0, 1).float()).reshape(u, k, -1).double()
    d = (pair_sq_dist(y) / y.shape[-1]).sqrt()
    return d.sum((-1, -2)) / (k * (k - 1))


@torch.no_grad()
def exemplar_bandwidth(exemplars: torch.Tensor) -> torch.Tensor:
    """(U, N, C, H, W) real exemplars of each unit (NaN rows = missing) -> (U,) kernel width h: half
    the median pairwise squared distance of the unit's low-passed exemplars. NaN where a unit has
    fewer than 2 exemplars."""
    u, n = exemplars.shape[:2]
    valid = torch.isfinite(exemplars.flatten(2)).all(-1)  # (U, N)
    y = lowpass(torch.nan_to_num(exemplars.flatten(0, 1).float())).reshape(u, n, -1)
    d2 = pair_sq_dist(y)
    iu = torch.triu_indices(n, n, 1, device=y.device)
    pairs = d2[:, iu[0], iu[1]]
    pairs = pairs.masked_fill(~(valid[:, iu[0]] & valid[:, iu[1]]), float("nan"))
    return 0.5 * pairs.nanmedian(dim=-1).values
