"""Planning a sweep: everything is resolved and checked before any work starts.

``resolve(job, model)`` makes the one ``SweepPlan`` a sweep runs by: what it sweeps (layers,
units, objectives), the store plan that fixes the store's shapes and arrays (``store.schema``),
the sampler's settings parsed once for the store's sampler revision, and the block tasks. The
driver, stage 1 and the workers all use that object; none derives it again. Also here: packing
blocks into batches and the memory estimate of a block. No torch is imported here.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ldam_sweep.errors import LdamError, SamplerError, SpecError
from ldam_sweep.objectives import DEFAULT_BY_KIND, objective_for
from ldam_sweep.settings import LADDER_STEPS, SAMPLER_DEFAULTS, default_snapshot_steps, parse_options, revision_options
from ldam_sweep.spec import JobSpec, SamplerSpec, StoreSpec, parse_units
from ldam_sweep.store.schema import LayerPlan, StorePlan, thumbnail_factor

if TYPE_CHECKING:
    from ldam_sweep.model.handle import ModelHandle


def plan_store(
    model: ModelHandle,
    layers: dict[str, list[int] | None],
    *,
    chains: int,
    steps: int,
    snapshot_steps: list[int],
    block_size: int,
    realism: bool = False,
    exemplars_k: int = 0,
    objective: Mapping[str, str] | None = None,
    spec: dict[str, Any] | None = None,
    starts: bool = False,
    storage: StoreSpec | None = None,
    ladder: tuple[float, ...] = (),
) -> StorePlan:
    """A StorePlan for ``model``: ``layers`` maps layer name -> selected units (None: all);
    ``objective`` is the job spec's ``objective:`` map (by layer kind or name); ``storage`` the
    job's ``store:`` section (None: the format of stores made before it, float16 at full size)."""
    plans = []
    for name, selected in layers.items():
        info = model.layer(name)
        sel = None if selected is None else tuple(int(u) for u in model.check_units(info.name, selected))
        plans.append(LayerPlan(
            name=info.name, kind=info.kind, module_type=info.module_type, units=info.units,
            output_shape=tuple(info.output_shape), block_size=int(min(block_size, info.units)),
            objective=objective_for(info.name, info.kind, objective, info.geometry), selected=sel,
        ))
    return StorePlan(
        layers=tuple(plans), chains=chains, steps=steps, snapshot_steps=tuple(snapshot_steps),
        image_shape=tuple(model.input.shape), value_range=tuple(model.input.range),  # type: ignore[arg-type]
        realism=realism, exemplars_k=exemplars_k, model_name=model.name,
        model_fingerprint=model.fingerprint, spec=dict(spec or {}), starts=starts, ladder=tuple(float(f) for f in ladder),
        **({} if storage is None else {
            "pixels": storage.pixels, "thumbnail": thumbnail_factor(model.input.shape, storage.snapshot_px),
            "zstd_level": storage.zstd_level}),
    )


def job_targets(job: JobSpec, model: ModelHandle) -> list[tuple[str, np.ndarray]]:
    """(layer, selected units) for every layer the job sweeps, checked against the model."""
    names = [layer.name for layer in model.layers] if job.layers == "all" else [model.layer(n).name for n in job.layers]
    for key in job.units:
        if model.layer(key).name not in names:
            raise SpecError(f"units.{key}: layer {key!r} is not among the swept layers ({', '.join(names)})")
    by_canonical = {model.layer(k).name: v for k, v in job.units.items()}
    out = []
    for name in names:
        sel = parse_units(by_canonical.get(name, "all"), where=f"units.{name}", layer=name,
                          units=model.layer(name).units)
        units = np.arange(model.layer(name).units) if sel is None else model.check_units(name, sel)
        out.append((name, units))
    return out


def job_objectives(job: JobSpec, model: ModelHandle,
                   targets: list[tuple[str, np.ndarray]] | None = None) -> dict[str, str]:
    """The objective of every layer the job sweeps (``targets``: ``job_targets``' when known)."""
    targets = job_targets(job, model) if targets is None else targets
    swept = {name for name, _ in targets}
    requested = dict(job.objective)  # kinds as given; layer names (aliases too) under the layer's name
    for key, objective in job.objective.items():
        if key in DEFAULT_BY_KIND:
            continue
        try:
            name = model.layer(key).name
        except LdamError as err:
            raise SpecError(f"objective.{key}: {err}") from None
        if name not in swept:
            raise SpecError(f"objective.{key}: layer {key!r} is not among the swept layers")
        requested[name] = objective
    out = {}
    for name, _ in targets:
        info = model.layer(name)
        try:
            out[name] = objective_for(name, info.kind, requested, info.geometry)
        except SamplerError as err:
            raise SpecError(f"objective: {err}") from None
    return out


