"""Planning a sweep: everything is resolved and checked before any work starts.

What a job sweeps (layers, units, objectives), the store plan that fixes the store's shapes and
arrays, the identity that decides whether a store may be resumed, and the block tasks. The store
reads its plan from here; this module imports no store code and no torch.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ldam_sweep.errors import LdamError, SamplerError, SpecError, StoreError
from ldam_sweep.objectives import DEFAULT_BY_KIND, objective_for
from ldam_sweep.settings import default_snapshot_steps
from ldam_sweep.spec import AUTO_GRID_UNITS, JobSpec, parse_units

if TYPE_CHECKING:
    from ldam_sweep.model.handle import ModelHandle


@dataclass(frozen=True)
class ArraySpec:
    """One array of a layer as the store keeps it. The unit axis comes first and its storage grid
    (shard, else chunk) equals the block size, so a block is exactly one storage object."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    dims: tuple[str, ...]
    shards: tuple[int, ...] | None = None

    def block_key(self, block: int) -> str:
        """The storage key (relative to the array) of the one object holding ``block``."""
        return "c/" + "/".join([str(block)] + ["0"] * (len(self.shape) - 1))

    def block_shape(self, units: int) -> tuple[int, ...]:
        """Shape of a region of ``units`` units."""
        return (units, *self.shape[1:])


@dataclass(frozen=True)
class LayerPlan:
    """One layer as the sweep will store it."""

    name: str
    kind: str
    module_type: str
    units: int  # all units of the layer; the unit axis is indexed by unit id
    output_shape: tuple[int, ...]
    block_size: int
    objective: str
    selected: tuple[int, ...] | None = None  # None: every unit

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.units / self.block_size)

    def block_bounds(self, block: int) -> tuple[int, int]:
        if not 0 <= block < self.n_blocks:
            raise StoreError(f"block {block} is out of range for layer {self.name!r} (0..{self.n_blocks - 1})")
        lo = block * self.block_size
        return lo, min(lo + self.block_size, self.units)

    def block_units(self, block: int) -> list[int]:
        """The units of ``block`` that the sweep samples."""
        lo, hi = self.block_bounds(block)
        if self.selected is None:
            return list(range(lo, hi))
        return [u for u in self.selected if lo <= u < hi]

    def planned_blocks(self) -> list[int]:
        return [b for b in range(self.n_blocks) if self.block_units(b)]

    def planned_units(self) -> int:
        return self.units if self.selected is None else len(self.selected)

    def block_of(self, unit: int) -> int:
        return unit // self.block_size


# The order of a block's arrays (the block checksum hashes them in this order).
ARRAY_NAMES = ("samples", "activation", "realism", "exemplars", "exemplar_activation", "starts")


