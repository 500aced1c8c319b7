"""The store's schema, in one place: what a store holds and how every reader and writer names it.

- ``StorePlan`` / ``LayerPlan`` / ``ArraySpec``: the arrays of each layer (shapes, dtypes, storage
  grid; ``ARRAY_NAMES`` order), the plan's JSON as ``zarr.json`` keeps it, and the sweep's identity
  (``spec_hash``, ``plan_hash``) that decides whether a store may be resumed;
- ``FILE_SCHEMA`` / ``SCHEMA``: the manifest's columns (one row per unit and attempt);
- the row builders: ``block_rows`` (ok / dead), ``failed_rows``, ``tombstone_rows`` (corrupt), and
  ``stamp_generation``, the one place rows get the store's generation;
- how columns are shown: ``SCORE_LABELS`` (the atlas's names for scores), ``QUERY_COLUMNS`` (what
  ``ldam-sweep query`` shows by default), ``display_label`` (the label a unit is listed by).

It imports no torch and nothing above the store; ``planning`` builds plans from a job spec and model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
import pyarrow as pa

from ldam_sweep.errors import StoreError
from ldam_sweep.spec import AUTO_GRID_UNITS
from ldam_sweep.version import __version__

# 8-bit images carry numcodecs' delta filter, which zarr-python reads and writes but the Zarr v3
# specification does not name: zarr warns at every opening of such an array. Said once, in docs/architecture.md.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

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
    zstd_level: int | None = None  # None: zarr's default codecs (every array of a store made before ``store:``)

    @property
    def fill_value(self) -> Any:
        """What an unwritten region reads as: NaN for floats, 0 for 8-bit pixels, -1 for indices."""
        kind = np.dtype(self.dtype).kind
        return np.nan if kind == "f" else 0 if kind == "u" else -1

    def codecs(self) -> dict[str, Any]:
        """``create_array``'s codec arguments: nothing (zarr's defaults) unless the plan chose a zstd
        level; then zstd at that level, after a byte delta along each row for 8-bit pixels (what a PNG's
        Sub filter does: neighbouring pixels are alike, so the differences compress ~2x better)."""
        if self.zstd_level is None:
            return {}
        from zarr.codecs import ZstdCodec

        out: dict[str, Any] = {"compressors": [ZstdCodec(level=self.zstd_level)]}
        if np.dtype(self.dtype) == np.uint8 and "x" in self.dims:
            from zarr.codecs.numcodecs import Delta

            out["filters"] = [Delta(dtype="uint8")]
        return out

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


# The order of a block's arrays (the block checksum hashes them in this order; later arrays last).
ARRAY_NAMES = ("samples", "activation", "realism", "exemplars", "exemplar_activation", "starts", "finals", "rungs",
               "rung_activation", "rung_realism")
PIXEL_ARRAYS = ("samples", "exemplars", "starts", "finals", "rungs")  # images, in the plan's ``pixels`` type


def thumbnail_factor(image_shape: Sequence[int], snapshot_size: int | None) -> int:
    """The integer factor by which snapshots are shrunk so their longer side is at most
    ``snapshot_size`` px (None: full size, factor 1). An image already that small stays full size."""
    if snapshot_size is None:
        return 1
    return max(1, math.ceil(max(image_shape[-2:]) / snapshot_size))


def encode_pixels(x: np.ndarray, dtype: str, value_range: Sequence[float]) -> np.ndarray:
    """Images as the store keeps them: 8-bit as round(255 (x - lo) / (hi - lo)), clipped to 0..255,
    NaN as 0 (at most half a step, (hi - lo) / 510, from the value); floats as they are."""
    if np.dtype(dtype) != np.uint8:
        return np.asarray(x).astype(dtype, copy=False)
    lo, hi = float(value_range[0]), float(value_range[1])
    y = np.array(x, dtype=np.float32)  # one copy, then in place: a block of 224-px images is ~100M values
    if lo:
        y -= np.float32(lo)
    y *= np.float32(255.0 / (hi - lo))
    np.rint(y, out=y)
    np.fmax(y, 0, out=y)  # fmax/fmin return the number where the other is NaN: NaN -> 0
    np.fmin(y, 255, out=y)
    return y.astype(np.uint8)


def decode_pixels(x: np.ndarray, value_range: Sequence[float]) -> np.ndarray:
    """Stored images as float32 in the model's pixel range (8-bit ones scaled back)."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        return x.astype(np.float32)
    lo, hi = float(value_range[0]), float(value_range[1])
    return x.astype(np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)


