"""ldam-sweep: whole-network Langevin Dynamics Activation Maximization (LDAM).

    import ldam_sweep as ls
    model = ls.load_model("digits-cnn")
    result = ls.sample(model, "fc2", range(10), chains=8, steps=300)
"""

from ldam_sweep.cluster.driver import SweepSummary, run_sweep
from ldam_sweep.errors import DataError, LayerError, LdamError, ModelError, SamplerError, SpecError
from ldam_sweep.model import LayerInfo, ModelHandle, RandomWeightsWarning, load_model
from ldam_sweep.sampling import ChainResult, LdamOptions, SgldOptions, sample
from ldam_sweep.spec import InputSpec, JobSpec, ModelSpec, load_model_spec, load_spec
from ldam_sweep.store import StoreError, SweepStore, open_store

__version__ = "0.1.0"

__all__ = [
    "ChainResult", "DataError", "InputSpec", "LayerError", "LayerInfo", "LdamError", "LdamOptions",
    "ModelError", "ModelHandle", "ModelSpec", "RandomWeightsWarning", "SamplerError", "SgldOptions",
    "SpecError", "StoreError", "SweepStore", "SweepSummary", "JobSpec", "load_model", "load_model_spec", "load_spec",
    "open_store", "run_sweep", "sample",
]