def sweep_store_plan(job: JobSpec, model: ModelHandle, spec_doc: dict[str, Any]) -> StorePlan:
    """The store's shapes for this job and model (``resolve(...).store``)."""
    return resolve(job, model, spec_doc).store


@dataclass(frozen=True)
class SamplerPlan:
    """The sampler as a sweep's workers run it, parsed once: the job's settings over the defaults of
    the store's sampler ``revision`` (a store resumes with the sampler it was made with)."""

    method: str
    chains: int
    steps: int
    seed: int
    lam: float
    snapshot_every: int | None
    init: str
    options: Any  # settings.LdamOptions | SgldOptions | AmOptions
    revision: int
    ladder_steps: int = LADDER_STEPS  # steps per rung; which rungs: the store plan's ``ladder``

    @classmethod
    def of(cls, spec: SamplerSpec, revision: int = SAMPLER_DEFAULTS) -> "SamplerPlan":
        options, init = spec.options, spec.init or "auto"
        if spec.method == "ldam":
            options = {**revision_options(revision), **options}
            init = spec.init or ("uniform" if revision <= 1 else "auto")
        return cls(spec.method, spec.chains, spec.steps, spec.seed, spec.lam, spec.snapshot_every, init,
                   parse_options(spec.method, options), revision, spec.ladder_steps or LADDER_STEPS)

    @property
    def starts_from_exemplars(self) -> bool:
        """``ldam`` from revision 2 on, and ``walk``, start each chain from its unit's real exemplars and
        take their targets from them."""
        return self.method == "walk" or (self.method == "ldam" and self.revision >= 2)

    def kwargs(self) -> dict[str, Any]:
        """``sample()``'s keyword arguments for these settings (the options already parsed)."""
        return dict(chains=self.chains, steps=self.steps, method=self.method, seed=self.seed, lam=self.lam,
                    snapshot_every=self.snapshot_every, init=self.init, options=self.options,
                    ladder_steps=self.ladder_steps)


@dataclass(frozen=True)
class SweepPlan:
    """Everything a sweep derives from its job spec and model, made once by ``resolve``."""

    job: JobSpec
    doc: dict[str, Any]  # the spec as JSON (the store keeps it)
    targets: tuple[tuple[str, np.ndarray], ...]  # (layer, selected units), in sweep order
    objectives: dict[str, str]  # layer -> objective
    store: StorePlan
    sampler: SamplerPlan

    @property
    def tasks(self) -> list["BlockTask"]:
        """The (layer, block) tasks, in sweep order."""
        return block_tasks(self.store)

    def with_store(self, store: StorePlan) -> "SweepPlan":
        """This plan writing into a store made from ``store`` (e.g. one made before chain starts were kept)."""
        return dataclasses.replace(self, store=store)

    def with_revision(self, revision: int) -> "SweepPlan":
        """This plan with the sampler defaults of a store of sampler ``revision``."""
        return self if revision == self.sampler.revision else dataclasses.replace(
            self, sampler=SamplerPlan.of(self.job.sampler, revision))


def resolve(job: JobSpec, model: ModelHandle, doc: dict[str, Any] | None = None) -> SweepPlan:
    """The sweep's plan: the job's targets and objectives against ``model`` (checked: SpecError),
    the store plan and the sampler's settings (today's sampler revision; ``with_revision`` for a
    store made with another). ``doc``: the spec's JSON (default: the job's)."""
    doc = job.model_dump(mode="json", exclude_none=True) if doc is None else doc
    targets = job_targets(job, model)
    objectives = job_objectives(job, model, targets)
    layers = {name: (None if len(units) == model.layer(name).units else units.tolist()) for name, units in targets}
    if job.sampler.ladder and job.data is None:
        raise SpecError("sampler.ladder: the activation ladder climbs to multiples of each unit's best real activation, "
                        "so it needs data: (the real images its exemplars come from); remove ladder or add data")
    store = plan_store(
        model, layers, chains=job.sampler.chains, steps=job.sampler.steps,
        snapshot_steps=default_snapshot_steps(job.sampler.steps, job.sampler.snapshot_every),
        block_size=job.resources.grid_units, realism=job.discriminator is not None,
        exemplars_k=job.exemplars if job.data is not None else 0,
        objective=objectives, spec=doc, starts=True, storage=job.store, ladder=tuple(job.sampler.ladder or ()),
    )
    return SweepPlan(job, doc, tuple(targets), objectives, store, SamplerPlan.of(job.sampler))