def shrink(x: np.ndarray, factor: int) -> np.ndarray:
    """(..., H, W) images as the mean of each ``factor`` x ``factor`` pixel block (float32; the last
    H mod factor rows and W mod factor columns are left out)."""
    if factor == 1:
        return np.asarray(x)
    x = np.asarray(x)
    h, w = x.shape[-2] // factor, x.shape[-1] // factor
    out = np.empty((*x.shape[:-2], h, w), dtype=np.float32)
    for i in range(x.shape[0]):  # one unit at a time: no float32 copy of a whole block (~600 MB at 224 px)
        part = x[i, ..., : h * factor, : w * factor].astype(np.float32)
        out[i] = part.reshape(*part.shape[:-2], h, factor, w, factor).mean(axis=(-3, -1))
    return out


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
    # how images are kept (the spec's ``store:`` section; the defaults are the format of stores made before it):
    pixels: str = "float16"  # "uint8" | "float16" | "float32"
    thumbnail: int = 1  # snapshots and starts shrunk by this factor; > 1 adds ``finals``: each chain's last snapshot at full size
    zstd_level: int | None = None  # None: zarr's default codecs
    ladder: tuple[float, ...] = ()  # the activation ladder's factors (arrays ``rungs``...); stores made before it: ()

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
        image, px, z = tuple(self.image_shape), self.pixels, self.zstd_level
        snap = self.snapshot_shape
        yx = ("thumb_y", "thumb_x") if self.thumbnail > 1 else ("y", "x")  # xarray: one size per dimension name
        out = [ArraySpec("samples", (lp.units, ch, s, *snap), px, chunks=(1, ch, s, *snap),
                         shards=(b, ch, s, *snap), dims=("unit", "chain", "snapshot", "c", *yx), zstd_level=z),
               ArraySpec("activation", (lp.units, ch, t), "float32", chunks=(b, ch, t), dims=("unit", "chain", "step"),
                         zstd_level=z)]
        if self.realism:
            out.append(ArraySpec("realism", (lp.units, ch, t), "float32", chunks=(b, ch, t), dims=("unit", "chain", "step"),
                                 zstd_level=z))
        if self.exemplars_k:
            k = self.exemplars_k
            out += [ArraySpec("exemplars", (lp.units, k, *image), px, chunks=(b, k, *image),
                              dims=("unit", "rank", "c", "y", "x"), zstd_level=z),
                    ArraySpec("exemplar_activation", (lp.units, k), "float32", chunks=(b, k), dims=("unit", "rank"),
                              zstd_level=z)]
        if self.starts:
            out.append(ArraySpec("starts", (lp.units, ch, *snap), px, chunks=(b, ch, *snap),
                                 dims=("unit", "chain", "c", *yx), zstd_level=z))
        if self.ladder:
            r = len(self.ladder)
            out += [ArraySpec("rungs", (lp.units, ch, r, *snap), px, chunks=(b, ch, r, *snap),
                              dims=("unit", "chain", "rung", "c", *yx), zstd_level=z),
                    ArraySpec("rung_activation", (lp.units, ch, r), "float32", chunks=(b, ch, r),
                              dims=("unit", "chain", "rung"), zstd_level=z)]
            if self.realism:
                out.append(ArraySpec("rung_realism", (lp.units, ch, r), "float32", chunks=(b, ch, r),
                                     dims=("unit", "chain", "rung"), zstd_level=z))
        if self.thumbnail > 1:
            out.append(ArraySpec("finals", (lp.units, ch, *image), px, chunks=(b, ch, *image),
                                 dims=("unit", "chain", "c", "y", "x"), zstd_level=z))
        return {a.name: a for a in out}

    @property
    def snapshot_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of a stored snapshot or start: the input's shape, shrunk by ``thumbnail``."""
        c, h, w = self.image_shape
        f = self.thumbnail
        return (c, h // f, w // f)

    def legacy_formats(self) -> list["StorePlan"]:
        """This plan in the formats of stores made by older code (newest first): images as float16,
        full-size snapshots, zarr's default codecs; before that, without chain starts. A store made
        from one of them resumes in its own format."""
        old = dataclasses.replace(self, pixels="float16", thumbnail=1, zstd_level=None, ladder=())
        return [old, dataclasses.replace(old, starts=False)] if self.starts else [old]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(lp) for lp in self.layers]
        if not self.starts:  # a plan without starts keeps the JSON (and plan_hash) of stores made before it
            del d["starts"]
        for name, old in (("pixels", "float16"), ("thumbnail", 1), ("zstd_level", None), ("ladder", ())):
            if d[name] == old:  # likewise the image format of stores made before ``store:``
                del d[name]
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
            pixels=d.get("pixels", "float16"), thumbnail=int(d.get("thumbnail", 1)), zstd_level=d.get("zstd_level"),
            ladder=tuple(float(f) for f in d.get("ladder", ())),
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


