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


@app.command()
def demo(
    out: Path = typer.Option(Path("storage/demo"), "--out", "-o", help="Directory for the demo's outputs."),
    chains: int = typer.Option(8, help="Chains per class."),
    steps: int = typer.Option(300, help="Langevin steps per chain."),
    seed: int = typer.Option(0, help="Seed of every chain."),
) -> None:
    """Train (or load) the built-in digits-cnn and sample its 10 class logits; write a PNG grid."""
    import numpy as np

    from ldam_sweep.atlas.grid import save_grid
    from ldam_sweep.model import load_model
    from ldam_sweep.model.zoo import class_max_logits
    from ldam_sweep.sampling import sample

    with user_errors():
        model = load_model("digits-cnn", log=_log)
        acc = model.metadata["train_metrics"]["test_accuracy"]
        console.print(f"digits-cnn: test accuracy {acc:.3f}; layers: {', '.join(l.name for l in model.layers)}")
        t0 = time.perf_counter()
        result = sample(model, "fc2", range(10), chains=chains, steps=steps, seed=seed)
        secs = time.perf_counter() - t0
        ref = class_max_logits(model.net.cpu())
        ratio = result.final_activation.mean(axis=1) / ref
        labels = np.vectorize(lambda v: f"{v:.1f}")(result.final_activation)
        path = save_grid(
            out / "fc2_logits.png", result.final_samples, model.input.range,
            row_labels=[f"class {u}" for u in result.units], cell_labels=labels,
        )
        console.print(
            f"sampled 10 logits x {chains} chains x {steps} steps in {secs:.1f}s; "
            f"final logit / best real digit: mean {ratio.mean():.2f} (min {ratio.min():.2f})"
        )
        console.print(f"wrote {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
