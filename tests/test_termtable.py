"""Terminal tables at 80 columns (ldam_sweep.termtable): names and headers are never cut, tables too wide
fold into stacked tables that repeat their key columns, repeated detail is one note under the table."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from ldam_sweep.cli import app
from ldam_sweep.store.schema import QUERY_COLUMNS
from ldam_sweep.termtable import folds, mark, print_table

runner = CliRunner()
NARROW = {"COLUMNS": "80", "TERM": "xterm-256color"}


def cli(*args: str, env: dict | None = None):
    out = runner.invoke(app, list(args), env=env)
    assert out.exit_code == 0, out.output
    return out.stdout


def table_cells(text: str) -> list[list[str]]:
    """The cells of every body and header row of rich tables in ``text`` (lines between rules), stripped."""
    return [[c.strip() for c in re.split("[│┃]", line)[1:-1]] for line in text.splitlines() if line[:1] in "│┃"]


def headers(text: str) -> list[list[str]]:
    """The header row of each (folded) table in ``text``, in order."""
    return [[c.strip() for c in line.split("┃")[1:-1]] for line in text.splitlines() if line.startswith("┃")]


def assert_fits(text: str, width: int = 80) -> None:
    too_long = [line for line in text.splitlines() if len(line) > width]
    assert not too_long, "\n".join(too_long)
    assert "…" not in text  # nothing ellipsised


def render(columns, rows, width=80, **kw) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    print_table(console, "t", columns, rows, **kw)
    return console.export_text()


@pytest.mark.fast
def test_a_table_that_fits_is_one_table_and_notes_are_plain_text():
    text = render(["layer", "units"], [["conv1", 16]], right=["units"], notes=[f"{mark(1)} [bold]not markup[/bold]"])
    assert text == ("        t        \n"
                    "┏━━━━━━━┳━━━━━━━┓\n"
                    "┃ layer ┃ units ┃\n"
                    "┡━━━━━━━╇━━━━━━━┩\n"
                    "│ conv1 │    16 │\n"
                    "└───────┴───────┘\n"
                    "¹ [bold]not markup[/bold]\n")


@pytest.mark.fast
def test_the_fold_layout_is_pinned():
    """Six 15-wide columns (18 each in a table) at 80 columns: the keys (a, b) and two more fit per fold
    (4 * 18 + 1 = 73), a fifth would not (91); every fold repeats the keys and names what it continues."""
    columns = ["a", "b", "c", "d", "e", "f"]
    assert folds(columns, [15] * 6, ("a", "b"), 80) == [[0, 1, 2, 3], [0, 1, 4, 5]]
    assert folds(columns, [15] * 6, (), 80) == [[0, 1, 2, 3], [4, 5]]
    assert folds(columns, [15] * 6, ("a", "b"), 200) == [[0, 1, 2, 3, 4, 5]]
    names = [c * 15 for c in columns]  # headers 15 wide: aaaaaaaaaaaaaaa, ...
    text = render(names, [[f"row{i}"] * 6 for i in range(2)], keys=names[:2])
    assert_fits(text)
    assert headers(text) == [names[:4], names[:2] + names[4:]]
    assert "t (continued: eeeeeeeeeeeeeee, fffffffffffffff)" in text
    assert table_cells(text).count(["row1"] * 4) == 2
    assert [len(line) for line in text.splitlines() if line.startswith("┃")] == [73, 73]


@pytest.mark.fast
def test_a_cell_too_wide_for_any_fold_is_broken_across_lines_whole():
    path = "/very/long/" + "x" * 120 + "/page.html"
    text = render(["layer", "unit", "atlas page"], [["fc2", 3, path]], keys=["layer", "unit"])
    assert_fits(text)
    body = [c for c in table_cells(text)[1:]]
    assert body[0][:2] == ["fc2", "3"] and "".join(row[2] for row in body) == path


def test_layers_of_digits_vit_at_80_columns_show_names_whole_and_the_token_layout_once(model_cache):
    """digits-vit's layers (trains digits-vit) fit 80 columns: one table, each layer once, names whole,
    one token-layout note; --wide adds kinds and aliases, folded with every layer named in each fold."""
    doc = json.loads(cli("layers", "digits-vit", "--json"))
    text = cli("layers", "digits-vit", env=NARROW)
    assert_fits(text)
    names = [layer["name"] for layer in doc["layers"]]
    assert headers(text) == [["layer", "module", "units", "output shape", "objective"]] and "continued" not in text
    assert [row[0] for row in table_cells(text)[1:]] == names  # each layer once, whole, in its own cell
    # the token layout: a marker on each token layer, one note under the table; aliases: one line
    detail = "50 tokens: 7×7 grid + class token"
    assert text.count(detail) == 1 and "¹ token_mean (50 tokens: 7×7 grid + class token)\n" in text
    tokens = sum(layer["tokens"] is not None for layer in doc["layers"])
    assert text.count("token_mean¹") == tokens > 20
    aliased = sum(bool(layer["aliases"]) for layer in doc["layers"])
    assert f"{aliased} layers also have another name (the same output): --wide lists them" in text
    wide = cli("layers", "digits-vit", "--wide", env=NARROW)
    assert_fits(wide)
    folds = headers(wide)
    assert len(folds) == 2 and all(h[0] == "layer" for h in folds)
    assert [h for fold in folds for h in fold[1:]] == ["module", "units", "output shape", "objective", "kind", "aliases"]
    assert [row[0] for row in table_cells(wide) if row[0] not in ("layer", "")] == names * 2
    aliases = [a for layer in doc["layers"] for a in layer["aliases"]]
    assert aliases and set(aliases) <= {c for row in table_cells(wide) for c in row}


@pytest.mark.fast
def test_layers_of_digits_cnn_fit_80_columns_unfolded(model_cache):
    doc = json.loads(cli("layers", "digits-cnn", "--json"))
    text = cli("layers", "digits-cnn", env=NARROW)
    assert_fits(text)
    assert len(headers(text)) == 1 and "continued" not in text and "¹" not in text
    assert [row[0] for row in table_cells(text)[1:]] == [layer["name"] for layer in doc["layers"]]


@pytest.mark.fast
def test_query_at_80_columns_prints_each_row_once_and_folds_only_when_asked(exemplar_store):
    """`query`'s default columns fit 80 columns (one table, each unit once, no integrity noise on an
    intact store); `--label 3` likewise; `--columns all` folds, repeating layer and unit in each fold;
    a query that matches nothing says so and names the store's labels."""
    units = json.loads(cli("query", exemplar_store, "--json"))["units"]
    text = cli("query", exemplar_store, env=NARROW)
    assert_fits(text)
    assert headers(text) == [list(QUERY_COLUMNS)] and "continued" not in text
    keys = [(u["layer"], str(u["unit"])) for u in units]
    assert [tuple(row[:2]) for row in table_cells(text)[1:]] == keys  # each unit once
    assert "unverified" not in text and "--repair" not in text
    threes = cli("query", exemplar_store, "--label", "3", env=NARROW)
    assert_fits(threes)
    want = [(u["layer"], str(u["unit"])) for u in json.loads(cli("query", exemplar_store, "--label", "3", "--json"))["units"]]
    assert want and [tuple(row[:2]) for row in table_cells(threes)[1:]] == want
    every = cli("query", exemplar_store, "--columns", "all", env=NARROW)
    assert_fits(every)
    folds = headers(every)
    assert len(folds) > 3 and all(h[:2] == ["layer", "unit"] for h in folds)
    starts = [tuple(row[:2]) for row in table_cells(every) if row[:2] != ["layer", "unit"] and row[0]]  # a wide cell folds onto lines with blank keys
    assert starts == keys * len(folds)
    none = cli("query", exemplar_store, "--label", "three", env=NARROW)
    assert none.strip() == "no ok units with label 'three'; labels are 0, 1, 2, 3, 4, 5, 6, 7, 8, 9"


@pytest.mark.fast
@pytest.mark.parametrize("width", [40, 60])
def test_query_columns_fold_at_any_width(exemplar_store, width):
    text = cli("query", exemplar_store, "--layer", "fc2", "--columns", "layer,unit,act_final_mean,exemplar_max",
               env={"COLUMNS": str(width)})
    assert_fits(text, width)
    assert [h for fold in headers(text) for h in fold if h not in ("layer", "unit")] == ["act_final_mean", "exemplar_max"]
