"""The one table of unit objectives: what each computes and which layer kinds it applies to.

An objective reduces a layer's output to one value per (image, unit). Element i of a sampling
batch maximises unit ``units[i]``; exemplar ranking scores every image for every unit. Both use
the same table, so adding an objective is one entry here.

This module imports no torch: a reduction only calls tensor methods, so the store and the
planning code can ask which objective a layer uses without loading the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ldam_sweep.errors import SamplerError


@dataclass(frozen=True)
class Objective:
    """``reduce`` maps a layer output (B, C, ...) to per-unit values (B, C), each channel on its
    own: the units are selected first and only their channels are reduced."""

    name: str
    kinds: tuple[str, ...]  # layer kinds it applies to
    reduce: Callable[[Any], Any]
    help: str


def _spatial_mean(acts: Any) -> Any:
    return acts.mean(dim=(2, 3))


def _centre(acts: Any) -> Any:
    return acts[:, :, acts.shape[2] // 2, acts.shape[3] // 2]


def _identity(acts: Any) -> Any:
    return acts


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("channel", ("conv",), _spatial_mean, "spatial mean of the channel (the lucid/lucent default)"),
    Objective("neuron", ("conv",), _centre, "the channel at the centre position (H // 2, W // 2)"),
    Objective("unit", ("linear", "logit"), _identity, "one feature of a (B, F) output"),
    Objective("logit", ("logit",), _identity, "one class logit, pre-softmax"),
)}

# The objective a layer of each kind uses unless the job spec asks for another.
DEFAULT_BY_KIND: dict[str, str] = {"conv": "channel", "linear": "unit", "logit": "logit"}


def allowed_objectives(kind: str) -> list[str]:
    """Names of the objectives that apply to a layer of ``kind``, in table order."""
    return [o.name for o in OBJECTIVES.values() if kind in o.kinds]


def check_objective(objective: str, layer_kind: str, layer_name: str) -> str:
    """``objective`` if it applies to the layer; SamplerError naming the allowed ones otherwise."""
    allowed = allowed_objectives(layer_kind)
    if objective not in OBJECTIVES:
        raise SamplerError(f"unknown objective {objective!r}; allowed for {layer_kind} layer {layer_name!r}: "
                           f"{', '.join(allowed)}")
    if objective not in allowed:
        raise SamplerError(f"objective {objective!r} does not apply to {layer_kind} layer {layer_name!r}; "
                           f"allowed: {', '.join(allowed)}")
    return objective


def objective_for(layer_name: str, layer_kind: str, requested: Mapping[str, str] | None = None) -> str:
    """The objective a layer uses: ``requested[layer_name]``, else ``requested[layer_kind]`` (the job
    spec's ``objective:`` map), else the kind's default. Checked against the table."""
    requested = requested or {}
    name = requested.get(layer_name) or requested.get(layer_kind) or DEFAULT_BY_KIND[layer_kind]
    return check_objective(name, layer_kind, layer_name)


def unit_objective(acts: Any, units: Any, objective: str) -> Any:
    """(B,) activation of each batch element's own unit ``units[i]``: one gather of its channel,
    then the reduction. Gathering first gives the same floats as the samplers before the table
    (reducing all C channels first rounds the channel mean differently) at no measurable cost."""
    b, rest = acts.shape[0], tuple(acts.shape[2:])
    idx = units.to(device=acts.device).long().view(b, 1, *(1 for _ in rest)).expand(b, 1, *rest)
    return OBJECTIVES[objective].reduce(acts.gather(1, idx)).squeeze(1)


def units_objective(acts: Any, units: Any, objective: str) -> Any:
    """(N, U): every image's activation for each of the given units (exemplar ranking)."""
    return OBJECTIVES[objective].reduce(acts[:, units.to(device=acts.device).long()])
