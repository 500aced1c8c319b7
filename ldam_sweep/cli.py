"""The ``ldam-sweep`` command. Errors print one clear message, no traceback, and exit with the
error's code (docs/guarantees.md, "Exit codes")."""

from __future__ import annotations

import collections

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ldam_sweep.errors import LdamError
from ldam_sweep.store.schema import QUERY_COLUMNS

app = typer.Typer(
    no_args_is_help=True,
    help="Sweep whole vision networks with Langevin Dynamics Activation Maximization (LDAM).",
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from ldam_sweep.version import __version__

        console.print(f"ldam-sweep {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Sweep whole vision networks with Langevin Dynamics Activation Maximization (LDAM)."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print LdamError as 'error: ...' and exit with its ``exit_code``; show warnings as one yellow
    line each. User and OS text is printed as plain text: rich markup in it never applies."""

    def show(message, category, *_args, **_kwargs):  # noqa: ANN001
        err_console.print(Text.assemble(("warning: ", "yellow"), str(message)), highlight=False, soft_wrap=True)

    old = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    except LdamError as err:
        err_console.print(Text.assemble(("error: ", "red"), str(err)), highlight=False, soft_wrap=True)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM during a sweep (cluster/signals.py)
        from ldam_sweep.cluster.signals import exit_code_of

        code = exit_code_of(err)
        err_console.print("interrupted" if code == 130 else f"stopped by {err}", highlight=False, markup=False)
        raise typer.Exit(code) from None
    except Exception as err:
        from ldam_sweep.store.transport import describe, is_transport_fault

        if is_transport_fault(err):  # a store that does not answer (an S3 outage, a network cut): exit 4
            err_console.print(Text.assemble(("error: ", "red"), f"the store did not answer ({describe(err)}); nothing "
                                            "was changed. Check its endpoint and the network (for S3: AWS_ENDPOINT_URL, "
                                            "credentials), then run the command again."), highlight=False, soft_wrap=True)
            raise typer.Exit(4) from None
        if not isinstance(err, OSError):
            raise
        # an output path that cannot be written, a full disk, ...
        err_console.print(Text.assemble(("error: ", "red"), f"{type(err).__name__}: {err}"), highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    finally:
        warnings.showwarning = old


def _log(msg: str) -> None:
    err_console.print(Text(msg, style="dim"), highlight=False)


JSON_HELP = "Print one JSON object on stdout instead of tables (see docs/spec.md: JSON output)."


def json_safe(value: Any) -> Any:
    """``value`` with only JSON types, by pydantic's encoder (the one the spec models use): NaN/inf ->
    null (strict parsers reject NaN, so it never appears), numpy scalars and arrays -> numbers and
    lists, tuples -> lists, datetimes -> ISO 8601 text, paths -> text, dict keys -> text."""
    from pydantic_core import to_jsonable_python

    return to_jsonable_python(value, inf_nan_mode="null",
                              fallback=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))


def print_json(command: str, **fields: Any) -> None:
    """The one JSON convention of every command: a single object ``{"command": ..., ...}`` on stdout."""
    import json

    sys.stdout.write(json.dumps({"command": command, **json_safe(fields)}, indent=1, allow_nan=False) + "\n")
    sys.stdout.flush()


@app.command()
def layers(
    spec: str = typer.Argument(..., help="A spec YAML file (with a model: section), or a model name such as digits-cnn or torchvision:resnet18."),
    wide: bool = typer.Option(False, "--wide", help="Also the unit kind and the layers' aliases (folded to the terminal's "
                              "width when wider)."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List the model's layers: name, module type, unit count, output shape, default objective."""
    from ldam_sweep.model import load_model
    from ldam_sweep.spec import load_model_spec

    with user_errors():
        model = load_model(load_model_spec(spec), device="cpu", log=_log)
        if json_out:
            print_json("layers", model=model.name, input=list(model.input.shape),
                       total_units=sum(layer.units for layer in model.layers),
                       layers=[layer.as_dict() for layer in model.layers],
                       skipped=[s.as_dict() for s in model.skipped])
            return
        from ldam_sweep.termtable import mark, print_table

        rows, details = [], {}  # details: a token layout, stated once in a note -> its marker
        for layer in model.layers:
            objective, full = layer.default_objective, _objective_note(layer)
            if full != objective:
                objective += details.setdefault(full, mark(len(details) + 1))
            row = [layer.name, layer.module_type, layer.units, "×".join(map(str, layer.output_shape)), objective]
            rows.append(row + [layer.kind, ", ".join(layer.aliases)] if wide else row)
        notes = [f"{m} {full}" for full, m in details.items()]
        aliased = sum(bool(layer.aliases) for layer in model.layers)
        if aliased and not wide:
            notes.append(f"{aliased} layers also have another name (the same output): --wide lists them")
        columns = ("layer", "module", "units", "output shape", "objective") + (("kind", "aliases") if wide else ())
        print_table(console, f"{model.name}: input {model.input.shape}, {len(model.layers)} layers", columns, rows,
                    keys=("layer",), right=("units",), notes=notes)
        console.print(f"total units: {sum(layer.units for layer in model.layers)}")
        if model.skipped:
            console.print(f"not layers ({len(model.skipped)} modules that run but have no single visualisable output):")
            for s in model.skipped:
                console.print(f"  {s.name} ({s.module_type}): {s.reason}", highlight=False, markup=False)


def _objective_note(layer) -> str:
    """The layer's default objective, and for token layers how its tokens are laid out (`layers`
    shows this once, as a note under the table, and marks the rows it applies to)."""
    g = layer.geometry
    if g is None:
        return layer.default_objective
    grid = "no grid" if g.grid is None else f"{g.grid[0]}×{g.grid[1]} grid" + (" + class token" if g.has_cls else "")
    return f"{layer.default_objective} ({g.tokens} tokens: {grid})"


def _print_summary(summary, json_out: bool = False, command: str = "run") -> None:
    """The end of a sweep: one line (what ran, how fast, the store), or with ``--json`` one JSON object
    on stdout (every field of the summary; docs/spec.md: JSON output)."""
    if json_out:
        print_json(command, **summary.as_dict())
        return
    how = "interrupted" if summary.interrupted else "finished"
    failed = f"; {summary.failed_blocks} blocks failed (`status` lists why)" if summary.failed_blocks else ""
    console.print(f"{how}: {summary.units_done} units, {summary.done_blocks} blocks, {summary.seconds:.0f}s "
                  f"({summary.units_per_second:.1f} units/s); {summary.skipped_blocks} blocks were already committed"
                  f"{failed}", highlight=False, markup=False, soft_wrap=True)


def _exit_code(summary) -> int:
    """0; 1 when blocks failed; 130 after Ctrl-C, 143 after SIGTERM (docs/guarantees.md)."""
    if summary.interrupted:
        return 143 if summary.signal == "SIGTERM" else 130
    return 1 if summary.failed_blocks else 0


def _stdin_is_tty() -> bool:
    import sys

    return sys.stdin.isatty()


def _typed_confirmation(url: str, units: int) -> bool:
    """Ask a person at a terminal to type the store's name; never asks a pipe or a job (no)."""
    if not _stdin_is_tty():
        return False
    name = url.rstrip("/").rsplit("/", 1)[-1]
    what = f"{units} committed units" if units > 0 else "its committed units"
    answer = typer.prompt(f"--fresh deletes {what} of {url}. Type the store's name ({name}) to delete them",
                          default="", show_default=False, err=True)
    return answer.strip() == name


@app.command()
def run(
    spec: Path = typer.Argument(..., help="Job spec YAML."),
    store: Optional[str] = typer.Option(None, help="Store path or URL (default: the spec's store, else storage/<name>.zarr)."),
    address: Optional[str] = typer.Option(None, help="Join an existing Ray cluster (e.g. auto, or ray://host:10001)."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the existing store (made from this or another spec) and "
                               "start over. Committed units are deleted only with --yes or a typed confirmation."),
    yes: bool = typer.Option(False, "--yes", "-y", help="With --fresh: delete committed units without asking."),
    realism: bool = typer.Option(True, "--realism/--no-realism", help="Measure the samples' realism after the sweep "
                                 "(stage 3; `ldam-sweep realism STORE` does it later)."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP + " The sweep's summary."),
) -> None:
    """Run a sweep; rerunning the same command resumes. Exit 1 if any block failed, 5 if another driver owns the store."""
    from ldam_sweep.cluster.driver import run_sweep

    with user_errors():
        summary = run_sweep(spec, store=store, address=address, fresh=fresh, console=err_console, realism=realism,
                            confirm_fresh=lambda url, units: yes or _typed_confirmation(url, units))
        _print_summary(summary, json_out)
        if not json_out:
            console.print(f"store: {summary.store}  (next: ldam-sweep status STORE)", highlight=False,
                          markup=False, soft_wrap=True)
        raise typer.Exit(_exit_code(summary))


@app.command()
def demo(
    store: Optional[str] = typer.Option(None, help="Store path (default storage/demo.zarr)."),
    quick: bool = typer.Option(False, "--quick", help="A smaller demo (fewer steps and D updates, no realism "
                               "measurement: `ldam-sweep realism STORE` adds it) for a first look."),
) -> None:
    """Sweep the whole built-in digits-cnn (every layer, every unit) with a discriminator trained on
    digits, measure how realistic the samples are, then build its HTML atlas."""
    from ldam_sweep.cluster.demo import demo_job
    from ldam_sweep.cluster.driver import run_sweep

    with user_errors():
        job = demo_job(quick=quick)
        summary = run_sweep(job, store=store, console=err_console, realism=not quick)
        _print_summary(summary)
        from ldam_sweep.atlas.site import build_atlas

        site = Path(summary.store).with_name(Path(summary.store).stem + "-atlas")
        report = build_atlas(summary.store, site)
        console.print(f"store: {summary.store}  (next: ldam-sweep status STORE)", highlight=False, markup=False,
                      soft_wrap=True)
        console.print(f"atlas: {report.out / 'index.html'}  (open it in a browser)", highlight=False, markup=False,
                      soft_wrap=True)
        raise typer.Exit(_exit_code(summary))


@app.command("train-discriminator")
def train_discriminator_cmd(
    spec: Path = typer.Argument(..., help="Job spec YAML with model, data and discriminator.train sections."),
    output: Path = typer.Option(..., "-o", "--output", help="File to write the trained discriminator to."),
) -> None:
    """Stage 1 alone: train the job's discriminator against its chains and save it."""
    from ldam_sweep.errors import SpecError
    from ldam_sweep.model import load_model
    from ldam_sweep.spec import load_spec
    from ldam_sweep.stage import job_discriminator

    with user_errors():
        job = load_spec(spec)
        if job.discriminator is None or job.discriminator.train is None:
            raise SpecError(f"{spec}: train-discriminator needs a discriminator.train section (settings, may be {{}})")
        model = load_model(job.model, log=_log)
        trained = job_discriminator(job, model, progress=True)  # the bar of ldam_sweep/progressbar.py on stderr
        assert trained is not None
        path = trained.save(output)
        console.print(
            f"held-out accuracy {trained.heldout_accuracy:.3f} (real {trained.heldout_real_accuracy:.3f}, "
            f"fresh chains {trained.heldout_fake_accuracy:.3f}) after {trained.seconds:.0f}s; wrote {path}"
        )


@app.command("train-prior")
def train_prior_cmd(
    spec: Path = typer.Argument(..., help="Job spec YAML with model, data and prior.train sections (method walk)."),
    output: Path = typer.Option(..., "-o", "--output", help="File to write the trained score prior to."),
) -> None:
    """Stage 1 alone for method walk: train the job's score prior and save it (a spec's prior: {file: ...} takes it)."""
    from ldam_sweep.errors import SpecError
    from ldam_sweep.model import load_model
    from ldam_sweep.model.loading import default_device
    from ldam_sweep.spec import load_spec
    from ldam_sweep.stage import job_prior, prior_line, prior_record

    with user_errors():
        job = load_spec(spec)
        if job.prior is None or job.prior.train is None:
            raise SpecError(f"{spec}: train-prior needs a prior.train section (settings, may be {{}})")
        model = load_model(job.model, log=_log)
        _log(f"training the score prior on {default_device()} ...")
        prior = job_prior(job, model, device=default_device())
        assert prior is not None
        path = prior.save(output)
        console.print(f"score prior: {prior_line(prior_record(prior))}; wrote {path}", highlight=False, markup=False)


@app.command()
def status(
    store: str = typer.Argument(..., help="Store path or URL."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Done / failed / corrupt / pending units per layer, and how many of the done ones are dead (not sampled)."""
    from ldam_sweep.store import open_store

    with user_errors():
        st = open_store(store)
        realism = st.realism()
        if json_out:
            layer_rows = st.layers()
            failed = st.units(status="failed")
            print_json("status", store=st.loc.url, model=st.attrs["model"]["name"], layers=layer_rows,
                       totals={k: sum(r[k] for r in layer_rows) for k in ("planned", "done", "failed", "corrupt", "pending", "dead")},
                       errors=sorted({e for e in failed["error"].to_pylist() if e}), realism=_realism_summary(realism),
                       integrity=st.verification(), discriminator=_discriminator_summary(st), prior=st.prior_info(), storage=st.storage(),
                       informativeness=st.informativeness())
            return
        table = Table(title=f"{st.loc.url}  ({st.attrs['model']['name']})")
        counts = ("planned", "done", "failed", "corrupt", "pending", "dead")  # dead: of the done units, found dead
        for col in ("layer", "kind", *counts, "blocks"):
            table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
        totals = dict.fromkeys(counts, 0)
        for info in st.layers():
            table.add_row(info["name"], info["kind"], *(str(info[k]) for k in counts), str(info["blocks"]))
            for key in counts:
                totals[key] += info[key]
        table.add_row("total", "", *(str(totals[k]) for k in counts), "")
        console.print(table)
        if realism:
            _print_realism(realism, st.loc.url)
        _print_informativeness(st.informativeness())
        _print_discriminator(st)
        prior = st.prior_info()
        if prior:
            from ldam_sweep.stage import prior_line

            console.print(f"score prior (method walk): {prior_line(prior)}", highlight=False, markup=False)
        _print_integrity(st)
        _print_storage(st.storage())
        if totals["corrupt"]:
            console.print(Text.assemble((f"{totals['corrupt']} units corrupt", "red"),
                                        f" (marked by verify --repair): `ldam-sweep run SPEC --store {st.loc.url}` "
                                        "redoes their blocks"), highlight=False)
        if totals["failed"]:
            failed = st.units(status="failed")
            errors = sorted(set(failed["error"].to_pylist()))
            console.print(Text.assemble((f"{totals['failed']} units failed", "red"), "; errors: " + " | ".join(
                e.splitlines()[-1][:200] for e in errors[:5] if e)), highlight=False)


def _print_informativeness(per_layer: dict[str, dict[str, Any]]) -> None:
    """Per layer: the 2-AFC observer's fraction correct for the samples, their starts, the exemplars."""
    if not per_layer:
        return
    from ldam_sweep.realism import fmt as _fmt

    table = Table(title="informativeness (2-AFC observer on held-out images)")
    for col in ("layer", "samples", "their starts", "exemplars", "units"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for name, e in per_layer.items():
        table.add_row(name, *(_fmt(e[k]) for k in ("samples", "starts", "exemplars")), str(e["units"]))
    console.print(table)
    console.print("fraction of held-out image pairs (one from a unit's top 5%, one from its 50-75th percentile) in which "
                  "an observer shown these images picks the stronger one (0.5 = they say nothing)",
                  highlight=False, markup=False)


def _print_storage(storage: dict[str, Any]) -> None:
    """One line: bytes per done unit, the largest arrays first, and the image format."""
    f = storage["format"]
    c, h, w = f["snapshot_shape"]
    how = (f"images {f['pixels']}, snapshots and starts {h}x{w}" + (" (finals full size)" if f["thumbnail_factor"] > 1 else "")
           + (f", zstd {f['zstd_level']}" if f["zstd_level"] is not None else ", zarr's default codecs"))
    per_unit = storage["bytes_per_unit"]
    if per_unit is None:
        console.print(f"stored: {storage['bytes'] / 1e6:.3g} MB, no unit done yet; {how}", highlight=False, markup=False)
        return
    arrays: dict[str, float] = collections.Counter()
    for layer in storage["layers"].values():
        for name, size in (layer["arrays"] or {}).items():
            arrays[name] += size
    units = sum(layer["units_done"] for layer in storage["layers"].values())
    parts = ", ".join(f"{name} {size / units / 1e6:.2g}" for name, size in arrays.most_common() if size / units >= 5e3)
    console.print(f"stored: {per_unit / 1e6:.3g} MB per unit ({parts}); {how}", highlight=False, markup=False)


def _discriminator_summary(st: Any) -> dict[str, Any] | None:
    """The stored discriminator's held-out accuracy and whether it is weak (under 0.55), or None."""
    from ldam_sweep.settings import WEAK_DISCRIMINATOR

    info = st.discriminator_info()
    if not info or info.get("heldout_accuracy") is None:
        return None
    acc = float(info["heldout_accuracy"])
    return {"heldout_accuracy": acc, "weak": acc < WEAK_DISCRIMINATOR}


def _print_discriminator(st: Any) -> None:
    d = _discriminator_summary(st)
    if d is None:
        return
    line = Text(f"discriminator: held-out accuracy {d['heldout_accuracy']:.3f} (0.5 = chance)")
    if d["weak"]:
        lams = sorted({v for v in st.units(status="ok")["lam"].to_pylist() if v is not None})  # what the chains used
        which = f"lambda {', '.join(f'{v:g}' for v in lams)}" if lams else "lambda"
        steered = "the chains did not use it (lambda 0) and" if lams == [0.0] else \
            f"its realism term ({which}) steered the chains little and"
        line.append(" -- weak: ", style="red")
        line.append(f"it barely tells chains from real images: {steered} its realism scores (log D) mean little; "
                    "train it longer (discriminator.train.updates) and rerun with --fresh")
    console.print(line, highlight=False, soft_wrap=True)


def _print_integrity(st: Any) -> None:
    """What the last ``verify`` found, for readers: corrupt blocks, and units committed since."""
    v = st.verification()
    verify = f"`ldam-sweep verify {st.loc.url}`"
    if v["corrupt"]:
        console.print(Text.assemble((f"{v['corrupt']} units in corrupt blocks", "red"), f" (found by verify at "
                                    f"{v['verified_at']}, or by this read): {verify[:-1]} --repair`, then "
                                    f"`ldam-sweep run SPEC --store {st.loc.url}` redoes them"), highlight=False)
    if v["state"] == "damaged":
        from ldam_sweep.store.integrity import VERIFY_RECORD, sidecar_path

        console.print(f"integrity: the last verify's record ({sidecar_path(st.loc, VERIFY_RECORD)}) is damaged: {verify} "
                      "writes it again",
                      highlight=False, markup=False)
    elif v["state"] == "never":
        console.print(f"integrity: this store has not been verified ({v['unverified']} units): {verify} checks "
                      "every file and block", highlight=False, markup=False)
    elif v["state"] == "stale":
        console.print(f"integrity: verified at {v['verified_at']}; {v['unverified']} units committed since have not "
                      f"been verified: {verify}", highlight=False, markup=False)
    elif not v["corrupt"]:
        console.print(f"integrity: verified at {v['verified_at']}: every file and committed block intact",
                      highlight=False, markup=False)


def _realism_summary(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    """The realism record without its per-unit detail (``query`` has that as ``detected_fraction``)."""
    if doc is None:
        return None
    layers = {name: {k: v for k, v in e.items() if k != "detected"} for name, e in (doc.get("layers") or {}).items()}
    return {k: v for k, v in doc.items() if k not in ("layers", "format")} | {"layers": layers}


def _print_realism(doc: dict[str, Any], url: str) -> None:
    """The realism record as a table: per layer (and all layers), samples beside the units' exemplars."""
    from ldam_sweep.realism import fmt as _fmt
    table = Table(title="realism of the final samples")
    for col in ("layer", "two-sample", "exemplars", "HF", "exemplars", "samples"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    entries = list((doc.get("layers") or {}).items()) + ([("all layers", doc["pooled"])] if doc.get("pooled") else [])
    for name, e in entries:
        stale = "" if doc["current"].get(name, True) else " *"
        table.add_row(name + stale, *(_fmt(e.get(k)) for k in ("c2st", "c2st_exemplars", "hf_ratio", "hf_ratio_exemplars")),
                      str(e.get("samples", "")))
    console.print(table)
    stale = sorted(name for name, ok in doc["current"].items() if not ok)
    console.print("two-sample: held-out accuracy of a classifier telling the samples from real images (0.5 = it "
                  "cannot); HF: fine detail ÷ the real images'; exemplars: the same for the units' top real images"
                  + (f". * units were committed since: `ldam-sweep realism {url}` re-measures" if stale else ""),
                  highlight=False, markup=False)


@app.command()
def query(
    store: str = typer.Argument(..., help="Store path or URL."),
    layer: Optional[str] = typer.Option(None, help="Only this layer."),
    unit: Optional[int] = typer.Option(None, help="Only this unit."),
    label: Optional[str] = typer.Option(None, help="Only units with this label (their top exemplars' class, else the "
                                        "network's reading of their samples; case-insensitive). With --status all: "
                                        "the units the atlas search lists for it."),
    status_: str = typer.Option("ok", "--status", help="ok, dead, failed, corrupt, or all."),
    sort: Optional[str] = typer.Option(None, help="Sort by this manifest column (descending)."),
    ascending: bool = typer.Option(False, help="Sort ascending instead."),
    limit: Optional[int] = typer.Option(None, min=0, help="Show the first K rows after sorting."),
    columns: Optional[str] = typer.Option(None, help="Comma-separated columns to show, or 'all' (default: layer, unit, "
                                          "label and three scores, which fit 80 columns; --json has every column)."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP + " Every manifest column."),
) -> None:
    """List committed units from the manifest, filtered and sorted by any column."""
    from ldam_sweep.store import open_store

    with user_errors():
        from ldam_sweep.errors import StoreError

        if status_ not in ("ok", "dead", "failed", "corrupt", "all"):
            raise StoreError(f"--status must be ok, dead, failed, corrupt or all, got {status_!r}")
        st = open_store(store)
        table = st.units(layer, unit=unit, label=label, status=None if status_ == "all" else status_, sort=sort,
                         descending=not ascending, limit=limit)
        if json_out:
            print_json("query", store=st.loc.url, count=table.num_rows, units=table.to_pylist())
            return
        if columns == "all":
            cols = list(table.column_names)
        elif columns:
            cols = [c.strip() for c in columns.split(",")]
        else:
            cols = _query_columns(table, status_)
        unknown = [c for c in cols if c not in table.column_names]
        if unknown:
            raise StoreError(f"unknown column(s) {unknown}; columns: {', '.join(table.column_names)}")
        if table.num_rows == 0:
            console.print(_no_units(st, layer, unit, label, status_), highlight=False, markup=False, soft_wrap=True)
            return
        from ldam_sweep.termtable import print_table

        data = [[f"{v:.4g}" if isinstance(v, float) else v for v in r.values()] for r in table.select(cols).to_pylist()]
        print_table(console, f"{table.num_rows} units", cols, data, keys=("layer", "unit"),
                    right=[c for c in cols if c not in ("layer", "status", "integrity", "label")])
        corrupt = table["integrity"].to_pylist().count("corrupt")
        if corrupt:
            console.print(f"{corrupt} of these units are in blocks that failed a check: `ldam-sweep verify {st.loc.url} "
                          "--repair`, then rerun the sweep", highlight=False, markup=False, soft_wrap=True)


def _query_columns(table: Any, status: str) -> list[str]:
    """``query``'s default columns: QUERY_COLUMNS (fit 80 columns for layer names up to ~8 characters),
    with ``status`` when several statuses can show and ``integrity`` when a unit is corrupt."""
    cols = list(QUERY_COLUMNS)
    if status != "ok":
        cols.insert(2, "status")
    if "corrupt" in table["integrity"].to_pylist():
        cols.insert(2, "integrity")
    return cols


def _no_units(st: Any, layer: str | None, unit: int | None, label: str | None, status: str) -> str:
    """What ``query`` says when nothing matches: the filters, and what would have matched."""
    asked = [f"{name} {value!r}" for name, value in (("layer", layer), ("unit", unit), ("label", label)) if value is not None]
    text = f"no {status + ' ' if status != 'all' else ''}units" + (f" with {', '.join(asked)}" if asked else "")
    if label is not None:
        from ldam_sweep.store.schema import display_label

        rows = st.units(layer, status=None).select(["label", "sample_label"]).to_pylist()
        labels = sorted({str(v) for v in map(display_label, rows) if v is not None}, key=lambda v: (len(v), v))
        text += (f"; labels are {', '.join(labels[:20])}{' ...' if len(labels) > 20 else ''}" if labels
                 else "; no unit of this store has a label (labels need a data: section with classes)")
    elif st.units(layer, status=None).num_rows == 0:
        text += f"; nothing is committed{' in layer ' + repr(layer) if layer else ''} yet: `ldam-sweep status {st.loc.url}`"
    elif status != "all":
        text += "; --status all lists every status"
    return text


@app.command()
def realism(
    store: str = typer.Argument(..., help="Store path or URL."),
    seed: int = typer.Option(0, help="Seed of the two-sample classifiers and of the subsets they see."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Measure how far the samples are from the sweep's real data (per layer and unit) and store it."""
    from ldam_sweep.store.integrity import sidecar_path
    from ldam_sweep.store.realism import REALISM_RECORD
    from ldam_sweep.realism import fmt as _fmt, layer_line, update_realism
    from ldam_sweep.store import open_store
    from ldam_sweep.store.lease import StoreLease

    with user_errors():
        st = open_store(store)
        lease = StoreLease.acquire(st.loc, doing="realism", log=_log)  # one writer: refused while a run owns it
        try:
            lease.start_heartbeat()
            doc = update_realism(st, seed=seed, progress=None if json_out else lambda name, e: _log(layer_line(name, e)))
        finally:
            lease.release()
        if json_out:
            print_json("realism", store=st.loc.url, **(_realism_summary(doc) or {}))
            return
        pooled = doc.get("pooled") or {}
        console.print(f"all layers: two-sample {_fmt(pooled.get('c2st'))} (exemplars {_fmt(pooled.get('c2st_exemplars'))}), "
                      f"HF {_fmt(pooled.get('hf_ratio'))} (exemplars {_fmt(pooled.get('hf_ratio_exemplars'))}); "
                      f"stored in {st.loc.join(sidecar_path(st.loc, REALISM_RECORD))}", highlight=False, markup=False)


@app.command()
def show(
    store: str = typer.Argument(..., help="Store path or URL."),
    layer: str = typer.Argument(...),
    unit: int = typer.Argument(...),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="PNG file to write (default: LAYER-UNIT.png in "
                                          "the current folder)."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Write a PNG of one unit: chains (rows) x snapshots (columns), labelled with activations."""
    from ldam_sweep.render import unit_grid
    from ldam_sweep.store import open_store
    from ldam_sweep.store.location import encode_name

    with user_errors():
        st = open_store(store)
        output = output if output is not None else Path(f"{encode_name(layer)}-{unit}.png")
        samples, steps = st.samples(layer, unit), st.snapshot_steps()  # only what the picture shows
        output.parent.mkdir(parents=True, exist_ok=True)
        unit_grid(samples, st.trace(layer, unit), steps, st.plan.value_range).save(output, format="PNG")
        path = output
        if json_out:
            print_json("show", store=st.loc.url, layer=layer, unit=unit, paths=[str(path)], chains=samples.shape[0],
                       snapshot_steps=steps.tolist())
            return
        console.print(f"wrote {path}: {layer} unit {unit}, {samples.shape[0]} chains x snapshots at steps {steps.tolist()}",
                      highlight=False, markup=False)


@app.command()
def verify(
    store: str = typer.Argument(..., help="Store path or URL."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP + " Every planned block: ok, corrupt, failed or missing."),
    repair: bool = typer.Option(False, "--repair", help="Repair what can be repaired without losing good data (metadata, "
                                "damaged files set aside) and mark every block with a problem as corrupt, in one commit, "
                                "so the next `ldam-sweep run` redoes exactly those blocks."),
) -> None:
    """Check every file the store depends on (metadata, discriminator, score prior, manifest, lease, records) and every
    committed block (readable, right shape, finite, checksum matches); record the result for readers.
    Exit 1 on problems (also with --repair, which fixes or marks them for the next run)."""
    from ldam_sweep.store import open_store, repair_store, verify_store
    from ldam_sweep.store.location import StoreLocation
    from ldam_sweep.store.verify import BlockProblem, StoreProblem, block_states, record_verification

    with user_errors():
        loc = StoreLocation.parse(store)
        checked, problems = verify_store(loc)
        files = [p for p in problems if isinstance(p, StoreProblem)]
        blocks = [p for p in problems if isinstance(p, BlockProblem)]
        report = repair_store(loc, problems) if repair and problems else None
        st = None
        if not any(p.kind in ("root", "unrepairable") for p in files) or (report and not report.left):
            st = open_store(store)
            if report is None:
                record_verification(st, blocks, files)
        code = _model_code(st)
        if json_out:
            states = block_states(st, blocks) if st is not None else []
            print_json("verify", store=loc.url, ok=not problems, checked=checked, model_runs_code=code,
                       repaired_units=report.units_marked if report else 0,
                       repaired_files=(report.fixed if report else []),
                       unrepaired=[str(p) for p in (report.left if report else [])],
                       counts={s: sum(b["state"] == s for b in states) for s in ("ok", "corrupt", "failed", "missing")},
                       problems=[str(p) for p in problems], files=[str(p) for p in files], blocks=states)
            raise typer.Exit(1 if problems else 0)
        for p in problems:
            err_console.print(Text.assemble(("problem: ", "red"), str(p)), highlight=False)
        if code is not None:
            err_console.print(f"note: this store's model is built by running code: {code}. Readers that rebuild it "
                              "(find) refuse it unless given --model or --trust-store.", highlight=False, markup=False)
        if not problems:
            console.print(f"ok: every file and {checked} committed blocks verified", highlight=False)
            return
        nblocks = len({(p.layer, p.block) for p in blocks})
        unchecked = " (blocks not checked: the root metadata is damaged)" if any(
            p.kind in ("root", "unrepairable") for p in files) else ""
        err_console.print(f"{len(problems)} problem(s): {len(files)} file(s), {nblocks} of {checked} committed blocks"
                          + unchecked, highlight=False)
        spec_run = f"`ldam-sweep run SPEC --store {loc.url}` (SPEC: the job spec this store was made from)"
        if report is not None:
            for line in report.fixed or []:
                err_console.print(f"repaired: {line}", highlight=False, markup=False)
            for p in report.left or []:
                err_console.print(Text.assemble(("not repaired: ", "red"), str(p)), highlight=False)
            if report.units_marked:
                err_console.print(f"repaired: {report.units_marked} units marked corrupt (one commit)", highlight=False)
            if report.rerun:
                err_console.print(f"next: {spec_run} redoes what was marked or set aside", highlight=False, markup=False)
        elif any(p.kind == "unrepairable" for p in files):
            pass  # its line names --fresh
        else:
            err_console.print(f"to repair: `ldam-sweep verify {loc.url} --repair`, then {spec_run}",
                              highlight=False, markup=False)
        raise typer.Exit(1)


def _model_code(st: Any) -> str | None:
    """What loading the store's model would run (a factory, TorchScript), or None."""
    if st is None:
        return None
    try:
        return st.model_spec().runs_code()
    except LdamError:  # a model spec this version cannot read: nothing would run it either
        return None


@app.command()
def atlas(
    store: str = typer.Argument(..., help="Store path or URL."),
    output: Path = typer.Option(..., "-o", "--output", help="Directory for the static site."),
    force: bool = typer.Option(False, "--force", help="Re-render every unit, not only changed ones."),
    workers: int = typer.Option(1, "-j", "--workers", min=1, help="Ray tasks rendering unit pages at once (a local Ray "
                                "of that many CPUs, or the cluster at --address); 1: in this process."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to render on (with -j), e.g. auto."),
) -> None:
    """Build (or update) the static HTML atlas of a store; open OUTPUT/index.html in a browser.
    Only units committed or changed since the last build are rendered again."""
    from ldam_sweep.atlas.site import build_atlas

    with user_errors():
        if address and workers == 1:
            raise LdamError(f"--address {address} renders on a Ray cluster: give -j N, how many tasks run at once")
        report = build_atlas(store, output, force=force, workers=workers, address=address)
        console.print(f"atlas: {report.layers} layers, {report.units_rendered} units rendered, "
                      f"{report.units_skipped} unchanged, {report.seconds:.1f}s -> {report.out / 'index.html'}", highlight=False,
                      markup=False)


@app.command()
def compare(
    store_a: str = typer.Argument(..., help="First store (e.g. raw weights)."),
    store_b: str = typer.Argument(..., help="Second store (e.g. averaged weights)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Also write an HTML report with side-by-side samples here."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP + " The per-layer table and every paired unit."),
) -> None:
    """Unit-by-unit comparison of two sweeps of one architecture: paired score differences and the
    distance between their samples, summarised per layer."""
    from ldam_sweep.compare import compare_stores, write_report
    from ldam_sweep.store import open_store

    with user_errors():
        a, b = open_store(store_a), open_store(store_b)
        cmp = compare_stores(a, b)
        if json_out:
            report = write_report(cmp, a, b, str(output)) if output is not None else None
            print_json("compare", a={"store": a.loc.url, "model": a.attrs["model"]["name"]},
                       b={"store": b.loc.url, "model": b.attrs["model"]["name"]},
                       layers=cmp.layers, units=cmp.units.to_pylist(), report=report)
            return
        table = Table(title=f"A = {a.attrs['model']['name']}  vs  B = {b.attrs['model']['name']}")
        cols = [("layer", "layer"), ("kind", "kind"), ("objective", "objective"), ("paired", "units"),
                ("mean_sample_distance", "sample dist"),
                ("mean_activation_ratio_delta", "Δ act ratio"), ("mean_realism_final_mean_delta", "Δ log D"),
                ("mean_nearest_real_delta", "Δ nearest real"), ("mean_pixel_diversity_delta", "Δ diversity")]
        for _, label in cols:
            table.add_column(label, justify="left" if label in ("layer", "kind", "objective") else "right")
        for r in cmp.layers:
            table.add_row(*[f"{r[k]:.4g}" if isinstance(r.get(k), float) else ("–" if r.get(k) is None else str(r[k]))
                            for k, _ in cols])
        console.print(table)
        for note in cmp.skipped:
            err_console.print(Text.assemble(("skipped (corrupt): ", "yellow"), note), highlight=False)
        if output is not None:
            console.print(f"wrote {write_report(cmp, a, b, str(output))}", highlight=False, markup=False)


@app.command()
def find(
    store: str = typer.Argument(..., help="Store path or URL."),
    images: list[str] = typer.Argument(..., help="Image files (PNG/JPEG/...) or folders of them."),
    layer: Optional[str] = typer.Option(None, help="Only this layer (default: every swept layer)."),
    top: int = typer.Option(10, min=1, help="How many units to list per image."),
    atlas_dir: Optional[Path] = typer.Option(None, "--atlas", help="An atlas of the store, to link unit pages "
                                             "(default: <store name>-atlas beside a local store, if built)."),
    model: Optional[str] = typer.Option(None, help="Load this model instead of the one in the store's spec "
                                        "(a YAML file or a name, as for `layers`)."),
    trust_store: bool = typer.Option(False, "--trust-store", help="Load the store's model even when it is built by "
                                     "running code (a factory or TorchScript named in the store); without it such "
                                     "a store needs --model."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Which units respond to these images: swept units of every layer ranked by lift, how far the image
    raises the unit above its typical (median) response to real images, relative to how far its best
    real image does (1 = as far as the best real image)."""
    from ldam_sweep.find import find_units
    from ldam_sweep.store import open_store

    with user_errors():
        st = open_store(store)
        handle = None
        if model is not None:
            from ldam_sweep.model import load_model
            from ldam_sweep.spec import load_model_spec

            handle = load_model(load_model_spec(model), log=_log)
        result = find_units(st, images, layer=layer, top=top, model=handle, atlas=atlas_dir, trust_store=trust_store)
        for note in result.notes:
            err_console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
        if json_out:
            print_json("find", store=st.loc.url, layer=layer, top=top, notes=result.notes,
                       seconds={"load": result.load_seconds, "compute": result.compute_seconds},
                       results=[{"image": name, "hits": [{k: v for k, v in h.items() if k not in ("image", "name")}
                                                          for h in result.for_image(i)]}
                                for i, name in enumerate(result.names)])
            return
        from ldam_sweep.termtable import print_table

        for i, name in enumerate(result.names):
            hits = result.for_image(i)
            print_table(console, name, ("rank", "layer", "unit", "label", "lift", "activation", "typical", "reference",
                                        "atlas page"),
                        [(h["rank"], h["layer"], h["unit"], h["label"], f"{h['lift']:.3g}", f"{h['activation']:.4g}",
                          f"{h['typical']:.4g}", f"{h['reference']:.4g}",
                          h["atlas_page"] and Path(h["atlas_page"]).relative_to(result.atlas).as_posix()) for h in hits],
                        keys=("rank", "layer", "unit"), right=("rank", "unit", "lift", "activation", "typical", "reference"),
                        notes=[f"atlas pages (each unit page's stable link) are under {result.atlas}"]
                        if result.atlas is not None and any(h["atlas_page"] for h in hits) else [])
        _log(f"model loaded in {result.load_seconds:.2f}s; {len(result.names)} image(s) ranked in {result.compute_seconds:.3f}s")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
