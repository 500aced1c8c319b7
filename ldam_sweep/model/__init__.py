"""Models: loading from a spec, layer discovery, truncated forward, the built-in zoo."""

from ldam_sweep.model.discovery import LayerInfo, discover_layers
from ldam_sweep.model.handle import ModelHandle
from ldam_sweep.model.loading import RandomWeightsWarning, load_model, read_state_dict

__all__ = ["LayerInfo", "ModelHandle", "RandomWeightsWarning", "discover_layers", "load_model", "read_state_dict"]