@dataclass(frozen=True)
class BlockTask:
    """One unit of work: a block of units of one layer, run as one batch by one actor."""

    layer: str
    block: int
    units: tuple[int, ...]

    @property
    def key(self) -> tuple[str, int]:
        return (self.layer, self.block)


def block_tasks(plan: StorePlan) -> list[BlockTask]:
    return [BlockTask(lp.name, b, tuple(lp.block_units(b))) for lp in plan.layers for b in lp.planned_blocks()]


def pack_batch(queue: collections.deque[BlockTask], batch_units: int) -> list[BlockTask]:
    """Take the next batch off the front of ``queue``: its first task and the following tasks of
    the same layer while their units fit in ``batch_units`` (always at least one task)."""
    batch = [queue.popleft()]
    size = len(batch[0].units)
    while queue and queue[0].layer == batch[0].layer and size + len(queue[0].units) <= batch_units:
        size += len(queue[0].units)
        batch.append(queue.popleft())
    return batch


@dataclass(frozen=True)
class BlockMemory:
    """Estimated memory of the largest block of a sweep, in bytes (``block_memory``)."""

    layer: str
    units: int
    host_bytes: int  # what the worker holds for one block: samples, traces, activations
    device_bytes: int  # what the batch needs on the model's device (an estimate, see block_memory)
    parts: dict[str, int]  # host_bytes by what it holds

    def largest_part(self) -> str:
        return max(self.parts, key=lambda k: self.parts[k])


def physical_memory_bytes() -> int | None:
    """This machine's physical memory (POSIX sysconf), or None where it cannot be asked."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


# One chain's image on the device is held about this many times during a step: the state, its
# gradient, the update's momentum and RMS buffers, the noise, the normalised copy the model sees.
DEVICE_IMAGE_COPIES = 6
# The target layer's output per chain is held for the forward and its gradient; the layers before
# it keep their activations for the backward: counted as this many copies of the target's output.
DEVICE_ACTIVATION_COPIES = 4


def block_memory(plan: StorePlan) -> BlockMemory:
    """Memory of the sweep's largest block (one batch of block_size units x chains images).

    Host (per worker): the block's float32 samples (units x chains x snapshots x C x H x W), its
    activation (and realism) traces (units x chains x (steps + 1)), and the target layer's
    activations of every chain (units x chains x layer output size), all float32. Device: the batch
    of images x DEVICE_IMAGE_COPIES plus the target layer's output x DEVICE_ACTIVATION_COPIES,
    float32: a rough guide (a deep model's earlier layers can need more), not a measurement."""
    image = int(np.prod(plan.image_shape))
    best: BlockMemory | None = None
    for lp in plan.layers:
        units = max((len(lp.block_units(b)) for b in lp.planned_blocks()), default=0)
        chains = units * plan.chains
        out_size = int(np.prod(lp.output_shape))
        parts = {
            "samples": 4 * chains * len(plan.snapshot_steps) * image,
            "traces": 4 * chains * (plan.steps + 1) * (2 if plan.realism else 1),
            "activations": 4 * chains * out_size,
        }
        device = 4 * chains * (DEVICE_IMAGE_COPIES * image + DEVICE_ACTIVATION_COPIES * out_size)
        est = BlockMemory(lp.name, units, sum(parts.values()), device, parts)
        if best is None or est.host_bytes > best.host_bytes:
            best = est
    assert best is not None, "a store plan has at least one layer"
    return best


# What to lower for each part of a block's memory (the settings that scale it).
MEMORY_SETTINGS = {
    "samples": "sampler.chains, resources.block_size, or take fewer snapshots (raise sampler.snapshot_every)",
    "traces": "sampler.steps, sampler.chains or resources.block_size",
    "activations": "sampler.chains or resources.block_size",
}


def check_block_memory(plan: StorePlan, limit_bytes: int | None = None) -> BlockMemory:
    """Refuse (SpecError) a sweep whose largest block cannot fit in memory: host memory per block
    must stay under half of this machine's physical memory (``limit_bytes`` overrides), which
    leaves room for the model, the driver and a second block in flight."""
    est = block_memory(plan)
    if limit_bytes is None:
        physical = physical_memory_bytes()
        if physical is None:
            return est
        limit_bytes = physical // 2
    if est.host_bytes > limit_bytes:
        part = est.largest_part()
        gib = 1024 ** 3
        raise SpecError(
            f"one block of layer {est.layer!r} ({est.units} units x {plan.chains} chains, {plan.steps} steps) needs "
            f"~{est.host_bytes / gib:.1f} GiB of memory (the largest part, {part}: {est.parts[part] / gib:.1f} GiB), "
            f"over the limit of {limit_bytes / gib:.1f} GiB (half of this machine's memory); lower {MEMORY_SETTINGS[part]}")
    return est
