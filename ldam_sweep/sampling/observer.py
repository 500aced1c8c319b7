"""How informative the images shown for a unit are: a machine observer's two-alternative task.

After Borowski et al. (ICLR 2021) and Zimmermann et al. (NeurIPS 2021), who asked people: shown a
unit's images, which of two real images excites the unit more? The two come from *query* images
that the sweep never used (the data's held-out split: not a start, not an exemplar, not the
discriminator's training data). The queries are ranked by the unit's activation: a "strong" one is
in the top 5% of the ranks, a "moderate" one between the median's rank and the 75th percentile's
(for a unit silent on most queries, silent ones). The observer is a fixed image model that knows
nothing about the network: each image low-passed (``diversity.lowpass``, as for facets) and pooled
to at most 32 px a side, minus the query images' mean image; it picks the query whose image points
more the way of the shown images' mean (cosine). The score is the fraction of all strong x moderate
pairs it gets right (ties count half): 0.5 = the images say nothing about which real images the
unit prefers, 1.0 = they always tell.

The same observer is given a unit's final samples, their starts (where those are real images) and
its top exemplars, so the scores say whether the sampler added information beyond the real images
it started from. What it cannot see: anything a low-pass of the pixels loses (fine texture,
semantics that do not show as layout and brightness). docs/scores.md, "Informativeness".
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ldam_sweep.sampling.diversity import lowpass

OBSERVER_MAX_QUERIES = 256  # held-out images a sweep keeps as queries (evenly spaced through the split)
FEATURE_SIZE = 32  # the observer sees images low-passed and pooled to at most this many pixels a side
STRONG_SHARE = 0.05  # strong queries: the top 5% of the ranks
MODERATE_RANKS = (0.5, 0.75)  # moderate ones: from the median's rank to the 75th percentile's
MIN_STRONG, MIN_MODERATE = 2, 8  # fewer (under ~40 queries): no score, rather than a coarse one
CHUNK = 64  # images low-passed at a time (bounds the float64 copies of 224-px images)


def query_subset(images: np.ndarray, limit: int = OBSERVER_MAX_QUERIES) -> np.ndarray:
    """At most ``limit`` images, evenly spaced through ``images`` (deterministic)."""
    if len(images) <= limit:
        return images
    return images[np.linspace(0, len(images) - 1, limit).round().astype(np.int64)]


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, D) low-passed and pooled to at most FEATURE_SIZE a side, float64,
    CHUNK images at a time."""
    parts = []
    for i in range(0, len(x), CHUNK):
        low = lowpass(x[i : i + CHUNK].double())
        if max(low.shape[-2:]) > FEATURE_SIZE:
            low = torch.nn.functional.adaptive_avg_pool2d(low, (min(low.shape[-2], FEATURE_SIZE), min(low.shape[-1], FEATURE_SIZE)))
        parts.append(low.flatten(1))
    return torch.cat(parts) if parts else torch.zeros(0, 0, dtype=torch.float64)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class Observer:
    """The fixed image model over one set of query images (kept for a whole sweep)."""

    def __init__(self, queries: torch.Tensor) -> None:
        self.queries = queries  # (Q, C, H, W) real images, model input range
        low = _pixels(queries)
        self.mean = low.mean(0)
        self.features = _unit(low - self.mean)  # (Q, D)
        q = len(queries)
        self.n_strong = math.ceil(STRONG_SHARE * q)
        lo, hi = int(MODERATE_RANKS[0] * q), int(MODERATE_RANKS[1] * q)
        self.moderate_ranks = slice(lo, hi)  # ascending ranks
        self.usable = self.n_strong >= MIN_STRONG and hi - lo >= MIN_MODERATE

    def directions(self, images: np.ndarray | torch.Tensor, index: np.ndarray) -> torch.Tensor:
        """(N, K, C, H, W) images of N units, scored units' rows ``index`` -> (len(index), D) the unit
        vector of each one's mean feature over its finite images (zero where none is finite). A few
        units at a time: no copy of the whole array (hundreds of MB at 224 px)."""
        out = []
        step = max(1, CHUNK // max(1, images.shape[1]))
        for j in range(0, len(index), step):
            x = torch.as_tensor(np.asarray(images[index[j : j + step]], dtype=np.float32))
            n, k = x.shape[:2]
            flat = x.flatten(0, 1)
            ok = torch.isfinite(flat.flatten(1)).all(1)
            feats = _unit(_pixels(torch.where(ok.view(-1, 1, 1, 1), flat, torch.zeros_like(flat))) - self.mean)
            centre = torch.where(ok.unsqueeze(1), feats, torch.zeros_like(feats)).view(n, k, -1).sum(1)
            norm = centre.norm(dim=-1, keepdim=True)
            out.append(torch.where(norm > 1e-12, centre / norm.clamp_min(1e-12), torch.zeros_like(centre)))
        return torch.cat(out) if out else torch.zeros(0, self.features.shape[1], dtype=torch.float64)

    def scores(self, query_acts: torch.Tensor, shown: dict[str, np.ndarray], index: np.ndarray) -> list[dict[str, float | None]]:
        """(Q, U) each query's activation for U scored units; per name (N, K, C, H, W) images of
        N >= U units, the scored ones at rows ``index`` -> per scored unit {``observer_<name>``:
        fraction correct, or None where its strong queries do not all beat its moderate ones (a unit
        flat on the queries), too few queries, or nothing finite is shown}."""
        acts = query_acts.double().cpu()
        u = acts.shape[1]
        none = [{f"observer_{name}": None for name in shown} for _ in range(u)]
        if not self.usable or u == 0:
            return none
        order = torch.argsort(torch.nan_to_num(acts, nan=-math.inf), dim=0, stable=True)  # ascending, (Q, U)
        strong, moderate = order[-self.n_strong :], order[self.moderate_ranks]  # (S, U), (M, U) query indices
        valid = torch.isfinite(acts).all(0) & (acts.gather(0, strong).min(0).values > acts.gather(0, moderate).max(0).values)
        for name, images in shown.items():
            centres = self.directions(images, index)  # (U, D)
            sim = self.features @ centres.T  # (Q, U)
            diff = sim.gather(0, strong).unsqueeze(1) - sim.gather(0, moderate).unsqueeze(0)  # (S, M, U)
            frac = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean((0, 1))
            shown_any = centres.norm(dim=-1) > 0
            for i in range(u):
                if valid[i] and shown_any[i]:
                    none[i][f"observer_{name}"] = float(frac[i])
        return none


def observer_columns(model, layer: str, objective: str, result, exemplars: np.ndarray | None,
                     observer: Observer, *, real_starts: bool = True) -> dict[int, dict[str, float | None]]:
    """{unit: its informativeness columns} for the live units of a ``ChainResult``: their final
    samples, starts (``real_starts``: the sampler starts chains on real images; else not scored)
    and top exemplars ((U, k, C, H, W), the result's unit order) shown to ``observer``."""
    from ldam_sweep.sampling.exemplars import pool_scores

    live = np.flatnonzero(np.ones(len(result.units), bool) if result.dead is None else ~result.dead)
    if not len(live):
        return {}
    acts = pool_scores(model, layer, result.units[live], objective, observer.queries)
    shown = {"samples": result.final_samples}
    if real_starts and result.starts is not None:
        shown["starts"] = result.starts
    if exemplars is not None:
        shown["exemplars"] = exemplars
    return {int(result.units[i]): row for i, row in zip(live, observer.scores(acts, shown, live))}
