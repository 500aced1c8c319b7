"""Which units respond to *this* image? ``ldam-sweep find``, ``Finder`` and ``find_units``.

The images go through the store's model once (batched, stopped at the deepest layer asked), each
swept unit's activation is computed with the layer's stored objective, and units are ranked by their
**lift**: how far the image raises the unit above its typical response to real images, in units of
how far the unit's best real image raises it::

    lift = (activation - typical) / (reference - typical)

``reference`` is the unit's top dataset exemplar (``exemplar_max``) where the sweep stored exemplars,
else its chains' final mean activation (``act_final_mean``); ``typical`` is the unit's median
activation over the sweep's real data (``data_p50``), or 0 where the store has no distribution (a
sweep without data, stores made before it). Lift 1 means the image moves the unit as far above its
ordinary response as the best real image does; 0, no more than an ordinary image.

Why not activation ÷ reference (``ratio``, still reported): it is not comparable between layers. An
early unit (an edge detector) answers most digits at a good share of its maximum, so almost any image
scores a ratio near 1 there, and a digit 3's own class logit ranked 154th of 365 units on the demo
store. Subtracting each unit's typical response removes that offset: on the same store, 50 held-out
digits (5 per class) put their class logit at median rank 4 by lift (top 10 for 60%), 154 by ratio
(top 10 for none). See docs/scores.md.

This module stands above the store: it takes an open store and imports the model code lazily;
the store never imports it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ldam_sweep.atlas.format import unit_page
from ldam_sweep.errors import DataError, StoreError
from ldam_sweep.store.schema import display_label

if TYPE_CHECKING:
    from ldam_sweep.model.handle import ModelHandle
    from ldam_sweep.store.query import SweepStore

HIT_SCHEMA = pa.schema([
    ("image", pa.int32()), ("name", pa.string()), ("rank", pa.int32()), ("layer", pa.string()), ("unit", pa.int32()),
    ("lift", pa.float64()), ("ratio", pa.float64()), ("activation", pa.float64()), ("reference", pa.float64()),
    ("typical", pa.float64()), ("reference_column", pa.string()), ("label", pa.string()), ("atlas_page", pa.string()),
])

Images = Any  # an array (N, C, H, W) / (C, H, W), an image file, a folder of them, or a list of files / arrays


@dataclass
class FindResult:
    """``hits``: one row per (image, rank), columns of ``HIT_SCHEMA``; ``notes``: units left out and
    why; timings of loading the model and of the forward pass + ranking."""

    hits: pa.Table
    names: list[str]
    notes: list[str] = field(default_factory=list)
    atlas: Path | None = None  # the atlas its ``atlas_page`` links point into
    load_seconds: float = 0.0
    compute_seconds: float = 0.0

    def for_image(self, i: int) -> list[dict[str, Any]]:
        """The hits of image ``i``, best first."""
        return self.hits.filter(pc.equal(self.hits["image"], i)).to_pylist()


class Finder:
    """``find_units`` for one store, keeping the store's model (loaded on the first ``find``;
    ``model`` overrides it): ``Finder(ls.open_store(url)).find(images, top=5)``. A store whose model
    is built by running code (a factory, TorchScript) is refused unless ``model`` is given or
    ``trust_store=True`` (see ``store_model``)."""

    def __init__(self, store: "SweepStore", model: "ModelHandle | None" = None, *, trust_store: bool = False) -> None:
        self.store, self.model, self.trust_store = store, model, trust_store

    def find(self, images: Images, layer: str | None = None, top: int = 10, *,
             atlas: str | Path | None = None) -> FindResult:
        """The ``top`` units per image by lift (see the module docstring). ``images``: (N, C, H, W) / (C, H, W) arrays in the model's pixel range, image
        files, folders. ``load_seconds`` is the model's load time on the first call, then 0."""
        load_seconds = 0.0
        if self.model is None:
            t0 = time.perf_counter()
            self.model = store_model(self.store, trust_store=self.trust_store)
            load_seconds = time.perf_counter() - t0
        self.model = as_handle(self.model, self.store)
        result = find_units(self.store, images, layer=layer, top=top, model=self.model, atlas=atlas)
        result.load_seconds = load_seconds
        return result


