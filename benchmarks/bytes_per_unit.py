"""Bytes per unit: one sweep run twice, side by side, in the previous store format (float16 images,
every snapshot and start at full size, zarr's default codecs) and in today's default (8-bit images,
snapshots and starts as thumbnails of at most 64 px beside full-size finals, zstd 9 after a row delta).

The sweep: ResNet-18 (random weights) at 224 px, layer3, 8 units, the default 8 chains, 4 snapshots,
8 exemplars and starts from photo crops (scikit-learn's two sample photographs), through
`ldam-sweep run` (local Ray, the real writer). Both runs sample the same chains (same seeds, CPU):
the finals of the two stores differ by the 8-bit rounding only, reported as ``finals_max_diff``.
Bytes come from ``SweepStore.storage()`` (what `ldam-sweep status --json` reports).

    python benchmarks/bytes_per_unit.py                 # ~6 min on 2 cores (40 steps per chain)
    python benchmarks/bytes_per_unit.py --steps 300     # the default chain length (traces 7x longer)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

import ldam_sweep as ls
from record import report

FORMATS = {"previous": {"pixels": "float16", "snapshot_size": "full", "zstd_level": None}, "default": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--units", default="0-7")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bytes_per_unit.json"))
    args = ap.parse_args()
    record: dict = {"model": "torchvision:resnet18 (random weights)", "layer": "layer3", "size": args.size,
                    "units": args.units, "steps": args.steps, "chains": 8, "exemplars": 8, "data": "photos (128 crops)"}
    stores = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, storage in FORMATS.items():
            doc = {"name": f"bytes-{name}", "layers": ["layer3"], "units": {"layer3": args.units},
                   "model": {"torchvision": "resnet18", "input": {"channels": 3, "height": args.size, "width": args.size,
                                                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}},
                   "sampler": {"steps": args.steps, "chains": 8, "seed": 0}, "data": {"source": "photos", "count": 128},
                   "exemplars": 8, "resources": {"actors": 1, "cpus_per_actor": 2, "block_size": 8},
                   "store": {"url": f"{tmp}/{name}.zarr", **storage}}
            spec = Path(tmp) / f"{name}.yaml"
            spec.write_text(yaml.safe_dump(doc))
            cli = [sys.executable, "-m", "ldam_sweep.cli", "run", str(spec), "--no-realism"]
            subprocess.run(cli, check=True, cwd=tmp, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
            st = ls.open_store(f"{tmp}/{name}.zarr")
            storage_doc = st.storage()
            stores[name] = st
            record[f"{name}_format"] = storage_doc["format"]
            record[f"{name}_bytes_per_unit"] = storage_doc["bytes_per_unit"]
            record[f"{name}_per_array"] = storage_doc["layers"]["layer3"]["per_unit"]
        units = [int(r["unit"]) for r in stores["default"].units(status="ok").to_pylist()]
        diff = max(float(np.nanmax(np.abs(stores["default"].finals("layer3", u) - stores["previous"].finals("layer3", u))))
                   for u in units)
    record["finals_max_diff"] = diff  # 8-bit vs float16 finals of the same chains (half a level: 0.00196)
    record["ratio"] = record["previous_bytes_per_unit"] / record["default_bytes_per_unit"]
    record["previous_mb_per_unit"] = record["previous_bytes_per_unit"] / 1e6
    record["default_mb_per_unit"] = record["default_bytes_per_unit"] / 1e6
    report("bytes per unit (resnet18 layer3 @224, 8 chains x 4 snapshots, 8 exemplars, starts)", record,
           ["previous_mb_per_unit", "default_mb_per_unit", "ratio", "finals_max_diff"], args.out, fmt="10.4f")


if __name__ == "__main__":
    main()
