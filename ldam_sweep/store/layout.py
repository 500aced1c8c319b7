"""The store's layout: what the driver creates once, up front, before any block is written.

    <store>/zarr.json                     root attrs: spec as submitted, spec hash, plan, model
                                          fingerprint, package versions, created_at, generation
                                          (a uuid per creation; absent in stores made before it),
                                          layout (2; absent = 1), the sha256 of every child zarr.json
                                          and of the coordinates' chunks, and the attrs' seal
    <store>/root-copy/zarr.json           the root zarr.json's copy (integrity.py; layout 1: root-copy.json)
    <store>/lease.json                    the running driver's lease (see lease.py)
    <store>/layers/<layer>/samples        (unit, chain, snapshot, C, h, w) in the plan's pixel type (uint8,
                                          0 fill; float16/float32, NaN fill), shrunk to thumbnails
                                          (h, w: dims thumb_y, thumb_x) where the plan says so;
                                          shard = one block of units, inner chunk = one unit
    <store>/layers/<layer>/finals         (unit, chain, C, H, W): the last snapshot at full size (only
                                          with thumbnails)
    <store>/layers/<layer>/activation     (unit, chain, step) float32, NaN fill; chunk = one block
    <store>/layers/<layer>/realism        same, when a discriminator is used
    <store>/layers/<layer>/exemplars      (unit, k, C, H, W) images + exemplar_activation (unit, k)
    <store>/layers/<layer>/starts         (unit, chain, C, h, w) each chain's first image, as samples
    <store>/layers/<layer>/rungs          (unit, chain, rung, C, h, w) each chain at the end of each rung
                                          of the activation ladder, as samples; rung_activation and
                                          rung_realism (unit, chain, rung) float32 (plans with a ladder)
    <store>/layers/<layer>/unit, chain, snapshot, step, rank   coordinates (layout 2)
    <store>/discriminator/                the frozen discriminator (bytes; its record, written last)
    <store>/prior/                        method walk's score prior (bytes; its record, written last)
    <store>/manifest/parts/layer=<layer>/part-*.parquet   the commit log (see manifest.py; layout 1:
                                          manifest/layer=<layer>/...)
    <store>/realism/zarr.json, verify/zarr.json   sealed records (layout 1: realism.json, verify.json)

Every array's grid on the unit axis equals the layer's block size, so a block is exactly one
storage object per array: writers of different blocks never share an object.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
import warnings
from importlib import metadata as importlib_metadata
from typing import Any

import numpy as np
import zarr

from ldam_sweep import failpoints
from ldam_sweep.errors import LdamError, StoreDamagedError, StoreError
from ldam_sweep.store.schema import LayerPlan, StorePlan, identity_changes
from ldam_sweep.settings import SAMPLER_DEFAULTS
from ldam_sweep.store.integrity import (ATTRS_SEAL, DISCRIMINATOR_SEAL, LAYOUT, LAYOUT_KEY, METADATA_KEY, ROOT_COPY,
                                        read_bytes, seal, sidecar_path,
                                        seal_state, sha256, write_root)
from ldam_sweep.store.lease import LEASE_FILE
from ldam_sweep.store.location import StoreLocation, encode_name

__all__ = ["FORMAT_NAME", "LayerPlan", "SCHEMA_VERSION", "StoreError", "StorePlan", "check_store", "committed_unit_count",
           "create_store", "layer_path", "read_generation", "read_sampler_revision", "write_discriminator", "write_frozen"]

SCHEMA_VERSION = 1
FORMAT_NAME = "ldam-sweep"


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


def as_stored(url: str | StoreLocation, plan: StorePlan) -> StorePlan:
    """``plan``, or the same plan in an older store format when the store at ``url`` was made from
    that (by code from before 8-bit images and thumbnails, or before chain starts were kept):
    such a store resumes in its own format (``StorePlan.legacy_formats``)."""
    loc = StoreLocation.parse(url)
    if not loc.fs.exists(loc.join("zarr.json")):
        return plan
    try:
        stored = _read_root_attrs(loc).get("plan_hash")
    except LdamError:
        return plan  # check_store says what is wrong
    if stored == plan.plan_hash():
        return plan
    return next((old for old in plan.legacy_formats() if old.plan_hash() == stored), plan)


def check_store(url: str | StoreLocation, plan: StorePlan, *, fresh: bool = False) -> str:
    """What is at ``url`` for this plan, refusing what must not be touched (read-only):
    "absent" (nothing, or an empty folder, or only a lease), "same" (a finished store of this plan),
    "unfinished" (our creation, interrupted), "other" (a store of another plan; only with ``fresh``)."""
    loc = StoreLocation.parse(url)
    fs = loc.fs
    if fs.exists(loc.join("zarr.json")):
        try:
            attrs = _read_root_attrs(loc)
        except StoreDamagedError:
            if fresh:  # ours (it has a root copy), damaged: --fresh may delete it
                return "other"
            raise
        same = attrs.get("plan_hash") == plan.plan_hash()
        if not (attrs.get("format") == FORMAT_NAME or "plan_hash" in attrs):
            raise StoreError(f"{loc.url!r} is a Zarr group but not an ldam-sweep store; nothing was changed "
                             "(--fresh only ever deletes ldam-sweep stores). Choose another path.")
        if same:
            return "same" if attrs.get("format") == FORMAT_NAME else "unfinished"
        if not fresh:
            raise StoreError(f"store {loc.url!r} was created from a different spec or model: "
                             f"{'; '.join(_identity_changes(attrs, plan))}. Nothing was changed. Use another store "
                             "path, or pass --fresh to delete it and start over.")
        return "other"
    if fs.exists(loc.root) and [p for p in fs.ls(loc.root, detail=False) if not _is_lease(p)]:
        raise StoreError(f"{loc.url!r} exists and is not empty, but is not an ldam-sweep store; nothing was changed "
                         "(--fresh only ever deletes ldam-sweep stores). Choose another path.")
    return "absent"


def create_store(url: str, plan: StorePlan, *, fresh: bool = False, storage_options: dict | None = None,
                 layout: int = LAYOUT) -> StoreLocation:
    """Create every group and array with final shapes (driver only; idempotent for the same plan).
    ``layout``: 2 (now); 1 writes a store the way the code before layout 2 did (tests of old stores).

    An existing store made from another plan is refused with a message saying how to proceed;
    it is deleted only when ``fresh=True`` (also one of the same plan). A new store gets a new
    ``generation`` (a uuid in the root attrs): writers that started on another generation stop.
    The store's lease file is kept: the driver that deletes and recreates a store holds it.
    """
    loc = StoreLocation.parse(url, storage_options)
    state = check_store(loc, plan, fresh=fresh)
    if state == "same" and not fresh:
        return loc
    if state != "absent":
        _clear(loc)
    # The format marker is written last, in one atomic zarr.json write: a reader that sees it sees
    # every group and array already in place. Mode "a" (not "w"): "w" would delete the lease.
    root = zarr.open_group(loc.zarr_store(read_only=False), mode="a", attributes={
        "schema_version": SCHEMA_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "generation": uuid.uuid4().hex,
        "sampler_defaults": SAMPLER_DEFAULTS,
        "spec": plan.spec,
        "spec_hash": plan.spec_hash(),
        "plan": plan.to_json(),
        "plan_hash": plan.plan_hash(),
        "model": {"name": plan.model_name, "fingerprint": plan.model_fingerprint},
        "versions": package_versions(),
        **({LAYOUT_KEY: layout} if layout >= 2 else {}),  # layout 1 had no such attribute
    })
    create_layers(root, plan, layout)
    failpoints.hit("metadata.before-root")
    # the format marker, the children's checksums and the seal: one atomic root write, then its copy
    write_root(loc, {**dict(root.attrs), "format": FORMAT_NAME, METADATA_KEY: metadata_sums(loc, plan, layout)})
    return loc


MANIFEST_GROUP = {"ldam_sweep": "the manifest: one Parquet file per commit in parts/ (ldam_sweep.store.manifest)"}


def coordinates(plan: Any, lp: Any) -> dict[str, np.ndarray]:
    """A layer's coordinate arrays (layout 2): each dimension's labels -- unit ids, chain indices, the
    snapshots' steps, every step, exemplar ranks."""
    out = {"unit": np.arange(lp.units, dtype=np.int64), "chain": np.arange(plan.chains, dtype=np.int64),
           "snapshot": np.asarray(plan.snapshot_steps, dtype=np.int64), "step": np.arange(plan.steps + 1, dtype=np.int64)}
    if plan.exemplars_k:
        out["rank"] = np.arange(plan.exemplars_k, dtype=np.int64)
    return out


