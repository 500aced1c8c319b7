"""The store's layout: what the driver creates once, up front, before any block is written.

    <store>/zarr.json                     root attrs: spec as submitted, spec hash, plan, model
                                          fingerprint, package versions, created_at
    <store>/layers/<layer>/samples        (unit, chain, snapshot, C, H, W) float16, NaN fill;
                                          shard = one block of units, inner chunk = one unit
    <store>/layers/<layer>/activation     (unit, chain, step) float32, NaN fill; chunk = one block
    <store>/layers/<layer>/realism        same, when a discriminator is used
    <store>/layers/<layer>/exemplars      (unit, k, C, H, W) float16 + exemplar_activation (unit, k)
    <store>/discriminator/                the frozen discriminator (weights, log, accuracy)
    <store>/manifest/layer=<layer>/part-*.parquet   the commit log (see manifest.py)

Every array's grid on the unit axis equals the layer's block size, so a block is exactly one
storage object per array: writers of different blocks never share an object.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any

import numpy as np
import zarr

from ldam_sweep.errors import LdamError
from ldam_sweep.store.location import StoreLocation, encode_name

SCHEMA_VERSION = 1
FORMAT_NAME = "ldam-sweep"


class StoreError(LdamError):
    """A store cannot be created, written or read as asked (not a store, other spec, missing unit)."""


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
            spec["resources"] = {k: v for k, v in spec["resources"].items() if k == "block_size"}
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


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in ("ldam-sweep", "torch", "zarr", "pyarrow", "numpy", "ray"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def layer_path(name: str) -> str:
    return f"layers/{encode_name(name)}"


def create_store(url: str, plan: StorePlan, *, fresh: bool = False, storage_options: dict | None = None) -> StoreLocation:
    """Create every group and array with final shapes (driver only; idempotent for the same plan).

    An existing store made from another plan is refused with a message saying how to proceed;
    it is deleted only when ``fresh=True``.
    """
    loc = StoreLocation.parse(url, storage_options)
    fs = loc.fs
    root_meta = loc.join("zarr.json")
    if fs.exists(root_meta):
        attrs = _read_root_attrs(loc)
        same = attrs.get("plan_hash") == plan.plan_hash()
        ours = attrs.get("format") == FORMAT_NAME or "plan_hash" in attrs
        if not ours:
            raise StoreError(f"{loc.url!r} is a Zarr group but not an ldam-sweep store; nothing was changed "
                             "(--fresh only ever deletes ldam-sweep stores). Choose another path.")
        if fresh:
            fs.rm(loc.root, recursive=True)
        elif same and attrs.get("format") == FORMAT_NAME:
            return loc
        elif same:
            pass  # our own creation, interrupted before it finished: nothing was committed, redo it
        else:
            raise StoreError(
                f"store {loc.url!r} was created from a different spec or model "
                f"(spec hash {str(attrs.get('spec_hash'))[:12]} vs {plan.spec_hash()[:12]}, "
                f"model {str(attrs.get('model', {}).get('fingerprint'))[:12]} vs {plan.model_fingerprint[:12]}). "
                "Nothing was changed. Use another store path, or pass --fresh to delete it and start over."
            )
    elif fs.exists(loc.root) and fs.ls(loc.root):
        raise StoreError(f"{loc.url!r} exists and is not empty, but is not an ldam-sweep store; nothing was changed "
                         "(--fresh only ever deletes ldam-sweep stores). Choose another path.")
    # The format marker is written last, in one atomic zarr.json write: a reader that sees it sees
    # every group and array already in place.
    root = zarr.open_group(loc.zarr_store(read_only=False), mode="w", attributes={
        "schema_version": SCHEMA_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "spec": plan.spec,
        "spec_hash": plan.spec_hash(),
        "plan": plan.to_json(),
        "plan_hash": plan.plan_hash(),
        "model": {"name": plan.model_name, "fingerprint": plan.model_fingerprint},
        "versions": package_versions(),
    })
    layers = root.create_group("layers")
    c, h, w = plan.image_shape
    s, ch, t = len(plan.snapshot_steps), plan.chains, plan.steps + 1
    for lp in plan.layers:
        g = layers.create_group(encode_name(lp.name), attributes={
            "name": lp.name, "kind": lp.kind, "module_type": lp.module_type, "units": lp.units,
            "output_shape": list(lp.output_shape), "block_size": lp.block_size, "objective": lp.objective,
            "snapshot_steps": list(plan.snapshot_steps), "value_range": list(plan.value_range),
        })
        b = lp.block_size
        g.create_array("samples", shape=(lp.units, ch, s, c, h, w), dtype="float16",
                       shards=(b, ch, s, c, h, w), chunks=(1, ch, s, c, h, w), fill_value=np.nan,
                       dimension_names=["unit", "chain", "snapshot", "c", "y", "x"])
        trace_kw = dict(shape=(lp.units, ch, t), dtype="float32", chunks=(b, ch, t), fill_value=np.nan,
                        dimension_names=["unit", "chain", "step"])
        g.create_array("activation", **trace_kw)
        if plan.realism:
            g.create_array("realism", **trace_kw)
        if plan.exemplars_k:
            k = plan.exemplars_k
            g.create_array("exemplars", shape=(lp.units, k, c, h, w), dtype="float16", chunks=(b, k, c, h, w),
                           fill_value=np.nan, dimension_names=["unit", "rank", "c", "y", "x"])
            g.create_array("exemplar_activation", shape=(lp.units, k), dtype="float32", chunks=(b, k),
                           fill_value=np.nan, dimension_names=["unit", "rank"])
    root.attrs.update({"format": FORMAT_NAME})
    return loc


def _read_root_attrs(loc: StoreLocation) -> dict[str, Any]:
    try:
        return dict(loc.open_group(mode="r").attrs)
    except Exception as err:
        raise StoreError(f"{loc.url!r} has a zarr.json but cannot be opened as a Zarr group: {err}") from None


def plan_store(
    model: Any,
    layers: dict[str, list[int] | None],
    *,
    chains: int,
    steps: int,
    snapshot_steps: list[int],
    block_size: int,
    realism: bool = False,
    exemplars_k: int = 0,
    objectives: dict[str, str] | None = None,
    spec: dict[str, Any] | None = None,
) -> StorePlan:
    """A StorePlan for ``model`` (a ModelHandle): ``layers`` maps layer name -> selected units (None: all)."""
    plans = []
    for name, selected in layers.items():
        info = model.layer(name)
        sel = None if selected is None else tuple(int(u) for u in model.check_units(info.name, selected))
        plans.append(LayerPlan(
            name=info.name, kind=info.kind, module_type=info.module_type, units=info.units,
            output_shape=tuple(info.output_shape), block_size=int(min(block_size, info.units)),
            objective=(objectives or {}).get(info.name, info.default_objective), selected=sel,
        ))
    return StorePlan(
        layers=tuple(plans), chains=chains, steps=steps, snapshot_steps=tuple(snapshot_steps),
        image_shape=tuple(model.input.shape), value_range=tuple(model.input.range),  # type: ignore[arg-type]
        realism=realism, exemplars_k=exemplars_k, model_name=model.name,
        model_fingerprint=model.fingerprint, spec=dict(spec or {}),
    )


def write_discriminator(url: str | StoreLocation, trained: Any) -> None:
    """Keep the frozen discriminator in the store (driver only, once): the saved file's bytes as a
    uint8 array ``discriminator/file`` (load it with ``load_discriminator``), and its training
    record as attrs of ``discriminator/`` (settings, per-update log, held-out accuracy)."""
    loc = url if isinstance(url, StoreLocation) else StoreLocation.parse(url)
    root = loc.open_group(mode="r+")
    blob = np.frombuffer(trained.to_bytes(), dtype=np.uint8)
    if "discriminator" in root:
        del root["discriminator"]
    g = root.create_group("discriminator", attributes={
        "config": trained.module.config, "settings": trained.settings, "log": trained.log,
        "heldout_accuracy": trained.heldout_accuracy, "heldout_real_accuracy": trained.heldout_real_accuracy,
        "heldout_fake_accuracy": trained.heldout_fake_accuracy, "model_fingerprint": trained.model_fingerprint,
        "seconds": trained.seconds, "digest": trained.digest(),
    })
    arr = g.create_array("file", shape=blob.shape, dtype="uint8", chunks=blob.shape)
    arr[:] = blob
