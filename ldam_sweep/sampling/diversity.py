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
"""

from __future__ import annotations

import torch

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


def mode_count(final: torch.Tensor, value_range: tuple[float, float], threshold: float = MODE_THRESHOLD,
               valid: torch.Tensor | None = None) -> torch.Tensor:
    """(U, K, C, H, W) -> (U,) number of distinct modes among the valid chains (see module doc)."""
    x = final.flatten(2).double()
    valid = valid if valid is not None else torch.isfinite(x).all(-1)
    x = torch.where(valid.unsqueeze(-1), x, torch.zeros_like(x))
    close = pairwise_rms(x) / (value_range[1] - value_range[0]) < threshold
    close = close & valid.unsqueeze(-1) & valid.unsqueeze(-2)
    k = close.shape[-1]
    reach = close | torch.eye(k, dtype=torch.bool, device=x.device)
    for _ in range(max(1, k.bit_length())):  # transitive closure by repeated squaring
        reach = (reach.double() @ reach.double()) > 0
    # each component is counted once, at its lowest-index member
    first = torch.arange(k, device=x.device).unsqueeze(0).expand_as(reach[..., 0])
    lowest = torch.where(reach, torch.arange(k, device=x.device).view(1, 1, k).expand_as(reach), torch.full_like(reach, k, dtype=torch.long)).min(-1).values
    return ((lowest == first) & valid).sum(-1)
