"""How far a sweep's samples are from its real data, per layer and per unit: the realism record.

Stands above the store (reads committed samples and exemplars) and the sampling package (the
two-sample test and the high-frequency energy, ``ldam_sweep.sampling.realism``); the store keeps the
record (``ldam_sweep.store.realism``). ``ldam-sweep run`` measures it after stage 2 for every layer,
``ldam-sweep realism STORE`` at any time. What the numbers mean: docs/scores.md, "Realism".
"""

from __future__ import annotations

import datetime as dt
import time
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from ldam_sweep.errors import CorruptBlockError, StoreError
from ldam_sweep.store.query import SweepStore
from ldam_sweep.store.realism import write_realism

POOLED_MAX_IMAGES = 2048  # per side for the all-layers test


def store_real_images(store: SweepStore) -> np.ndarray:
    """The sweep's real images (its ``data``: training and held-out splits together), or StoreError."""
    from ldam_sweep.data import real_images
    from ldam_sweep.spec import parse_job

    job = parse_job(store.spec())
    if job.data is None:
        raise StoreError(f"store {store.loc.url!r} was swept without real data (no data: section in its spec); "
                         "realism is measured against the job's real images")
    spec = SimpleNamespace(shape=tuple(store.plan.image_shape), range=tuple(store.plan.value_range))
    return np.concatenate([real_images(job.data, spec, "train"), real_images(job.data, spec, "test")])


def layer_images(store: SweepStore, layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[str]]:
    """(final samples (n, C, H, W), their units (n,), the units' stored exemplars (m, C, H, W) or None,
    notes) of a layer's committed live units; finite chains only; corrupt blocks are skipped with a note."""
    rows = store.units(layer, status="ok")
    units = np.asarray(rows["unit"].to_numpy(), dtype=np.int64)
    blocks = np.asarray(rows["block"].to_numpy(), dtype=np.int64)
    lp = store.layer_plan(layer)
    with_ex = bool(store.plan.exemplars_k)
    finals, owners, exemplars, notes = [], [], [], []
    for block in np.unique(blocks):
        try:
            data = store.read_block(layer, int(block), ["finals"] + (["exemplars"] if with_ex else []))
        except CorruptBlockError as err:
            notes.append(f"skipped: {err}")
            continue
        lo, _ = lp.block_bounds(int(block))
        for u in units[blocks == block]:
            final = data["finals"][u - lo]
            ok = np.isfinite(final.reshape(len(final), -1)).all(1)
            finals.append(final[ok])
            owners.append(np.full(int(ok.sum()), u, dtype=np.int64))
            if with_ex:
                ex = data["exemplars"][u - lo].astype(np.float32)
                exemplars.append(ex[np.isfinite(ex.reshape(len(ex), -1)).all(1)])
    shape = tuple(store.plan.image_shape)
    cat = (lambda parts: np.concatenate(parts) if parts else np.zeros((0, *shape), np.float32))
    return (cat(finals), np.concatenate(owners) if owners else np.zeros(0, np.int64),
            cat(exemplars) if with_ex else None, notes)


def _test(fake: np.ndarray, real: np.ndarray, vr: tuple[float, float], seed: int, max_images: int):
    from ldam_sweep.sampling.realism import two_sample_test

    if len(fake) < 12:
        return None
    return two_sample_test(fake, real, value_range=vr, seed=seed, max_images=max_images)


def measure_realism(store: SweepStore, *, layers: list[str] | None = None, seed: int = 0,
                    progress: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The realism record of a store's committed units (see ``ldam_sweep.store.realism``)."""
    from ldam_sweep.sampling.realism import MAX_IMAGES, hf_energy

    t0 = time.perf_counter()
    vr = tuple(store.plan.value_range)
    real = store_real_images(store)
    real_hf = float(hf_energy(real, vr).mean())
    names = layers or [lp.name for lp in store.plan.layers]
    out: dict[str, Any] = {}
    pooled_fake, pooled_ex, notes = [], [], []
    for name in names:
        store.layer_plan(name)
        fake, owners, ex, skipped = layer_images(store, name)
        notes += [f"{name}: {s}" for s in skipped]
        if len(fake) == 0:
            continue
        entry: dict[str, Any] = {"samples": int(len(fake)), "units": int(len(np.unique(owners))),
                                 "hf_ratio": float(hf_energy(fake, vr).mean()) / real_hf}
        res = _test(fake, real, vr, seed, MAX_IMAGES)
        entry["c2st"] = None if res is None else res.accuracy
        detected: dict[str, float] = {}
        if res is not None:
            called_units = owners[res.chosen]
            for u in np.unique(called_units):
                detected[str(int(u))] = float(res.fake_called[called_units == u].mean())
        entry["detected"] = detected
        entry["c2st_exemplars"] = entry["hf_ratio_exemplars"] = None
        if ex is not None and len(ex):
            entry["hf_ratio_exemplars"] = float(hf_energy(ex, vr).mean()) / real_hf
            ex_res = _test(ex, real, vr, seed, MAX_IMAGES)
            entry["c2st_exemplars"] = None if ex_res is None else ex_res.accuracy
            pooled_ex.append(ex)
        pooled_fake.append(fake)
        out[name] = entry
        if progress:
            progress(name, entry)
    pooled = None
    if len(out) > 1:
        fake, ex = np.concatenate(pooled_fake), (np.concatenate(pooled_ex) if pooled_ex else None)
        res = _test(fake, real, vr, seed, POOLED_MAX_IMAGES)
        ex_res = None if ex is None else _test(ex, real, vr, seed, POOLED_MAX_IMAGES)
        pooled = {"samples": int(len(fake)), "c2st": None if res is None else res.accuracy,
                  "c2st_exemplars": None if ex_res is None else ex_res.accuracy,
                  "hf_ratio": float(hf_energy(fake, vr).mean()) / real_hf,
                  "hf_ratio_exemplars": None if ex is None else float(hf_energy(ex, vr).mean()) / real_hf}
    return {
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(), "generation": store.attrs.get("generation"),
        "seed": seed, "real_images": int(len(real)), "seconds": time.perf_counter() - t0,
        "commits": store.commit_marks(list(out)), "layers": out, "pooled": pooled, "notes": notes,
    }


def layer_line(name: str, entry: dict[str, Any]) -> str:
    """One layer's entry as progress output: samples, with the units' exemplars in brackets."""
    return (f"{name}: two-sample {fmt(entry.get('c2st'))} ({fmt(entry.get('c2st_exemplars'))}), "
            f"HF {fmt(entry.get('hf_ratio'))} ({fmt(entry.get('hf_ratio_exemplars'))}), {entry.get('samples')} samples")


def fmt(v: float | None) -> str:
    """A realism number for people: two decimals, or n/a where it was not measured."""
    return "n/a" if v is None else f"{v:.2f}"


def update_realism(store: SweepStore, *, seed: int = 0, progress: Callable | None = None) -> dict[str, Any]:
    """Measure and store the record; returns it as ``store.realism()`` reads it."""
    write_realism(store.loc, measure_realism(store, seed=seed, progress=progress))
    return store.refresh().realism() or {}