def create_layers(root: zarr.Group, plan: StorePlan, layout: int = 1) -> None:
    """Every layer's group and arrays under ``root`` (also used to rebuild damaged metadata: integrity.py).
    Layout 2 adds each layer's coordinate arrays and consolidated metadata (xarray opens a layer
    with both, without a warning) and the manifest's group."""
    layers = root.create_group("layers")
    for lp in plan.layers:
        g = layers.create_group(encode_name(lp.name), attributes={
            "name": lp.name, "kind": lp.kind, "module_type": lp.module_type, "units": lp.units,
            "output_shape": list(lp.output_shape), "block_size": lp.block_size, "objective": lp.objective,
            "snapshot_steps": list(plan.snapshot_steps), "value_range": list(plan.value_range),
        })
        for a in plan.arrays(lp).values():
            g.create_array(a.name, shape=a.shape, dtype=a.dtype, chunks=a.chunks, shards=a.shards, fill_value=a.fill_value,
                           dimension_names=list(a.dims), **a.codecs())
        if layout >= 2:  # the coordinates, values included (xarray reads them as the dimensions' labels)
            for name, values in coordinates(plan, lp).items():
                g.create_array(name, shape=values.shape, dtype=values.dtype, chunks=values.shape, fill_value=-1,
                               dimension_names=[name])[:] = values  # fill -1: never a value, so the chunk is always written
            with warnings.catch_warnings():  # zarr-python's own extension to Zarr v3, which xarray reads
                warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
                zarr.consolidate_metadata(root.store, path=layer_path(lp.name))
    if layout >= 2:
        root.create_group("manifest", attributes=MANIFEST_GROUP)


