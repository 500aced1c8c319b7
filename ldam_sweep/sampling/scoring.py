"""Scores of a ChainResult against its model: diversity, diagnostics, realism without D."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ldam_sweep.model.handle import ModelHandle
from ldam_sweep.sampling.chains import ChainResult
from ldam_sweep.sampling.diagnostics import unit_scores


@torch.no_grad()
def image_features(model: ModelHandle, images: np.ndarray | torch.Tensor, layer: str, batch: int = 512) -> torch.Tensor:
    """(U, K, C, H, W) images -> (U, K, F) the model's activations at ``layer``; NaN images give NaN rows."""
    x = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32)
    flat = x.flatten(0, 1)
    parts = [model.activations(flat[i : i + batch].to(model.device), layer).flatten(1).float() for i in range(0, len(flat), batch)]
    return torch.cat(parts).view(x.shape[0], x.shape[1], -1)


def score_result(
    model: ModelHandle,
    result: ChainResult,
    *,
    real_pool: np.ndarray | torch.Tensor | None = None,
    exemplar_max: np.ndarray | None = None,
    exemplars: np.ndarray | None = None,
    feature_layer: str | None = None,
    burn_in: int | None = None,
    real_hf: float | None = None,
) -> dict[int, dict[str, Any]]:
    """{unit: {score column: value}} for every live unit of the result (see docs/scores.md); dead
    units (``result.dead``) were not sampled and get no scores. ``exemplars`` (U, k, C, H, W): the
    units' top real images, for the diversity ratios and the saturation floor. ``real_hf``: the real
    data's mean high-frequency energy (``realism.hf_energy``), for ``hf_ratio``; computed from
    ``real_pool`` when not given."""
    live = np.ones(len(result.units), dtype=bool) if result.dead is None else ~result.dead
    if not live.any():
        return {}
    pool = None if real_pool is None else torch.as_tensor(np.asarray(real_pool, dtype=np.float32))
    if real_hf is None and pool is not None:
        from ldam_sweep.sampling.realism import hf_energy

        real_hf = float(hf_energy(pool, model.input.range).mean())
    layer = feature_layer or result.layer

    def pick(a: np.ndarray) -> np.ndarray:  # the live units' rows; no copy when all are live (~300 MB at 224 px)
        return a if live.all() else a[live]

    ex = ex_features = None
    if exemplars is not None:
        ex = torch.as_tensor(np.ascontiguousarray(pick(exemplars)), dtype=torch.float32)
        ex_features = image_features(model, ex, layer)
    rows = unit_scores(
        pick(result.samples), pick(result.activation), result.snapshot_steps, model.input.range,
        features=image_features(model, pick(result.final_samples), layer),
        realism=None if result.realism is None else pick(result.realism),
        exemplar_max=None if exemplar_max is None else pick(np.asarray(exemplar_max)), real_pool=pool,
        exemplars=ex, exemplar_features=ex_features, burn_in=burn_in, device=model.device, real_hf=real_hf,
    )
    return {int(u): row for u, row in zip(result.units[live], rows)}