def as_handle(model: Any, store: "SweepStore") -> "ModelHandle":
    """``model`` as a ModelHandle: a live ``nn.Module`` (a store swept with ``run_sweep(model=module)``
    records only its class) is wrapped with the input the store recorded."""
    from ldam_sweep.model import ModelHandle, load_model

    if isinstance(model, ModelHandle):
        return model
    spec = store.model_spec()
    return load_model(model, device="cpu", input=spec.input)


def store_model(store: "SweepStore", device: Any = None, *, trust_store: bool = False) -> "ModelHandle":
    """The model the store was swept with, from its job spec (``model:``, else the plan's model
    name), checked against the stored fingerprint.

    Reading a store never runs code named in it unless the caller says so: a model built by a
    factory function or a TorchScript program is refused (StoreError) without ``trust_store=True``
    -- whoever wrote the store chose that code, and a store can come from anywhere. Pass the
    model yourself (``model=``, ``--model``) or trust the store (``--trust-store``)."""
    from ldam_sweep.model import load_model

    spec = store.model_spec()
    code = spec.runs_code()
    if code is not None and not trust_store:
        raise StoreError(f"store {store.loc.url!r} names a model built by running code: {code}. Reading a store "
                         "never runs code named in it: pass the model yourself (--model SPEC, or model= in Python), "
                         "or --trust-store (trust_store=True) if you trust whoever wrote this store.")
    model = load_model(spec, device=device)
    want = store.attrs["model"]["fingerprint"]
    if model.fingerprint != want:
        raise StoreError(f"the model of store {store.loc.url!r} ({spec!r}) now loads with fingerprint "
                         f"{model.fingerprint[:12]}, but the sweep used {want[:12]}: its weights changed. Pass the "
                         "sweep's model explicitly (model=..., or --model SPEC).")
    return model


def query_images(images: Images, input_spec: Any) -> tuple[np.ndarray, list[str]]:
    """(N, C, H, W) float32 images in the model's pixel range and a name for each: files and folders
    are converted as the ``folder`` data source does (resized, centre-cropped, channel-converted);
    arrays must already be in the model's pixel range."""
    from ldam_sweep.data import fit_images, image_files, load_image

    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise DataError("find: no images given")
    arrays, names = [], []
    for i, item in enumerate(items):
        if isinstance(item, (str, Path)):
            p = Path(item)
            files = image_files(p) if p.is_dir() else [p]
            arrays += [load_image(f, input_spec)[None] for f in files]
            names += [str(f) for f in files]
            continue
        arr = np.asarray(item, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise DataError(f"find: image array {i} has shape {arr.shape}; give (N, C, H, W) or (C, H, W), "
                            f"(C, H, W) = {tuple(input_spec.shape)}")
        arrays.append(arr)
        names += [f"array {i}[{j}]" for j in range(len(arr))] if len(items) > 1 else [f"image {j}" for j in range(len(arr))]
    return fit_images(np.concatenate(arrays), input_spec, what="find images"), names


def unit_activations(model: "ModelHandle", x: np.ndarray, targets: dict[str, tuple[np.ndarray, str]],
                     batch: int = 256) -> dict[str, np.ndarray]:
    """For each layer of ``targets`` (layer -> (units, objective)): (N, U) activations of the images
    ``x`` for those units, from one forward pass per batch stopped at the deepest of the layers."""
    import torch

    from ldam_sweep.objectives import units_objective

    idx = {name: torch.as_tensor(units, dtype=torch.long) for name, (units, _) in targets.items()}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in targets}
    with torch.no_grad():
        for i in range(0, len(x), batch):
            acts = model.activations_at(torch.from_numpy(x[i : i + batch]).to(model.device), list(targets))
            for name, (_, objective) in targets.items():
                parts[name].append(units_objective(acts[name], idx[name], objective).cpu().numpy())
    return {name: np.concatenate(p).astype(np.float64) for name, p in parts.items()}


def default_atlas(store: "SweepStore") -> Path | None:
    """The atlas ``ldam-sweep demo`` builds beside a local store (``<name>-atlas``), if it exists."""
    if not store.loc.is_local:
        return None
    root = Path(store.loc.root)
    site = root.with_name(root.stem + "-atlas")
    return site if (site / "index.html").is_file() else None


