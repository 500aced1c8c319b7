"""Atlas benchmark: build the static site of a large store; report build time, page sizes, and how
fast the index search and the largest layer page answer in headless Chromium.

Synthetic mode: results (8 chains, 4 snapshots of 1x28x28, 301-step traces, 8 exemplars, chain
starts, labels from 10 classes, 32-bin activation histograms) go through the real writer, manifest
and atlas code; then a rebuild with nothing changed (incremental).
``--vit``: a real sweep of every layer and unit of the zoo's digits ViT (2,442 units; 20 steps, 4
chains, no discriminator, digits exemplars) through ``ldam-sweep run``, then its atlas.

    python benchmarks/atlas.py            # 20,480 units in 4 layers
    python benchmarks/atlas.py --quick    # 200 units (seconds; run by the test suite)
    python benchmarks/atlas.py --vit      # the whole digits ViT (a sweep of a few minutes first)
    python benchmarks/atlas.py --units 4096 --workers 2                  # 2 Ray workers against one process
                                                   # (Ray started by the build, and already running)
    python benchmarks/atlas.py --units 122880 --layers 40 --workers 2 --parallel-only   # vit_b_16's size
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ldam_sweep.atlas.site import build_atlas, slug
from ldam_sweep.sampling.chains import ChainResult
from ldam_sweep.sampling.exemplars import HIST_BINS
from ldam_sweep.store import BlockWriter, commit, create_store, open_store
from ldam_sweep.store.schema import LayerPlan, StorePlan
from record import report

CHAINS, STEPS, SNAPS, SHAPE, K = 8, 300, (75, 150, 225, 300), (1, 28, 28), 8
VIT_SPEC = {"name": "atlas-vit", "model": {"zoo": "digits-vit"}, "layers": "all",
            "sampler": {"method": "ldam", "steps": 20, "chains": 4, "lam": 0.0, "seed": 0},
            "data": {"source": "digits"}, "exemplars": 8, "resources": {"actors": 2, "block_size": "auto"}}


def synthetic_store(url: str, units: int, n_layers: int, block: int, hold_back: int = 0) -> tuple[float, list]:
    """A store of ``units`` synthetic units through the real writer; the last ``hold_back`` units'
    blocks are left out. Returns (seconds taken, a function that writes and commits them)."""
    rng = np.random.default_rng(0)
    per = units // n_layers
    layers = tuple(LayerPlan(f"layer{i}", "conv", "Conv2d", per, (per, 4, 4), block, "channel") for i in range(n_layers))
    plan = StorePlan(layers=layers, chains=CHAINS, steps=STEPS, snapshot_steps=SNAPS, image_shape=SHAPE,
                     value_range=(0.0, 1.0), exemplars_k=K, model_name="synthetic", model_fingerprint="0" * 64,
                     spec={"bench": True}, starts=True)
    create_store(url, plan)
    w = BlockWriter(url)
    blocks = [(lp, b) for lp in layers for b in lp.planned_blocks()]
    held = blocks[len(blocks) - -(-hold_back // block):] if hold_back else []

    def write(todo) -> None:
        rows = []
        for lp, b in todo:
            units_b = lp.block_units(b)
            n = len(units_b)
            res = ChainResult(layer=lp.name, units=np.asarray(units_b), objective="channel", method="ldam", seed=0,
                              lam=0.0, steps=STEPS, options={}, snapshot_steps=np.asarray(SNAPS),
                              samples=rng.random((n, CHAINS, len(SNAPS), *SHAPE), dtype=np.float32),
                              activation=np.cumsum(rng.standard_normal((n, CHAINS, STEPS + 1), dtype=np.float32), -1),
                              starts=rng.random((n, CHAINS, *SHAPE), dtype=np.float32))
            ex = (rng.random((n, K, *SHAPE), dtype=np.float32), np.sort(rng.random((n, K), dtype=np.float32))[:, ::-1])
            cols = {}
            for u in units_b:
                label, reading = (str(c) for c in rng.integers(0, 10, 2))
                cols[u] = {"pixel_diversity": float(rng.random()), "activation_ratio": float(rng.random() * 2),
                           "label": label, "label_purity": float(rng.integers(1, K + 1) / K), "label_base_rate": 0.1,
                           "sample_label": reading, "sample_label_share": float(rng.random()),
                           "label_match": float(rng.random()), "data_active_fraction": float(rng.random()),
                           "data_p50": 0.2, "data_p90": 0.6, "data_p99": 0.9,
                           "data_hist": rng.integers(0, 200, HIST_BINS).tolist(), "data_hist_lo": -1.0, "data_hist_hi": 1.0}
            rows += w.write(lp.name, b, res, exemplars=ex, unit_columns=cols)
            if len(rows) >= 640:
                commit(url, rows)
                rows = []
        if rows:
            commit(url, rows)

    t0 = time.perf_counter()
    write([x for x in blocks if x not in held])
    return time.perf_counter() - t0, (lambda: write(held))


def vit_store(url: str, workdir: Path) -> float:
    """Sweep the whole digits ViT (VIT_SPEC) with the real CLI; returns seconds taken."""
    import yaml

    spec = workdir / "vit.yaml"
    spec.write_text(yaml.safe_dump(VIT_SPEC))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "run", str(spec), "--store", url], check=True,
                   env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    return time.perf_counter() - t0


SEARCH_TIMING = """(q) => { const box = document.getElementById('search'), t0 = performance.now();
  box.value = q; box.dispatchEvent(new Event('input'));
  return [performance.now() - t0, document.querySelectorAll('tr.hit').length, document.getElementById('found').textContent]; }"""
FILTER_TIMING = """(q) => { const box = document.getElementById('label'), t0 = performance.now();
  box.value = q; box.dispatchEvent(new Event('input'));
  return [performance.now() - t0, document.getElementById('count').textContent]; }"""


def browser_timings(site: Path, label: str, largest_layer: str) -> dict:
    """Load the index and search for a label, load the largest layer page and filter it by the label:
    milliseconds each, in headless Chromium (Debian's, as the tests use it)."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        t0 = time.perf_counter()
        page.goto((site / "index.html").as_uri(), wait_until="load")
        out["index_load_ms"] = 1e3 * (time.perf_counter() - t0)
        ms, shown, found = page.evaluate(SEARCH_TIMING, label)
        out.update(search_ms=ms, search_rows_shown=shown, search_found=found)
        t0 = time.perf_counter()
        page.goto((site / "layers" / f"{slug(largest_layer)}.html").as_uri(), wait_until="load")
        page.wait_for_selector(".cell")
        out["layer_page_load_ms"] = 1e3 * (time.perf_counter() - t0)
        ms, count = page.evaluate(FILTER_TIMING, label)
        out.update(layer_filter_ms=ms, layer_filter_count=count)
        browser.close()
    return out


def warm_build(url: str, site: Path, workers: int):
    """The parallel build on a Ray that is already up (a cluster's, or the one a sweep just used):
    the same local Ray as ``build_atlas`` starts, started before the clock runs."""
    import ray

    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", num_cpus=workers, include_dashboard=False, namespace="ldam-sweep",
             log_to_driver=False, logging_level="ERROR")
    try:
        return build_atlas(url, site, workers=workers)
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=20_480)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--vit", action="store_true", help="a real sweep of the whole digits ViT instead of synthetic units")
    ap.add_argument("--no-browser", action="store_true", help="skip the Chromium timings")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--workers", type=int, default=1,
                    help="> 1: also build with that many Ray tasks beside the one-process build, and time a rebuild "
                    "after --new-units more units are committed (synthetic mode)")
    ap.add_argument("--new-units", type=int, default=1000)
    ap.add_argument("--parallel-only", action="store_true",
                    help="with --workers: build only in parallel (no one-process build to compare; for whole-network sizes)")
    args = ap.parse_args()
    if args.quick:
        args.units, args.layers, args.new_units = 200, 2, 64
    name = "atlas_vit" if args.vit else ("atlas_quick" if args.quick else "atlas")
    out = args.out or str(Path(__file__).parent / "results" / f"{name}.json")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        url = f"{tmp}/bench.zarr"
        if args.vit:
            t_store, write_held = vit_store(url, Path(tmp)), None
        else:
            t_store, write_held = synthetic_store(url, args.units, args.layers, args.block,
                                                  args.new_units if args.workers > 1 else 0)
        st = open_store(url)
        units = st.units(status=("ok", "dead")).num_rows
        site = Path(tmp) / "site"
        parallel: dict = {}
        if args.parallel_only:  # the one-process build is left out (too long at this size): the parallel site is measured
            first = build_atlas(url, site, workers=args.workers)
            second = build_atlas(url, site, workers=args.workers)
            parallel = {"workers": args.workers, "parallel_atlas_seconds": first.seconds}
        else:
            first = build_atlas(url, site)
            second = build_atlas(url, site)
        if args.workers > 1:
            psite = site if args.parallel_only else Path(tmp) / "site-parallel"
            full = first if args.parallel_only else build_atlas(url, psite, workers=args.workers)
            warm = None if args.parallel_only else warm_build(url, Path(tmp) / "site-warm", args.workers)
            if write_held is not None:
                write_held()
            inc = build_atlas(url, psite, workers=args.workers)
            parallel = {"workers": args.workers, "parallel_atlas_seconds": full.seconds,
                        "incremental_new_units": inc.units_rendered, "incremental_seconds": inc.seconds,
                        "incremental_fraction_of_full": inc.seconds / full.seconds,
                        **({} if warm is None else {"parallel_speedup": first.seconds / full.seconds,
                                                    "parallel_atlas_seconds_ray_running": warm.seconds,
                                                    "parallel_speedup_ray_running": first.seconds / warm.seconds})}
        html = {p: p.stat().st_size for p in site.rglob("*.html")}
        data = {p: p.stat().st_size for p in (site / "data").glob("*.js") if p.name != "search.js"}
        largest_layer = max(st.layers(), key=lambda d: d["done"])["name"]
        label = st.units(largest_layer, sort="label_purity", limit=1)["label"][0].as_py() or "0"
        record = {
            "benchmark": name, "units": units, "layers": len(st.plan.layers), "machine": platform.machine(),
            "cpus": os.cpu_count(), "store_build_seconds": t_store, "atlas_seconds": first.seconds,
            "atlas_seconds_per_1000_units": 1e3 * first.seconds / units,
            "rebuild_unchanged_seconds": second.seconds, "units_rendered": first.units_rendered,
            "rebuild_units_rendered": second.units_rendered, "pages": len(html),
            "largest_html_kb": max(html.values()) / 1e3, "largest_html": str(max(html, key=html.get).relative_to(site)),
            "largest_layer": largest_layer, "largest_layer_units": max(d["done"] for d in st.layers()),
            "largest_layer_page_kb": (html[site / "layers" / f"{slug(largest_layer)}.html"]
                                      + data[site / "data" / f"{slug(largest_layer)}.js"]) / 1e3,
            "largest_layer_data_kb": max(data.values()) / 1e3,
            "search_index_kb": (site / "data" / "search.js").stat().st_size / 1e3,
            "site_mb": sum(p.stat().st_size for p in site.rglob("*") if p.is_file()) / 1e6, "search_label": label,
        }
        record.update(parallel)
        if not args.no_browser:
            record.update(browser_timings(site, label, largest_layer))
    keys = ["units", "store_build_seconds", "atlas_seconds", "atlas_seconds_per_1000_units", "rebuild_unchanged_seconds",
            "pages", "largest_html_kb", "largest_layer_page_kb", "search_index_kb", "site_mb"]
    keys += [] if args.no_browser else ["index_load_ms", "search_ms", "layer_page_load_ms", "layer_filter_ms"]
    keys += [k for k in ("parallel_speedup", "parallel_speedup_ray_running", "incremental_new_units",
                         "incremental_fraction_of_full") if k in record]
    report(f"atlas benchmark: {units} units in {record['layers']} layers", record, keys, out, fmt="10.2f")


if __name__ == "__main__":
    main()
