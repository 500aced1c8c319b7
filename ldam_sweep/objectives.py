"""The one table of unit objectives: what each computes and which layer kinds it applies to.

An objective reduces a layer's output to one value per (image, unit). Element i of a sampling
batch maximises unit ``units[i]``; exemplar ranking scores every image for every unit. Both use
the same table, so adding an objective is one entry here.

This module imports no torch: a reduction only calls tensor methods, so the store and the
planning code can ask which objective a layer uses without loading the sampler.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ldam_sweep.errors import SamplerError


@dataclass(frozen=True)
class TokenGeometry:
    """Where a token layer's tokens sit: ``tokens`` in all, the first ``prefix`` of them not on the
    patch grid (a class token, distillation or register tokens), then ``grid`` = (rows, cols) patch
    tokens in row-major order (None when the count fits no grid of the input's aspect ratio)."""

    tokens: int
    prefix: int = 0
    grid: tuple[int, int] | None = None

    @property
    def has_cls(self) -> bool:
        """Whether token 0 is a class token: a token before the patch grid (ViT, DeiT, CLIP)."""
        return self.grid is not None and self.prefix >= 1

    def centre(self) -> int:
        """Sequence index of the patch token at the grid's centre (rows // 2, cols // 2)."""
        if self.grid is None:
            return self.tokens // 2
        rows, cols = self.grid
        return self.prefix + (rows // 2) * cols + cols // 2

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "prefix": self.prefix, "grid": None if self.grid is None else list(self.grid)}


def token_geometry(tokens: int, height: int, width: int, max_prefix: int = 8) -> TokenGeometry:
    """The geometry of a (B, tokens, D) output for an input of height x width: the fewest leading
    tokens whose removal leaves a rows x cols grid with rows / cols = height / width."""
    for prefix in range(0, min(max_prefix, tokens - 1) + 1):
        n = tokens - prefix
        for rows in range(1, n + 1):
            if n % rows == 0 and rows * width == (n // rows) * height:
                return TokenGeometry(tokens, prefix, (rows, n // rows))
    return TokenGeometry(tokens)


@dataclass(frozen=True)
class Objective:
    """``reduce(acts, arg)`` maps a layer output laid out unit-first, (B, C, ...), to per-unit values
    (B, C), each channel on its own: the units are selected first and only their channels are
    reduced. Token layers arrive as (B, D, T): features first, then tokens. ``arg`` is the
    objective's parameter (``token:N`` gives N), None for the others."""

    name: str
    kinds: tuple[str, ...]  # layer kinds it applies to
    reduce: Callable[[Any, int | None], Any]
    help: str


def _spatial_mean(acts: Any, _arg: int | None) -> Any:
    return acts.mean(dim=(2, 3))


def _centre(acts: Any, _arg: int | None) -> Any:
    return acts[:, :, acts.shape[2] // 2, acts.shape[3] // 2]


def _identity(acts: Any, _arg: int | None) -> Any:
    return acts


def _token_mean(acts: Any, _arg: int | None) -> Any:
    return acts.mean(dim=2)


def _token_at(acts: Any, arg: int | None) -> Any:
    return acts[:, :, acts.shape[2] // 2 if arg is None else arg]


def _cls(acts: Any, _arg: int | None) -> Any:
    return acts[:, :, 0]


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("channel", ("conv",), _spatial_mean, "spatial mean of the channel (the lucid/lucent default)"),
    Objective("neuron", ("conv",), _centre, "the channel at the centre position (H // 2, W // 2)"),
    Objective("unit", ("linear", "logit"), _identity, "one feature of a (B, F) output"),
    Objective("logit", ("logit",), _identity, "one class logit, pre-softmax"),
    Objective("token_mean", ("token",), _token_mean, "one feature averaged over all tokens"),
    Objective("cls", ("token",), _cls, "one feature of the class token (token 0; models with a class token)"),
    Objective("token", ("token",), _token_at,
              "one feature of one token: token (the patch grid's centre), token:ROW,COL (a grid position) "
              "or token:N (sequence index N, class token = 0)"),
)}

# The objective a layer of each kind uses unless the job spec asks for another.
DEFAULT_BY_KIND: dict[str, str] = {"conv": "channel", "linear": "unit", "logit": "logit", "token": "token_mean"}


def allowed_objectives(kind: str) -> list[str]:
    """Names of the objectives that apply to a layer of ``kind``, in table order."""
    return [o.name for o in OBJECTIVES.values() if kind in o.kinds]


def split_objective(objective: str) -> tuple[str, str | None]:
    """``"token:3,4"`` -> ``("token", "3,4")``; a name without a parameter -> ``(name, None)``."""
    base, sep, arg = objective.partition(":")
    return base.strip(), (arg.strip() if sep else None)


def check_objective(objective: str, layer_kind: str, layer_name: str,
                    geometry: TokenGeometry | None = None) -> str:
    """The objective's canonical name if it applies to the layer (``token`` and ``token:R,C``
    become ``token:N``, a sequence index, checked against ``geometry``); SamplerError naming what
    is allowed otherwise."""
    allowed = allowed_objectives(layer_kind)
    base, arg = split_objective(objective)
    where = f"{layer_kind} layer {layer_name!r}"
    if base not in OBJECTIVES:
        raise SamplerError(f"unknown objective {objective!r}; allowed for {where}: {', '.join(allowed)}")
    if base not in allowed:
        raise SamplerError(f"objective {objective!r} does not apply to {where}; allowed: {', '.join(allowed)}")
    if base != "token":
        if arg is not None:
            raise SamplerError(f"objective {objective!r} for {where} takes no parameter; use {base!r}")
        if base == "cls" and geometry is not None and not geometry.has_cls:
            raise SamplerError(f"objective 'cls' for {where}: its {geometry.tokens} tokens have no class token "
                               f"(no token before the patch grid); use token_mean or token")
        return base
    return f"token:{_token_index(objective, arg, where, geometry)}"


def _token_index(objective: str, arg: str | None, where: str, geometry: TokenGeometry | None) -> int:
    parts = [] if arg is None else [p.strip() for p in arg.split(",")]
    if not all(p.isdigit() for p in parts) or len(parts) > 2:
        raise SamplerError(f"objective {objective!r} for {where}: write token, token:N (a sequence index) or "
                           f"token:ROW,COL (a patch-grid position)")
    if geometry is None:
        raise SamplerError(f"objective {objective!r} for {where}: the layer's token geometry is unknown")
    if not parts:
        return geometry.centre()
    if len(parts) == 1:
        index = int(parts[0])
        if index >= geometry.tokens:
            raise SamplerError(f"objective {objective!r} for {where}: token {index} is out of range; "
                               f"the layer has tokens 0..{geometry.tokens - 1}")
        return index
    if geometry.grid is None:
        raise SamplerError(f"objective {objective!r} for {where}: its {geometry.tokens} tokens form no patch grid; "
                           f"give a sequence index, token:N with N in 0..{geometry.tokens - 1}")
    row, col = int(parts[0]), int(parts[1])
    rows, cols = geometry.grid
    if row >= rows or col >= cols:
        raise SamplerError(f"objective {objective!r} for {where}: position ({row}, {col}) is outside the "
                           f"{rows}x{cols} patch grid (rows 0..{rows - 1}, columns 0..{cols - 1})")
    return geometry.prefix + row * cols + col


def objective_for(layer_name: str, layer_kind: str, requested: Mapping[str, str] | None = None,
                  geometry: TokenGeometry | None = None) -> str:
    """The objective a layer uses: ``requested[layer_name]``, else ``requested[layer_kind]`` (the job
    spec's ``objective:`` map), else the kind's default. Checked against the table and canonical."""
    requested = requested or {}
    name = requested.get(layer_name) or requested.get(layer_kind) or DEFAULT_BY_KIND[layer_kind]
    return check_objective(name, layer_kind, layer_name, geometry)


@dataclass(frozen=True)
class UnitObjective:
    """A canonical objective string (``check_objective``'s), parsed once: its table entry and its
    parameter. ``str()`` gives the string back (what the manifest and the plan keep)."""

    text: str
    entry: Objective
    arg: int | None

    def reduce(self, acts: Any) -> Any:
        return self.entry.reduce(acts, self.arg)

    def __str__(self) -> str:
        return self.text


@functools.lru_cache(maxsize=256)
def _parse(objective: str) -> UnitObjective:
    base, arg = split_objective(objective)
    if base not in OBJECTIVES:
        raise SamplerError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
    return UnitObjective(objective, OBJECTIVES[base], None if arg is None else int(arg))


def parse_objective(objective: "str | UnitObjective") -> UnitObjective:
    """The objective as an object, made once per distinct string (a sampler's step does not parse it)."""
    return objective if isinstance(objective, UnitObjective) else _parse(objective)


def _reduce(objective: "str | UnitObjective") -> Callable[[Any], Any]:
    return parse_objective(objective).reduce


def unit_objective(acts: Any, units: Any, objective: "str | UnitObjective") -> Any:
    """(B,) activation of each batch element's own unit ``units[i]``: one gather of its channel,
    then the reduction. Gathering first gives the same floats as the samplers before the table
    (reducing all C channels first rounds the channel mean differently) at no measurable cost."""
    b, rest = acts.shape[0], tuple(acts.shape[2:])
    idx = units.to(device=acts.device).long().view(b, 1, *(1 for _ in rest)).expand(b, 1, *rest)
    return _reduce(objective)(acts.gather(1, idx)).squeeze(1)


def units_objective(acts: Any, units: Any, objective: "str | UnitObjective") -> Any:
    """(N, U): every image's activation for each of the given units (exemplar ranking)."""
    return _reduce(objective)(acts[:, units.to(device=acts.device).long()])
