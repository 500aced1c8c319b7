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

from ldam_sweep.errors import SpecError, StoreError
from ldam_sweep.objectives import objective_for
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
ARRAY_NAMES = ("samples", "activation", "realism", "exemplars", "exemplar_activation")


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
        return {a.name: a for a in out}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(lp) for lp in self.layers]
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
            model_fingerprint=d["model_fingerprint"], spec=d["spec"],
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
            objective=objective_for(info.name, info.kind, objective), selected=sel,
        ))
    return StorePlan(
        layers=tuple(plans), chains=chains, steps=steps, snapshot_steps=tuple(snapshot_steps),
        image_shape=tuple(model.input.shape), value_range=tuple(model.input.range),  # type: ignore[arg-type]
        realism=realism, exemplars_k=exemplars_k, model_name=model.name,
        model_fingerprint=model.fingerprint, spec=dict(spec or {}),
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
        sel = parse_units(by_canonical.get(name, "all"), where=f"units.{name}")
        units = np.arange(model.layer(name).units) if sel is None else model.check_units(name, sel)
        out.append((name, units))
    return out


def job_objectives(job: JobSpec, model: ModelHandle) -> dict[str, str]:
    """The objective of every layer the job sweeps."""
    return {name: objective_for(name, model.layer(name).kind, job.objective) for name, _ in job_targets(job, model)}


def sweep_store_plan(job: JobSpec, model: ModelHandle, spec_doc: dict[str, Any]) -> StorePlan:
    """The store's shapes for this job and model (layer names, units, blocks, chains, steps)."""
    targets = job_targets(job, model)
    layers = {name: (None if len(units) == model.layer(name).units else units.tolist()) for name, units in targets}
    return plan_store(
        model, layers, chains=job.sampler.chains, steps=job.sampler.steps,
        snapshot_steps=default_snapshot_steps(job.sampler.steps, job.sampler.snapshot_every),
        block_size=job.resources.grid_units, realism=job.discriminator is not None,
        exemplars_k=job.exemplars if job.data is not None else 0,
        objective=job.objective, spec=spec_doc,
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
