"""The update rules, run for a whole batch of chains at once (pure tensor code).

One class per rule, named in ``RULES`` (the same names as ``settings.METHODS``, which holds their
settings):

``ldam`` (reference form, BIDMach ``viz/Synthesis.scala``): per-term RMS-normalised gradients of
the activation and of log D, annealed noise restarting every ``noise_block`` steps, an L2 prior,
momentum, clipping to the pixel box.

``sgld`` (exact form): ``x <- clip(x + (eps/2) grad log pi(x) + sqrt(eps) xi)`` with
``grad log pi = ((1 - lam) grad a + lam grad log D - 2 c x) / T`` and an optional decaying eps.

``am`` (the peer libraries' baseline): Adam ascent on the pixels, no noise, no realism term.

``run_chains`` only advances: each step it evaluates a(x_t) (and log D(x_t)), records them, hands
the rule a ``Step`` and takes x_{t+1} back. A rule asks the ``Step`` for what it needs (gradients,
noise), so a new sampler is one class here, one entry in ``RULES`` and its settings in
``settings.METHODS``. Batch layout: element ``u * chains + c`` is chain c of unit u.

Traces and snapshots stay on the device until the loop ends: no host synchronisation per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
from pydantic import BaseModel

from ldam_sweep.errors import SamplerError
from ldam_sweep.sampling import noise
from ldam_sweep.sampling.lowpass import lowpass, pair_sq_dist
from ldam_sweep.settings import METHODS, AmOptions, LdamOptions, SgldOptions, WalkOptions  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from ldam_sweep.sampling.precondition import Preconditioner
    from ldam_sweep.sampling.prior import ScorePrior

ActivationFn = Callable[[torch.Tensor], torch.Tensor]
LogDFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Step:
    """What an update rule sees at step t. B = units * chains; element ``u * chains + c`` is
    chain c of unit u. Gradients and noise are computed only when asked for; a rule asks for
    either ``grads()`` or ``energy_grad()`` (a backward pass frees the graph)."""

    t: int
    x: torch.Tensor  # (B, C, H, W) x_t, requires grad
    activation: torch.Tensor  # (B,) a(x_t) on the autograd graph
    log_d: torch.Tensor | None  # (B,) log D(x_t) on the graph when D is in the update (lam > 0)
    lam: float
    box: tuple[float, float]
    chains: int  # chains per unit
    unit_context: torch.Tensor | None  # (U, ...) per-unit data for a rule (e.g. a kernel width)
    keys: torch.Tensor  # (B, 2) per-chain noise keys
    draw: int  # this step's noise draw (draw 0 is the initial image)
    steps: int  # steps of the whole run (for schedules over the run)
    noise_stream: Callable[[int], torch.Tensor] | None = None  # draw -> noise (``noise.NormalStream``)
    _grads: tuple[torch.Tensor, torch.Tensor | None] | None = field(default=None, repr=False)

    def grads(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(grad a, grad log D) with respect to x_t, separately. grad a is zeros at lam = 1 (its
        weight) without a backward pass; grad log D is None when D is not in the update. The
        caller owns the tensors (it may update them in place)."""
        if self._grads is None:
            g_a = (torch.autograd.grad(self.activation.sum(), self.x)[0].contiguous() if self.lam < 1
                   else torch.zeros_like(self.x))
            g_d = (torch.autograd.grad(self.log_d.sum(), self.x)[0].contiguous() if self.log_d is not None
                   else None)
            self._grads = (g_a, g_d)
        return self._grads

    def energy_grad(self) -> torch.Tensor:
        """grad of the energy (1 - lam) a + lam log D (a alone without D), in one backward pass."""
        energy = self.activation if self.log_d is None else (1 - self.lam) * self.activation + self.lam * self.log_d
        return torch.autograd.grad(energy.sum(), self.x)[0].contiguous()

    def noise(self) -> torch.Tensor:
        """(B, C, H, W) standard normal noise of this step, one stream per chain (``noise.normal``)."""
        if self.noise_stream is not None:
            return self.noise_stream(self.draw)
        return noise.normal(self.keys, self.draw, tuple(self.x.shape[1:]))


