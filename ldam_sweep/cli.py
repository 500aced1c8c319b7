"""The ``ldam-sweep`` command. Errors from bad input print one clear message (exit 2), no traceback."""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from ldam_sweep.errors import LdamError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Sweep whole vision networks with Langevin Dynamics Activation Maximization (LDAM).",
)
console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print LdamError as 'error: ...' and exit 2; show warnings as one yellow line each."""

    def show(message, category, *_args, **_kwargs):  # noqa: ANN001
        err_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)

    old = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    except LdamError as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False, markup=True)
        raise typer.Exit(2) from None
    except OSError as err:  # an output path that cannot be written, a full disk, ...
        err_console.print(f"[red]error:[/red] {type(err).__name__}: {err}", highlight=False, markup=False)
        raise typer.Exit(2) from None
    finally:
        warnings.showwarning = old


def _log(msg: str) -> None:
    err_console.print(f"[dim]{msg}[/dim]", highlight=False)


@app.command()
def layers(
    spec: str = typer.Argument(..., help="A spec YAML file (with a model: section), or a model name such as digits-cnn or torchvision:resnet18."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the model's layers: name, module type, unit kind, unit count, output shape."""
    import json

    from ldam_sweep.model import load_model
    from ldam_sweep.spec import load_model_spec

    with user_errors():
        model = load_model(load_model_spec(spec), device="cpu", log=_log)
        if json_out:
            print(json.dumps([layer.as_dict() for layer in model.layers], indent=2))
            return
        table = Table(title=f"{model.name}: input {model.input.shape}, {len(model.layers)} layers")
        for col in ("layer", "module", "kind", "units", "output shape", "aliases"):
            table.add_column(col, justify="right" if col == "units" else "left")
        for layer in model.layers:
            table.add_row(
                layer.name, layer.module_type, layer.kind, str(layer.units),
                "×".join(map(str, layer.output_shape)), ", ".join(layer.aliases),
            )
        console.print(table)
        console.print(f"total units: {sum(layer.units for layer in model.layers)}")


def _print_summary(summary) -> None:
    from ldam_sweep.cluster.driver import summary_line

    console.print(
        f"sweep {'interrupted' if summary.interrupted else 'finished'}: {summary.done_blocks} blocks run "
        f"({summary.units_done} units, {summary.units_per_second:.2f} units/s, {summary.seconds:.0f}s), "
        f"{summary.skipped_blocks} already committed, {summary.failed_blocks} failed; store {summary.store}",
        highlight=False,
    )
    console.print(summary_line(summary), highlight=False, soft_wrap=True)


def _exit_code(summary) -> int:
    return 130 if summary.interrupted else (1 if summary.failed_blocks else 0)


