"""The demo job: every layer and unit of the built-in digits CNN, D trained on digits.

``jobs/demo.yaml`` holds the same spec (a test keeps the two equal)."""

from __future__ import annotations

import copy
from typing import Any

from ldam_sweep.spec import JobSpec, parse_job

DEMO_DOC: dict[str, Any] = {
    "name": "demo",
    "model": {"zoo": "digits-cnn"},
    "layers": "all",
    "sampler": {"method": "ldam", "steps": 300, "chains": 8, "lam": 0.5, "seed": 0, "ladder": [1.5, 2.0]},
    "discriminator": {"train": {"updates": 400, "lam": 0.5}},
    "data": {"source": "digits"},
    "exemplars": 8,
    "resources": {"actors": 2, "block_size": "auto"},
}


def demo_job(quick: bool = False) -> JobSpec:
    doc = copy.deepcopy(DEMO_DOC)
    if quick:  # the same whole-network sweep, shorter: a first look in well under a minute
        doc["name"] = "demo-quick"
        doc["sampler"].update(steps=60, chains=4, ladder_steps=30)
        doc["discriminator"]["train"]["updates"] = 30
    return parse_job(doc)