@dataclass
class ChainContext:
    """What a rule may use beyond its options, fixed for a run. B = units * chains."""

    bandwidth: torch.Tensor | None = None  # (U,) per-unit kernel width of ``ldam``'s repulsion
    preconditioner: "Preconditioner | None" = None  # drift P and noise P^(1/2) from the real data
    target: torch.Tensor | None = None  # (B,) the activation above which a chain's activation term is off
    diverse_starts: bool = False  # chains start from a diverse subset of their unit's exemplars
    stop_at_target: bool = False  # a ladder rung: the momentum fades with the activation term (no overshoot)
    prior: "ScorePrior | None" = None  # ``walk``'s denoising score prior


class UpdateRule:
    """One sampler: ``init(x_0)`` allocates its state and returns the x it iterates on,
    ``step(s)`` returns x_{t+1} (detached, or the rule's own leaf tensor)."""

    options_type: ClassVar[type[BaseModel]]

    def __init__(self, options: BaseModel, context: ChainContext | None = None) -> None:
        if not isinstance(options, self.options_type):
            raise TypeError(f"{type(self).__name__} takes {self.options_type.__name__}, got {type(options).__name__}")
        self.options = options
        self.context = context or ChainContext()

    def init(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def step(self, s: Step) -> torch.Tensor:
        raise NotImplementedError


class LdamRule(UpdateRule):
    """Reference form: RMS-normalised activation and log D gradients, annealed noise, momentum;
    plus (the revision-3 defaults) the data preconditioner, the activation target, a realism term
    that fades where D calls the sample real, and optionally a kernel repulsion among each unit's
    chains (``repel`` > 0) that keeps them apart."""

    options_type = LdamOptions
    options: LdamOptions

    def init(self, x: torch.Tensor) -> torch.Tensor:
        self.v_a = torch.zeros_like(x)
        self.v_d: torch.Tensor | None = None  # allocated on the first step that has a log D gradient
        self.m = torch.zeros_like(x)
        self.force_max: torch.Tensor | None = None  # (U,) running max of each unit's repulsion RMS
        self.h_max: torch.Tensor | None = None  # (U, 1, 1) running max of the median bandwidth
        self.repel = self.options.resolved_repel(self.context.diverse_starts)
        self.eta = self.options.resolved_step(self.context.preconditioner is not None)
        return x

    def _rms(self, v: torch.Tensor) -> torch.Tensor:
        """sqrt(v + eps) (reference form), or with eps relative to each chain's mean v."""
        o = self.options
        if o.eps_rel == 0:
            return torch.sqrt(v + o.eps)
        floor = v.mean(dim=(1, 2, 3), keepdim=True).mul_(o.eps_rel).add_(o.eps)
        return torch.sqrt(v + floor).clamp_min_(_TINY)

    def step(self, s: Step) -> torch.Tensor:
        o = self.options
        ctx = self.context
        xi = s.noise()
        g_a, g_d = s.grads()
        x = s.x.detach()
        repel = self.repel > 0 and s.chains > 1 and s.t < round(o.repel_until * s.steps)
        force = self._repulsion(s, x, g_d) if repel else None
        rho = o.rms_decay
        held = None  # (B, 1, 1, 1) how far each chain is into its target band, where D must not lower a
        h = None
        if ctx.target is not None:
            # the activation term fades linearly from the target to TARGET_BAND above it (its running average
            # fades with it): continuous in a, so a 1-ulp difference in the activation (another batch size
            # changes a GEMM's rounding) changes the step by a rounding-sized amount, never on or off
            h = _below_target(s.activation.detach(), ctx.target).to(x.dtype).view(-1, 1, 1, 1)
            if g_d is not None:
                held, direction = 1 - h, g_a.clone()
            self.v_a.mul_(1 - h * (1 - rho)).addcmul_(g_a, g_a * h, value=1 - rho)
            g_a.mul_(h)
        else:
            self.v_a.mul_(rho).addcmul_(g_a, g_a, value=1 - rho)
        step = g_a.div_(self._rms(self.v_a)).mul_(1 - s.lam)
        if g_d is not None:
            if self.v_d is None:
                self.v_d = torch.zeros_like(x)
            if o.realism_scale == "logit":
                # grad log D = (1 - D) grad logit: normalise grad logit and keep the (1 - D) factor, so the
                # term pushes as hard as D objects and fades where D calls the sample real
                fake = (-torch.expm1(s.log_d.detach())).clamp_(min=0.0).view(-1, 1, 1, 1)  # 1 - D
                g_logit = g_d.div_(fake.clamp_min(1e-6))
                self.v_d.mul_(rho).addcmul_(g_logit, g_logit, value=1 - rho)
                realism = g_logit.div_(self._rms(self.v_d)).mul_(fake)
                if held is not None:
                    realism = _keep_level(realism, direction, held, ctx.preconditioner)
                step.add_(realism, alpha=s.lam)
            else:
                self.v_d.mul_(rho).addcmul_(g_d, g_d, value=1 - rho)
                step.add_(g_d.div_(self._rms(self.v_d)), alpha=s.lam)
        tb = s.t % o.noise_block
        sigma = max(o.noise / (1.0 + tb * tb), o.noise_floor)
        pre = ctx.preconditioner
        if pre is not None:  # the whole move (gradients and repulsion) and the noise in the data's directions
            if force is not None:
                step.add_(force, alpha=self.repel)
            step = pre.drift(step).add_(pre.noise(xi), alpha=sigma)
            step.add_(x, alpha=-2.0 * o.l2)
        else:  # the reference form's order of operations (bit for bit)
            step.add_(xi, alpha=sigma)
            step.add_(x, alpha=-2.0 * o.l2)
            if force is not None:
                step.add_(force, alpha=self.repel)
        if ctx.stop_at_target and h is not None:
            self.m.mul_(h)  # a chain past its target keeps no speed: the rung ends at its factor, not beyond
        self.m.mul_(o.momentum).add_(step, alpha=1 - o.momentum)
        return (x + self.eta * self.m).clamp_(*s.box)

    def _bandwidth(self, s: Step, d2: torch.Tensor) -> torch.Tensor:
        """(U, 1, 1) kernel width: fixed, the unit's exemplars' (``unit_context``), or the SVGD
        median heuristic on the chains floored at half its running max (so a collapsing unit's
        kernel does not shrink with it)."""
        o = self.options
        u = d2.shape[0]
        if isinstance(o.bandwidth, float):
            return torch.full((u, 1, 1), o.bandwidth, device=d2.device)
        if o.bandwidth == "exemplars" and s.unit_context is None:
            raise SamplerError("bandwidth='exemplars' needs the units' exemplars (sample(..., exemplars=...))")
        if o.bandwidth != "median" and s.unit_context is not None:
            return s.unit_context.view(u, 1, 1)
        # the lower median, as torch.median gives it, from a sort: CUDA's median(dim) has no
        # deterministic form for its indices and warns under deterministic algorithms
        flat = d2.reshape(u, -1)
        med = flat.sort(dim=-1).values[:, (flat.shape[1] - 1) // 2].view(u, 1, 1) / math.log(s.chains + 1.0)
        self.h_max = med if self.h_max is None else torch.maximum(self.h_max, med)
        return torch.maximum(med, 0.5 * self.h_max).clamp_min_(1e-12)

    def _repulsion(self, s: Step, x: torch.Tensor, g_d: torch.Tensor | None) -> torch.Tensor:
        """(B, C, H, W) SVGD-style repulsive force among each unit's chains on low-passed images,
        scaled by its per-unit running max (so ``repel`` is a fraction of the unit-free step), with
        the part that would lower log D (to first order) projected out."""
        k = s.chains
        u = x.shape[0] // k
        finite = torch.isfinite(x).flatten(1).all(1).view(u, k)  # a diverged chain drops out of its unit's kernel
        y = lowpass(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)).reshape(u, k, -1)
        d2 = pair_sq_dist(y)
        h = self._bandwidth(s, d2)
        kern = torch.exp(-d2 / h) * (finite.unsqueeze(-1) & finite.unsqueeze(-2))
        # grad of -(1/K) sum_j k(y_i, y_j) w.r.t. y_i = (2 / (K h)) sum_j k_ij (y_i - y_j), then L^T = L
        r = (kern.sum(-1, keepdim=True) * y - kern @ y) * (2.0 / (k * h))
        r = lowpass(r.reshape(x.shape))
        rms = r.pow(2).mean(dim=(1, 2, 3)).sqrt().view(u, k).amax(1)
        self.force_max = rms if self.force_max is None else torch.maximum(self.force_max, rms)
        force = (r.view(u, k, -1) / self.force_max.clamp_min(_TINY).view(u, 1, 1)).view(x.shape)
        if g_d is not None:
            dot = (force * g_d).sum(dim=(1, 2, 3), keepdim=True)
            norm2 = (g_d * g_d).sum(dim=(1, 2, 3), keepdim=True).clamp_min_(_TINY)
            force = force - dot.clamp_max(0.0) / norm2 * g_d
        return force


_TINY = torch.finfo(torch.float32).tiny
TARGET_BAND = 0.01  # the activation term fades over [target, target * 1.01]


def _below_target(a: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) weight of the activation term: 1 below the target, falling linearly to 0 at
    target * (1 + TARGET_BAND); 1 where the target is infinite (no positive real activation)."""
    ramp = ((target * (1 + TARGET_BAND) - a) / (TARGET_BAND * target)).clamp_(0.0, 1.0)
    return torch.where(torch.isfinite(target), ramp, torch.ones_like(ramp))


def _keep_level(d: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, pre: "Preconditioner | None") -> torch.Tensor:
    """d minus ``weight`` times its part that would lower a to first order (g = grad a): the move P d
    must not decrease a, so remove c g with c = min(0, g.Pd) / g.Pg; weight (B, 1, 1, 1) is how far a
    chain is into its target band (0 below the target: nothing removed; 1 at its top: all of it)."""
    pg = g if pre is None else pre.drift(g)
    num = (pg * d).sum(dim=(1, 2, 3), keepdim=True)
    den = (pg * g).sum(dim=(1, 2, 3), keepdim=True)
    c = torch.where(den > 0, num.clamp(max=0.0) / den.clamp_min(_TINY), torch.zeros_like(num))
    return d - (weight * c) * g


class SgldRule(UpdateRule):
    """Exact form: a Langevin step on the tempered energy with an L2 prior."""

    options_type = SgldOptions
    options: SgldOptions

    def step(self, s: Step) -> torch.Tensor:
        o = self.options
        xi = s.noise()
        g = s.energy_grad()
        x = s.x.detach()
        eps_t = o.step_size * (1.0 + s.t) ** (-o.step_decay)
        drift = (g - 2.0 * o.l2 * x) / o.temperature
        return (x + 0.5 * eps_t * drift + (eps_t**0.5) * xi).clamp_(*s.box)


class AmRule(UpdateRule):
    """Deterministic activation maximisation: Adam on the pixels (element-wise state, so the
    chains stay independent), clipped to the box."""

    options_type = AmOptions
    options: AmOptions

    def init(self, x: torch.Tensor) -> torch.Tensor:
        x.requires_grad_(True)
        self.adam = torch.optim.Adam([x], lr=self.options.lr)
        return x

    def step(self, s: Step) -> torch.Tensor:
        x = s.x
        loss = -(s.activation.sum() - self.options.l2 * (x * x).sum())
        self.adam.zero_grad(set_to_none=True)
        loss.backward()
        self.adam.step()
        with torch.no_grad():
            x.clamp_(*s.box)
        return x


class WalkRule(UpdateRule):
    """Annealed Langevin dynamics in the score prior's coordinates z (``sampling/prior.py``):

        step 0:        z <- z + sigma_max xi                        (the kick that lets a chain move)
        at level s:    z <- z + a (score(z, s) + (w / s) h g) + sqrt(2 a) xi,   a = epsilon s^2
        the last step: z <- z - s_min eps_hat(z, s_min)              (with ``denoise``: one denoising step)

    g: the activation gradient in z scaled to unit RMS, h: 1 below the target fading to 0 over the 1%
    above it (as ``ldam``'s). Levels fall geometrically from sigma_max to sigma_min, the steps shared
    evenly. xi is the chain's own noise (its stream, projected onto the prior's subspace), so a chain
    does not depend on its batch. The walk moves the image's part in the prior's subspace; the start's
    part outside it (its fine detail; none on the digits, whose span the subspace is) is kept as it
    is. Images are clipped to the pixel box after every step."""

    options_type = WalkOptions
    options: WalkOptions

    def init(self, x: torch.Tensor) -> torch.Tensor:
        prior = self.context.prior
        if prior is None:
            raise SamplerError("method 'walk' needs a score prior: sample(..., prior=train_score_prior(real_images))")
        with torch.no_grad():  # the start's detail outside the prior's subspace, kept as it is (0 on the digits)
            self.residual = x - prior.image(prior.coords(x))
        return x

    def _level(self, t: int, steps: int) -> float:
        o = self.options
        i = min(o.levels - 1, t * o.levels // max(steps, 1))
        return o.sigma_max * (o.sigma_min / o.sigma_max) ** (i / max(o.levels - 1, 1))

    def step(self, s: Step) -> torch.Tensor:
        o, prior = self.options, self.context.prior
        assert prior is not None
        with torch.no_grad():
            z = prior.coords(s.x.detach())
            xi = s.noise().flatten(1) @ prior.basis  # the chain's noise in the subspace (V orthonormal)
        if s.t == 0:
            z = z + o.sigma_max * xi
        else:
            g = s.grads()[0].flatten(1) @ prior.basis  # d a / d z up to the (positive) scale
            with torch.no_grad():
                g.div_(g.pow(2).mean(1, keepdim=True).sqrt_().clamp_min_(_TINY))
                if self.context.target is not None:
                    g.mul_(_below_target(s.activation.detach(), self.context.target).to(g.dtype).view(-1, 1))
                sigma = self._level(s.t, s.steps)
                a = o.step * sigma * sigma
                z = z + a * (prior.score(z, sigma) + (o.guidance / sigma) * g) + math.sqrt(2 * a) * xi
                if s.t == s.steps - 1 and o.denoise:
                    z = z - o.sigma_min * prior(z, o.sigma_min)
        with torch.no_grad():
            return prior.image(z).add_(self.residual).clamp_(*s.box)


RULES: dict[str, type[UpdateRule]] = {"ldam": LdamRule, "sgld": SgldRule, "am": AmRule, "walk": WalkRule}


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
    method: str,
    options: BaseModel,
    box: tuple[float, float],
    snapshot_steps: list[int],
    chains: int,
    lam: float = 0.0,
    log_d: LogDFn | None = None,
    draw_offset: int = 0,
    context: ChainContext | None = None,
    on_step: Callable[[int], None] | None = None,
) -> ChainTensors:
    """Run ``steps`` steps of the rule ``RULES[method]`` on the batch ``x0`` (B, C, H, W).

    ``activation_fn(x) -> (B,)`` is each chain's own unit activation; ``log_d(x) -> (B,)`` the
    realism term, used in the update when ``lam > 0`` and recorded whenever given. ``keys`` (B, 2)
    are the per-chain noise keys (see ``noise``). ``snapshot_steps``: values of t in 1..steps at
    which x_t is kept. ``chains``: chains per unit (element ``u * chains + c`` is chain c of unit
    u); ``context``: what the rule may use beyond its options (kernel widths, preconditioner,
    per-chain activation targets). ``on_step(t)`` is told each finished step (progress).
    """
    b = x0.shape[0]
    dev = x0.device
    keys = keys.to(dev)
    snap_at = {t: i for i, t in enumerate(snapshot_steps)}
    snaps = torch.empty((len(snapshot_steps), *x0.shape), dtype=torch.float32, device=dev)
    act_trace = torch.empty((steps + 1, b), dtype=torch.float32, device=dev)
    real_trace = torch.empty((steps + 1, b), dtype=torch.float32, device=dev)
    if method not in RULES:
        raise SamplerError(f"unknown method {method!r}; allowed: {', '.join(RULES)}")
    context = context or ChainContext()
    rule = RULES[method](options, context)
    x = rule.init(x0.detach().to(torch.float32).clone())
    stream = noise.NormalStream(keys, tuple(x0.shape[1:]), last_draw=draw_offset + steps)
    for t in range(steps):
        x.requires_grad_(True)
        a = activation_fn(x)
        act_trace[t] = a.detach()
        logd = None
        if log_d is not None:
            if lam > 0:
                logd = log_d(x)
                real_trace[t] = logd.detach()
            else:
                with torch.no_grad():
                    real_trace[t] = log_d(x.detach())
        x = rule.step(Step(t=t, x=x, activation=a, log_d=logd, lam=lam, box=box, chains=chains,
                           unit_context=context.bandwidth, keys=keys, draw=draw_offset + t + 1, steps=steps,
                           noise_stream=stream))
        if t + 1 in snap_at:
            snaps[snap_at[t + 1]] = x.detach()
        if on_step is not None:
            on_step(t + 1)
    x = x.detach()
    with torch.no_grad():
        act_trace[steps] = activation_fn(x)
        if log_d is not None:
            real_trace[steps] = log_d(x)
    return ChainTensors(snapshots=snaps, activation=act_trace, realism=real_trace if log_d is not None else None)
