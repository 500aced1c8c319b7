"""``sample``: run batched Langevin chains for a block of units of one layer -> ``ChainResult``.

Batch layout: element ``u * chains + c`` is chain c of the u-th unit. One forward (truncated at
the layer) and one backward per step serve the whole block.

Dead units: before the loop, one probe forward + backward at the starting images finds units whose
activation and input gradient are exactly 0 for every chain's start (a ReLU that never fires on
them); those units are dropped from the batch, not sampled, and flagged in ``ChainResult.dead``.
Their samples and traces are NaN ("not sampled"), so nothing downstream mistakes the unmoved start
for a sample. Dropping them changes nothing for the others: a chain depends only on its own key.
"""

from __future__ import annotations

import copy
import dataclasses

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ldam_sweep.errors import SamplerError
from ldam_sweep.model.handle import ModelHandle
from ldam_sweep.progressbar import progress_bar
from ldam_sweep.objectives import DEFAULT_BY_KIND, UnitObjective, check_objective, parse_objective, unit_objective
from ldam_sweep.sampling import noise
from ldam_sweep.sampling.langevin import ChainContext, ChainTensors, run_chains
from ldam_sweep.sampling.lowpass import exemplar_bandwidth, lowpass
from ldam_sweep.sampling.precondition import Preconditioner, fit_preconditioner
from ldam_sweep.sampling.prior import ScorePrior
from ldam_sweep.settings import (LADDER_STEPS, METHODS, AmOptions, LdamOptions, SgldOptions, check_ladder,
                                 default_snapshot_steps, parse_options)

LADDER_STEP = 0.004  # eta of the rungs: 20x the run's (docs/method.md, "The activation ladder")
SAMPLING_EXEMPLARS = 64  # top real images per unit a sweep hands ``sample``: chain starts and the kernel width


@dataclass
class ChainResult:
    """What a block of chains produced; numpy arrays, unit axis first."""

    layer: str
    units: np.ndarray  # (U,)
    objective: str
    method: str
    seed: int
    lam: float
    steps: int
    options: dict[str, Any]
    snapshot_steps: np.ndarray  # (S,) the t of each snapshot, 1..steps
    samples: np.ndarray  # (U, chains, S, C, H, W) float32
    activation: np.ndarray  # (U, chains, steps + 1) float32: a(x_t), t = 0 (start) .. steps (final)
    realism: np.ndarray | None = None  # (U, chains, steps + 1) log D(x_t), when a discriminator is given
    dead: np.ndarray | None = None  # (U,) bool: activation and input gradient 0 at every start; not sampled (NaN)
    starts: np.ndarray | None = None  # (U, chains, C, H, W) each chain's starting image (x_0), snapshot dtype
    # the activation ladder (``sample(..., ladder=...)``): each chain continued from its final state to
    # higher targets, rung r at ladder[r] x the unit's best real activation; None without a ladder
    ladder: np.ndarray | None = None  # (R,) the rungs' factors, rising
    rung_samples: np.ndarray | None = None  # (U, chains, R, C, H, W) each chain's state at the end of each rung
    rung_activation: np.ndarray | None = None  # (U, chains, R) its activation there
    rung_realism: np.ndarray | None = None  # (U, chains, R) log D there, when a discriminator is given

    @property
    def chains(self) -> int:
        return int(self.samples.shape[1])

    @property
    def dead_reason(self) -> str:
        """Why a unit flagged in ``dead`` was not sampled (the manifest's ``error`` for it)."""
        return f"activation and input gradient are 0 for all {self.chains} starting images"

    @property
    def final_activation(self) -> np.ndarray:
        """(U, chains) activation of each chain's final state."""
        return self.activation[:, :, -1]

    @property
    def final_samples(self) -> np.ndarray:
        """(U, chains, C, H, W) each chain's final state."""
        return self.samples[:, :, -1]

    # the arrays with one entry per unit (unit axis first); None where a result has no such array
    PER_UNIT = ("units", "samples", "activation", "realism", "dead", "starts", "rung_samples", "rung_activation",
                "rung_realism")

    def take(self, units: slice) -> "ChainResult":
        """The result of a range of its units (every per-unit array sliced alike; views, no copy)."""
        return dataclasses.replace(self, **{name: None if getattr(self, name) is None else getattr(self, name)[units]
                                            for name in self.PER_UNIT})

    @classmethod
    def concat(cls, parts: "Sequence[ChainResult]") -> "ChainResult":
        """Results of one layer sampled in several batches (e.g. after an out-of-memory split) as one:
        chains depend only on (seed, layer, unit, chain), so this equals one big batch."""
        first = parts[0]
        if len(parts) == 1:
            return first
        same = ("layer", "steps", "chains", "method", "seed", "lam", "objective")
        if any(tuple(getattr(p, k) for k in same) != tuple(getattr(first, k) for k in same)
               or not np.array_equal(*(np.asarray(() if r.ladder is None else r.ladder) for r in (p, first)))
               for p in parts[1:]):
            raise ValueError("results to join must come from the same layer and sampler settings")
        parts = [p if p.dead is not None else dataclasses.replace(p, dead=np.zeros(len(p.units), dtype=bool))
                 for p in parts]
        return dataclasses.replace(first, **{name: None if getattr(first, name) is None else
                                             np.concatenate([getattr(p, name) for p in parts])
                                             for name in cls.PER_UNIT})


