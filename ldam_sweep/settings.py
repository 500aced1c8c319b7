"""Settings users give for sampling and for stage 1, as pydantic models (no torch imported here).

The job spec validates against these, so checking a spec never loads the sampler. ``METHODS`` is
the table of update rules' settings; the rules themselves (``RULES``, same names) live in
``sampling/langevin.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ldam_sweep.errors import SamplerError

REPEL_DEFAULT = 0.3  # measured on the digits demo (docs/method.md, "Diversity")


# Chains whose low-passed final samples are linked by RMS distances (fraction of the pixel range)
# below this show one facet of a unit; two facets differ by more than most real digits of one
# class do: 0.22 is the 75th percentile of the low-passed distances between real test digits of one
# class (median 0.185, mean 0.190). 8 real digits of one class make 1 facet in 81% of draws, 4 + 4
# of two classes make 2 or more in 69% (tests/test_scores.py). docs/scores.md ("facets"). Was 0.095 (half the class
# spacing), which split 8 digits of one class into 7 facets.
FACET_THRESHOLD = 0.22


# The revision of the sampler defaults a store is created with (root attr ``sampler_defaults``).
# A store resumes with the defaults of its own revision, so one store never mixes two samplers.
# Revision 1 (no attribute): the paper's reference form, uniform starts. Revision 2: exemplar
# starts, kernel repulsion, relative eps. Revision 3: the data preconditioner, the activation
# target, a realism term that fades where D calls a sample real, diverse starts, no L2 pull.
SAMPLER_DEFAULTS = 3
# What each older revision's ``ldam`` defaults were, as options over today's; init for revision 1.
REVISION_2_LDAM = {"precondition": "none", "target": None, "realism_scale": "log_d", "start_pool": 0, "l2": 0.1,
                   "repel": REPEL_DEFAULT, "step_size": 0.01}
REFERENCE_LDAM = {**REVISION_2_LDAM, "repel": 0.0, "eps": 1e-8, "eps_rel": 0.0}  # revision 1 (starts: uniform)
STEP_FROM_NOISE = 0.01  # the reference step
# With the data preconditioner (scaled to keep white noise's size, it lengthens steps along the data's
# main directions ~15x on the digits): chains from real exemplars need to move little (docs/method.md)
STEP_FROM_DATA = 0.0002
START_POOL = 32  # ldam's chains start from a diverse subset of this many of a unit's top real exemplars


LADDER_STEPS = 150  # steps per rung of the activation ladder (docs/method.md, "The activation ladder")


def check_ladder(ladder: Any, target: Any) -> list[float]:
    """The activation ladder's factors as floats: rising, each above ``target`` (``ldam``'s option;
    auto / None: 1.0), or a SamplerError saying what is wrong."""
    try:
        rungs = [float(f) for f in ladder]
    except (TypeError, ValueError):
        raise SamplerError(f"ladder must be a list of numbers (multiples of the best real activation), got {ladder!r}") from None
    base = 1.0 if target in ("auto", None) else float(target)
    if any(f != f or f in (float("inf"), float("-inf")) for f in rungs) or any(b >= a for b, a in zip([base, *rungs], rungs)):
        raise SamplerError(f"ladder must rise above the target ({base:g}): each rung higher than the one before, "
                           f"got {rungs}")
    return rungs


def _check_target(target: Any) -> None:
    """The activation target of ldam and walk: a positive multiple of the unit's best real activation."""
    if isinstance(target, float) and target <= 0:
        raise ValueError(f"target must be positive (a multiple of the unit's best real activation), got {target}")


def revision_options(revision: int) -> dict[str, Any]:
    """The ``ldam`` options that make today's defaults those of a store's sampler revision."""
    if revision >= SAMPLER_DEFAULTS:
        return {}
    return dict(REFERENCE_LDAM if revision <= 1 else REVISION_2_LDAM)


