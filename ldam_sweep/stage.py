"""Stage 1 of a sweep, shared by the CLI and the driver: the real data and the discriminator a job
spec asks for (trained on the spot, or loaded from a file), and its record as the store keeps it."""

from __future__ import annotations

from typing import Any, Callable

from ldam_sweep.data import real_images
from ldam_sweep.model.handle import ModelHandle
from ldam_sweep.planning import SweepPlan, resolve
from ldam_sweep.sampling.discriminator import (
    DiscriminatorSettings,
    TrainedDiscriminator,
    load_discriminator,
    train_discriminator,
)
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
