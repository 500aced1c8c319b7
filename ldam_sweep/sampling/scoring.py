"""Scores of a ChainResult against its model: diversity, diagnostics, realism without D."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ldam_sweep.model.handle import ModelHandle
from ldam_sweep.sampling.chains import ChainResult
from ldam_sweep.sampling.diagnostics import unit_scores


@torch.no_grad()
def final_features(model: ModelHandle, result: ChainResult, layer: str | None = None, batch: int = 512) -> torch.Tensor:
    """(U, K, F) the model's activations at ``layer`` (default: the result's layer) for each chain's
    final sample; used by the feature-space diversity."""
    final = torch.from_numpy(np.ascontiguousarray(result.final_samples)).flatten(0, 1)
    name = layer or result.layer
    parts = [model.activations(final[i : i + batch].to(model.device).float(), name).flatten(1).float()
             for i in range(0, len(final), batch)]
    return torch.cat(parts).view(len(result.units), result.chains, -1)


def score_result(
    model: ModelHandle,
    result: ChainResult,
    *,
    real_pool: np.ndarray | torch.Tensor | None = None,
    exemplar_max: np.ndarray | None = None,
    feature_layer: str | None = None,
    burn_in: int | None = None,
) -> dict[int, dict[str, Any]]:
    """{unit: {score column: value}} for every unit of the result (see docs/scores.md)."""
    pool = None if real_pool is None else torch.as_tensor(np.asarray(real_pool, dtype=np.float32))
    rows = unit_scores(
        result.samples, result.activation, result.snapshot_steps, model.input.range,
        features=final_features(model, result, feature_layer), realism=result.realism,
        exemplar_max=exemplar_max, real_pool=pool, burn_in=burn_in, device=model.device,
    )
    return {int(u): row for u, row in zip(result.units, rows)}
