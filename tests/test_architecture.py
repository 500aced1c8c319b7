"""Architecture: stored identities never change, imports only point down, the store needs no torch."""

from __future__ import annotations

import copy

from ldam_sweep.store.layout import StorePlan

# A plan exactly as zarr.json stores it (attrs "plan"), with a spec that has every field the
# identity rules treat specially: store, resources, model.memory_format, model.precision float32.
PLAN_JSON = {
    "layers": [
        {"name": "conv2", "kind": "conv", "module_type": "Conv2d", "units": 32, "output_shape": [32, 14, 14],
         "block_size": 4, "objective": "channel", "selected": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]},
        {"name": "fc2", "kind": "logit", "module_type": "Linear", "units": 10, "output_shape": [10],
         "block_size": 4, "objective": "logit", "selected": None},
    ],
    "chains": 2, "steps": 12, "snapshot_steps": [6, 12], "image_shape": [1, 28, 28], "value_range": [0.0, 1.0],
    "realism": True, "exemplars_k": 3, "model_name": "digits-cnn", "model_fingerprint": "ab" * 32,
    "spec": {
        "name": "pin", "model": {"zoo": "digits-cnn", "memory_format": "auto", "precision": "float32"},
        "layers": ["conv2", "fc2"], "units": {"conv2": "0-15"},
        "sampler": {"method": "ldam", "steps": 12, "chains": 2, "lam": 0.5, "seed": 0},
        "resources": {"actors": 2, "block_size": 4, "max_attempts": 3, "commit_every": 8},
        "store": "storage/pin.zarr", "exemplars": 3,
    },
}


def test_stored_plan_hashes_never_change():
    """Stores record these hashes: a change here would make every existing store refuse to resume."""
    plan = StorePlan.from_json(copy.deepcopy(PLAN_JSON))
    assert plan.to_json() == PLAN_JSON
    assert plan.spec_hash() == "05b5bf2e10ed048ccbb95448874a8e071ff751836ba94f93798fe5ef3d941808"
    assert plan.plan_hash() == "78e58023430addb3d90b62f55fc1dd3f0e9831c04a4d27abf7f915606267b27b"