def diverse_order(exemplars: torch.Tensor, pool: int, chains: int) -> np.ndarray:
    """(U, N, C, H, W) exemplars, best first (NaN = missing) -> (U, chains) indices: per unit, the top
    exemplar, then greedily the one farthest (low-passed, Euclidean) from those already picked, among
    its top ``pool`` finite ones; cycling when it has fewer than ``chains``."""
    u, n = exemplars.shape[:2]
    valid = torch.isfinite(exemplars.flatten(2)).all(-1).sum(1).numpy()  # missing ones come last (topk pads)
    out = np.zeros((u, chains), dtype=np.int64)
    for i in range(u):
        k = int(min(pool, valid[i]))
        if k <= chains:
            out[i] = np.arange(chains) % max(k, 1)
            continue
        y = lowpass(exemplars[i, :k].float()).flatten(1).double()
        picked = [0]
        dmin = ((y - y[0]) ** 2).sum(1)
        for _ in range(chains - 1):
            j = int(dmin.argmax())
            picked.append(j)
            dmin = torch.minimum(dmin, ((y - y[j]) ** 2).sum(1))
        out[i] = picked
    return out


def initial_images(
    model: ModelHandle, init: str | np.ndarray | torch.Tensor, keys: torch.Tensor, n_units: int, chains: int,
    exemplars: torch.Tensor | None = None, start_pool: int = 0,
) -> torch.Tensor:
    """(B, C, H, W) starting images: per-chain uniform noise in the pixel box, the unit's real
    exemplars (chain c from its c-th, cycling when it has fewer; with ``start_pool`` > chains from
    the c-th of a diverse subset of its top ``start_pool``, see ``diverse_order``), or given images."""
    lo, hi = model.input.range
    shape = model.input.shape
    if isinstance(init, str):
        if init == "auto":
            init = "uniform" if exemplars is None else "exemplars"
        if init == "uniform":
            return lo + (hi - lo) * noise.uniform(keys.to(model.device), 0, shape)
        if init != "exemplars":
            raise SamplerError(f"init must be 'auto', 'uniform', 'exemplars' or an array of images, got {init!r}")
        if exemplars is None:
            raise SamplerError("init='exemplars' needs the units' exemplar images: sample(..., exemplars=(U, N, C, H, W))")
        pick = diverse_order(exemplars.cpu(), start_pool, chains)  # (U, chains)
        arr = exemplars.cpu()[np.arange(n_units)[:, None], pick].reshape(n_units * chains, *shape)
    else:
        arr = torch.as_tensor(np.asarray(init.detach().cpu() if isinstance(init, torch.Tensor) else init), dtype=torch.float32)
        if tuple(arr.shape) == shape:
            arr = arr.expand(n_units * chains, *shape)
        elif tuple(arr.shape) == (n_units, chains, *shape):
            arr = arr.reshape(n_units * chains, *shape)
        else:
            raise SamplerError(
                f"init array has shape {tuple(arr.shape)}; expected one image {shape} shared by every chain, "
                f"or one per unit and chain {(n_units, chains, *shape)}"
            )
    if not torch.isfinite(arr).all() or arr.min() < lo - 1e-6 or arr.max() > hi + 1e-6:
        raise SamplerError(f"init images must be finite and inside the model's pixel range [{lo}, {hi}]")
    return arr.to(model.device).contiguous()