def child_metadata_paths(plan: Any, layout: int = 1) -> list[str]:
    """Every file below the root that ``create_store`` writes and nothing rewrites, relative to the
    store: each group's and array's zarr.json and (layout 2) the coordinates' one chunk each."""
    paths = ["layers/zarr.json"]
    for lp in plan.layers:
        paths.append(f"{layer_path(lp.name)}/zarr.json")
        paths += [f"{layer_path(lp.name)}/{name}/zarr.json" for name in plan.arrays(lp)]
        if layout >= 2:
            paths += [f"{layer_path(lp.name)}/{name}/{part}" for name in coordinates(plan, lp) for part in ("zarr.json", "c/0")]
    return paths + (["manifest/zarr.json"] if layout >= 2 else [])


def expected_metadata(plan: Any, layout: int = 1) -> dict[str, bytes]:
    """Every file of ``child_metadata_paths`` as ``create_store`` writes it for ``plan``: built the
    same way in memory, so a damaged one is rebuilt from the plan alone."""
    mem: dict[str, Any] = {}
    root = zarr.open_group(zarr.storage.MemoryStore(mem), mode="w")
    create_layers(root, plan, layout)
    return {path: mem[path].to_bytes() for path in child_metadata_paths(plan, layout)}


def metadata_sums(loc: StoreLocation, plan: Any, layout: int = 1) -> dict[str, str]:
    """sha256 of every child zarr.json as stored now (what the root records at creation)."""
    out = {}
    for path in child_metadata_paths(plan, layout):
        data = read_bytes(loc, path)
        if data is None:
            raise FileNotFoundError(loc.join(path))
        out[path] = sha256(data)
    return out


def _clear(loc: StoreLocation) -> None:
    """Delete an ldam-sweep store's contents except its lease. The format marker goes first, so an
    interrupted deletion leaves an unfinished store (recreated by the next run), and zarr.json last."""
    fs = loc.fs
    for copy in (sidecar_path(loc, ROOT_COPY, 2), sidecar_path(loc, ROOT_COPY, 1)):
        if fs.exists(loc.join(copy)):  # first: a half-deleted store must not be restorable from its copy
            fs.rm(loc.join(copy))
    root_meta = loc.join("zarr.json")
    try:
        meta = json.loads(fs.cat_file(root_meta))
    except ValueError:  # a damaged root (--fresh on a store verify cannot repair)
        meta = {}
    if meta.get("attributes", {}).pop("format", None) is not None:
        fs.pipe_file(root_meta, json.dumps(meta).encode())
    for path in fs.ls(loc.root, detail=False):
        if not _is_lease(path) and path.rstrip("/").rsplit("/", 1)[-1] != "zarr.json":
            fs.rm(path, recursive=True)
    fs.rm(root_meta)
    fs.invalidate_cache(loc.root)