class LdamOptions(BaseModel):
    """Reference-form settings plus what keeps samples realistic and varied (docs/method.md); the
    defaults are the ones measured on the digits demo. ``REFERENCE_LDAM`` is the paper's reference
    form exactly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step_size: float | Literal["auto"] = Field(
        "auto", description=f"eta: step size in pixel units; auto: {STEP_FROM_DATA} with the data preconditioner "
        f"(which lengthens steps along the data's main directions), {STEP_FROM_NOISE} without (the reference form)")
    noise: float = Field(0.1, ge=0, description="sigma: initial noise scale of each noise block")
    noise_block: int = Field(100, ge=1, description="steps after which the noise schedule restarts")
    noise_floor: float = Field(0.0, ge=0, description="sigma never falls below this: noise on every step "
                               "(a walk; 0: the annealed schedule alone). docs/method.md, 'Chains that walk'")
    l2: float = Field(0.0, ge=0, description="c: weight of the L2 prior c*||x||^2 (the reference form: 0.1)")
    precondition: Literal["auto", "covariance", "spectrum", "none"] = Field(
        "auto", description="shape drift and noise by the real data's covariance: covariance (exact, inputs up to "
        "3072 values), spectrum (its stationary form, any size), auto (covariance if it fits, else spectrum; none "
        "without real data), none (the reference form)")
    target: float | Literal["auto"] | None = Field(
        "auto", description="the activation term pushes a chain while its activation is below target x the unit's "
        "best real activation (its top exemplar), fading to 0 over the 1% above it; auto: 1.0 when exemplars are "
        "given, else off; null: always on")
    realism_scale: Literal["logit", "log_d"] = Field(
        "logit", description="what the log D gradient is divided by: the RMS of D's logit gradient (the term fades as "
        "D calls the sample real) or its own RMS (the reference form: a step of constant size)")
    start_pool: int = Field(START_POOL, ge=0, description="exemplar starts: chain c starts from the c-th of a diverse "
                            "subset (farthest-point) of the unit's top start_pool real exemplars; <= chains: the top "
                            "ones in order (the reference)")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum of the update")
    rms_decay: float = Field(0.9, ge=0, lt=1, description="decay of the per-pixel squared-gradient average")
    eps: float = Field(0.0, ge=0, description="added under the RMS square root (the reference form: 1e-8)")
    eps_rel: float = Field(1e-6, ge=0, description="added under the RMS square root, times the chain's mean "
                           "squared-gradient average: keeps the step invariant to the scale of a and log D")
    repel: float | Literal["auto"] = Field(
        "auto", description="w: weight of the kernel repulsion among a unit's chains (0: none, the reference form); "
        f"auto: 0 when chains start from diverse exemplars, {REPEL_DEFAULT} otherwise")
    repel_until: float = Field(2 / 3, gt=0, le=1, description="fraction of the steps with the repulsion on; the rest "
                               "close without it")
    bandwidth: float | Literal["auto", "exemplars", "median"] = Field(
        "auto", description="kernel width h on low-passed images (summed squared distance): exemplars (half the median "
        "pairwise distance of the unit's real exemplars), median (the chains' own, floored at half its running max), "
        "auto (exemplars when given, median otherwise), or a number")

    @model_validator(mode="after")
    def _eps(self) -> "LdamOptions":
        if self.eps == 0 and self.eps_rel == 0:
            raise ValueError("eps and eps_rel are both 0: one must be positive (reference form: eps=1e-8, eps_rel=0)")
        if isinstance(self.bandwidth, float) and self.bandwidth <= 0:
            raise ValueError(f"bandwidth must be positive, got {self.bandwidth}")
        if isinstance(self.step_size, float) and self.step_size <= 0:
            raise ValueError(f"step_size must be positive, got {self.step_size}")
        if isinstance(self.repel, float) and self.repel < 0:
            raise ValueError(f"repel must be >= 0, got {self.repel}")
        _check_target(self.target)
        return self

    def resolved_step(self, preconditioned: bool) -> float:
        """The step size: ``auto`` is smaller with the data preconditioner."""
        if self.step_size == "auto":
            return STEP_FROM_DATA if preconditioned else STEP_FROM_NOISE
        return float(self.step_size)

    def resolved_repel(self, diverse_starts: bool) -> float:
        """The repulsion's weight: ``auto`` is 0 when chains start from diverse real exemplars."""
        if self.repel == "auto":
            return 0.0 if diverse_starts else REPEL_DEFAULT
        return float(self.repel)


