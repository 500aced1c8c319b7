"""Atlas benchmark: build the static site of a 10,000-unit store and report time and page sizes.

Synthetic results (8 chains, 4 snapshots of 1x28x28, 301-step traces, 8 exemplars) go through the
real writer, manifest and atlas code; then a rebuild with nothing changed (incremental).

    python benchmarks/atlas.py            # 10,000 units in 4 layers
    python benchmarks/atlas.py --quick    # 200 units (seconds; run by the test suite)
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from ldam_sweep.atlas.site import build_atlas
from record import report
from ldam_sweep.sampling.chains import ChainResult
from ldam_sweep.store import BlockWriter, commit, create_store
from ldam_sweep.store.layout import LayerPlan, StorePlan

CHAINS, STEPS, SNAPS, SHAPE, K = 8, 300, (75, 150, 225, 300), (1, 28, 28), 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=10_000)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "atlas.json"))
    args = ap.parse_args()
    if args.quick:
        args.units, args.layers = 200, 2
    rng = np.random.default_rng(0)
    per = args.units // args.layers
    layers = tuple(LayerPlan(f"layer{i}", "conv", "Conv2d", per, (per, 4, 4), args.block, "channel") for i in range(args.layers))
    plan = StorePlan(layers=layers, chains=CHAINS, steps=STEPS, snapshot_steps=SNAPS, image_shape=SHAPE,
                     value_range=(0.0, 1.0), exemplars_k=K, model_name="synthetic", model_fingerprint="0" * 64,
                     spec={"bench": True})
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        url = f"{tmp}/bench.zarr"
        create_store(url, plan)
        w = BlockWriter(url)
        t0 = time.perf_counter()
        for lp in layers:
            rows = []
            for b in lp.planned_blocks():
                units = lp.block_units(b)
                n = len(units)
                res = ChainResult(layer=lp.name, units=np.asarray(units), objective="channel", method="ldam", seed=0,
                                  lam=0.0, steps=STEPS, options={}, snapshot_steps=np.asarray(SNAPS),
                                  samples=rng.random((n, CHAINS, len(SNAPS), *SHAPE), dtype=np.float32),
                                  activation=np.cumsum(rng.standard_normal((n, CHAINS, STEPS + 1), dtype=np.float32), -1))
                ex = (rng.random((n, K, *SHAPE), dtype=np.float32), np.sort(rng.random((n, K), dtype=np.float32))[:, ::-1])
                cols = {u: {"pixel_diversity": float(rng.random()), "activation_ratio": float(rng.random() * 2)} for u in units}
                rows += w.write(lp.name, b, res, exemplars=ex, unit_columns=cols)
            commit(url, rows)
        t_store = time.perf_counter() - t0
        site = Path(tmp) / "site"
        first = build_atlas(url, site)
        second = build_atlas(url, site)
        html_sizes = [p.stat().st_size for p in site.rglob("*.html")]
        data_sizes = [p.stat().st_size for p in (site / "data").glob("*.js")]
        total = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    record = {
        "benchmark": "atlas", "units": args.units, "layers": args.layers, "machine": platform.machine(),
        "store_build_seconds": t_store, "atlas_seconds": first.seconds, "atlas_ms_per_unit": 1e3 * first.seconds / args.units,
        "rebuild_unchanged_seconds": second.seconds, "units_rendered": first.units_rendered,
        "rebuild_units_rendered": second.units_rendered, "pages": len(html_sizes), "largest_html_kb": max(html_sizes) / 1e3,
        "largest_layer_data_kb": max(data_sizes) / 1e3, "site_mb": total / 1e6,
    }
    report(f"atlas benchmark: {args.units} units in {args.layers} layers", record,
           ("store_build_seconds", "atlas_seconds", "atlas_ms_per_unit", "rebuild_unchanged_seconds", "pages",
            "largest_html_kb", "largest_layer_data_kb", "site_mb"), args.out, fmt="10.2f")


if __name__ == "__main__":
    main()