def _check_exemplars(exemplars: np.ndarray | torch.Tensor | None, n_units: int, shape: tuple[int, ...]) -> torch.Tensor | None:
    """(U, N, C, H, W) float32 tensor on the CPU, every unit with at least one real image, or None."""
    if exemplars is None:
        return None
    ex = torch.as_tensor(np.asarray(exemplars.detach().cpu() if isinstance(exemplars, torch.Tensor) else exemplars),
                         dtype=torch.float32)
    if ex.ndim != 2 + len(shape) or ex.shape[0] != n_units or tuple(ex.shape[2:]) != shape or ex.shape[1] < 1:
        raise SamplerError(f"exemplars have shape {tuple(ex.shape)}; expected (units, N, *{shape}) = ({n_units}, N, ...)")
    if not torch.isfinite(ex[:, 0].flatten(1)).all():
        raise SamplerError("exemplars: every unit needs at least one real image (its first one is NaN)")
    return ex


def _unit_bandwidths(exemplars: torch.Tensor | None, method: str, options: Any, diverse: bool = False) -> torch.Tensor | None:
    """(U,) per-unit kernel width from the exemplars for ``ldam``'s repulsion, or None. A unit with
    fewer than 2 exemplars takes the median of the others'; if none has 2, the chains' own
    (median heuristic) is used."""
    if (exemplars is None or method != "ldam" or options.resolved_repel(diverse) == 0
            or not isinstance(options.bandwidth, str)):
        return None
    if options.bandwidth == "median":
        return None
    h = exemplar_bandwidth(exemplars)
    missing = torch.isnan(h)
    if missing.all():
        if options.bandwidth == "exemplars":
            raise SamplerError("bandwidth='exemplars' needs at least 2 exemplars for some unit")
        return None
    return torch.where(missing, h[~missing].median(), h)


def _preconditioner(given: Preconditioner | np.ndarray | torch.Tensor | None, options: Any,
                    model: ModelHandle) -> Preconditioner | None:
    """The ldam run's preconditioner on the model's device, or None (``none``, or ``auto`` without data)."""
    if options.precondition == "none":
        return None
    if given is None:
        if options.precondition == "auto":
            return None
        raise SamplerError(f"precondition={options.precondition!r} needs real images: "
                           "sample(..., preconditioner=real_images (N, C, H, W)) or a fitted one")
    if not isinstance(given, Preconditioner):
        given = fit_preconditioner(given, options.precondition)
        if given is None:
            return None
    if tuple(given.shape) != tuple(model.input.shape):
        raise SamplerError(f"preconditioner is for images {given.shape}, the model takes {model.input.shape}")
    return given if given.device == model.device else given.to(model.device)


@torch.no_grad()
def _best_real(model: ModelHandle, layer: str, objective: UnitObjective, units: np.ndarray,
               exemplars: torch.Tensor) -> torch.Tensor:
    """(U,) the activation of each unit's best real image (its first exemplar); +inf (no target)
    where that is not positive."""
    idx = torch.from_numpy(units).to(model.device)
    a = unit_objective(model.activations(exemplars[:, 0].to(model.device), layer), idx, objective).float()
    return torch.where(a > 0, a, torch.full_like(a, float("inf")))


def _targets(model: ModelHandle, layer: str, objective: UnitObjective, units: np.ndarray, exemplars: torch.Tensor | None,
             options: Any, best: torch.Tensor | None = None) -> torch.Tensor | None:
    """(U,) per-unit activation target: ``target`` x the activation of the unit's best real image
    (``best`` when the caller has it, else ``_best_real``); +inf where that is not positive. None when off."""
    factor = options.target
    if factor is None or (factor == "auto" and exemplars is None):
        return None
    if exemplars is None:
        raise SamplerError(f"target={factor} is a multiple of each unit's best real activation: it needs the units' "
                           "exemplars (sample(..., exemplars=...)); target=None turns it off")
    best = _best_real(model, layer, objective, units, exemplars) if best is None else best
    return best * (1.0 if factor == "auto" else float(factor))


def _options(method: str, options: Any, given: dict[str, Any]) -> LdamOptions | SgldOptions | AmOptions:
    """The method's settings: parsed once by the caller (``options``), or parsed here from keywords."""
    if options is None:
        return parse_options(method, given)
    if given:
        raise SamplerError(f"give the sampler's settings either as options= or as keywords, not both "
                           f"(got options= and {', '.join(sorted(given))})")
    if method not in METHODS or not isinstance(options, METHODS[method]):
        raise SamplerError(f"options= is a {type(options).__name__}, but method {method!r} takes "
                           f"{METHODS[method].__name__ if method in METHODS else 'one of ' + ', '.join(METHODS)}")
    return options


