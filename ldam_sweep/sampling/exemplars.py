"""Dataset exemplars: the top-k real images of each unit, in one batched pass over the data.

The same pass gives each unit's activation distribution over the real pool (a histogram, the
fraction of images where it is above zero, quantiles) and, when the data is labelled, its label:
the most common class among its top-k exemplars, with that class's share of them (purity) and its
share of the whole pool (base rate) beside it. docs/scores.md says what these do and do not capture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ldam_sweep.model.handle import ModelHandle
from ldam_sweep.objectives import units_objective

LABEL_K = 8  # a unit's label comes from its top exemplars: the stored k (spec ``exemplars``), else this many
HIST_BINS = 32  # bins of a unit's activation histogram over the real pool (between its min and max)
QUANTILES = {"data_p50": 0.5, "data_p90": 0.9, "data_p99": 0.99}


@dataclass
class ExemplarPass:
    """What one pass over the real pool found for a batch of units (unit axis first)."""

    images: np.ndarray  # (U, k, C, H, W) the top-k real images, best first (NaN-padded past the pool)
    activations: np.ndarray  # (U, k)
    order: np.ndarray  # (U, k) their indices in the pool (-1: padding)
    columns: list[dict[str, Any]] = field(default_factory=list)  # per unit: distribution and label columns


@torch.no_grad()
def pool_scores(model: ModelHandle, layer: str, units: np.ndarray, objective: str, pool: torch.Tensor,
                batch: int = 512) -> torch.Tensor:
    """(N, U) every real image's activation for each unit, on the model's device."""
    idx = torch.as_tensor(units, device=model.device, dtype=torch.long)
    scores = []
    for i in range(0, len(pool), batch):
        x = pool[i : i + batch].to(model.device)
        scores.append(units_objective(model.activations(x, layer), idx, objective).float())
    return torch.cat(scores)


def exemplar_pass(model: ModelHandle, layer: str, units: np.ndarray, objective: str, pool: torch.Tensor, k: int, *,
                  labels: np.ndarray | None = None, class_names: Sequence[str] | None = None,
                  label_k: int | None = None, distributions: bool = True, batch: int = 512) -> ExemplarPass:
    """Top-k exemplars, the activation distribution over ``pool`` and (with ``labels``: the pool's
    class indices into ``class_names``) each unit's label from its top ``label_k`` exemplars."""
    all_scores = pool_scores(model, layer, units, objective, pool, batch)  # (N, U)
    kk = min(k, all_scores.shape[0])
    vals, order = all_scores.topk(kk, dim=0)  # (kk, U)
    order_np = order.T.cpu().numpy()
    images = pool[order.T.reshape(-1).cpu()].reshape(len(units), kk, *pool.shape[1:])
    vals = vals.T.cpu()
    if kk < k:  # fewer real images than k: pad with NaN
        pad = torch.full((len(units), k - kk, *pool.shape[1:]), float("nan"))
        images = torch.cat([images, pad], 1)
        vals = torch.cat([vals, torch.full((len(units), k - kk), float("nan"))], 1)
        order_np = np.concatenate([order_np, np.full((len(units), k - kk), -1)], 1)
    columns = distribution_columns(all_scores.cpu().numpy()) if distributions else [{} for _ in units]
    if labels is not None and class_names is not None:
        for col, lab in zip(columns, label_columns(order_np[:, : label_k or k], labels, class_names)):
            col.update(lab)
    return ExemplarPass(images.numpy(), vals.numpy(), order_np, columns)


