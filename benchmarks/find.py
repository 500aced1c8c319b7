"""find benchmark: which units respond to an image, over a whole digits-cnn store (9 layers, 410 units).

The store is built in-process (few chains and steps, exemplars from the train digits: what find
reads is the manifest's references, not the samples' quality), then ``find_units`` is timed for
1 and for 100 held-out digits, separately from loading the store's model.

    python benchmarks/find.py            # 2 chains x 20 steps, 20 repeats
    python benchmarks/find.py --quick    # 1 chain x 4 steps, 3 repeats (run by the test suite)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import ldam_sweep as ls
from record import report
from ldam_sweep.data import digits
from ldam_sweep.find import find_units, store_model
from ldam_sweep.sampling.chains import default_snapshot_steps
from ldam_sweep.sampling.exemplars import top_exemplars
from ldam_sweep.store import BlockWriter, commit, create_store
from ldam_sweep.planning import plan_store


def build_store(url: str, chains: int, steps: int, k: int) -> int:
    model = ls.load_model("digits-cnn", device="cpu")
    plan = plan_store(model, {layer.name: None for layer in model.layers}, chains=chains, steps=steps,
                      snapshot_steps=default_snapshot_steps(steps, None), block_size=64, exemplars_k=k,
                      spec={"model": {"zoo": "digits-cnn"}, "sampler": {"chains": chains, "steps": steps, "seed": 0}})
    create_store(url, plan)
    pool = torch.from_numpy(digits(28, "train")[0])
    writer = BlockWriter(url)
    rows = []
    for lp in plan.layers:
        for b in lp.planned_blocks():
            res = ls.sample(model, lp.name, lp.block_units(b), chains=chains, steps=steps, seed=0)
            rows += writer.write(lp.name, b, res, exemplars=top_exemplars(model, lp.name, res.units, lp.objective, pool, k))
    commit(url, rows)
    return len(rows)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "find.json"))
    ap.add_argument("--dir", default=None, help="where to build the store (default: a temp dir)")
    args = ap.parse_args()
    if args.quick:
        args.chains, args.steps, args.repeats = 1, 4, 3
    test = digits(28, "test")[0]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        url = f"{tmp}/find.zarr"
        t0 = time.perf_counter()
        units = build_store(url, args.chains, args.steps, k=4)
        t_build = time.perf_counter() - t0
        st = ls.open_store(url)
        t0 = time.perf_counter()
        model = store_model(st)  # what the first find() of a session pays
        t_load = time.perf_counter() - t0
        find_units(st, test[:1], model=model)  # warm-up
        one = timed(lambda: find_units(st, test[:1], model=model), args.repeats)
        hundred = timed(lambda: find_units(st, test[:100], model=model), max(1, args.repeats // 4))
        hits = find_units(st, test[:1], model=model).hits.num_rows
    record = {
        "benchmark": "find", "units": units, "layers": len(st.plan.layers), "chains": args.chains, "steps": args.steps,
        "build_seconds": t_build, "model_load_seconds": t_load, "find_1_image_seconds": one,
        "find_100_images_seconds": hundred, "per_image_ms_at_100": 1000 * hundred / 100, "hits_per_image": hits,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(), "quick": args.quick,
    }
    report(f"find over a whole digits-cnn store ({units} units, {record['layers']} layers)", record,
           ["model_load_seconds", "find_1_image_seconds", "find_100_images_seconds", "per_image_ms_at_100",
            "build_seconds"], args.out)


if __name__ == "__main__":
    main()
