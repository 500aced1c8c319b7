"""Integrity benchmark: one flipped byte in each file of a finished store, one file at a time.

For every file of the store: a private copy gets one random byte XORed with a random non-zero value,
then ``verify_store`` runs on it. The flip is **found** when verify reports a problem; else it is
**harmless** when everything a reader gets back (root attributes, plan, manifest rows, every array's
data, the discriminator's record and bytes, the realism record, plain zarr's view of every group and
array) is identical to the original's; else it is **silent**: the one outcome that must not happen.
Also times ``verify`` on the store, the whole of it beside its block checks alone (what verify
checked before issue 29), side by side.

    python benchmarks/integrity.py STORE --seeds 5  # e.g. storage/demo.zarr after `make demo`
    python benchmarks/integrity.py --quick          # builds a small sweep first (the test suite's size)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def read_everything(url: str) -> dict[str, Any]:
    """What readers get back from a store, as comparable values (raises where a reader would)."""
    import zarr

    import ldam_sweep as ls
    from ldam_sweep.store import query

    reader_columns = getattr(query, "READER_COLUMNS", ("detected_fraction",))  # (older code: one)
    st = ls.open_store(url)
    out: dict[str, Any] = {"attrs": json.dumps(st.attrs, sort_keys=True)}
    units = st.units(status=None).drop_columns([c for c in reader_columns if c != "detected_fraction"])
    out["units"] = units.to_pylist()
    raw = st.manifest()
    out["manifest"] = sorted(map(str, raw.to_pylist()))
    for lp in st.plan.layers:
        for name in st.plan.arrays(lp):
            a = np.asarray(st._array(lp.name, name)[:])
            out[f"{lp.name}/{name}"] = (a.dtype.str, a.shape, a.tobytes())
    out["discriminator"] = (json.dumps(st.discriminator_info(), sort_keys=True), st.discriminator_bytes())
    out["realism"] = json.dumps(st.realism(), sort_keys=True, default=str)
    with warnings.catch_warnings():  # plain zarr notes the non-zarr files deep down (manifest/parts/, and older stores' root files)
        warnings.simplefilter("ignore")
        root = zarr.open_group(url, mode="r")
        for path, node in sorted(root.members(max_depth=None)):
            out[f"zarr:{path}"] = json.dumps(node.metadata.to_dict(), sort_keys=True, default=str)
    return out


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def flip_every_file(url: str, workdir: str | Path, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Flip one random byte in each file of the store at ``url`` (each in its own copy); returns the
    counts and, per file, its outcome: "found", "harmless" or "silent"."""
    import ldam_sweep as ls
    from ldam_sweep.store import verify as verify_module
    from ldam_sweep.store import verify_store

    rng = random.Random(seed)
    original = read_everything(url)
    files = sorted(p.relative_to(url) for p in Path(url).rglob("*") if p.is_file())
    outcome: dict[str, str] = {}
    for rel in files:
        copy = Path(workdir) / "flip.zarr"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(url, copy)
        target = copy / rel
        data = bytearray(target.read_bytes())
        if not data:
            outcome[str(rel)] = "empty"
            continue
        i = rng.randrange(len(data))
        data[i] ^= rng.randrange(1, 256)
        target.write_bytes(bytes(data))
        try:
            if hasattr(verify_module, "file_problems"):
                _, problems = verify_store(str(copy))
            else:  # the code before issue 29: verify took an open store (for the before/after counts)
                _, problems = verify_store(ls.open_store(str(copy)))
        except Exception as err:  # verify (or opening the store) refusing it outright also tells the user
            problems = [f"{type(err).__name__}: {err}"]
        if problems:
            outcome[str(rel)] = "found"
        else:
            try:
                outcome[str(rel)] = "harmless" if same(original, read_everything(str(copy))) else "silent"
            except Exception:
                outcome[str(rel)] = "silent"  # verify said ok, a reader fails
        if progress and outcome[str(rel)] == "silent":
            print(f"  silent: {rel} (byte {i})", flush=True)
    counts = {k: sum(v == k for v in outcome.values()) for k in ("found", "harmless", "silent", "empty")}
    return {"files": len(files), **counts, "outcome": outcome}


def time_verify(url: str, repeats: int = 3) -> dict[str, float]:
    """Seconds for the whole verify and for its block checks alone (median of ``repeats``), side by side."""
    import ldam_sweep as ls
    from ldam_sweep.store.verify import _block_problems, verify_store

    whole, blocks = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        verify_store(url)
        whole.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _block_problems(ls.open_store(url), set())
        blocks.append(time.perf_counter() - t0)
    w, b = statistics.median(whole), statistics.median(blocks)
    return {"verify_s": w, "blocks_only_s": b, "new_checks_s": w - b, "ratio": w / b}


QUICK_SPEC = """
name: integrity
model: {zoo: digits-cnn}
layers: [conv2, fc2]
units: {conv2: "0-7", fc2: "0-3"}
sampler: {steps: 10, chains: 2, seed: 1, lam: 0.5}
discriminator: {train: {updates: 5}}
data: {source: digits, limit: 64}
exemplars: 2
resources: {actors: 1, block_size: 4, commit_every: 1}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", nargs="?", help="a finished store (not changed: every flip is made in a copy)")
    ap.add_argument("--quick", action="store_true", help="build a small sweep (2 layers, a discriminator) first")
    ap.add_argument("--seeds", type=int, default=1, help="rounds of one flip per file (seeds 0..N-1)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "integrity.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.store
        if args.quick:
            spec = Path(tmp) / "job.yaml"
            spec.write_text(QUICK_SPEC)
            url = str(Path(tmp) / "s.zarr")
            subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "run", str(spec), "--store", url], check=True,
                           capture_output=True)
        if url is None:
            ap.error("name a STORE or pass --quick")
        timing = time_verify(url)
        rounds = [flip_every_file(url, tmp, seed=seed, progress=True) for seed in range(args.seeds)]
    counts = {k: sum(r[k] for r in rounds) for k in ("found", "harmless", "silent")}
    not_found = {f"seed {i}: {f}": o for i, r in enumerate(rounds) for f, o in r["outcome"].items() if o != "found"}
    record = {"store": Path(args.store).name if args.store else "quick", "seeds": args.seeds, "files": rounds[0]["files"],
              "flips": args.seeds * rounds[0]["files"], **counts, **timing, "not_found": not_found}
    from record import report

    report("integrity: one flipped byte per file", record,
           ["files", "flips", "found", "harmless", "silent", "verify_s", "blocks_only_s", "ratio"], args.out, fmt="10.3f")


if __name__ == "__main__":
    main()
