"""Planning a sweep from a job spec: everything is resolved and checked before any work starts."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldam_sweep.model.handle import ModelHandle
from ldam_sweep.settings import default_snapshot_steps
from ldam_sweep.spec import JobSpec
from ldam_sweep.stage import job_targets
from ldam_sweep.store.layout import StoreError, StorePlan, plan_store
from ldam_sweep.store.location import StoreLocation


@dataclass(frozen=True)
class BlockTask:
    """One unit of work: a block of units of one layer, run as one batch by one actor."""

    layer: str
    block: int
    units: tuple[int, ...]

    @property
    def key(self) -> tuple[str, int]:
        return (self.layer, self.block)


def store_url(job: JobSpec, override: str | None) -> str:
    """--store, else the spec's store, else storage/<name>.zarr under the current directory."""
    return override or job.store or str(Path("storage") / f"{job.name}.zarr")


def check_writable(url: str) -> None:
    """Fail before any work when the store cannot be written (local paths: the nearest existing
    parent must be a writable directory)."""
    loc = StoreLocation.parse(url)
    if not loc.is_local:
        return
    p = Path(loc.url)
    while not p.exists():
        p = p.parent
    try:
        if not p.is_dir():
            raise NotADirectoryError(f"{str(p)!r} is not a directory")
        with tempfile.TemporaryFile(dir=p):  # a real write: os.access says yes to root on /proc
            pass
    except OSError as err:
        raise StoreError(f"store {url!r} is not writable: cannot create files in {str(p)!r} ({err})") from None


def sweep_store_plan(job: JobSpec, model: ModelHandle, spec_doc: dict[str, Any]) -> StorePlan:
    """The store's shapes for this job and model (layer names, units, blocks, chains, steps)."""
    targets = job_targets(job, model)
    layers = {name: (None if len(units) == model.layer(name).units else units.tolist()) for name, units in targets}
    objectives = {name: job.objective.get("conv", "channel") for name, _ in targets if model.layer(name).kind == "conv"}
    return plan_store(
        model, layers, chains=job.sampler.chains, steps=job.sampler.steps,
        snapshot_steps=default_snapshot_steps(job.sampler.steps, job.sampler.snapshot_every),
        block_size=job.resources.block_size, realism=job.discriminator is not None,
        exemplars_k=job.exemplars if job.data is not None else 0,
        objectives=objectives, spec=spec_doc,
    )


def block_tasks(plan: StorePlan) -> list[BlockTask]:
    return [BlockTask(lp.name, b, tuple(lp.block_units(b))) for lp in plan.layers for b in lp.planned_blocks()]