class SgldOptions(BaseModel):
    """Exact Langevin settings: eps_t = step_size * (1 + t) ** -step_decay, target exp(E / T)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step_size: float = Field(1e-3, gt=0, description="eps: Langevin step size")
    temperature: float = Field(0.01, gt=0, description="T: temperature of the target")
    l2: float = Field(0.1, ge=0, description="c: weight of the L2 prior c*||x||^2")
    step_decay: float = Field(0.0, ge=0, le=1, description="gamma in eps_t = eps (1 + t)^-gamma")


class AmOptions(BaseModel):
    """The peer libraries' deterministic activation maximisation: Adam ascent on the pixels, no
    noise, no realism term (lam must be 0). A baseline for what sampling adds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(0.05, gt=0, description="Adam learning rate in pixel units (lucent's default)")
    l2: float = Field(0.0, ge=0, description="c: weight of an L2 penalty c*||x||^2")


# the noise levels (per-pixel RMS in units of the pixel range) a score prior is trained on: walk's
# sigma_min and sigma_max must lie inside them (sampling/prior.py)
PRIOR_SIGMA_RANGE = (0.005, 1.0)


class WalkOptions(BaseModel):
    """Annealed Langevin dynamics on a denoising score prior plus the unit's activation: chains that
    walk through the images a unit prefers while the prior pulls them toward the data (docs/method.md,
    "Walks on a score prior"). sigma is per-pixel RMS noise in units of the pixel range."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sigma_max: float = Field(0.2, gt=0, description="the noise level a walk starts at (a kick of this size, then "
                             "annealed): how far a chain can move from its start; 0.3 moved the demo's chains further "
                             "(0.23 against 0.18) onto other digits, which told less about their unit (docs/method.md)")
    sigma_min: float = Field(0.02, gt=0, description="the noise level a walk ends at (with denoise, then one denoising step)")
    levels: int = Field(10, ge=1, description="noise levels, geometric from sigma_max to sigma_min, the steps "
                        "shared evenly among them")
    step: float = Field(0.05, gt=0, description="epsilon: the Langevin step at level sigma is epsilon * sigma^2")
    guidance: float = Field(2.0, ge=0, description="w: the activation's push, w / sigma times its unit-RMS gradient "
                            "(the prior's score is of size 1 / sigma); 2 reaches the target on 99% of the demo's units "
                            "with the default prior, 1 on 86%, at the same realism")
    denoise: bool = Field(False, description="end with one denoising step at sigma_min (the prior's estimate of the "
                          "clean image): on the demo it left 24% of units below their target for no gain in realism")
    target: float | Literal["auto"] | None = Field(
        "auto", description="the activation's push fades over the 1% above target x the unit's best real activation; "
        "auto: 1.0 when exemplars are given, else off; null: always on")
    start_pool: int = Field(START_POOL, ge=0, description="exemplar starts, as ldam's: chain c starts from the c-th "
                            "of a diverse subset of the unit's top start_pool real exemplars")

    @model_validator(mode="after")
    def _levels(self) -> "WalkOptions":
        if self.sigma_min > self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must not exceed sigma_max ({self.sigma_max})")
        lo, hi = PRIOR_SIGMA_RANGE
        if self.sigma_min < lo or self.sigma_max > hi:
            raise ValueError(f"sigma_min and sigma_max must lie in [{lo}, {hi}], the noise levels a score prior is "
                             f"trained on (got {self.sigma_min}, {self.sigma_max})")
        _check_target(self.target)
        return self


METHODS: dict[str, type[BaseModel]] = {"ldam": LdamOptions, "sgld": SgldOptions, "am": AmOptions, "walk": WalkOptions}
# the methods stage 1's chains can run while D trains (``walk`` needs a score prior, which D's training has not)
D_TRAINING_METHODS = tuple(m for m in METHODS if m != "walk")


def parse_options(method: str, options: dict[str, Any]):
    """Validated sampler options for ``method``; SamplerError names the bad option and the allowed ones."""
    if method not in METHODS:
        raise SamplerError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    cls = METHODS[method]
    try:
        return cls(**options)
    except ValidationError as err:
        allowed = ", ".join(cls.model_fields)
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {'unknown option' if e['type'] == 'extra_forbidden' else e['msg']}"
            f" (got {e.get('input')!r})"
            for e in err.errors()
        )
        raise SamplerError(f"invalid {method} options: {problems}. Allowed options for {method}: {allowed}") from None


# A discriminator whose held-out accuracy (real images and fresh chains, each half) stays under this
# barely beats chance (0.5): it is reported loudly (a warning, and in `status`).
WEAK_DISCRIMINATOR = 0.55


class DiscriminatorSettings(BaseModel):
    """Stage-1 training settings. Defaults: what worked on the digits demo (docs/method.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    updates: int = Field(400, ge=1, description="D updates (each after a block of Langevin steps)")
    steps_per_update: int = Field(20, ge=1, description="Langevin steps of the chains between D updates")
    chains: int = Field(64, ge=2, description="persistent chains, spread over the target units")
    batch: int = Field(64, ge=2, description="D batch: half chain samples, half real images")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    lam: float = Field(0.5, ge=0, le=1, description="lambda used by the chains while D trains")
    reinit_every: int = Field(5, ge=1, description="re-initialise a layer's chains after this many blocks of steps")
    eval_chains: int = Field(64, ge=2, description="fresh chains for the held-out accuracy")
    eval_steps: int = Field(100, ge=1, description="Langevin steps of the fresh evaluation chains")
    arch: str = Field("auto", description="auto | small | residual")
    method: str = "ldam"
    sampler: dict[str, Any] = Field(default_factory=dict, description="options of the chains' update rule")
    seed: int = 0

    @model_validator(mode="after")
    def _method(self) -> "DiscriminatorSettings":
        if self.method not in D_TRAINING_METHODS:
            raise ValueError(f"method {self.method!r}: stage 1's chains run one of {', '.join(D_TRAINING_METHODS)}")
        return self


class PriorSettings(BaseModel):
    """Stage-1 training of ``walk``'s score prior (``train_score_prior``). Defaults: what made the
    prior's own walk hard to tell from real digits (docs/method.md, "A sharper prior")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(16000, ge=1, le=10_000_000, description="Adam steps of denoising score matching")
    hidden: int = Field(1024, ge=8, le=16384, description="width of the MLP's 3 hidden layers")
    components: int = Field(64, ge=1, le=4096, description="principal directions of the real images the walk moves in")
    batch: int = Field(256, ge=2, description="real images per step")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (cosine-annealed)")
    seed: int = 0
    max_images: int = Field(10_000, ge=32, description="at most this many of the training images (a random "
                            "subset, from the seed): the principal directions cost images^2 memory")


def default_snapshot_steps(steps: int, snapshot_every: int | None) -> list[int]:
    """t = k, 2k, ... and always the final step; default k gives 4 snapshots."""
    k = snapshot_every if snapshot_every is not None else max(1, steps // 4)
    if not isinstance(k, int) or k < 1:
        raise SamplerError(f"snapshot_every must be a positive integer, got {snapshot_every!r}")
    ts = list(range(k, steps + 1, k))
    if not ts or ts[-1] != steps:
        ts.append(steps)
    return ts
