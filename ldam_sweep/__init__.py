"""ldam-sweep: whole-network Langevin Dynamics Activation Maximization (LDAM).

    import ldam_sweep as ls
    model = ls.load_model("digits-cnn")
    result = ls.sample(model, "fc2", range(10), chains=8, steps=300)

Names load on first use (PEP 562), so ``import ldam_sweep.store`` or the atlas never pull in
torch or Ray; only the error classes and the version are imported up front.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ldam_sweep.errors import CompareError, DataError, LayerError, LdamError, ModelError, SamplerError, SpecError, StoreError
from ldam_sweep.version import __version__

# public name -> the module that defines it
_LAZY = {
    "run_sweep": "ldam_sweep.cluster.driver", "SweepSummary": "ldam_sweep.cluster.driver",
    "load_model": "ldam_sweep.model", "RandomWeightsWarning": "ldam_sweep.model",
    "ModelHandle": "ldam_sweep.model", "LayerInfo": "ldam_sweep.model",
    "sample": "ldam_sweep.sampling", "ChainResult": "ldam_sweep.sampling",
    "load_spec": "ldam_sweep.spec", "load_model_spec": "ldam_sweep.spec", "JobSpec": "ldam_sweep.spec",
    "ModelSpec": "ldam_sweep.spec", "InputSpec": "ldam_sweep.spec",
    "open_store": "ldam_sweep.store.query", "SweepStore": "ldam_sweep.store.query",
    "Finder": "ldam_sweep.find", "find_units": "ldam_sweep.find",
    "ScorePrior": "ldam_sweep.sampling.prior", "train_score_prior": "ldam_sweep.sampling.prior",
    "load_score_prior": "ldam_sweep.sampling.prior",
}

__all__ = [
    "ChainResult", "CompareError", "DataError", "Finder", "InputSpec", "JobSpec", "LayerError", "LayerInfo", "LdamError",
    "ModelError", "ModelHandle", "ModelSpec", "RandomWeightsWarning", "SamplerError", "ScorePrior", "SpecError",
    "StoreError", "SweepStore", "SweepSummary", "__version__", "find_units", "load_model", "load_model_spec", "load_score_prior",
    "load_spec", "open_store", "run_sweep", "sample", "train_score_prior",
]

if TYPE_CHECKING:
    from ldam_sweep.cluster.driver import SweepSummary, run_sweep
    from ldam_sweep.find import Finder, find_units
    from ldam_sweep.model import LayerInfo, ModelHandle, RandomWeightsWarning, load_model
    from ldam_sweep.sampling import ChainResult, sample
    from ldam_sweep.sampling.prior import ScorePrior, load_score_prior, train_score_prior
    from ldam_sweep.spec import InputSpec, JobSpec, ModelSpec, load_model_spec, load_spec
    from ldam_sweep.store.query import SweepStore, open_store


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ldam_sweep' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