@app.command()
def run(
    spec: Path = typer.Argument(..., help="Job spec YAML."),
    store: Optional[str] = typer.Option(None, help="Store path or URL (default: the spec's store, else storage/<name>.zarr)."),
    address: Optional[str] = typer.Option(None, help="Join an existing Ray cluster (e.g. auto, or ray://host:10001)."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete an existing store made from another spec and start over."),
) -> None:
    """Run a sweep; rerunning the same command resumes. Exit 1 if any block failed."""
    from ldam_sweep.cluster.driver import run_sweep

    with user_errors():
        summary = run_sweep(spec, store=store, address=address, fresh=fresh, console=err_console)
        _print_summary(summary)
        raise typer.Exit(_exit_code(summary))


@app.command()
def demo(
    store: Optional[str] = typer.Option(None, help="Store path (default storage/demo.zarr)."),
    quick: bool = typer.Option(False, "--quick", help="A smaller demo (fewer steps and D updates) for a first look."),
) -> None:
    """Sweep the whole built-in digits-cnn (every layer, every unit) with a discriminator trained on
    digits, then build its HTML atlas."""
    from ldam_sweep.cluster.demo import demo_job
    from ldam_sweep.cluster.driver import run_sweep

    with user_errors():
        job = demo_job(quick=quick)
        summary = run_sweep(job, store=store, console=err_console)
        _print_summary(summary)
        from ldam_sweep.atlas.site import build_atlas

        site = Path(summary.store).with_name(Path(summary.store).stem + "-atlas")
        report = build_atlas(summary.store, site)
        console.print(f"store: {summary.store}  (try: ldam-sweep status {summary.store})", highlight=False)
        console.print(f"atlas: {report.out / 'index.html'}  (open it in a browser)", highlight=False)
        raise typer.Exit(_exit_code(summary))


@app.command("train-discriminator")
def train_discriminator_cmd(
    spec: Path = typer.Argument(..., help="Job spec YAML with model, data and discriminator.train sections."),
    output: Path = typer.Option(..., "-o", "--output", help="File to write the trained discriminator to."),
) -> None:
    """Stage 1 alone: train the job's discriminator against its chains and save it."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ldam_sweep.errors import SpecError
    from ldam_sweep.model import load_model
    from ldam_sweep.settings import DiscriminatorSettings
    from ldam_sweep.spec import load_spec
    from ldam_sweep.stage import job_discriminator

    with user_errors():
        job = load_spec(spec)
        if job.discriminator is None or job.discriminator.train is None:
            raise SpecError(f"{spec}: train-discriminator needs a discriminator.train section (settings, may be {{}})")
        model = load_model(job.model, log=_log)
        total = DiscriminatorSettings(**job.discriminator.train).updates
        with Progress(TextColumn("[bold]training D"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=err_console) as bar:
            task = bar.add_task("d", total=total, stats="")
            trained = job_discriminator(job, model, progress=lambda i, st: bar.update(
                task, completed=i, stats=f"loss {st['loss']:.3f} acc {st['accuracy']:.2f}"))
        assert trained is not None
        path = trained.save(output)
        console.print(
            f"held-out accuracy {trained.heldout_accuracy:.3f} (real {trained.heldout_real_accuracy:.3f}, "
            f"fresh chains {trained.heldout_fake_accuracy:.3f}) after {trained.seconds:.0f}s; wrote {path}"
        )


@app.command()
def status(store: str = typer.Argument(..., help="Store path or URL.")) -> None:
    """Done / failed / pending units per layer, and how many of the done ones are dead (not sampled)."""
    from ldam_sweep.store import open_store

    with user_errors():
        st = open_store(store)
        table = Table(title=f"{st.loc.url}  ({st.attrs['model']['name']})")
        keys = ("planned", "done", "failed", "pending", "dead")  # dead: of the done units, found dead
        for col in ("layer", "kind", *keys, "blocks"):
            table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
        totals = dict.fromkeys(keys, 0)
        for info in st.layers():
            table.add_row(info["name"], info["kind"], *(str(info[k]) for k in keys), str(info["blocks"]))
            for k in keys:
                totals[k] += info[k]
        table.add_row("total", "", *(str(totals[k]) for k in keys), "")
        console.print(table)
        if totals["failed"]:
            failed = st.units(status="failed")
            errors = sorted(set(failed["error"].to_pylist()))
            console.print(f"[red]{totals['failed']} units failed[/red]; errors: " + " | ".join(e.splitlines()[-1][:200] for e in errors[:5] if e))


QUERY_COLUMNS = ("layer", "unit", "status", "act_start_mean", "act_final_mean", "act_final_max", "realism_final_mean", "exemplar_max")


@app.command()
def query(
    store: str = typer.Argument(..., help="Store path or URL."),
    layer: Optional[str] = typer.Option(None, help="Only this layer."),
    unit: Optional[int] = typer.Option(None, help="Only this unit."),
    status_: str = typer.Option("ok", "--status", help="ok, dead, failed, or all."),
    sort: Optional[str] = typer.Option(None, help="Sort by this manifest column (descending)."),
    ascending: bool = typer.Option(False, help="Sort ascending instead."),
    limit: Optional[int] = typer.Option(None, help="Show the first K rows after sorting."),
    columns: Optional[str] = typer.Option(None, help="Comma-separated columns to show (default: a summary set)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON records (all columns)."),
) -> None:
    """List committed units from the manifest, filtered and sorted by any column."""
    import json

    from ldam_sweep.store import open_store

    with user_errors():
        from ldam_sweep.errors import StoreError

        if status_ not in ("ok", "dead", "failed", "all"):
            raise StoreError(f"--status must be ok, dead, failed or all, got {status_!r}")
        st = open_store(store)
        table = st.units(layer, unit=unit, status=None if status_ == "all" else status_, sort=sort,
                         descending=not ascending, limit=limit)
        if json_out:
            records = table.to_pylist()
            for r in records:
                if r.get("committed_at") is not None:
                    r["committed_at"] = r["committed_at"].isoformat()
            print(json.dumps(records, indent=1, default=str))
            return
        cols = [c.strip() for c in columns.split(",")] if columns else list(QUERY_COLUMNS)
        unknown = [c for c in cols if c not in table.column_names]
        if unknown:
            raise StoreError(f"unknown column(s) {unknown}; columns: {', '.join(table.column_names)}")
        out = Table(title=f"{table.num_rows} units")
        for c in cols:
            out.add_column(c, justify="left" if c in ("layer", "status") else "right")
        data = table.select(cols).to_pylist()
        for r in data:
            out.add_row(*[f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v)) for v in r.values()])
        console.print(out)


@app.command()
def show(
    store: str = typer.Argument(..., help="Store path or URL."),
    layer: str = typer.Argument(...),
    unit: int = typer.Argument(...),
    output: Path = typer.Option(..., "-o", "--output", help="PNG file to write."),
) -> None:
    """Write a PNG of one unit: chains (rows) x snapshots (columns), labelled with activations."""
    import numpy as np

    from ldam_sweep.atlas.grid import save_grid
    from ldam_sweep.store import open_store

    with user_errors():
        st = open_store(store)
        samples = st.samples(layer, unit)
        act = st.trace(layer, unit)
        steps = st.snapshot_steps()
        labels = np.vectorize(lambda v: f"{v:.3g}")(act[:, steps])
        path = save_grid(output, samples, st.plan.value_range, row_labels=[f"chain {c}" for c in range(len(samples))],
                         cell_labels=labels)
        console.print(f"wrote {path}: {layer} unit {unit}, {samples.shape[0]} chains x snapshots at steps {steps.tolist()}")


@app.command()
def verify(store: str = typer.Argument(..., help="Store path or URL.")) -> None:
    """Check every committed block: readable, right shape, finite, checksum matches. Exit 1 on problems."""
    from ldam_sweep.store import open_store, verify_store

    with user_errors():
        st = open_store(store)
        checked, problems = verify_store(st)
        for p in problems:
            err_console.print(f"[red]problem:[/red] {p}", highlight=False)
        if problems:
            err_console.print(f"{len(problems)} problem(s) in {checked} committed blocks")
            raise typer.Exit(1)
        console.print(f"ok: {checked} committed blocks verified")


@app.command()
def atlas(
    store: str = typer.Argument(..., help="Store path or URL."),
    output: Path = typer.Option(..., "-o", "--output", help="Directory for the static site."),
    force: bool = typer.Option(False, "--force", help="Re-render every unit, not only changed ones."),
) -> None:
    """Build (or update) the static HTML atlas of a store; open OUTPUT/index.html in a browser."""
    from ldam_sweep.atlas.site import build_atlas

    with user_errors():
        report = build_atlas(store, output, force=force)
        console.print(f"atlas: {report.layers} layers, {report.units_rendered} units rendered, "
                      f"{report.units_skipped} unchanged, {report.seconds:.1f}s -> {report.out / 'index.html'}", highlight=False)


@app.command()
def compare(
    store_a: str = typer.Argument(..., help="First store (e.g. raw weights)."),
    store_b: str = typer.Argument(..., help="Second store (e.g. averaged weights)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Also write an HTML report with side-by-side samples here."),
) -> None:
    """Unit-by-unit comparison of two sweeps of one architecture: paired score differences and the
    distance between their samples, summarised per layer."""
    from ldam_sweep.compare import compare_stores, write_report
    from ldam_sweep.store import open_store

    with user_errors():
        a, b = open_store(store_a), open_store(store_b)
        cmp = compare_stores(a, b)
        table = Table(title=f"A = {a.attrs['model']['name']}  vs  B = {b.attrs['model']['name']}")
        cols = [("layer", "layer"), ("paired", "units"), ("mean_sample_distance", "sample dist"),
                ("mean_activation_ratio_delta", "Δ act ratio"), ("mean_realism_final_mean_delta", "Δ log D"),
                ("mean_nearest_real_delta", "Δ nearest real"), ("mean_pixel_diversity_delta", "Δ diversity")]
        for _, label in cols:
            table.add_column(label, justify="left" if label == "layer" else "right")
        for r in cmp.layers:
            table.add_row(*[f"{r[k]:.4g}" if isinstance(r.get(k), float) else ("–" if r.get(k) is None else str(r[k]))
                            for k, _ in cols])
        console.print(table)
        if output is not None:
            console.print(f"wrote {write_report(cmp, a, b, str(output))}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