def find_units(store: "SweepStore", images: Images, *, layer: str | None = None, top: int = 10,
               model: "ModelHandle | Any | None" = None, atlas: str | Path | None = None, batch: int = 256,
               trust_store: bool = False) -> FindResult:
    """Rank the store's committed units by how far ``images`` lift them above their typical response,
    relative to their reference (``lift``, see the module docstring); the ``top`` best per image. Without ``model``,
    the store's own (``store_model``: refused when it runs code, unless ``trust_store``)."""
    if top < 1:
        raise StoreError(f"find: top must be >= 1, got {top}")
    t0 = time.perf_counter()
    if model is None:
        model = store_model(store, trust_store=trust_store)
    model = as_handle(model, store)
    load_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    x, names = query_images(images, model.input)
    layers = [store.layer_plan(layer)] if layer is not None else list(store.plan.layers)
    committed = store.units(layer, status="ok")
    notes: list[str] = []
    targets: dict[str, tuple[np.ndarray, str]] = {}
    refs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # layer -> (reference, uses exemplar, typical)
    labels: dict[str, np.ndarray] = {}  # layer -> each usable unit's label (display_label)
    for lp in layers:
        rows = committed.filter(pc.equal(committed["layer"], lp.name))
        if rows.num_rows == 0:
            notes.append(f"layer {lp.name!r}: no committed units")
            continue
        exemplar = rows["exemplar_max"].to_numpy(zero_copy_only=False).astype(np.float64)
        final = rows["act_final_mean"].to_numpy(zero_copy_only=False).astype(np.float64)
        has_exemplar = np.isfinite(exemplar)
        ref = np.where(has_exemplar, exemplar, final)
        typical = rows["data_p50"].to_numpy(zero_copy_only=False).astype(np.float64) \
            if "data_p50" in rows.column_names else np.full(rows.num_rows, np.nan)
        typical = np.where(np.isfinite(typical), typical, 0.0)  # no distribution stored: lift = ratio
        usable = np.isfinite(ref) & (ref > 0) & (ref > typical)
        if (~usable).any():
            notes.append(f"layer {lp.name!r}: {int((~usable).sum())} of {rows.num_rows} units skipped "
                         "(reference activation not positive, or not above the unit's typical response)")
        if usable.any():
            targets[lp.name] = (rows["unit"].to_numpy()[usable].astype(np.int64), lp.objective)
            labels[lp.name] = np.array([display_label(r) for r in rows.select(["label", "sample_label"]).to_pylist()],
                                       dtype=object)[usable]
            refs[lp.name] = (ref[usable], has_exemplar[usable], typical[usable])
    acts = unit_activations(model, x, targets, batch=batch) if targets else {}
    site = Path(atlas) if atlas is not None else default_atlas(store)
    if site is not None and not (site / "index.html").is_file():
        notes.append(f"atlas {str(site)!r} has no index.html: no page links")
        site = None
    if acts:
        layer_col = np.concatenate([np.full(len(targets[n][0]), n, dtype=object) for n in acts])
        unit_col = np.concatenate([targets[n][0] for n in acts])
        ref_col = np.concatenate([refs[n][0] for n in acts])
        exemplar_col = np.concatenate([refs[n][1] for n in acts])
        label_col = np.concatenate([labels[n] for n in acts])
        typical_col = np.concatenate([refs[n][2] for n in acts])
        act = np.concatenate([acts[n] for n in acts], axis=1)  # (N, all units)
        ratio = act / ref_col
        lift = (act - typical_col) / (ref_col - typical_col)
        k = min(top, lift.shape[1])
    rows_out: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        if not acts:
            break
        r = np.where(np.isfinite(lift[i]), lift[i], -np.inf)
        best = np.argpartition(-r, k - 1)[:k] if k < len(r) else np.arange(len(r))
        best = best[np.lexsort((unit_col[best], -r[best]))]  # lift descending, ties by unit
        for rank, j in enumerate(best, start=1):
            page = unit_page(site, layer_col[j], unit_col[j]) if site is not None else None
            rows_out.append({
                "image": i, "name": name, "rank": rank, "layer": layer_col[j], "unit": int(unit_col[j]),
                "lift": float(lift[i, j]), "ratio": float(ratio[i, j]), "activation": float(act[i, j]),
                "reference": float(ref_col[j]), "typical": float(typical_col[j]),
                "reference_column": "exemplar_max" if exemplar_col[j] else "act_final_mean", "label": label_col[j],
                "atlas_page": str(page) if page is not None and page.is_file() else None,
            })
    hits = pa.Table.from_pylist(rows_out, schema=HIT_SCHEMA)
    return FindResult(hits=hits, names=names, notes=notes, load_seconds=load_seconds,
                      compute_seconds=time.perf_counter() - t0, atlas=site)
