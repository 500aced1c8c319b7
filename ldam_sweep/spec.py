"""Specs users write (YAML or Python), validated with pydantic into precise, actionable errors.

This module holds the model part of a job spec; the sweep's job spec builds on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ldam_sweep.errors import SpecError


class InputSpec(BaseModel):
    """What the model takes: image shape, the pixel range chains live in, and the normalisation
    applied inside the adapter (``(x - mean) / std`` per channel) before the network sees x."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: int = Field(ge=1, le=64)
    height: int = Field(ge=1, le=4096)
    width: int = Field(ge=1, le=4096)
    range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @model_validator(mode="after")
    def _check(self) -> "InputSpec":
        lo, hi = self.range
        if not lo < hi:
            raise ValueError(f"range must be [low, high] with low < high, got [{lo}, {hi}]")
        for name in ("mean", "std"):
            vals = getattr(self, name)
            if len(vals) not in (1, self.channels):
                raise ValueError(
                    f"{name} needs 1 value or one per channel ({self.channels}), got {len(vals)}"
                )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {list(self.std)}")
        return self

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


class ModelSpec(BaseModel):
    """Where a model comes from: exactly one of ``zoo``, ``torchvision``, ``factory``, ``torchscript``.

    - ``zoo: digits-cnn`` — a built-in model, trained on the spot and cached;
    - ``torchvision: resnet18`` (+ ``weights: file.pth``; without weights: random init, warned);
    - ``factory: "package.module:function"`` (+ ``kwargs``, + ``weights`` state dict), needs ``input``;
    - ``torchscript: model.pt``, needs ``input``.
    ``input`` overrides the source's default input spec (e.g. a 64 px torchvision model).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    zoo: str | None = None
    torchvision: str | None = None
    factory: str | None = None
    torchscript: Path | None = None
    weights: Path | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    input: InputSpec | None = None

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, v: str | None) -> str | None:
        if v is not None and (v.count(":") != 1 or not all(v.split(":"))):
            raise ValueError(f"factory must look like 'package.module:function', got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        given = [k for k in ("zoo", "torchvision", "factory", "torchscript") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one model source of zoo, torchvision, factory, torchscript; "
                f"got {given or 'none'}"
            )
        if self.weights is not None and (self.zoo or self.torchscript):
            raise ValueError(f"weights is only allowed with torchvision or factory, not with {given[0]}")
        if self.kwargs and not (self.factory or self.torchvision):
            raise ValueError("kwargs is only allowed with factory or torchvision")
        if (self.factory or self.torchscript) and self.input is None:
            raise ValueError(
                f"a {given[0]} model needs an input section "
                "(channels, height, width, and optionally range, mean, std)"
            )
        return self

    @property
    def source(self) -> str:
        """A short human-readable name of the model source."""
        if self.zoo:
            return f"zoo:{self.zoo}"
        if self.torchvision:
            return f"torchvision:{self.torchvision}"
        if self.factory:
            return f"factory:{self.factory}"
        return f"torchscript:{self.torchscript}"


def format_validation_error(err: ValidationError, where: str) -> str:
    """Turn pydantic's error list into lines 'field.path: message (got value)'."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        got = e.get("input")
        shown = repr(got) if not isinstance(got, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  {loc}: {msg} (got {shown})")
    return f"invalid {where}:\n" + "\n".join(lines)


def parse_model_spec(value: "ModelSpec | dict[str, Any] | str") -> ModelSpec:
    """A ModelSpec from a ModelSpec, a dict, or a shorthand string.

    Shorthands: ``digits-cnn`` (a zoo name), ``torchvision:resnet18``, ``package.module:function``
    is not accepted as shorthand because it needs an input section.
    """
    if isinstance(value, ModelSpec):
        return value
    if isinstance(value, str):
        if value.startswith("torchvision:"):
            value = {"torchvision": value.split(":", 1)[1]}
        elif value.startswith("zoo:"):
            value = {"zoo": value.split(":", 1)[1]}
        else:
            value = {"zoo": value}
    if not isinstance(value, dict):
        raise SpecError(f"model must be a mapping or a name, got {type(value).__name__}")
    try:
        return ModelSpec.model_validate(value)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, "model spec")) from None


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file, turning I/O and syntax problems into SpecError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {str(p)!r} does not exist")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"spec file {str(p)!r} is not valid YAML: {err}") from None


def load_model_spec(ref: str | Path) -> ModelSpec:
    """A ModelSpec from a YAML file (a job spec with a ``model:`` section, or a bare model spec)
    or from a shorthand name such as ``digits-cnn`` or ``torchvision:resnet18``."""
    p = Path(ref)
    if p.suffix.lower() in (".yaml", ".yml") or p.is_file():
        doc = read_yaml(p)
        if not isinstance(doc, dict):
            raise SpecError(f"spec file {str(p)!r} must hold a mapping, got {type(doc).__name__}")
        section = doc.get("model", doc)
        spec = parse_model_spec(section)
        return _resolve_paths(spec, p.parent)
    return parse_model_spec(str(ref))


def _resolve_paths(spec: ModelSpec, base: Path) -> ModelSpec:
    """Relative weight/TorchScript paths in a spec file are relative to that file."""
    updates = {}
    for name in ("weights", "torchscript"):
        val = getattr(spec, name)
        if val is not None and not val.is_absolute():
            updates[name] = (base / val).resolve()
    return spec.model_copy(update=updates) if updates else spec