# a unit's informativeness: the 2-AFC observer's fraction correct on held-out images
# (``ldam_sweep.sampling.observer``) for its final samples, their starts and its top exemplars
OBSERVER_COLUMNS = ("observer_samples", "observer_starts", "observer_exemplars")

FILE_SCHEMA = pa.schema([
    ("unit", pa.int32()),
    ("block", pa.int32()),
    ("status", pa.string()),  # "ok" | "dead" (not sampled; the reason in error) | "failed" | "corrupt" (verify --repair)
    ("attempt", pa.int16()),
    ("error", pa.string()),
    ("objective", pa.string()),
    ("method", pa.string()),
    ("lam", pa.float32()),
    ("chains", pa.int16()),
    ("steps", pa.int32()),
    ("act_start_mean", pa.float32()),
    ("act_final_mean", pa.float32()),
    ("act_final_max", pa.float32()),
    ("act_final_min", pa.float32()),
    ("act_final_std", pa.float32()),
    ("realism_final_mean", pa.float32()),
    ("exemplar_max", pa.float32()),
    ("activation_ratio", pa.float32()),
    ("pixel_diversity", pa.float32()),
    ("feature_diversity", pa.float32()),
    ("modes", pa.int16()),
    ("lowpass_diversity", pa.float32()),  # these four came later: older part files lack them (read as null)
    ("lowpass_diversity_ratio", pa.float32()),
    ("feature_diversity_ratio", pa.float32()),
    ("facets", pa.int16()),
    ("nearest_real", pa.float32()),
    ("movement", pa.float32()),
    ("ess", pa.float32()),
    ("rhat", pa.float32()),
    ("diverged_fraction", pa.float32()),
    ("stuck_fraction", pa.float32()),
    ("saturated_fraction", pa.float32()),  # these three came with the realism scores (older parts: null)
    ("frozen_fraction", pa.float32()),
    ("hf_ratio", pa.float32()),
    # a unit's label and its activation over the real pool (the exemplar pass; older parts: null)
    ("label", pa.string()),  # most common class among its top exemplars
    ("label_purity", pa.float32()),  # that class's share of them
    ("label_base_rate", pa.float32()),  # that class's share of the real pool
    ("sample_label", pa.string()),  # the class the whole network assigns most of its final samples
    ("sample_label_share", pa.float32()),  # the share of chains assigned it
    ("label_match", pa.float32()),  # the share of chains the network assigns the exemplar label
    ("data_active_fraction", pa.float32()),  # share of real images on which the unit is above 0
    ("data_p50", pa.float32()),
    ("data_p90", pa.float32()),
    ("data_p99", pa.float32()),
    # informativeness: the 2-AFC observer's fraction correct on held-out queries (older parts: null)
    *((name, pa.float32()) for name in OBSERVER_COLUMNS),
    ("data_hist", pa.list_(pa.int32())),  # histogram of its activation over the pool (HIST_BINS bins)
    ("data_hist_lo", pa.float32()),  # ... between these two values
    ("data_hist_hi", pa.float32()),
    ("seconds", pa.float32()),
    ("batch_units", pa.int32()),  # live units sampled together with this one (null before it existed; see sample())
    ("worker", pa.string()),
    ("attempt_id", pa.string()),
    ("checksum", pa.string()),
    ("spec_hash", pa.string()),
    ("generation", pa.string()),  # the store's generation at commit; null in rows committed before it existed
    ("discriminator", pa.string()),  # digest of the discriminator the block was sampled with (null: none, or older rows)
    ("prior", pa.string()),  # digest of the score prior a walk was sampled with (null: another method, or older rows)
    ("code_version", pa.string()),
    ("committed_at", pa.timestamp("us", tz="UTC")),
])
SCHEMA = pa.schema([("layer", pa.string()), *FILE_SCHEMA])
COLUMNS = tuple(SCHEMA.names)


