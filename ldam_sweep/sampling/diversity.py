"""Per-unit scores of what the chains explored, vectorised over units and chains (torch, on the
device). Every score is symmetric in the chains, so it does not depend on their order.

- ``pixel_diversity``: mean pairwise RMS distance between chains' final samples, divided by the
  width of the pixel range (0 = all chains identical; real digits of one class score ~0.22).
- ``feature_diversity``: mean pairwise cosine distance (1 - cos) of the model's own activations
  for those samples at a chosen layer (default: the swept layer).
- ``modes``: distinct modes among the chains: connected components of the graph joining chains
  whose final samples are closer than ``MODE_THRESHOLD`` (RMS, as a fraction of the pixel range).
  0.1 is about the distance between a real test digit and its nearest training digit: chains
  closer than that show the same image up to noise.
- ``lowpass_diversity``: ``pixel_diversity`` after ``lowpass`` (a 3x3 box blur applied twice), which
  removes per-pixel speckle, so what is left is the variety of shapes, not of noise.
- ``facets``: the same connected components as ``modes``, on the low-passed images at
  ``FACET_THRESHOLD``; ``facet_labels`` gives each chain its facet (the atlas groups chains by it).

Thresholds, measured on the digits demo (scikit-learn digits at 28x28, test split, low-passed):
real digits of one class are 0.190 apart on average (median 0.185, 75th percentile 0.22; mean over
classes of the pairwise RMS), a test digit is 0.082 from its nearest training digit.
``FACET_THRESHOLD`` = 0.22: chains split into two facets only where every chain of one is farther
from every chain of the other than three quarters of same-class digit pairs are. Measured on real
digits (8 per draw, ``tests/test_scores.py``): one class gives 1 facet in 81% of draws (mean 1.25),
4 + 4 of two classes 2 or more in 69% (mean 2.0); 8 different classes 4.9 (measured the same way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldam_sweep.settings import FACET_THRESHOLD  # noqa: F401 (torch-free: the atlas uses it too)

MODE_THRESHOLD = 0.1


def pairwise_rms(x: torch.Tensor) -> torch.Tensor:
    """(U, K, D) -> (U, K, K) RMS distances between the K rows of each unit (NaN rows give NaN)."""
    sq = (x * x).sum(-1)
    d2 = sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * x @ x.transpose(-1, -2)
    return torch.sqrt(d2.clamp_min(0) / x.shape[-1])


def _mean_off_diagonal(m: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of m[u, i, j] over pairs i != j of valid chains; NaN when fewer than 2 are valid."""
    k = m.shape[-1]
    pair = valid.unsqueeze(-1) & valid.unsqueeze(-2) & ~torch.eye(k, dtype=torch.bool, device=m.device)
    total = torch.where(pair, m, torch.zeros_like(m)).sum((-1, -2))
    count = pair.sum((-1, -2))
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


def pixel_diversity(final: torch.Tensor, value_range: tuple[float, float], valid: torch.Tensor | None = None) -> torch.Tensor:
    """(U, K, C, H, W) final samples -> (U,) mean pairwise RMS distance / range width."""
    x = final.flatten(2).double()
    valid = valid if valid is not None else torch.isfinite(x).all(-1)
    x = torch.where(valid.unsqueeze(-1), x, torch.zeros_like(x))
    return (_mean_off_diagonal(pairwise_rms(x), valid) / (value_range[1] - value_range[0])).float()


def feature_diversity(features: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(U, K, F) activations -> (U,) mean pairwise cosine distance."""
    f = features.double()
    valid = valid if valid is not None else torch.isfinite(f).all(-1)
    f = torch.where(valid.unsqueeze(-1), f, torch.zeros_like(f))
    unit = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return _mean_off_diagonal(1.0 - unit @ unit.transpose(-1, -2), valid).float()


def lowpass(images: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) -> the same shape, blurred by a 3x3 box filter applied twice (edges average
    only the pixels inside the image). Removes per-pixel speckle and keeps strokes and shapes."""
    x = images.reshape(-1, *images.shape[-3:])
    for _ in range(2):
        x = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    return x.reshape(images.shape)


def lowpass_diversity(final: torch.Tensor, value_range: tuple[float, float], valid: torch.Tensor | None = None) -> torch.Tensor:
    """(U, K, C, H, W) -> (U,) ``pixel_diversity`` of the low-passed images."""
    valid = valid if valid is not None else torch.isfinite(final.flatten(2)).all(-1)
    return pixel_diversity(lowpass(final.double()), value_range, valid)


def _component_labels(close: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(U, K, K) 'closer than the threshold' -> (U, K) the lowest chain index of each chain's
    connected component (single linkage), -1 for invalid chains."""
    k = close.shape[-1]
    close = close & valid.unsqueeze(-1) & valid.unsqueeze(-2)
    reach = close | torch.eye(k, dtype=torch.bool, device=close.device)
    for _ in range(max(1, k.bit_length())):  # transitive closure by repeated squaring
        reach = (reach.double() @ reach.double()) > 0
    index = torch.arange(k, device=close.device).view(1, 1, k).expand_as(reach)
    lowest = torch.where(reach, index, torch.full_like(index, k)).min(-1).values
    return torch.where(valid, lowest, torch.full_like(lowest, -1))


def _components(images: torch.Tensor, value_range: tuple[float, float], threshold: float,
                valid: torch.Tensor | None) -> torch.Tensor:
    x = images.flatten(2).double()
    valid = valid if valid is not None else torch.isfinite(x).all(-1)
    x = torch.where(valid.unsqueeze(-1), x, torch.zeros_like(x))
    close = pairwise_rms(x) / (value_range[1] - value_range[0]) < threshold
    return _component_labels(close, valid)


def _count(labels: torch.Tensor) -> torch.Tensor:
    """(U, K) component labels -> (U,) number of components (each counted at its lowest member)."""
    first = torch.arange(labels.shape[-1], device=labels.device).expand_as(labels)
    return (labels == first).sum(-1)


def mode_count(final: torch.Tensor, value_range: tuple[float, float], threshold: float = MODE_THRESHOLD,
               valid: torch.Tensor | None = None) -> torch.Tensor:
    """(U, K, C, H, W) -> (U,) number of distinct modes among the valid chains (see module doc)."""
    return _count(_components(final, value_range, threshold, valid))


def facet_labels(final: torch.Tensor, value_range: tuple[float, float], threshold: float = FACET_THRESHOLD,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """(U, K, C, H, W) -> (U, K) each chain's facet: the lowest chain index of its group of
    low-passed final samples linked by distances below ``threshold`` (-1 for invalid chains)."""
    valid = valid if valid is not None else torch.isfinite(final.flatten(2)).all(-1)
    return _components(lowpass(final.double()), value_range, threshold, valid)


def facet_count(final: torch.Tensor, value_range: tuple[float, float], threshold: float = FACET_THRESHOLD,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """(U, K, C, H, W) -> (U,) number of facets among the valid chains."""
    return _count(facet_labels(final, value_range, threshold, valid))
