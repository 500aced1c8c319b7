"""The two LDAM update rules, run for a whole batch of chains at once (pure tensor code).

``ldam`` (reference form, BIDMach ``viz/Synthesis.scala``): per-term RMS-normalised gradients of
the activation and of log D, annealed noise restarting every ``noise_block`` steps, an L2 prior,
momentum, clipping to the pixel box.

``sgld`` (exact form): ``x <- clip(x + (eps/2) grad log pi(x) + sqrt(eps) xi)`` with
``grad log pi = ((1 - lam) grad a + lam grad log D - 2 c x) / T`` and an optional decaying eps.

Traces and snapshots stay on the device until the loop ends: no host synchronisation per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import BaseModel

from ldam_sweep.sampling import noise
from ldam_sweep.settings import METHODS, AmOptions, LdamOptions, Method, SgldOptions  # noqa: F401 (re-exported)

ActivationFn = Callable[[torch.Tensor], torch.Tensor]
LogDFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ChainTensors:
    """Device tensors produced by ``run_chains`` (B = batch of chains)."""

    snapshots: torch.Tensor  # (S, B, C, H, W)
    activation: torch.Tensor  # (steps + 1, B): a(x_t), t = 0 .. steps
    realism: torch.Tensor | None  # (steps + 1, B): log D(x_t), when a discriminator is given


def run_chains(
    activation_fn: ActivationFn,
    x0: torch.Tensor,
    keys: torch.Tensor,
    *,
    steps: int,
    method: Method,
    options: BaseModel,
    box: tuple[float, float],
    snapshot_steps: list[int],
    lam: float = 0.0,
    log_d: LogDFn | None = None,
    draw_offset: int = 0,
) -> ChainTensors:
    """Run ``steps`` Langevin steps on the batch ``x0`` (B, C, H, W).

    ``activation_fn(x) -> (B,)`` is each chain's own unit activation; ``log_d(x) -> (B,)`` the
    realism term, used in the update when ``lam > 0`` and recorded whenever given. ``keys`` (B, 2)
    are the per-chain noise keys (see ``noise``). ``snapshot_steps``: values of t in 1..steps at
    which x_t is kept.
    """
    lo, hi = box
    b = x0.shape[0]
    shape = tuple(x0.shape[1:])
    dev = x0.device
    keys = keys.to(dev)
    snap_at = {t: i for i, t in enumerate(snapshot_steps)}
    snaps = torch.empty((len(snapshot_steps), *x0.shape), dtype=torch.float32, device=dev)
    act_trace = torch.empty((steps + 1, b), dtype=torch.float32, device=dev)
    real_trace = torch.empty((steps + 1, b), dtype=torch.float32, device=dev) if log_d is not None else None
    use_d = log_d is not None and lam > 0
    x = x0.detach().to(torch.float32).clone()

    if method == "ldam":
        assert isinstance(options, LdamOptions)
        v_a = torch.zeros_like(x)
        v_d = torch.zeros_like(x) if use_d else None
        m = torch.zeros_like(x)
    if method == "am":
        assert isinstance(options, AmOptions)
        x.requires_grad_(True)
        adam = torch.optim.Adam([x], lr=options.lr)  # element-wise state: chains stay independent
    for t in range(steps):
        x.requires_grad_(True)
        a = activation_fn(x)
        act_trace[t] = a.detach()
        logd = None
        if log_d is not None:
            if use_d:
                logd = log_d(x)
                real_trace[t] = logd.detach()  # type: ignore[index]
            else:
                with torch.no_grad():
                    real_trace[t] = log_d(x.detach())  # type: ignore[index]
        if method == "am":
            loss = -(a.sum() - options.l2 * (x * x).sum())
            adam.zero_grad(set_to_none=True)
            loss.backward()
            adam.step()
            with torch.no_grad():
                x.clamp_(lo, hi)
            if t + 1 in snap_at:
                snaps[snap_at[t + 1]] = x.detach()
            continue
        xi = noise.normal(keys, draw_offset + t + 1, shape)
        if method == "ldam":
            g_a = torch.autograd.grad(a.sum(), x)[0].contiguous() if lam < 1 else torch.zeros_like(x)
            g_d = torch.autograd.grad(logd.sum(), x)[0].contiguous() if use_d else None  # type: ignore[union-attr]
            x = x.detach()
            rho = options.rms_decay
            v_a.mul_(rho).addcmul_(g_a, g_a, value=1 - rho)
            step = g_a.div_(torch.sqrt(v_a + options.eps)).mul_(1 - lam)
            if g_d is not None:
                v_d.mul_(rho).addcmul_(g_d, g_d, value=1 - rho)  # type: ignore[union-attr]
                step.add_(g_d.div_(torch.sqrt(v_d + options.eps)), alpha=lam)  # type: ignore[operator]
            tb = t % options.noise_block
            step.add_(xi, alpha=options.noise / (1.0 + tb * tb))
            step.add_(x, alpha=-2.0 * options.l2)
            m.mul_(options.momentum).add_(step, alpha=1 - options.momentum)
            x = (x + options.step_size * m).clamp_(lo, hi)
        else:
            assert isinstance(options, SgldOptions)
            energy = a if not use_d else (1 - lam) * a + lam * logd  # type: ignore[operator]
            g = torch.autograd.grad(energy.sum(), x)[0].contiguous()
            x = x.detach()
            eps_t = options.step_size * (1.0 + t) ** (-options.step_decay)
            drift = (g - 2.0 * options.l2 * x) / options.temperature
            x = (x + 0.5 * eps_t * drift + (eps_t**0.5) * xi).clamp_(lo, hi)
        if t + 1 in snap_at:
            snaps[snap_at[t + 1]] = x
    x = x.detach()
    with torch.no_grad():
        act_trace[steps] = activation_fn(x)
        if real_trace is not None:
            real_trace[steps] = log_d(x)  # type: ignore[misc]
    return ChainTensors(snapshots=snaps, activation=act_trace, realism=real_trace)
