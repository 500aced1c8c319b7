"""Dataset exemplars: the top-k real images of each unit, in one batched pass over the data."""

from __future__ import annotations

import numpy as np
import torch

from ldam_sweep.model.handle import ModelHandle
from ldam_sweep.objectives import units_objective


@torch.no_grad()
def top_exemplars(model: ModelHandle, layer: str, units: np.ndarray, objective: str, pool: torch.Tensor, k: int,
                  batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(images (U, k, C, H, W), activations (U, k)) of the k real images that excite each unit most."""
    idx = torch.as_tensor(units, device=model.device, dtype=torch.long)
    scores = []
    for i in range(0, len(pool), batch):
        x = pool[i : i + batch].to(model.device)
        scores.append(units_objective(model.activations(x, layer), idx, objective).float())
    all_scores = torch.cat(scores)  # (N, U)
    kk = min(k, all_scores.shape[0])
    vals, order = all_scores.topk(kk, dim=0)  # (kk, U)
    images = pool[order.T.reshape(-1).cpu()].reshape(len(units), kk, *pool.shape[1:])
    vals = vals.T
    if kk < k:  # fewer real images than k: pad with NaN
        pad = torch.full((len(units), k - kk, *pool.shape[1:]), float("nan"))
        images = torch.cat([images, pad], 1)
        vals = torch.cat([vals, torch.full((len(units), k - kk), float("nan"), device=vals.device)], 1)
    return images.numpy(), vals.cpu().numpy()
