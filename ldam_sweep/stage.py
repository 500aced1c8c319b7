"""Stage 1 of a sweep, shared by the CLI and the driver: the real data and the discriminator a job
spec asks for (trained on the spot, or loaded from a file)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ldam_sweep.data import real_images
from ldam_sweep.model.handle import ModelHandle
from ldam_sweep.sampling.discriminator import (
    DiscriminatorSettings,
    TrainedDiscriminator,
    load_discriminator,
    train_discriminator,
)
from ldam_sweep.spec import JobSpec, parse_units


def job_targets(job: JobSpec, model: ModelHandle) -> list[tuple[str, np.ndarray]]:
    """(layer, selected units) for every layer the job sweeps, checked against the model."""
    names = [layer.name for layer in model.layers] if job.layers == "all" else [model.layer(n).name for n in job.layers]
    for key in job.units:
        if model.layer(key).name not in names:
            from ldam_sweep.errors import SpecError

            raise SpecError(f"units.{key}: layer {key!r} is not among the swept layers ({', '.join(names)})")
    by_canonical = {model.layer(k).name: v for k, v in job.units.items()}
    out = []
    for name in names:
        sel = parse_units(by_canonical.get(name, "all"), where=f"units.{name}")
        units = np.arange(model.layer(name).units) if sel is None else model.check_units(name, sel)
        out.append((name, units))
    return out


def job_discriminator(
    job: JobSpec, model: ModelHandle, *, progress: Callable[[int, dict], None] | None = None
) -> TrainedDiscriminator | None:
    """The job's discriminator: None, loaded from ``discriminator.file``, or trained (stage 1)."""
    if job.discriminator is None:
        return None
    if job.discriminator.file is not None:
        return load_discriminator(job.discriminator.file, model)
    assert job.data is not None  # the spec validator guarantees it
    settings = DiscriminatorSettings(**(job.discriminator.train or {}))
    train = real_images(job.data, model.input, "train")
    heldout = real_images(job.data, model.input, "test")
    conv = job.objective.get("conv")
    objectives = {layer.name: conv for layer in model.layers if layer.kind == "conv" and conv}
    return train_discriminator(model, job_targets(job, model), train, heldout, settings, progress=progress,
                               objectives=objectives)