class BlockResult(Protocol):
    """What the writer needs of a sampled block (a ``ChainResult`` fits): plain arrays and the
    sampler settings that go into the manifest. The store needs no sampler (and no torch)."""

    layer: str
    units: Sequence[int]
    samples: np.ndarray  # (unit, chain, snapshot, C, H, W)
    activation: np.ndarray  # (unit, chain, steps + 1)
    realism: np.ndarray | None
    dead: np.ndarray | None  # (unit,) bool: not sampled (its arrays are NaN); None = every unit sampled
    starts: np.ndarray | None  # (unit, chain, C, H, W) each chain's first image (stores whose plan keeps starts)
    dead_reason: str
    objective: str
    method: str
    lam: float
    chains: int
    steps: int

    @property
    def final_activation(self) -> np.ndarray: ...


def block_rows(
    lp: LayerPlan, block: int, result: BlockResult, *, checksum: str, attempt: int, seconds: float, worker: str,
    spec_hash: str, exemplar_max: np.ndarray | None = None, unit_columns: dict[int, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One manifest row per unit of the block, with its activation and realism statistics: status
    'ok', or 'dead' (with the reason in ``error``) for a unit the sampler found dead and did not sample."""
    attempt_id = uuid.uuid4().hex
    final = result.final_activation
    dead = getattr(result, "dead", None)
    per_unit_seconds = seconds / max(1, len(result.units))
    rows = []
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of a dead unit's all-NaN trace
        for i, unit in enumerate(result.units):
            is_dead = dead is not None and bool(dead[i])
            row = {
                "layer": lp.name, "unit": int(unit), "block": int(block), "status": "dead" if is_dead else "ok",
                "attempt": int(attempt), "error": result.dead_reason if is_dead else None,
                "objective": result.objective, "method": result.method, "lam": result.lam,
                "chains": result.chains, "steps": result.steps,
                "act_start_mean": float(np.nanmean(result.activation[i, :, 0])),
                "act_final_mean": float(np.nanmean(final[i])), "act_final_max": float(np.nanmax(final[i])),
                "act_final_min": float(np.nanmin(final[i])), "act_final_std": float(np.nanstd(final[i])),
                "realism_final_mean": None if result.realism is None else float(np.nanmean(result.realism[i, :, -1])),
                "exemplar_max": None if exemplar_max is None else float(exemplar_max[i]),
                "seconds": per_unit_seconds, "worker": worker, "attempt_id": attempt_id, "checksum": checksum,
                "spec_hash": spec_hash, "code_version": __version__,
            }
            if is_dead:  # not sampled: no statistics (the exemplars are real data and stay)
                row.update(dict.fromkeys(("act_start_mean", "act_final_mean", "act_final_max", "act_final_min",
                                          "act_final_std", "realism_final_mean"), None))
            row.update((unit_columns or {}).get(int(unit), {}))
            rows.append(row)
    return rows


def failed_rows(lp: LayerPlan, block: int, error: str, *, attempt: int, spec_hash: str, worker: str = "",
                generation: str | None = None) -> list[dict[str, Any]]:
    """'failed' rows for every unit of a block that ran out of attempts (the sweep goes on), of the
    store's ``generation`` (the driver's: the one its workers write into)."""
    return stamp_generation([
        {"layer": lp.name, "unit": int(u), "block": int(block), "status": "failed", "attempt": int(attempt),
         "error": error[-2000:], "spec_hash": spec_hash, "worker": worker, "code_version": __version__}
        for u in lp.block_units(block)
    ], generation)


def tombstone_rows(lp: LayerPlan, block: int, units: Sequence[int], problem: str, *, spec_hash: str) -> list[dict[str, Any]]:
    """'corrupt' rows for the given units of a block whose stored data failed ``verify``: newer than
    its 'ok' rows, so the block counts as not done and the next run redoes it."""
    return [
        {"layer": lp.name, "unit": int(u), "block": int(block), "status": "corrupt", "attempt": 0,
         "error": f"corrupt: {problem}"[-2000:], "spec_hash": spec_hash, "worker": "verify --repair",
         "code_version": __version__}
        for u in units
    ]


def display_label(row: dict[str, Any]) -> str | None:
    """The label a unit is listed and searched by (``units(label=...)``, the atlas): its exemplars'
    class (``label``), else the class the network reads its samples as (``sample_label``)."""
    return row.get("label") if row.get("label") is not None else row.get("sample_label")


def stamp_generation(rows: Iterable[dict[str, Any]], generation: str | None) -> list[dict[str, Any]]:
    """The rows stamped with the store's generation (None in a store made before generations):
    the one place rows get it (the block writer's rows, repair's tombstones). Readers and ``verify``
    check it against the store's; the driver checks the store still is that generation before it commits."""
    return [{**r, "generation": generation or None} for r in rows]


# How the atlas names a score (its layer pages' sort keys and unit pages' tables), in display order.
SCORE_LABELS = (

    ("activation_ratio", "activation ratio"), ("pixel_diversity", "pixel diversity"),
    ("lowpass_diversity", "low-pass diversity"), ("lowpass_diversity_ratio", "low-pass diversity ÷ exemplars'"),
    ("feature_diversity", "feature diversity"), ("feature_diversity_ratio", "feature diversity ÷ exemplars'"),
    ("facets", "facets"), ("realism_final_mean", "realism (log D)"),
    ("nearest_real", "nearest real"), ("modes", "modes"), ("movement", "movement"), ("ess", "ESS"),
    ("rhat", "split R-hat"), ("act_final_mean", "final activation"), ("exemplar_max", "exemplar max"),
    ("diverged_fraction", "diverged"), ("stuck_fraction", "stuck at box"),
    ("hf_ratio", "fine detail ÷ real (HF)"), ("detected_fraction", "called generated (two-sample)"),
    ("saturated_fraction", "saturated chains"), ("frozen_fraction", "frozen chains"),
    ("label_purity", "label purity (top exemplars in its class)"), ("label_base_rate", "label's base rate (real pool)"),
    ("sample_label_share", "chains read as the network's class"), ("label_match", "chains read as the label"),
    ("data_active_fraction", "active (> 0) on real images"), ("data_p50", "median on real images"),
    ("data_p99", "99th percentile on real images"),
    ("observer_samples", "informativeness: samples (2-AFC)"), ("observer_starts", "informativeness: their starts"),
    ("observer_exemplars", "informativeness: exemplars"),
)
TEXT_COLUMNS = ("label", "sample_label")  # a layer page's rows carry these beside the scores  # shown as text beside the scores
# the columns ``ldam-sweep query`` shows unless asked for others
QUERY_COLUMNS = ("layer", "unit", "label", "act_final_mean", "exemplar_max", "realism_final_mean")