def check_prior(prior: Any, model: ModelHandle) -> None:
    if prior is None:
        raise SamplerError("method 'walk' needs a score prior: sample(..., prior=ls.train_score_prior(real_images))")
    if not isinstance(prior, ScorePrior):
        raise SamplerError(f"prior must be a ScorePrior (train_score_prior / load_score_prior), got {type(prior).__name__}")
    if tuple(prior.shape) != tuple(model.input.shape) or tuple(prior.box) != tuple(map(float, model.input.range)):
        raise SamplerError(f"the score prior is for images {tuple(prior.shape)} in {list(prior.box)}, the model takes "
                           f"{tuple(model.input.shape)} in {list(model.input.range)}: train it on this model's real images")


def _check_discriminator(discriminator: Callable | None, lam: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise SamplerError(f"lam must be in [0, 1], got {lam}")
    if lam > 0 and discriminator is None:
        raise SamplerError(f"lam={lam} weights a realism term, so it needs a discriminator (got none)")
    if discriminator is not None and not callable(discriminator):
        raise SamplerError(f"discriminator must be callable (x -> log D(x)), got {type(discriminator).__name__}")


def sample(
    model: ModelHandle,
    layer: str,
    units: int | Sequence[int] | np.ndarray,
    *,
    chains: int = 8,
    steps: int = 300,
    method: str = "ldam",
    seed: int = 0,
    lam: float = 0.0,
    discriminator: Callable[[torch.Tensor], torch.Tensor] | None = None,
    init: str | np.ndarray | torch.Tensor = "auto",
    exemplars: np.ndarray | torch.Tensor | None = None,
    snapshot_every: int | None = None,
    objective: str | None = None,
    snapshot_dtype: torch.dtype = torch.float32,
    batch_units: int | None = None,
    preconditioner: Preconditioner | np.ndarray | torch.Tensor | None = None,
    options: LdamOptions | SgldOptions | AmOptions | None = None,
    progress: bool | Callable[[int], None] = False,
    input: Any = None,
    ladder: Sequence[float] = (),
    ladder_steps: int = LADDER_STEPS,
    prior: ScorePrior | None = None,
    **sampler_options: Any,
) -> ChainResult:
    """Sample ``chains`` Langevin chains for each unit of ``layer`` in one batch.

    ``model``: a ``ModelHandle`` (``ls.load_model``), or your own ``torch.nn.Module`` with ``input``
    (what ``ls.load_model(module, input=...)`` takes: ``(C, H, W)`` or an input spec; a sweep of
    several calls should load it once). ``progress``: ``True`` shows a progress bar over the steps
    on stderr; a callable is told each finished step.

    ``discriminator``: any callable mapping pixel-space images (B, C, H, W) to log D(x) (B,);
    used in the update with weight ``lam`` and recorded as the realism trace whenever given.
    ``init``: ``"auto"`` (``"exemplars"`` when ``exemplars`` are given, else ``"uniform"``),
    ``"uniform"``, ``"exemplars"`` (chain c of unit u starts from the unit's c-th exemplar, cycling
    when it has fewer), one image (C, H, W) shared by every chain, or (U, chains, C, H, W).
    ``exemplars``: (U, N, C, H, W) each unit's top real images, best first (``top_exemplars``;
    NaN images = missing); ``ldam`` starts from a diverse subset of the top ``start_pool``, takes
    its activation target from the first (the unit's best real image) and sizes its repulsion's
    kernel by them.
    ``preconditioner``: ``ldam``'s data preconditioner, fitted (``fit_preconditioner``) or as real
    images (N, C, H, W) to fit it from (the kind is the ``precondition`` option); without it
    ``ldam`` runs unpreconditioned (``precondition: auto``) or refuses (``covariance``/``spectrum``).
    ``sampler_options``: the method's settings (see ``LdamOptions`` / ``SgldOptions``), or
    ``options``: those settings already parsed (``parse_options``; a sweep parses them once).
    ``snapshot_dtype``: the type ``samples`` leave the device in (``torch.float16``, the store's
    type, halves the transfer); traces stay float32.
    ``batch_units``: run as a batch of this many live units, padding with repeats of the units'
    chains (discarded): on a GPU a kernel's rounding can depend on the batch's size (not on what else
    is in it), so re-sampling a stored unit with its manifest's ``batch_units`` reproduces it there.
    ``ladder``: rising factors (e.g. ``(1.5, 2.0)``, each above the ``target``): after the run, each
    chain goes on for ``ladder_steps`` steps per rung with its target at that factor x the unit's best
    real activation, from where the rung before ended (``ldam`` with exemplars only). A rung climbs
    without the realism term (log D is still recorded), with step ``LADDER_STEP`` and the stationary
    (smooth, full-rank) form of the preconditioner; the state at the end of each rung is in
    ``rung_samples`` (docs/method.md, "The activation ladder").
    ``prior``: the denoising score prior (``train_score_prior``) that ``method="walk"`` walks on
    (docs/method.md, "Walks on a score prior"); a discriminator is then only recorded (lam = 0).
    A chain's start and noise depend only on (seed, layer, unit, chain).
    """
    if not isinstance(model, ModelHandle):
        from ldam_sweep.model.loading import load_model

        model = load_model(model, input=input)
    info = model.layer(layer)
    unit_arr = model.check_units(info.name, units)
    objective = check_objective(str(objective or DEFAULT_BY_KIND[info.kind]), info.kind, info.name, info.geometry)
    reduce = parse_objective(objective)  # parsed once, not on every step
    if not isinstance(chains, int) or chains < 1:
        raise SamplerError(f"chains must be a positive integer, got {chains!r}")
    if not isinstance(steps, int) or steps < 1:
        raise SamplerError(f"steps must be a positive integer, got {steps!r}")
    options = _options(method, options, sampler_options)
    _check_discriminator(discriminator, lam)
    if method == "am" and lam > 0:
        raise SamplerError("method 'am' (plain activation maximisation) has no realism term: use lam=0")
    walk = method == "walk"
    if walk:
        if lam > 0:
            raise SamplerError("method 'walk' takes its realism from the score prior (prior=...): use lam=0 (a "
                               "discriminator, if given, is recorded, not used)")
        check_prior(prior, model)
        if isinstance(init, str) and (init == "uniform" or (init == "auto" and exemplars is None)):
            raise SamplerError("method 'walk' walks from real images: give the units' exemplars (exemplars=...) or "
                               "starting images (init=...); uniform noise starts would keep their noise outside the "
                               "prior's subspace")
        if prior.mean.device != model.device:  # a copy on the model's device: the caller's prior stays where it is
            prior = copy.deepcopy(prior).to(model.device)
    elif prior is not None:
        raise SamplerError(f"prior= is the score prior of method 'walk'; method {method!r} does not use it")
    snap_steps = default_snapshot_steps(steps, snapshot_every)
    rungs = _check_ladder(ladder, ladder_steps, method, options, exemplars)
    if batch_units is not None and (not isinstance(batch_units, int) or batch_units < 1):
        raise SamplerError(f"batch_units must be a positive integer (live units per batch), got {batch_units!r}")

    n_units = len(unit_arr)
    keys = noise.chain_keys(seed, info.name, unit_arr, chains).to(model.device)
    ex = _check_exemplars(exemplars, n_units, model.input.shape)
    ldam = method == "ldam"
    pool = options.start_pool if ldam or walk else 0
    x0 = initial_images(model, init, keys, n_units, chains, ex, pool)
    diverse = (ldam or walk) and ex is not None and isinstance(init, str) and init in ("auto", "exemplars") and pool > chains
    bandwidth = _unit_bandwidths(ex, method, options, diverse)
    pre = _preconditioner(preconditioner, options, model) if ldam else None
    rung_pre = None if pre is None or not rungs else pre.stationary()  # the ladder climbs smooth, full rank
    best = _best_real(model, info.name, reduce, unit_arr, ex) if rungs else None  # one forward for run and rungs
    target = _targets(model, info.name, reduce, unit_arr, ex, options, best) if ldam or walk else None
    rung_targets = [best * f for f in rungs]
    dead = _dead_units(model, info.name, reduce, unit_arr, x0)
    live = ~dead
    starts_all = x0  # every unit's starts (the dead ones' too: the images they were found dead on)
    if dead.any():
        keep = torch.from_numpy(np.repeat(live, chains)).to(model.device)
        keys, x0 = keys[keep], x0[keep]
        if bandwidth is not None:
            bandwidth = bandwidth[torch.from_numpy(live).to(bandwidth.device)]
        if target is not None:
            target = target[torch.from_numpy(live).to(target.device)]
        rung_targets = [t[torch.from_numpy(live).to(t.device)] for t in rung_targets]
    n_live = int(live.sum())
    if batch_units is not None and n_live > batch_units:
        raise SamplerError(f"batch_units={batch_units} is smaller than the {n_live} live units asked for; give at "
                           f"least {n_live} or fewer units")
    shape = model.input.shape
    host: list[np.ndarray] = []
    if n_live:
        unit_idx = torch.from_numpy(np.repeat(unit_arr[live], chains)).to(model.device)
        rows = n_live * chains
        if batch_units is not None and batch_units > n_live:  # pad: whole units' chains, repeated
            pad = torch.arange(batch_units * chains, device=keys.device) % rows
            keys, x0, unit_idx = keys[pad], x0[pad], unit_idx[pad.to(unit_idx.device)]
            if bandwidth is not None:
                bandwidth = bandwidth[torch.arange(batch_units, device=bandwidth.device) % n_live]
            if target is not None:
                target = target[torch.arange(batch_units, device=target.device) % n_live]
            rung_targets = [t[torch.arange(batch_units, device=t.device) % n_live] for t in rung_targets]

        def activation_fn(x: torch.Tensor) -> torch.Tensor:
            return unit_objective(model.activations(x, info.name), unit_idx, reduce)

        log_d = _wrap_discriminator(discriminator, model, len(unit_idx)) if discriminator is not None else None
        total = steps + len(rungs) * ladder_steps
        rung_options = options if not rungs else options.model_copy(update={"step_size": LADDER_STEP})
        rung_out: list[ChainTensors] = []
        with progress_bar(progress, total, f"sampling {info.name}: {n_live} units x {chains} chains") as on_step:
            def context(t: torch.Tensor | None, p: Preconditioner | None, rung: bool = False) -> ChainContext:
                return ChainContext(
                    bandwidth=None if bandwidth is None else bandwidth.to(model.device), preconditioner=p,
                    target=None if t is None else t.to(model.device).repeat_interleave(chains), diverse_starts=diverse,
                    stop_at_target=rung, prior=prior)

            out: ChainTensors = run_chains(
                activation_fn, x0, keys, steps=steps, method=method, options=options,
                box=model.input.range, snapshot_steps=snap_steps, chains=chains, lam=lam, log_d=log_d,
                context=context(target, pre), on_step=on_step,
            )
            x_end = out.snapshots[-1]  # the final state (the last snapshot is always the last step)
            for r, t_r in enumerate(rung_targets):  # each rung goes on from where the one before ended
                offset = steps + r * ladder_steps
                rung_out.append(run_chains(  # no realism term: log D is recorded once, at the rung's end
                    activation_fn, x_end, keys, steps=ladder_steps, method=method, options=rung_options,
                    box=model.input.range, snapshot_steps=[ladder_steps], chains=chains, lam=0.0,
                    log_d=None, draw_offset=offset, context=context(t_r, rung_pre, rung=True),
                    on_step=None if on_step is None else (lambda t, o=offset: on_step(o + t))))
                x_end = rung_out[-1].snapshots[-1]
        # laid out (unit, chain, ...) on the device, then one transfer per array
        snaps = out.snapshots.detach()[:, :rows].view(len(snap_steps), n_live, chains, *shape).permute(1, 2, 0, 3, 4, 5)
        traces = [t[:, :rows] for t in (out.activation, *([] if out.realism is None else [out.realism]))]
        host = _to_host([snaps.to(snapshot_dtype, memory_format=torch.contiguous_format),
                         *(t.detach().T.reshape(n_live, chains, steps + 1) for t in traces)])
        if rung_out:
            rung_host = _to_host([
                torch.stack([o.snapshots[-1, :rows] for o in rung_out], 1).view(n_live, chains, len(rungs), *shape)
                .to(snapshot_dtype),
                torch.stack([o.activation[-1, :rows] for o in rung_out], 1).view(n_live, chains, len(rungs)),
                *([] if log_d is None else [torch.stack([_no_grad(log_d, o.snapshots[-1, :rows]) for o in rung_out], 1)
                                            .view(n_live, chains, len(rungs))])])
    starts = _to_host([starts_all.detach().reshape(n_units, chains, *shape).to(snapshot_dtype)])[0]
    if host and n_live == n_units:  # no dead unit: the transferred arrays are the result
        samples, act, real = host[0], host[1], (host[2] if discriminator is not None else None)
    else:  # NaN rows for the dead units; allocated only then (at 224 px a batch's samples are ~300 MB)
        samples = np.full((n_units, chains, len(snap_steps), *shape), np.nan,
                          dtype=torch.empty((), dtype=snapshot_dtype).numpy().dtype)
        act = np.full((n_units, chains, steps + 1), np.nan, dtype=np.float32)
        real = None if discriminator is None else np.full((n_units, chains, steps + 1), np.nan, dtype=np.float32)
        if host:
            samples[live], act[live] = host[0], host[1]
            if real is not None:
                real[live] = host[2]
    rung_arrays: dict[str, Any] = {}
    if rungs:
        dtype = torch.empty((), dtype=snapshot_dtype).numpy().dtype
        rung_arrays = {"ladder": np.asarray(rungs, dtype=np.float64),
                       "rung_samples": np.full((n_units, chains, len(rungs), *shape), np.nan, dtype=dtype),
                       "rung_activation": np.full((n_units, chains, len(rungs)), np.nan, dtype=np.float32)}
        if discriminator is not None:
            rung_arrays["rung_realism"] = np.full((n_units, chains, len(rungs)), np.nan, dtype=np.float32)
        if n_live:
            for name, arr in zip(("rung_samples", "rung_activation", "rung_realism"), rung_host):
                rung_arrays[name][live] = arr
    return ChainResult(
        layer=info.name, units=unit_arr, objective=objective, method=method, seed=int(seed), lam=float(lam),
        steps=steps, options=options.model_dump(), snapshot_steps=np.asarray(snap_steps, dtype=np.int64),
        samples=samples, activation=act, realism=real, dead=dead, starts=starts, **rung_arrays,
    )


def _check_ladder(ladder: Sequence[float], steps: int, method: str, options: Any, exemplars: Any) -> list[float]:
    """The ladder's factors as floats, or a SamplerError saying what is wrong."""
    if ladder is None or len(ladder) == 0:
        return []
    if method != "ldam" or exemplars is None:
        raise SamplerError("ladder= raises each chain's activation target: it needs method 'ldam' and the units' "
                           f"exemplars (got method {method!r}{'' if exemplars is not None else ', no exemplars'})")
    if not isinstance(steps, int) or steps < 1:
        raise SamplerError(f"ladder_steps must be a positive integer, got {steps!r}")
    return check_ladder(ladder, options.target)


@torch.no_grad()
def _no_grad(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return fn(x).float()


def _to_host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Contiguous numpy copies of device tensors. On CUDA each goes into pinned host memory
    asynchronously and the host waits once for all of them (a pageable copy would block per array
    and run at a fraction of the bus speed)."""
    if not tensors or tensors[0].device.type != "cuda":
        return [np.ascontiguousarray(t.cpu().numpy()) for t in tensors]
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for h, t in zip(host, tensors):
        h.copy_(t, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [h.numpy() for h in host]


def _dead_units(model: ModelHandle, layer: str, objective: UnitObjective, units: np.ndarray, x0: torch.Tensor) -> np.ndarray:
    """(U,) bool: units whose activation and input gradient are exactly 0 at every chain's start.
    One forward + backward of the whole batch and one host sync."""
    chains = len(x0) // len(units)
    unit_idx = torch.from_numpy(np.repeat(units, chains)).to(x0.device)
    x = x0.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        a = unit_objective(model.activations(x, layer), unit_idx, objective)
        (grad,) = torch.autograd.grad(a.sum(), x)
    alive = (a.detach() != 0) | (grad.flatten(1) != 0).any(1)
    return ~alive.view(len(units), chains).any(1).cpu().numpy()


def _wrap_discriminator(d: Callable, model: ModelHandle, batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(d, torch.nn.Module):
        d.to(model.device).eval()
        for p in d.parameters():
            p.requires_grad_(False)
    checked = False

    def log_d(x: torch.Tensor) -> torch.Tensor:
        nonlocal checked
        out = d(x)
        if not checked:
            if not isinstance(out, torch.Tensor) or out.shape != (x.shape[0],):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise SamplerError(f"discriminator must return log D(x) of shape ({x.shape[0]},), got {got}")
            checked = True
        return out

    return log_d
