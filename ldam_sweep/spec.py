"""Specs users write (YAML or Python), validated with pydantic into precise, actionable errors.

This module holds the model part of a job spec; the sweep's job spec builds on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from ldam_sweep.errors import SpecError
from ldam_sweep.objectives import DEFAULT_BY_KIND, allowed_objectives, split_objective
from ldam_sweep.settings import METHODS


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
    ``memory_format``: ``auto`` (channels_last when the model has a Conv2d), ``contiguous`` or
    ``channels_last``; ``auto`` falls back to contiguous for a model that cannot run NHWC (``.view()``
    on conv outputs). Values agree across layouts up to float rounding, so the layout is not part of
    a sweep's identity (a resume may change it, as it may change hardware).
    ``precision: bf16`` runs the model under ``torch.autocast(bfloat16)`` (tensor cores on a GPU);
    the chains' state, noise and update stay float32.
    ``labels``: a text file naming the model's output classes, one per line (the network's reading
    of each unit's samples); the zoo's digits models name theirs, torchvision's take ImageNet's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    zoo: str | None = None
    torchvision: str | None = None
    factory: str | None = None
    torchscript: Path | None = None
    module: str | None = Field(None, description="set by ldam-sweep for a model given as a live torch.nn.Module from "
                               "Python (its class); not loadable from a spec: readers take the module again")
    # where a factory's module is looked for besides sys.path: the folder of the spec file it came
    # from (absolute, and relative to the working folder for a cluster job's shipped working_dir).
    # Not part of the spec's document, so not of a sweep's identity.
    _search: tuple[str, ...] = PrivateAttr(default=())
    weights: Path | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    input: InputSpec | None = None
    labels: Path | None = Field(None, description="text file: the model's output class names, one per line")
    memory_format: Literal["auto", "contiguous", "channels_last"] = Field(
        "auto", description="layout of conv weights and activations; auto: channels_last when the model has a Conv2d "
        "and runs with it (up to 2x faster at large batches on CPU, a wash at small ones: benchmarks/README.md)")
    precision: Literal["float32", "bf16"] = Field(
        "float32", description="bf16: the model's forward/backward under torch.autocast(bfloat16); chain state, "
        "noise, update and traces stay float32")

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, v: str | None) -> str | None:
        if v is not None and (v.count(":") != 1 or not all(v.split(":"))):
            raise ValueError(f"factory must look like 'package.module:function', got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        given = [k for k in ("zoo", "torchvision", "factory", "torchscript", "module") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one model source of zoo, torchvision, factory, torchscript; "
                f"got {given or 'none'}"
            )
        if self.weights is not None and (self.zoo or self.torchscript):
            raise ValueError(f"weights is only allowed with torchvision or factory, not with {given[0]}")
        if self.kwargs and not (self.factory or self.torchvision):
            raise ValueError("kwargs is only allowed with factory or torchvision")
        if (self.factory or self.torchscript or self.module) and self.input is None:
            raise ValueError(
                f"a {given[0]} model needs an input section "
                "(channels, height, width, and optionally range, mean, std)"
            )
        return self

    def runs_code(self) -> str | None:
        """What loading this model would run besides ldam-sweep's and torchvision's own code: the
        factory function a module import calls, or a TorchScript program; None for zoo and
        torchvision models (their weights are read with ``weights_only=True``)."""
        if self.factory:
            return f"factory {self.factory!r} (imports its module and calls it)"
        if self.torchscript is not None:
            return f"TorchScript file {str(self.torchscript)!r} (a program)"
        return None

    @property
    def source(self) -> str:
        """A short human-readable name of the model source."""
        if self.zoo:
            return f"zoo:{self.zoo}"
        if self.torchvision:
            return f"torchvision:{self.torchvision}"
        if self.factory:
            return f"factory:{self.factory}"
        if self.module:
            return f"module:{self.module}"
        return f"torchscript:{self.torchscript}"


class DataSpec(BaseModel):
    """Real images for the discriminator and for dataset exemplars.

    ``source``: ``digits`` (scikit-learn, offline), ``photos`` (random crops of scikit-learn's two
    sample photographs, offline), ``folder`` (PNG/JPEG under ``path``, recursive) or ``npy``
    (an (N, C, H, W) array in the model's pixel range at ``path``).
    Labels (units' exemplar labels): digits' classes, a folder's class subfolders, an npy source's
    ``labels`` (a 1-D .npy of N integers or strings); photos have none.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["digits", "photos", "folder", "npy"]
    path: Path | None = None
    labels: Path | None = Field(None, description="npy only: a 1-D .npy of one label (integer or string) per image")
    limit: int | None = Field(None, ge=1, description="use at most this many images per split")
    count: int = Field(512, ge=8, description="photos: number of training crops")
    seed: int = 0

    @model_validator(mode="after")
    def _path(self) -> "DataSpec":
        if self.source in ("folder", "npy") and self.path is None:
            raise ValueError(f"source {self.source!r} needs a path")
        if self.source in ("digits", "photos") and self.path is not None:
            raise ValueError(f"source {self.source!r} ships with scikit-learn and takes no path")
        if self.labels is not None and self.source != "npy":
            raise ValueError(f"labels is for the npy source; {self.source!r} has its own (digits: the digit; folder: "
                             "its class subfolders; photos: none)")
        return self


def format_validation_error(err: ValidationError, where: str) -> str:
    """Turn pydantic's error list into one line of 'field.path: message (got value)', separated by '; '."""
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
        lines.append(f"{loc}: {msg} (got {shown})")
    return f"invalid {where}: " + "; ".join(lines)  # one line: every field that is wrong


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


def yaml_error_line(err: yaml.YAMLError) -> str:
    """A YAML parser's message in one line: where (line and column, from 1) and what it expected."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context, cmark = getattr(err, "context", None), getattr(err, "context_mark", None)
    opened = f" ({context} at line {cmark.line + 1}, column {cmark.column + 1})" if context and cmark is not None else ""
    return f"{where}{problem}{opened}"


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file, turning I/O and syntax problems into SpecError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {str(p)!r} does not exist")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"spec file {str(p)!r} is not valid YAML: {yaml_error_line(err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"spec file {str(p)!r} cannot be read as YAML text: {err}") from None


def load_model_spec(ref: str | Path) -> ModelSpec:
    """A ModelSpec from a YAML file (a job spec with a ``model:`` section, or a bare model spec)
    or from a shorthand name such as ``digits-cnn`` or ``torchvision:resnet18``."""
    p = Path(ref)
    if p.suffix.lower() in (".yaml", ".yml"):
        doc = read_yaml(p)
        if not isinstance(doc, dict):
            raise SpecError(f"spec file {str(p)!r} must hold a mapping, got {type(doc).__name__}")
        section = doc.get("model", doc)
        spec = parse_model_spec(section)
        return _resolve_paths(spec, p.parent)
    return parse_model_spec(str(ref))


def _resolve_paths(spec: ModelSpec, base: Path) -> ModelSpec:
    """Relative weight/TorchScript/labels paths in a spec file are relative to that file, and a
    factory's module is looked for beside it too."""
    updates = {}
    for name in ("weights", "torchscript", "labels"):
        val = getattr(spec, name)
        if val is not None and not val.is_absolute():
            updates[name] = (base / val).resolve()
    out = spec.model_copy(update=updates) if updates else spec.model_copy()
    if out.factory:
        folder = base.resolve()
        try:
            relative = [str(folder.relative_to(Path.cwd().resolve()))]  # "." for the working folder itself
        except ValueError:
            relative = []
        out._search = tuple(dict.fromkeys([str(folder), *relative]))
    return out


# -- the job spec -------------------------------------------------------------------------------

UnitsSel = Literal["all"] | list[int] | str


class SamplerSpec(BaseModel):
    """How every unit is sampled. Method settings (``step_size``, ``noise``, ``l2``, ``temperature``,
    ...) sit beside these keys and are checked against the method's options."""

    model_config = ConfigDict(extra="allow", frozen=True)

    method: str = Field("ldam", description="update rule: one of settings.METHODS")
    steps: int = Field(300, ge=1, le=100_000)
    chains: int = Field(8, ge=1, le=4096)
    lam: float = Field(0.0, ge=0, le=1)
    seed: int = 0
    snapshot_every: int | None = Field(None, ge=1)
    init: Literal["auto", "uniform", "exemplars"] | None = Field(
        None, description="chain starts: auto (None) = the unit's real exemplars for ldam when the job has data, "
        "uniform noise otherwise")
    ladder: list[float] | None = Field(
        None, description="the activation ladder: after the run each chain climbs on to these multiples of its unit's "
        "best real activation, e.g. [1.5, 2.0] (ldam with data); None: no ladder")
    ladder_steps: int | None = Field(None, ge=1, le=100_000, description="steps per rung (default 150)")

    @field_validator("method")
    @classmethod
    def _method(cls, method: str) -> str:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
        return method

    @model_validator(mode="after")
    def _options(self) -> "SamplerSpec":
        from ldam_sweep.errors import SamplerError
        from ldam_sweep.settings import check_ladder, parse_options

        try:
            options = parse_options(self.method, self.options)
            if self.ladder:
                if self.method != "ldam":
                    raise SamplerError(f"ladder: the activation ladder raises ldam's target; method {self.method!r} has none")
                check_ladder(self.ladder, options.target)
        except SamplerError as err:
            raise ValueError(str(err)) from None
        return self

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class _FrozenSpec(BaseModel):
    """A frozen model stage 1 provides: ``file`` (one trained before) or ``train`` (stage 1's settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: Path | None = None
    train: dict[str, Any] | None = None

    def _check(self, what: str, settings: type[BaseModel], section: str) -> None:
        if (self.file is None) == (self.train is None):
            raise ValueError(f"give exactly one of file (a trained {what}) or train (settings, may be {{}})")
        if self.train is not None:
            try:
                settings(**self.train)
            except ValidationError as err:
                raise ValueError(format_validation_error(err, f"{section}.train settings")) from None


class DiscriminatorSpec(_FrozenSpec):
    """The realism prior: ``file`` (a trained discriminator) or ``train`` (stage 1 settings)."""

    @model_validator(mode="after")
    def _one(self) -> "DiscriminatorSpec":
        from ldam_sweep.settings import DiscriminatorSettings

        self._check("discriminator", DiscriminatorSettings, "discriminator")
        return self


class PriorSpec(_FrozenSpec):
    """``walk``'s score prior: ``file`` (saved with ``ScorePrior.save``) or ``train`` (stage 1 trains it
    on the data section's training images: ``settings.PriorSettings``)."""

    @model_validator(mode="after")
    def _one(self) -> "PriorSpec":
        from ldam_sweep.settings import PriorSettings

        self._check("score prior", PriorSettings, "prior")
        return self


AUTO_GRID_UNITS = 32  # the store grid that ``block_size: auto`` stands for


class ResourcesSpec(BaseModel):
    """Where and how the sweep runs. ``block_size`` is the store's grid (units per storage block,
    part of the sweep's identity). ``auto`` (default): a grid of 32 units, and each actor picks how
    many units it samples per batch (whole blocks; on a GPU as many as fit its free memory).
    An integer: batches of exactly one block. ``deterministic``: deterministic kernels, no TF32
    (GPU results reproducible on the same hardware); false trades that for speed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    actors: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = Field(
        "auto", description="resident workers; auto: as many as the cluster fits (one per GPU, else one per "
        "cpus_per_actor CPUs), growing as nodes join")
    gpus_per_actor: float | Literal["auto"] = "auto"
    cpus_per_actor: float = Field(1, gt=0)
    block_size: Annotated[int, Field(ge=1, le=65536)] | Literal["auto"] = Field(
        "auto", description="units per storage block; auto: 32, batches sized by each actor")
    deterministic: bool = Field(True, description="deterministic kernels and no TF32 in the workers")
    max_in_flight: int | None = Field(None, ge=1, description="tasks in flight (default 2 per actor)")
    max_attempts: int = Field(3, ge=1, le=100, description="attempts per block before it is recorded as failed")
    commit_every: int = Field(8, ge=1, description="blocks per manifest commit")
    storage_patience: float = Field(600.0, ge=0, le=86400, description="seconds the driver and workers keep retrying "
                                    "a store that does not answer (an S3 outage, a network cut) before the sweep stops "
                                    "with exit 4; committed blocks stay committed")

    @property
    def grid_units(self) -> int:
        """Units per storage block (``auto``: 32)."""
        return AUTO_GRID_UNITS if self.block_size == "auto" else int(self.block_size)


class StoreSpec(BaseModel):
    """Where results go and how images are kept (``store:``; a bare string is the url alone).
    The defaults keep what a reader looks at, at the precision a picture has: 8-bit pixels, the
    intermediate snapshots as thumbnails beside full-size finals, zstd. They fix the store's format
    (a resume keeps the format the store was made with)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = Field(None, description="the store: a local path or s3://, gs://, ... (default storage/<name>.zarr)")
    pixels: Literal["uint8", "float16", "float32"] = Field(
        "uint8", description="images (samples, finals, exemplars, starts): uint8 = 256 levels over the input range "
        "(at most half a level from the float value), or float16 / float32")
    snapshot_size: Annotated[int, Field(ge=8, le=65536)] | Literal["full"] = Field(
        64, description="snapshots and chain starts shrunk (by a whole factor, block means) until their longer side is "
        "at most this many pixels; each chain's final sample is also kept at full size. full: nothing shrunk")
    zstd_level: Annotated[int, Field(ge=1, le=22)] | None = Field(
        9, description="zstd compression level of every array (8-bit images get a delta filter along rows first); "
        "null: zarr's default codecs. {pixels: float16, snapshot_size: full, zstd_level: null} is the format of "
        "stores made before this section existed")
    @property
    def snapshot_px(self) -> int | None:
        return None if self.snapshot_size == "full" else int(self.snapshot_size)


class JobSpec(BaseModel):
    """A whole sweep: which model, which layers and units, how to sample, the realism prior, the
    data, the resources, and where results go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("sweep", pattern=r"^[A-Za-z0-9_.\-]+$")
    model: ModelSpec
    layers: Literal["all"] | list[str] = "all"
    units: dict[str, UnitsSel] = Field(default_factory=dict, description="per layer: all, [i, j, ...] or 'a-b'")
    objective: dict[str, str] = Field(default_factory=dict, description="per layer kind or layer name: the objective "
                                      "its layers use (a layer's entry wins over its kind's)")
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    discriminator: DiscriminatorSpec | None = None
    prior: PriorSpec | None = Field(None, description="method walk's score prior: file or train (stage 1)")
    data: DataSpec | None = None
    exemplars: int = Field(8, ge=0, le=256, description="top-k real images per unit (needs data)")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    store: StoreSpec = Field(default_factory=StoreSpec, description="where results go (a url) or a mapping: url, "
                             "pixels, snapshot_size, zstd_level")

    @field_validator("store", mode="before")
    @classmethod
    def _store_url(cls, store: Any) -> Any:
        return {"url": store} if isinstance(store, str) else {} if store is None else store

    @field_validator("objective")
    @classmethod
    def _objective(cls, objective: dict[str, str]) -> dict[str, str]:
        everywhere = sorted({n for kind in DEFAULT_BY_KIND for n in allowed_objectives(kind)})
        for key, name in objective.items():
            base = split_objective(name)[0]
            if key in DEFAULT_BY_KIND:  # a layer kind: its objectives are known now
                allowed = allowed_objectives(key)
                if base not in allowed:
                    raise ValueError(f"objective {name!r} does not apply to {key} layers; allowed for {key}: "
                                     f"{', '.join(allowed)}")
            elif base not in everywhere:  # a layer name: checked against the layer once the model is loaded
                raise ValueError(f"unknown objective {name!r} for layer {key!r}; objectives: {', '.join(everywhere)} "
                                 f"(keys are layer kinds, {', '.join(DEFAULT_BY_KIND)}, or layer names)")
        return objective

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        if self.sampler.method == "walk":
            if self.prior is None:
                raise ValueError("sampler.method 'walk' walks on a score prior: add a prior section (prior: {train: {}} "
                                 "trains it in stage 1 on the data section's images, or prior: {file: PATH})")
            if self.data is None:
                raise ValueError("sampler.method 'walk' starts its chains from the units' real exemplars, so a data "
                                 "section is needed")
            if self.sampler.lam > 0:
                raise ValueError(f"sampler.method 'walk' takes its realism from the score prior: use lam 0 (got "
                                 f"{self.sampler.lam}); a discriminator section with lam 0 still records realism traces")
            if self.sampler.init == "uniform":
                raise ValueError("sampler.method 'walk' walks from real images: init 'uniform' is not allowed (use auto "
                                 "or exemplars)")
        elif self.prior is not None:
            raise ValueError(f"the prior section is method walk's score prior; sampler.method {self.sampler.method!r} "
                             "does not use it (remove it, or use method: walk)")
        if self.sampler.method == "am" and self.sampler.lam > 0:
            raise ValueError("sampler.method 'am' (plain activation maximisation) has no realism term: use lam 0")
        if self.sampler.lam > 0 and self.discriminator is None:
            raise ValueError(f"sampler.lam={self.sampler.lam} weights the realism term, so a discriminator section is needed")
        if self.discriminator is not None and self.discriminator.train is not None and self.data is None:
            raise ValueError("discriminator.train needs a data section (the real images D learns from)")
        if self.sampler.init == "exemplars" and self.data is None:
            raise ValueError("sampler.init 'exemplars' starts chains from real images, so a data section is needed")
        for layer, sel in self.units.items():
            unit_ranges(sel, where=f"units.{layer}")
        return self


def unit_ranges(sel: Any, *, where: str = "units") -> list[tuple[int, int]] | None:
    """``all`` -> None; else the selection as inclusive (first, last) ranges, never expanded (a range
    like ``"0-100000000000"`` costs nothing here). Lists hold non-negative integers; strings are
    ranges ``"0-15,32,40-47"``."""
    if sel == "all":
        return None
    if isinstance(sel, list):
        if not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in sel):
            raise ValueError(f"{where}: a unit list holds non-negative integers, got {sel!r}")
        out = [(u, u) for u in sel]
        _no_repeats(out, sel, where)
        return out
    if isinstance(sel, str):
        out = []
        for part in sel.split(","):
            part = part.strip()
            try:
                if "-" in part:
                    a, b = (int(v) for v in part.split("-", 1))
                    if not 0 <= a <= b:
                        raise ValueError
                    out.append((a, b))
                else:
                    out.append((int(part), int(part)))
            except ValueError:
                raise ValueError(f"{where}: {sel!r} is not 'all', a list, or ranges like '0-15,32'") from None
        _no_repeats(out, sel, where)
        return out
    raise ValueError(f"{where}: {sel!r} is not 'all', a list, or ranges like '0-15,32'")


def _no_repeats(ranges: list[tuple[int, int]], sel: Any, where: str) -> None:
    """A unit named twice is a mistake (a typo, a pasted list): said, never silently merged."""
    ordered = sorted(ranges)
    for (a0, b0), (a1, b1) in zip(ordered, ordered[1:]):
        if a1 <= b0:
            twice = f"unit {a1}" if a1 == min(b0, b1) else f"units {a1}-{min(b0, b1)}"
            raise ValueError(f"{where}: {twice} named twice in {sel!r}; name each unit once")


def parse_units(sel: Any, *, where: str = "units", layer: str | None = None, units: int | None = None) -> list[int] | None:
    """``all`` -> None; a list of ints; or a string of ranges ``"0-15,32,40-47"`` (inclusive).
    With ``units`` (the unit count of ``layer``) every range is checked before it is expanded, so an
    out-of-range selection fails at once with the valid range, whatever its size."""
    ranges = unit_ranges(sel, where=where)
    if ranges is None:
        return None
    if units is not None:
        bad = [max(a, units) for a, b in ranges if b >= units]
        if bad:
            raise SpecError(f"{where}: unit {min(bad)} is out of range for layer {layer!r}: valid units are "
                            f"0..{units - 1} ({units} units)")
    out: set[int] = set()
    for a, b in ranges:
        out.update(range(a, b + 1))
    return sorted(out)


def load_spec(path: str | Path) -> JobSpec:
    """A JobSpec from a YAML file; SpecError names the field, the value and what is allowed.
    Relative paths inside (weights, files, data) are relative to the spec file."""
    p = Path(path)
    doc = read_yaml(p)
    if not isinstance(doc, dict):
        raise SpecError(f"spec file {str(p)!r} must hold a mapping, got {type(doc).__name__}")
    job = parse_job(doc, where=f"job spec {str(p)!r}")
    return resolve_job_paths(job, p.parent)


def parse_job(doc: dict[str, Any], where: str = "job spec") -> JobSpec:
    try:
        return JobSpec.model_validate(doc)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, where)) from None


def resolve_job_paths(job: JobSpec, base: Path) -> JobSpec:
    updates: dict[str, Any] = {"model": _resolve_paths(job.model, base)}
    if job.discriminator is not None and job.discriminator.file is not None and not job.discriminator.file.is_absolute():
        updates["discriminator"] = job.discriminator.model_copy(update={"file": (base / job.discriminator.file).resolve()})
    if job.prior is not None and job.prior.file is not None and not job.prior.file.is_absolute():
        updates["prior"] = job.prior.model_copy(update={"file": (base / job.prior.file).resolve()})
    if job.data is not None:
        paths = {name: (base / getattr(job.data, name)).resolve() for name in ("path", "labels")
                 if getattr(job.data, name) is not None and not getattr(job.data, name).is_absolute()}
        if paths:
            updates["data"] = job.data.model_copy(update=paths)
    return job.model_copy(update=updates)


def job_doc(spec: "JobSpec | dict[str, Any] | str | Path") -> tuple[JobSpec, dict[str, Any]]:
    """A job spec (object, dict or YAML path) as the validated JobSpec and its JSON document."""
    job = spec if isinstance(spec, JobSpec) else parse_job(spec) if isinstance(spec, dict) else load_spec(spec)
    return job, job.model_dump(mode="json", exclude_none=True)