def top_exemplars(model: ModelHandle, layer: str, units: np.ndarray, objective: str, pool: torch.Tensor, k: int,
                  batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(images (U, k, C, H, W), activations (U, k)) of the k real images that excite each unit most."""
    found = exemplar_pass(model, layer, units, objective, pool, k, distributions=False, batch=batch)
    return found.images, found.activations


def distribution_columns(scores: np.ndarray) -> list[dict[str, Any]]:
    """(N, U) activations over the pool -> per unit: the fraction above zero, quantiles and a
    HIST_BINS-bin histogram between its min and max (manifest columns ``data_*``)."""
    s = np.asarray(scores, dtype=np.float64)
    out = []
    for u in range(s.shape[1]):
        v = s[np.isfinite(s[:, u]), u]  # a non-finite activation (an overflowing model) is left out
        if v.size == 0:
            out.append({})
            continue
        lo, hi = float(v.min()), float(v.max())
        top = hi if hi > lo else lo + 1e-6  # a constant unit: every image in the first bin
        counts = np.histogram(v, bins=HIST_BINS, range=(lo, top))[0]
        q = np.quantile(v, list(QUANTILES.values()))
        out.append({"data_active_fraction": float((v > 0).mean()), **{name: float(q[i]) for i, name in enumerate(QUANTILES)},
                    "data_hist": counts.astype(np.int32).tolist(), "data_hist_lo": lo, "data_hist_hi": top})
    return out


def label_columns(order: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """(U, k) pool indices of each unit's top exemplars (-1: none) -> per unit ``label`` (the most
    common class among them; a tie goes to the class of the better-ranked exemplar),
    ``label_purity`` (its share of the k) and ``label_base_rate`` (its share of the pool)."""
    labels = np.asarray(labels)
    base = np.bincount(labels, minlength=len(class_names)) / max(1, len(labels))
    out = []
    for row in order:
        classes = labels[row[row >= 0]]
        if classes.size == 0:
            out.append({})
            continue
        counts = np.bincount(classes, minlength=len(class_names))
        best = counts.max()
        label = next(int(c) for c in classes if counts[c] == best)  # first in rank order among the tied
        out.append({"label": str(class_names[label]), "label_purity": float(best / classes.size),
                    "label_base_rate": float(base[label])})
    return out


def unit_label_columns(model: ModelHandle, result: Any, found: ExemplarPass | None) -> dict[int, dict[str, Any]]:
    """{unit: manifest columns}: the exemplar pass's (distribution, label; dead units too) and the
    network's reading of the result's final samples (live units)."""
    columns = found.columns if found is not None else [{} for _ in result.units]
    readings = sample_label_columns(model, result.final_samples, model.class_names, [c.get("label") for c in columns])
    return {int(u): {**col, **reading} for u, col, reading in zip(result.units, columns, readings)}


@torch.no_grad()
def sample_label_columns(model: ModelHandle, final: np.ndarray, class_names: Sequence[str] | None,
                         exemplar_labels: Sequence[str | None], batch: int = 512) -> list[dict[str, Any]]:
    """The whole network's reading of each unit's final samples ((U, chains, C, H, W); NaN chains
    are left out): ``sample_label`` (the class most chains are assigned), ``sample_label_share``
    (the share of chains assigned it) and ``label_match`` (the share of chains assigned the unit's
    exemplar label); shares are of the chains that did not diverge. Empty dicts when the model is not
    a classifier (``ModelHandle.logits``)."""
    u, c = final.shape[:2]
    x = torch.as_tensor(np.ascontiguousarray(final), dtype=torch.float32).flatten(0, 1)
    ok = torch.isfinite(x.flatten(1)).all(1)
    if not ok.any():
        return [{} for _ in range(u)]
    parts = [model.logits(x[ok][i : i + batch].to(model.device)) for i in range(0, int(ok.sum()), batch)]
    if any(p is None for p in parts):  # not a classifier: no reading
        return [{} for _ in range(u)]
    logits = torch.cat(parts)
    names = list(class_names) if class_names is not None and len(class_names) == logits.shape[1] \
        else [str(i) for i in range(logits.shape[1])]
    pred = np.full(u * c, -1)
    pred[ok.numpy()] = logits.argmax(1).cpu().numpy()
    out = []
    for i, row in enumerate(pred.reshape(u, c)):
        row = row[row >= 0]
        if row.size == 0:
            out.append({})
            continue
        counts = np.bincount(row, minlength=len(names))
        top = int(np.argmax(counts))
        want = exemplar_labels[i]
        match = None if want is None else float(np.mean([names[p] == want for p in row]))
        out.append({"sample_label": names[top], "sample_label_share": float(counts[top] / row.size), "label_match": match})
    return out
