"""The demo job: every layer and unit of the built-in digits CNN, D trained on digits.

``jobs/demo.yaml`` holds the same spec (a test keeps the two equal)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from ldam_sweep.spec import JobSpec, parse_job

DEMO_DOC: dict[str, Any] = {
    "name": "demo",
    "model": {"zoo": "digits-cnn"},
    "layers": "all",
    "sampler": {"method": "ldam", "steps": 300, "chains": 8, "lam": 0.5, "seed": 0,
                "step_size": 0.01, "noise": 0.1, "l2": 0.1},
    "discriminator": {"train": {"updates": 200, "lam": 0.5}},
    "data": {"source": "digits"},
    "exemplars": 8,
    "resources": {"actors": 2, "block_size": 32},
}


def demo_job(quick: bool = False) -> JobSpec:
    doc = copy.deepcopy(DEMO_DOC)
    if quick:  # the same whole-network sweep, shorter: a first look in well under a minute
        doc["name"] = "demo-quick"
        doc["sampler"].update(steps=60, chains=4)
        doc["discriminator"]["train"]["updates"] = 30
    return parse_job(doc)


def write_demo_pictures(url: str) -> list[Path]:
    """PNG grids of the final samples of every committed unit of the logits layer and of a few
    units per other layer (until the HTML atlas exists)."""
    from ldam_sweep.atlas.grid import save_grid
    from ldam_sweep.store import open_store

    st = open_store(url)
    out_dir = Path(st.loc.url).parent / f"{Path(st.loc.url).stem}-pictures"
    paths = []
    for lp in st.plan.layers:
        units = st.units(lp.name, sort="unit", descending=False)["unit"].to_pylist()[:16]
        if not units:
            continue
        finals = np.stack([st.samples(lp.name, u)[:, -1] for u in units])
        acts = np.stack([st.trace(lp.name, u)[:, -1] for u in units])
        paths.append(save_grid(out_dir / f"{lp.name}.png", finals, st.plan.value_range,
                               row_labels=[f"{lp.name}:{u}" for u in units],
                               cell_labels=np.vectorize(lambda v: f"{v:.3g}")(acts)))
    return paths