@dataclass(frozen=True)
class StorePlan:
    """Everything that fixes the store's shapes. Built by the driver from the job spec and model."""

    layers: tuple[LayerPlan, ...]
    chains: int
    steps: int
    snapshot_steps: tuple[int, ...]
    image_shape: tuple[int, int, int]
    value_range: tuple[float, float]
    realism: bool = False
    exemplars_k: int = 0
    model_name: str = ""
    model_fingerprint: str = ""
    spec: dict[str, Any] = field(default_factory=dict)  # the job spec as submitted
    starts: bool = False  # keep each chain's starting image (array ``starts``); stores made before it have none

    def layer(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise StoreError(f"layer {name!r} is not in this store; layers: {', '.join(lp.name for lp in self.layers)}")

    def arrays(self, layer: str | LayerPlan) -> dict[str, ArraySpec]:
        """The one description of a layer's arrays (in ``ARRAY_NAMES`` order): what the store
        creates, what a writer writes per block, what verify and readers read back."""
        lp = layer if isinstance(layer, LayerPlan) else self.layer(layer)
        b, ch, s, t = lp.block_size, self.chains, len(self.snapshot_steps), self.steps + 1
        image = tuple(self.image_shape)
        out = [ArraySpec("samples", (lp.units, ch, s, *image), "float16", chunks=(1, ch, s, *image),
                         shards=(b, ch, s, *image), dims=("unit", "chain", "snapshot", "c", "y", "x")),
               ArraySpec("activation", (lp.units, ch, t), "float32", chunks=(b, ch, t), dims=("unit", "chain", "step"))]
        if self.realism:
            out.append(ArraySpec("realism", (lp.units, ch, t), "float32", chunks=(b, ch, t), dims=("unit", "chain", "step")))
        if self.exemplars_k:
            k = self.exemplars_k
            out += [ArraySpec("exemplars", (lp.units, k, *image), "float16", chunks=(b, k, *image),
                              dims=("unit", "rank", "c", "y", "x")),
                    ArraySpec("exemplar_activation", (lp.units, k), "float32", chunks=(b, k), dims=("unit", "rank"))]
        if self.starts:
            out.append(ArraySpec("starts", (lp.units, ch, *image), "float16", chunks=(b, ch, *image),
                                 dims=("unit", "chain", "c", "y", "x")))
        return {a.name: a for a in out}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(lp) for lp in self.layers]
        if not self.starts:  # a plan without starts keeps the JSON (and plan_hash) of stores made before it
            del d["starts"]
        return json.loads(json.dumps(d))  # tuples -> lists, exactly as stored in zarr.json

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StorePlan":
        layers = tuple(
            LayerPlan(**{**lp, "output_shape": tuple(lp["output_shape"]),
                         "selected": None if lp["selected"] is None else tuple(lp["selected"])})
            for lp in d["layers"]
        )
        return cls(
            layers=layers, chains=d["chains"], steps=d["steps"], snapshot_steps=tuple(d["snapshot_steps"]),
            image_shape=tuple(d["image_shape"]), value_range=tuple(d["value_range"]),  # type: ignore[arg-type]
            realism=d["realism"], exemplars_k=d["exemplars_k"], model_name=d["model_name"],
            model_fingerprint=d["model_fingerprint"], spec=d["spec"], starts=bool(d.get("starts", False)),
        )

    def identity_spec(self) -> dict[str, Any]:
        """The spec without what may change between runs of one sweep: where the store is and
        how many actors / attempts / commits (the block size stays: it fixes the store's grid)."""
        spec = dict(self.spec)
        spec.pop("store", None)
        if isinstance(spec.get("resources"), dict):
            # block_size auto is a grid of 32 units: the same store as an explicit 32 (and as the
            # default before auto existed); how actors batch the blocks is not the sweep's identity
            spec["resources"] = {k: (AUTO_GRID_UNITS if v == "auto" else v)
                                 for k, v in spec["resources"].items() if k == "block_size"}
        if isinstance(spec.get("model"), dict):
            # the memory layout changes results by float rounding only, like running on other hardware
            # (which a resume allows); float32 is left out so specs written before the field existed
            # keep their identity. bf16 changes the method's numerics and stays in.
            model = {k: v for k, v in spec["model"].items() if k != "memory_format"}
            if model.get("precision") == "float32":
                model.pop("precision")
            spec["model"] = model
        return spec

    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity_spec(), sort_keys=True, default=str).encode()).hexdigest()

    def plan_hash(self) -> str:
        d = {**self.to_json(), "spec": json.loads(json.dumps(self.identity_spec(), default=str))}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


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
) -> StorePlan:
    """A StorePlan for ``model``: ``layers`` maps layer name -> selected units (None: all);
    ``objective`` is the job spec's ``objective:`` map (by layer kind or name)."""
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
        model_fingerprint=model.fingerprint, spec=dict(spec or {}), starts=starts,
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


def job_objectives(job: JobSpec, model: ModelHandle) -> dict[str, str]:
    """The objective of every layer the job sweeps."""
    targets = job_targets(job, model)
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
    """The store's shapes for this job and model (layer names, units, blocks, chains, steps)."""
    targets = job_targets(job, model)
    layers = {name: (None if len(units) == model.layer(name).units else units.tolist()) for name, units in targets}
    return plan_store(
        model, layers, chains=job.sampler.chains, steps=job.sampler.steps,
        snapshot_steps=default_snapshot_steps(job.sampler.steps, job.sampler.snapshot_every),
        block_size=job.resources.grid_units, realism=job.discriminator is not None,
        exemplars_k=job.exemplars if job.data is not None else 0,
        objective=job_objectives(job, model), spec=spec_doc, starts=True,
    )


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


def store_url(job: JobSpec, override: str | None) -> str:
    """--store, else the spec's store, else storage/<name>.zarr under the current directory."""
    return override or job.store or str(Path("storage") / f"{job.name}.zarr")


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


def identity_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 8) -> list[str]:
    """The fields that differ between two identity specs, as 'path: old -> new' (dotted paths into
    nested mappings; a missing field shows as 'unset'), at most ``limit`` of them."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict) or not d:
            return {prefix: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out

    a, b = flat(json.loads(json.dumps(old, default=str))), flat(json.loads(json.dumps(new, default=str)))
    missing = object()
    changes = [f"{k}: {'unset' if a.get(k, missing) is missing else json.dumps(a[k])} -> "
               f"{'unset' if b.get(k, missing) is missing else json.dumps(b[k])}"
               for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]
    return changes[:limit] + ([f"... and {len(changes) - limit} more"] if len(changes) > limit else [])
