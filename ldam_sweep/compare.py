"""Unit-by-unit comparison of two sweeps of one architecture (e.g. raw vs averaged weights).

Units present (committed) in both stores are paired. With the same sampler settings and seeds,
chain c of a unit starts from the same image and sees the same noise in both sweeps, so the
distance between the two sweeps' samples of that chain measures what the weights changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ldam_sweep.atlas.format import escape, fmt_number
from ldam_sweep.errors import CompareError, CorruptBlockError
from ldam_sweep.store.query import SweepStore, open_store

PAIRED = ("activation_ratio", "act_final_mean", "realism_final_mean", "nearest_real", "pixel_diversity", "feature_diversity")


def check_comparable(a: SweepStore, b: SweepStore) -> None:
    """Same layers (names, kinds, unit counts, shapes, objectives) and the same sampler settings, or a
    clear error."""
    problems = []
    la = {lp.name: (lp.kind, lp.units, tuple(lp.output_shape), lp.objective) for lp in a.plan.layers}
    lb = {lp.name: (lp.kind, lp.units, tuple(lp.output_shape), lp.objective) for lp in b.plan.layers}
    for name in sorted(set(la) & set(lb)):
        if la[name] != lb[name]:
            problems.append(f"layer {name!r}: {la[name]} vs {lb[name]} (kind, units, output shape, objective)")
    if not set(la) & set(lb):
        problems.append(f"no layer in common: {sorted(la)} vs {sorted(lb)}")
    for key in ("chains", "steps", "snapshot_steps", "image_shape", "value_range"):
        va, vb = getattr(a.plan, key), getattr(b.plan, key)
        if tuple(np.atleast_1d(va)) != tuple(np.atleast_1d(vb)):
            problems.append(f"{key}: {va} vs {vb}")
    sa, sb = a.spec().get("sampler", {}), b.spec().get("sampler", {})
    if sa != sb:
        keys = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
        problems.append("sampler settings differ: " + ", ".join(f"{k}: {sa.get(k)!r} vs {sb.get(k)!r}" for k in keys))
    if problems:
        raise CompareError(f"{a.loc.url!r} and {b.loc.url!r} cannot be compared unit by unit:\n  " + "\n  ".join(problems))


@dataclass
class Comparison:
    units: pa.Table  # one row per paired unit: layer, unit, <col>_a, <col>_b, <col>_delta, sample_distance
    layers: list[dict[str, Any]]  # per layer: units paired, mean |delta| per column, mean sample distance
    skipped: list[str] = field(default_factory=list)  # units left out because a store's block is corrupt


def compare_stores(url_a: str | SweepStore, url_b: str | SweepStore) -> Comparison:
    a = url_a if isinstance(url_a, SweepStore) else open_store(url_a)
    b = url_b if isinstance(url_b, SweepStore) else open_store(url_b)
    check_comparable(a, b)
    ua, ub = a.units(), b.units()
    rows_b = {(r["layer"], r["unit"]): r for r in ub.to_pylist()}
    out: list[dict[str, Any]] = []
    skipped: list[str] = []
    for ra in ua.to_pylist():
        rb = rows_b.get((ra["layer"], ra["unit"]))
        if rb is None:
            continue
        row: dict[str, Any] = {"layer": ra["layer"], "unit": ra["unit"]}
        for col in PAIRED:
            va, vb = ra.get(col), rb.get(col)
            row[f"{col}_a"], row[f"{col}_b"] = va, vb
            row[f"{col}_delta"] = (vb - va) if va is not None and vb is not None else None
        try:
            sa = a.finals(ra["layer"], ra["unit"])
            sb = b.finals(ra["layer"], ra["unit"])
        except CorruptBlockError as err:
            skipped.append(f"{ra['layer']} unit {ra['unit']}: {err}")
            continue
        lo, hi = a.plan.value_range
        with np.errstate(invalid="ignore"):
            per_chain = np.sqrt(np.nanmean((sa - sb).reshape(len(sa), -1) ** 2, axis=1)) / (hi - lo)
        row["sample_distance"] = float(np.nanmean(per_chain)) if np.isfinite(per_chain).any() else None
        out.append(row)
    table = pa.Table.from_pylist(out) if out else pa.table({"layer": pa.array([], pa.string()), "unit": pa.array([], pa.int32())})
    layers = []
    for name in dict.fromkeys(r["layer"] for r in out):
        lrows = [r for r in out if r["layer"] == name]
        lp = a.plan.layer(name)
        summary: dict[str, Any] = {"layer": name, "kind": lp.kind, "objective": lp.objective, "paired": len(lrows)}
        for col in (*PAIRED, "sample"):
            key = "sample_distance" if col == "sample" else f"{col}_delta"
            vals = np.array([r[key] for r in lrows if r[key] is not None], dtype=float)
            if col == "sample":
                summary["mean_sample_distance"] = float(vals.mean()) if vals.size else None
            else:
                summary[f"mean_{col}_delta"] = float(vals.mean()) if vals.size else None
                summary[f"mean_abs_{col}_delta"] = float(np.abs(vals).mean()) if vals.size else None
        layers.append(summary)
    return Comparison(units=table, layers=layers, skipped=skipped)


def write_report(cmp: Comparison, a: SweepStore, b: SweepStore, out_dir: str, top: int = 12) -> str:
    """An HTML page with the per-layer summary and side-by-side samples of the units that changed most."""
    from pathlib import Path

    from ldam_sweep.render import render_grid

    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    cols = ["layer", "kind", "objective", "paired", "mean_sample_distance", "mean_activation_ratio_delta", "mean_abs_activation_ratio_delta",
            "mean_realism_final_mean_delta", "mean_nearest_real_delta", "mean_pixel_diversity_delta"]
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{escape(fmt_number(r.get(c)))}</td>" for c in cols) + "</tr>" for r in cmp.layers)
    rows = sorted((r for r in cmp.units.to_pylist() if r.get("sample_distance") is not None),
                  key=lambda r: -r["sample_distance"])[:top]
    figs = []
    for i, r in enumerate(rows):
        sa = a.finals(r["layer"], r["unit"])
        sb = b.finals(r["layer"], r["unit"])
        h = sa.shape[-2]
        name = f"img/{i}.png"
        render_grid(np.stack([sa, sb]), a.plan.value_range, scale=max(1, 64 // h),
                    row_labels=["A", "B"]).save(out / name)
        figs.append(f"<figure><figcaption>{escape(r['layer'])} unit {r['unit']}: sample distance {r['sample_distance']:.3f}, "
                    f"activation ratio {fmt_number(r.get('activation_ratio_a'))} → {fmt_number(r.get('activation_ratio_b'))}</figcaption>"
                    f"<img style='image-rendering:pixelated' src='{name}' alt='unit {r['unit']}'></figure>")
    page = (f"<!doctype html><meta charset='utf-8'><title>compare</title><h1>A: {escape(a.attrs['model']['name'])} "
            f"({escape(a.loc.url)})<br>B: {escape(b.attrs['model']['name'])} ({escape(b.loc.url)})</h1>"
            f"<h2>Per layer</h2><table border='1' cellpadding='4'><tr>{head}</tr>{body}</table>"
            f"<h2>Units that changed most (final samples, chain by chain; same seeds)</h2>{''.join(figs)}")
    (out / "index.html").write_text(page)
    return str(out / "index.html")

