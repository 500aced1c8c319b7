"""Store benchmark: writing + committing blocks, querying a 100k-unit manifest, reading one unit.

Synthetic chain results of the demo's shape (8 chains, 4 snapshots, 1x28x28, 301-step traces)
go through the real writer, manifest and query code on local disk.

    python benchmarks/store.py            # 100,000 units in 10 layers, blocks of 64
    python benchmarks/store.py --quick    # 2,000 units (seconds; run by the test suite)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import ldam_sweep as ls
from record import report
from ldam_sweep.sampling.chains import ChainResult
from ldam_sweep.store import BlockWriter, commit, create_store
from ldam_sweep.store.schema import LayerPlan, StorePlan

CHAINS, STEPS, SNAPS, SHAPE = 8, 300, (75, 150, 225, 300), (1, 28, 28)


def fake_result(layer: str, units: list[int], rng: np.random.Generator) -> ChainResult:
    n = len(units)
    return ChainResult(
        layer=layer, units=np.asarray(units), objective="channel", method="ldam", seed=0, lam=0.0, steps=STEPS,
        options={}, snapshot_steps=np.asarray(SNAPS),
        samples=rng.random((n, CHAINS, len(SNAPS), *SHAPE), dtype=np.float32),
        activation=rng.standard_normal((n, CHAINS, STEPS + 1), dtype=np.float32),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--write-blocks", type=int, default=40, help="blocks written for real (data + rows)")
    ap.add_argument("--commit-every", type=int, default=10, help="blocks per manifest file")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "store.json"))
    ap.add_argument("--dir", default=None, help="where to build the store (default: a temp dir)")
    args = ap.parse_args()
    if args.quick:
        args.units, args.layers, args.write_blocks = 2_000, 2, 4
    rng = np.random.default_rng(0)
    per_layer = args.units // args.layers
    layers = tuple(LayerPlan(f"layer{i}", "conv", "Conv2d", per_layer, (per_layer, 4, 4), args.block, "channel")
                   for i in range(args.layers))
    plan = StorePlan(layers=layers, chains=CHAINS, steps=STEPS, snapshot_steps=SNAPS, image_shape=SHAPE,
                     value_range=(0.0, 1.0), model_name="synthetic", model_fingerprint="0" * 64, spec={"bench": True})
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        url = f"{tmp}/bench.zarr"
        t0 = time.perf_counter()
        create_store(url, plan)
        t_create = time.perf_counter() - t0
        writer = BlockWriter(url)

        # 1. real block writes (arrays + rows) for the first blocks of layer0
        lp = layers[0]
        results = [fake_result(lp.name, lp.block_units(b), rng) for b in range(args.write_blocks)]
        t0 = time.perf_counter()
        rows = []
        for b, res in enumerate(results):
            rows += writer.write(lp.name, b, res)
        t_write = time.perf_counter() - t0
        bytes_per_block = results[0].samples.size * 2 + results[0].activation.nbytes

        # 2. commit rows for every unit of the store, args.commit_every blocks per manifest file
        template = rows[0]
        written = {(r["layer"], r["unit"]): r for r in rows}  # real rows (and checksums) of the written blocks
        all_rows = []
        for layer in layers:
            for b in layer.planned_blocks():
                for u in layer.block_units(b):
                    all_rows.append({**written.get((layer.name, u), template), "layer": layer.name, "unit": u, "block": b,
                                     "act_final_mean": float(rng.standard_normal())})
        per_file = args.commit_every * args.block
        t0 = time.perf_counter()
        n_files = 0
        for i in range(0, len(all_rows), per_file):
            commit(url, all_rows[i : i + per_file])
            n_files += 1
        t_commit = time.perf_counter() - t0

        # 3. query: units() de-duplicated + sort + top-k, over the whole manifest; DuckDB too
        st = ls.open_store(url)
        q_times, sql_times = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            top = st.units(sort="act_final_mean", limit=20)
            q_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            st.sql("SELECT layer, unit, act_final_mean FROM units ORDER BY act_final_mean DESC LIMIT 20")
            sql_times.append(time.perf_counter() - t0)
        assert top.num_rows == 20
        manifest_rows = st.units().num_rows

        # 4. one unit's samples (manifest check + one inner chunk of a shard); the first read of a
        # block also verifies the block's checksum (reads and hashes the whole block), later reads of
        # the same block by the same SweepStore are cached
        first_times, read_times = [], []
        for b in range(args.write_blocks):
            u = b * args.block
            t0 = time.perf_counter()
            st.samples(lp.name, u)
            first_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            st.samples(lp.name, u + 1)
            read_times.append(time.perf_counter() - t0)
        root = st.root
        arr = root[f"layers/{lp.name}/samples"]
        raw_times = []
        for u in range(0, args.write_blocks * args.block, args.block):
            t0 = time.perf_counter()
            arr[u]
            raw_times.append(time.perf_counter() - t0)

    record = {
        "benchmark": "store", "units": len(all_rows), "layers": args.layers, "block": args.block,
        "machine": f"{platform.machine()} ({platform.node()})",
        "create_seconds": t_create,
        "write_blocks": args.write_blocks, "write_block_ms": 1e3 * t_write / args.write_blocks,
        "write_MB_per_s": bytes_per_block * args.write_blocks / t_write / 1e6,
        "manifest_files": n_files, "manifest_rows": manifest_rows, "commit_ms_per_file": 1e3 * t_commit / n_files,
        "commit_rows_per_s": len(all_rows) / t_commit,
        "units_sort_topk_s": statistics.median(q_times), "duckdb_topk_s": statistics.median(sql_times),
        "read_unit_samples_first_in_block_ms": 1e3 * statistics.median(first_times),
        "read_unit_samples_ms": 1e3 * statistics.median(read_times),
        "read_unit_raw_zarr_ms": 1e3 * statistics.median(raw_times),
    }
    report(f"store benchmark: {record['units']} units in {args.layers} layers, blocks of {args.block}", record,
           ("create_seconds", "write_block_ms", "write_MB_per_s", "manifest_files", "commit_ms_per_file",
            "commit_rows_per_s", "units_sort_topk_s", "duckdb_topk_s", "read_unit_samples_first_in_block_ms",
            "read_unit_samples_ms", "read_unit_raw_zarr_ms"),
           args.out)


if __name__ == "__main__":
    main()
