"""Stage 1 of a sweep, shared by the CLI and the driver: the real data, the discriminator and
``walk``'s score prior a job spec asks for (trained on the spot, or loaded from a file), and their
records as the store keeps them."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ldam_sweep.data import real_images
from ldam_sweep.model.handle import ModelHandle
from ldam_sweep.planning import SweepPlan, resolve
from ldam_sweep.sampling.discriminator import (
    DiscriminatorSettings,
    TrainedDiscriminator,
    load_discriminator,
    train_discriminator,
)
from ldam_sweep.sampling.prior import ScorePrior, load_score_prior, train_score_prior
from ldam_sweep.settings import PriorSettings
from ldam_sweep.spec import JobSpec


def job_discriminator(
    job: JobSpec, model: ModelHandle, *, progress: bool | Callable[[int, dict], None] | None = None,
    plan: SweepPlan | None = None, loaded: TrainedDiscriminator | None = None, train: Any = None,
) -> TrainedDiscriminator | None:
    """The job's discriminator: None, loaded from ``discriminator.file``, or trained (stage 1).
    ``plan``: the sweep's (its targets and objectives; else resolved here); ``loaded``: the file's
    discriminator already loaded, ``train``: the real training images already loaded (the driver's
    checks loaded them before any store existed)."""
    if job.discriminator is None:
        return None
    if job.discriminator.file is not None:
        return loaded if loaded is not None else load_discriminator(job.discriminator.file, model)
    assert job.data is not None  # the spec validator guarantees it
    plan = plan if plan is not None else resolve(job, model)
    settings = DiscriminatorSettings(**(job.discriminator.train or {}))
    train = real_images(job.data, model.input, "train") if train is None else train
    heldout = real_images(job.data, model.input, "test")
    return train_discriminator(model, list(plan.targets), train, heldout, settings, progress=progress,
                               objectives=plan.objectives)


def discriminator_record(trained: TrainedDiscriminator) -> dict[str, Any]:
    """The training record the store keeps beside the discriminator's bytes (``discriminator/`` attrs)."""
    return {
        "config": trained.module.config, "settings": trained.settings, "log": trained.log,
        "heldout_accuracy": trained.heldout_accuracy, "heldout_real_accuracy": trained.heldout_real_accuracy,
        "heldout_fake_accuracy": trained.heldout_fake_accuracy, "model_fingerprint": trained.model_fingerprint,
        "seconds": trained.seconds, "digest": trained.digest(),
    }


def job_prior(job: JobSpec, model: ModelHandle, *, loaded: ScorePrior | None = None, train: Any = None,
              device: Any = "cpu") -> ScorePrior | None:
    """The job's score prior (``method: walk``): None, loaded from ``prior.file``, or trained on the
    data section's training images on ``device`` (stage 1). ``loaded`` / ``train``: as for ``job_discriminator``."""
    if job.prior is None:
        return None
    if job.prior.file is not None:
        return loaded if loaded is not None else load_score_prior(job.prior.file)
    assert job.data is not None  # the spec validator guarantees it
    settings = PriorSettings(**(job.prior.train or {}))
    train = real_images(job.data, model.input, "train") if train is None else train
    if len(train) > settings.max_images:  # a random subset, from the seed
        keep = np.sort(np.random.default_rng(settings.seed).choice(len(train), settings.max_images, replace=False))
        train = train[keep]
    return train_score_prior(train, box=tuple(map(float, model.input.range)), device=device,  # type: ignore[arg-type]
                             **settings.model_dump(exclude={"max_images"}))


def prior_record(prior: ScorePrior) -> dict[str, Any]:
    """The record the store keeps beside the score prior's bytes (``prior/`` attrs)."""
    return {"config": prior.config(), "training": dict(prior.record), "digest": prior.digest(),
            "seconds": float(prior.record.get("seconds", 0.0))}


def prior_line(info: dict[str, Any] | None) -> str:
    """A stored score prior's record in a few words (stage 1's log, ``status``)."""
    t = (info or {}).get("training") or {}
    digest = str((info or {}).get("digest"))[:12]
    if not t:
        return f"digest {digest}, loaded from a file"
    return (f"{t.get('images')} images, {t.get('components')} components, {t.get('steps')} steps, final loss "
            f"{t.get('final_loss', float('nan')):.3f}, {t.get('seconds', 0):.0f}s to train; digest {digest}")