def _is_lease(path: str) -> bool:
    """The lease file, or a lease file's temp / set-aside copy (lease.py)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name == LEASE_FILE or name.startswith(f".{LEASE_FILE}.")


def read_generation(url: str | StoreLocation) -> str | None:
    """The store's generation from its root zarr.json ("" for a store made before generations
    existed), or None when the store has no root metadata (deleted, or being replaced)."""
    loc = StoreLocation.parse(url)
    try:
        meta = json.loads(loc.fs.cat_file(loc.join("zarr.json")))
    except FileNotFoundError:
        return None
    except ValueError:
        raise StoreError(f"the root metadata (zarr.json) of store {loc.url!r} is damaged: `ldam-sweep verify "
                         f"{loc.url} --repair` restores it from its copy") from None
    attrs = meta.get("attributes", {})
    return str(attrs.get("generation", "")) if attrs.get("format") == FORMAT_NAME else None


def read_sampler_revision(url: str | StoreLocation) -> int:
    """The revision of the sampler defaults the store was made with (root attr ``sampler_defaults``;
    1 for a store made before the attribute existed): a store resumes with its own sampler."""
    return int(_read_root_attrs(StoreLocation.parse(url)).get("sampler_defaults", 1))


def committed_unit_count(url: str | StoreLocation) -> int:
    """Units whose newest manifest row is 'ok': what deleting the store would lose."""
    from ldam_sweep.store import manifest

    loc = StoreLocation.parse(url)
    rows = manifest.latest_per_unit(manifest.read(loc))
    return 0 if rows.num_rows == 0 else int(sum(1 for s in rows["status"].to_pylist() if s == "ok"))


def _identity_changes(attrs: dict[str, Any], plan: StorePlan) -> list[str]:
    """What differs between the store's recorded identity and this plan's: spec fields, the model's
    weights (fingerprint), and else the plan itself (e.g. a model whose layers changed)."""
    try:
        old = StorePlan.from_json(attrs["plan"])
    except (KeyError, TypeError):
        return [f"spec hash {str(attrs.get('spec_hash'))[:12]} -> {plan.spec_hash()[:12]}"]
    changes = identity_changes(old.identity_spec(), plan.identity_spec())
    changes += [f"store.{name}: {getattr(old, name)} -> {getattr(plan, name)} (the image format is fixed when the store "
                "is made: --fresh starts over in the new one)"
                for name in ("pixels", "thumbnail", "zstd_level") if getattr(old, name) != getattr(plan, name)]
    if old.model_fingerprint != plan.model_fingerprint:
        changes.append(f"model weights (fingerprint) {old.model_fingerprint[:12]} -> {plan.model_fingerprint[:12]}")
    return changes or [f"the store plan (layers, shapes) {str(attrs.get('plan_hash'))[:12]} -> {plan.plan_hash()[:12]}"]


def _read_root_attrs(loc: StoreLocation) -> dict[str, Any]:
    """The root's attributes; StoreDamagedError when they are damaged in a store of ours (one with a root copy)."""
    damaged = StoreDamagedError(f"the root metadata (zarr.json) of store {loc.url!r} is damaged: `ldam-sweep verify "
                                f"{loc.url} --repair` restores it from its copy; nothing was changed")
    try:
        attrs = dict(loc.open_group(mode="r").attrs)
    except Exception as err:
        if loc.fs.exists(loc.join(sidecar_path(loc, ROOT_COPY))):
            raise damaged from None
        raise StoreError(f"{loc.url!r} has a zarr.json but cannot be opened as a Zarr group: {err}") from None
    if seal_state(attrs, ATTRS_SEAL) == "broken":
        raise damaged
    return attrs


def write_discriminator(url: str | StoreLocation, blob: bytes, attrs: dict[str, Any]) -> None:
    """Keep the frozen discriminator in the store (driver only, once): its saved file's bytes as a
    uint8 array ``discriminator/file`` and its training record ``attrs`` (settings, per-update log,
    held-out accuracy) as attrs of ``discriminator/``. Read back with ``SweepStore.discriminator_bytes``;
    see ``write_frozen``."""
    write_frozen(url, "discriminator", blob, attrs)


def write_frozen(url: str | StoreLocation, name: str, blob: bytes, attrs: dict[str, Any]) -> None:
    """Keep a frozen model (``name``: one of integrity.FROZEN) in the store: its file's bytes as the
    uint8 array ``<name>/file`` and its record ``attrs`` as the attrs of ``<name>/``.

    The record is the commit, written last: the group starts without one, the bytes follow, and
    only then the sealed record naming the sha256 of the bytes and of the array's metadata. A store
    whose group has no record, or bytes that do not match it, has none (stage 1 redoes it)."""
    loc = StoreLocation.parse(url)
    root = loc.open_group(mode="r+")
    data = np.frombuffer(blob, dtype=np.uint8)
    if name in root:
        del root[name]
    g = root.create_group(name)
    failpoints.hit(f"{name}.before-bytes")
    arr = g.create_array("file", shape=data.shape, dtype="uint8", chunks=data.shape)
    arr[:] = data
    failpoints.hit(f"{name}.before-record")
    meta = loc.fs.cat_file(loc.join(name, "file", "zarr.json"))
    g.attrs.put(seal({**attrs, "file_sha256": sha256(blob), "file_bytes": len(blob), "file_meta_sha256": sha256(meta)},
                     DISCRIMINATOR_SEAL))

