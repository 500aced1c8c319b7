"""How informative the images shown for a unit are: a machine observer's two-alternative task.

After Borowski et al. (ICLR 2021) and Zimmermann et al. (NeurIPS 2021), who asked people: shown a
unit's images, which of two real images excites the unit more? The two come from *query* images
that the sweep never used (the data's held-out split: not a start, not an exemplar, not the
discriminator's training data), one from the unit's top 5% on them ("strong"), one from its 50-75th
percentile ("moderate"). The observer is a fixed image model that knows nothing about the network:
each image low-passed (``diversity.lowpass``, as for facets) and pooled to at most 32 px a side,
minus the query images' mean image;
it picks the query whose image points more the way of the shown images' mean (cosine). The score
is the fraction of all strong x moderate pairs it gets right (ties count half): 0.5 = the images
say nothing about which real images the unit prefers, 1.0 = they always tell.

The same observer is given a unit's final samples, their starts and its top exemplars, so the
three scores say whether the sampler added information beyond the real images it started from.
What it cannot see: anything a low-pass of the pixels loses (fine texture, semantics that do not
show as layout and brightness). docs/scores.md, "Informativeness".
"""

from __future__ import annotations

import numpy as np
import torch

from ldam_sweep.sampling.diversity import lowpass

OBSERVER_MAX_QUERIES = 256  # held-out images a sweep keeps as queries (evenly spaced through the split)
FEATURE_SIZE = 32  # the observer sees images low-passed and pooled to at most this many pixels a side
STRONG_QUANTILE = 0.95  # a strong query: in the unit's top 5% on the query images
MODERATE_QUANTILES = (0.5, 0.75)  # a moderate one: between its median and 75th percentile


def query_subset(images: np.ndarray, limit: int = OBSERVER_MAX_QUERIES) -> np.ndarray:
    """At most ``limit`` images, evenly spaced through ``images`` (deterministic)."""
    if len(images) <= limit:
        return images
    return images[np.linspace(0, len(images) - 1, limit).round().astype(np.int64)]


class Observer:
    """The fixed image model over one set of query images (kept for a whole sweep)."""

    def __init__(self, queries: torch.Tensor) -> None:
        self.queries = queries  # (Q, C, H, W) real images, model input range
        low = self._pixels(queries)
        self.mean = low.mean(0)
        self.features = self._normalise(low - self.mean)  # (Q, D)

    @staticmethod
    def _pixels(x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, D) low-passed, pooled to at most FEATURE_SIZE a side, float64."""
        low = lowpass(x.double())
        if max(low.shape[-2:]) > FEATURE_SIZE:
            low = torch.nn.functional.adaptive_avg_pool2d(low, (min(low.shape[-2], FEATURE_SIZE), min(low.shape[-1], FEATURE_SIZE)))
        return low.flatten(1)

    @staticmethod
    def _normalise(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def direction(self, shown: np.ndarray | torch.Tensor) -> torch.Tensor | None:
        """(K, C, H, W) shown images -> the unit vector of their mean feature; None when no image is finite."""
        x = torch.as_tensor(np.asarray(shown, dtype=np.float64))
        x = x[torch.isfinite(x.flatten(1)).all(1)]
        if len(x) == 0:
            return None
        feats = self._normalise(self._pixels(x) - self.mean)
        centre = feats.mean(0)
        return None if float(centre.norm()) < 1e-12 else centre / centre.norm()

    def scores(self, query_acts: torch.Tensor, shown: dict[str, np.ndarray]) -> list[dict[str, float | None]]:
        """(Q, U) each query's activation for each unit, and per name (U, K, C, H, W) images shown
        for each unit -> per unit {``observer_<name>``: fraction correct, or None where the unit has no
        strong/moderate split on the queries (flat on them) or nothing finite is shown}."""
        acts = query_acts.double().cpu()
        out: list[dict[str, float | None]] = []
        for u in range(acts.shape[1]):
            a = acts[:, u]
            row: dict[str, float | None] = {f"observer_{name}": None for name in shown}
            q = torch.quantile(a, torch.tensor([MODERATE_QUANTILES[0], MODERATE_QUANTILES[1], STRONG_QUANTILE], dtype=a.dtype))
            strong, moderate = a >= q[2], (a >= q[0]) & (a <= q[1]) & (a < q[2])
            if torch.isfinite(a).all() and q[1] < q[2] and strong.any() and moderate.any():
                for name, images in shown.items():
                    centre = self.direction(images[u])
                    if centre is None:
                        continue
                    sim = self.features @ centre
                    diff = sim[strong].unsqueeze(1) - sim[moderate].unsqueeze(0)
                    row[f"observer_{name}"] = float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
            out.append(row)
        return out


def observer_columns(model, layer: str, objective: str, result, exemplars: np.ndarray | None,
                     observer: Observer) -> dict[int, dict[str, float | None]]:
    """{unit: its informativeness columns} for the live units of a ``ChainResult``: their final
    samples, starts and top exemplars ((U, k, C, H, W), the result's unit order) shown to ``observer``."""
    from ldam_sweep.sampling.exemplars import pool_scores

    live = np.flatnonzero(np.ones(len(result.units), bool) if result.dead is None else ~result.dead)
    if not len(live):
        return {}
    acts = pool_scores(model, layer, result.units[live], objective, observer.queries)
    shown = {"samples": result.final_samples[live]}
    if result.starts is not None:
        shown["starts"] = result.starts[live]
    if exemplars is not None:
        shown["exemplars"] = exemplars[live]
    return {int(result.units[i]): row for i, row in zip(live, observer.scores(acts, shown))}
