"""Per-unit chain diagnostics and the score columns of each unit's manifest row.

Conventions (all documented in docs/scores.md):
- burn-in: the first half of the steps (``burn_in = steps // 2``) unless given;
- a chain *diverged* when any of its samples or activations is non-finite: it is flagged (counted
  in ``diverged_fraction``) and left out of every other score; the rest of the block is kept;
- a chain is *stuck at the box* when >= 95% of its final pixels sit on the pixel-range bounds;
- a chain is *saturated* when >= 50% of its final pixels sit on the bounds and at least 25 points
  more of them than of the unit's exemplars' pixels (so a real image's black background does not count);
- a chain is *frozen* when it stopped short: its final sample is within 1e-3 (RMS, fraction of the
  range) of its first snapshot while its final activation is below the unit's best real image's
  (a chain that reached its target and stays there is not frozen);
- ``hf_ratio``: the high-frequency energy of the final samples (``realism.hf_energy``) divided by
  that of the real data (1.0 = as much fine detail as real images);
- ``*_diversity_ratio``: the chains' diversity divided by the same measure over the unit's top real
  exemplars (its finite ones): 1.0 = the chains are as varied as the real images that excite the
  unit most.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ldam_sweep.sampling.diversity import (facet_count, feature_diversity, lowpass_diversity, mode_count,
                                           pixel_diversity)

STUCK_PIXEL_FRACTION = 0.95
SATURATED_PIXEL_FRACTION = 0.5
SATURATED_MARGIN = 0.25
FROZEN_RMS = 1e-3
BOUNDARY_TOL = 1e-3


def autocorr_ess(traces: torch.Tensor) -> torch.Tensor:
    """(U, K, n) -> (U, K) effective sample size of each chain (Geyer's initial positive sequence)."""
    x = traces.double()
    n = x.shape[-1]
    x = x - x.mean(-1, keepdim=True)
    f = torch.fft.rfft(x, n=2 * n)
    acov = torch.fft.irfft(f * f.conj(), n=2 * n)[..., :n] / n
    var = acov[..., :1]
    rho = torch.where(var > 0, acov / var.clamp_min(1e-300), torch.zeros_like(acov))
    m = n // 2
    pairs = rho[..., : 2 * m : 2] + rho[..., 1 : 2 * m : 2]  # P_t = rho_2t + rho_2t+1
    keep = torch.cumprod((pairs > 0).double(), dim=-1)  # up to the first non-positive pair
    tau = -1.0 + 2.0 * (pairs * keep).sum(-1)
    ess = n / tau.clamp_min(1.0 / n)
    const = (var.squeeze(-1) <= 0)
    return torch.where(const, torch.full_like(ess, float("nan")), ess.clamp(max=float(n))).float()


def split_rhat(traces: torch.Tensor) -> torch.Tensor:
    """(U, K, n) -> (U,) split-R-hat across chains (1 = the chains agree; NaN if all constant)."""
    x = traces.double()
    half = x.shape[-1] // 2
    if half < 2:
        return torch.full(x.shape[:1], float("nan"))
    halves = torch.cat([x[..., :half], x[..., half : 2 * half]], dim=1)  # (U, 2K, half)
    means = halves.mean(-1)
    w = halves.var(-1, unbiased=True).mean(-1)
    b = half * means.var(-1, unbiased=True)
    var_hat = (half - 1) / half * w + b / half
    rhat = torch.sqrt(var_hat / w.clamp_min(1e-300))
    return torch.where(w > 0, rhat, torch.full_like(rhat, float("nan"))).float()


def unit_scores(
    samples: np.ndarray,
    activation: np.ndarray,
    snapshot_steps: np.ndarray,
    value_range: tuple[float, float],
    *,
    features: torch.Tensor | None = None,
    realism: np.ndarray | None = None,
    exemplar_max: np.ndarray | None = None,
    real_pool: torch.Tensor | None = None,
    exemplars: torch.Tensor | None = None,
    exemplar_features: torch.Tensor | None = None,
    burn_in: int | None = None,
    device: torch.device | str = "cpu",
    real_hf: float | None = None,
) -> list[dict[str, Any]]:
    """One dict of score columns per unit. ``samples`` (U, K, S, C, H, W), ``activation`` (U, K, T+1),
    ``features`` (U, K, F) of the final samples, ``real_pool`` (N, C, H, W) for the nearest-real
    distance, ``exemplar_max`` (U,) the unit's maximum over real data (for the activation ratio),
    ``exemplars`` (U, k, C, H, W) and ``exemplar_features`` (U, k, F) the unit's top real images and
    their features (for the diversity ratios; NaN exemplars are left out), ``real_hf`` the real data's
    mean high-frequency energy (for ``hf_ratio``)."""
    dev = torch.device(device)
    s = torch.from_numpy(np.ascontiguousarray(samples)).to(dev).float()  # float16 samples: widened on the device
    act = torch.from_numpy(np.ascontiguousarray(activation)).to(dev)
    u, k = act.shape[:2]
    lo, hi = value_range
    width = hi - lo
    final = s[:, :, -1]
    valid = torch.isfinite(s.flatten(2)).all(-1) & torch.isfinite(act).all(-1)  # (U, K)
    n_valid = valid.sum(-1)
    steps = act.shape[-1] - 1
    burn = steps // 2 if burn_in is None else burn_in

    fin = torch.where(valid.view(u, k, 1, 1, 1), final, torch.full_like(final, lo))
    def bound_fraction(x: torch.Tensor) -> torch.Tensor:  # (U, K, C, H, W) -> (U, K): pixels on the box's bounds
        at_bound = ((x - lo).abs() < BOUNDARY_TOL * width) | ((x - hi).abs() < BOUNDARY_TOL * width)
        return at_bound.flatten(2).float().mean(-1)

    bound_frac = bound_fraction(fin)
    stuck = (bound_frac >= STUCK_PIXEL_FRACTION) & valid
    floor = torch.zeros((u, 1), device=dev)
    if exemplars is not None:
        ex_all = exemplars.to(dev).float()
        ex_ok = torch.isfinite(ex_all.flatten(2)).all(-1)
        ex_frac = bound_fraction(ex_all)
        floor = (torch.where(ex_ok, ex_frac, torch.zeros_like(ex_frac)).sum(-1) / ex_ok.sum(-1).clamp_min(1)).unsqueeze(-1)
    saturated = (bound_frac >= SATURATED_PIXEL_FRACTION) & (bound_frac >= floor + SATURATED_MARGIN) & valid
    first = torch.where(valid.view(u, k, 1, 1, 1), s[:, :, 0], torch.full_like(final, lo))
    still = ((fin - first).flatten(2).double().pow(2).mean(-1).sqrt() / width) < FROZEN_RMS
    if exemplar_max is not None:
        emax = torch.as_tensor(np.asarray(exemplar_max, dtype=np.float64), device=dev).view(u, 1)
        short = ~(act[..., -1].double() >= emax)  # NaN best: no reference, any still chain counts
        still = still & short
    frozen = still & valid
    hf = torch.full((u,), float("nan"), device=dev)
    if real_hf is not None and real_hf > 0:
        from ldam_sweep.sampling.realism import hf_energy

        per_chain = torch.from_numpy(hf_energy(fin.flatten(0, 1), value_range)).to(dev).view(u, k).double() / real_hf
        hf = _masked_mean(per_chain, valid)

    post = [i for i, t in enumerate(snapshot_steps.tolist()) if t > burn]
    movement = torch.full((u,), float("nan"), device=dev)
    if len(post) >= 2:
        snaps = s[:, :, post].flatten(3).double()
        step_rms = torch.sqrt(((snaps[:, :, 1:] - snaps[:, :, :-1]) ** 2).mean(-1)) / width  # (U, K, P-1)
        per_chain = step_rms.mean(-1)
        movement = _masked_mean(per_chain, valid)

    trace = act[..., burn + 1 :] if steps - burn >= 4 else act
    trace_v = torch.where(valid.unsqueeze(-1), trace, torch.zeros_like(trace))
    ess = _masked_mean(autocorr_ess(trace_v), valid)
    rhat = _rhat_valid(trace_v, valid)

    final_act = torch.where(valid, act[..., -1], torch.zeros_like(act[..., -1]))
    act_mean = _masked_mean(final_act, valid)
    ratio = torch.full((u,), float("nan"), device=dev)
    if exemplar_max is not None:
        emax = torch.as_tensor(exemplar_max, device=dev, dtype=torch.float64)
        # a ratio to a non-positive best is meaningless (and -/- would rank such units first): left empty
        ratio = torch.where(emax > 1e-12, act_mean.double() / emax, torch.full_like(emax, float("nan")))

    nearest = torch.full((u,), float("nan"), device=dev)
    if real_pool is not None:
        a = fin.flatten(2).reshape(u * k, -1).double()
        b = real_pool.to(dev).flatten(1).double()
        d2 = (a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2 * a @ b.T
        dist = torch.sqrt(d2.min(1).values.clamp_min(0) / a.shape[1]) / width
        nearest = _masked_mean(dist.view(u, k), valid)

    px = pixel_diversity(final, value_range, valid)
    fd = feature_diversity(features.to(dev), valid) if features is not None else torch.full((u,), float("nan"))
    modes = mode_count(final, value_range, valid=valid)
    low = lowpass_diversity(final, value_range, valid)
    facets = facet_count(final, value_range, valid=valid)
    low_ratio = torch.full((u,), float("nan"))
    fd_ratio = torch.full((u,), float("nan"))
    if exemplars is not None:
        ex = exemplars.to(dev)
        low_ratio = low / lowpass_diversity(ex, value_range, torch.isfinite(ex.flatten(2)).all(-1)).to(low.device)
        if exemplar_features is not None:
            ef = exemplar_features.to(dev)
            fd_ratio = fd.to(dev) / feature_diversity(ef, torch.isfinite(ef).all(-1) & torch.isfinite(ex.flatten(2)).all(-1))
    real_mean = None
    if realism is not None:
        r = torch.from_numpy(np.ascontiguousarray(realism[..., -1])).to(dev)
        real_mean = _masked_mean(torch.where(valid, r, torch.zeros_like(r)), valid)

    out = []
    for i in range(u):
        row = {
            "pixel_diversity": _f(px[i]), "feature_diversity": _f(fd[i]), "modes": int(modes[i]),
            "lowpass_diversity": _f(low[i]), "facets": int(facets[i]),
            "lowpass_diversity_ratio": _f(low_ratio[i]), "feature_diversity_ratio": _f(fd_ratio[i]),
            "activation_ratio": _f(ratio[i]), "nearest_real": _f(nearest[i]), "movement": _f(movement[i]),
            "ess": _f(ess[i]), "rhat": _f(rhat[i]),
            "diverged_fraction": float(1 - n_valid[i].item() / k), "stuck_fraction": float(stuck[i].sum().item() / k),
            "saturated_fraction": float(saturated[i].sum().item() / k), "frozen_fraction": float(frozen[i].sum().item() / k),
            "hf_ratio": _f(hf[i]),
        }
        if real_mean is not None:
            row["realism_final_mean"] = _f(real_mean[i])
        out.append(row)
    return out


def _rhat_valid(trace: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """split-R-hat per unit over its valid chains (units with < 2 valid chains: NaN)."""
    out = torch.full((trace.shape[0],), float("nan"), device=trace.device)
    for n in torch.unique(valid.sum(-1)).tolist():  # units grouped by their number of valid chains
        if n < 2:
            continue
        idx = (valid.sum(-1) == n).nonzero().squeeze(-1)
        sel = trace[idx][valid[idx]].view(len(idx), n, -1)
        out[idx] = split_rhat(sel).to(out.device)
    return out


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    x = torch.where(valid, x.to(torch.float64), torch.zeros_like(x, dtype=torch.float64))
    n = valid.sum(-1)
    return torch.where(n > 0, x.sum(-1) / n.clamp_min(1), torch.full_like(x[..., 0], float("nan")))


def _f(v: torch.Tensor) -> float | None:
    x = float(v)
    return x if np.isfinite(x) else None
