"""``--json`` on every reporting command: one JSON object on stdout whose values equal the Python API's."""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import ldam_sweep as ls
from ldam_sweep.cli import app
from ldam_sweep.compare import compare_stores
from ldam_sweep.store import BlockWriter, commit, verify_store

pytestmark = pytest.mark.fast  # the whole file is in the quick tier (make test-fast)

runner = CliRunner()


def run_json(*args: str, code: int = 0) -> dict:
    """Invoke the CLI in-process; stdout must be exactly one JSON document (strict: no NaN)."""
    res = runner.invoke(app, list(args))
    assert res.exit_code == code, (res.exit_code, res.stderr, res.exception)
    doc = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert isinstance(doc, dict) and doc["command"] == args[0]
    return doc


def same(got, want) -> bool:
    """JSON value vs the Python API's value: NaN <-> null, datetimes as ISO 8601, floats to 1e-9."""
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(same(got[k], want[k]) for k in want)
    if isinstance(want, (list, tuple)):
        return isinstance(got, list) and len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    if isinstance(want, float) and not math.isfinite(want):
        return got is None
    if isinstance(want, float):
        return isinstance(got, (int, float)) and got == pytest.approx(want, rel=1e-9, abs=1e-12)
    if isinstance(want, dt.datetime):  # ISO 8601 (pydantic writes UTC as "Z")
        return isinstance(got, str) and dt.datetime.fromisoformat(got) == want
    return got == want


def test_layers_json_equals_the_models_layers(digits_model):
    doc = run_json("layers", "digits-cnn", "--json")
    assert doc["layers"] == [layer.as_dict() for layer in digits_model.layers]
    assert doc["total_units"] == 410 and doc["input"] == [1, 28, 28] and doc["model"] == digits_model.name


def test_status_json_equals_store_layers(exemplar_store):
    st = ls.open_store(exemplar_store)
    doc = run_json("status", exemplar_store, "--json")
    assert same(doc["layers"], st.layers())
    assert doc["totals"] == {"planned": 4 + 16 + 128 + 10, "done": 8 + 128 + 10, "failed": 8, "corrupt": 0, "pending": 4, "dead": 0}
    assert doc["errors"] == ["RuntimeError: injected"] and doc["store"] == st.loc.url


def test_query_json_equals_units(exemplar_store):
    st = ls.open_store(exemplar_store)
    doc = run_json("query", exemplar_store, "--layer", "fc1", "--sort", "activation_ratio", "--limit", "5", "--json")
    want = st.units("fc1", sort="activation_ratio", limit=5).to_pylist()
    assert doc["count"] == 5 and same(doc["units"], want)
    assert doc["units"][0]["exemplar_max"] > 0 and doc["units"][0]["committed_at"].endswith("Z")  # UTC, RFC 3339


def test_show_json_lists_the_png_written(exemplar_store, tmp_path):
    from PIL import Image

    doc = run_json("show", exemplar_store, "fc2", "3", "-o", str(tmp_path / "u.png"), "--json")
    assert doc["paths"] == [str(tmp_path / "u.png")] and doc["chains"] == 2 and doc["snapshot_steps"] == [10, 20]
    assert Image.open(doc["paths"][0]).format == "PNG"


def test_verify_json_states_every_planned_block(exemplar_store, tmp_path):
    st = ls.open_store(exemplar_store)
    checked, problems = verify_store(st)
    doc = run_json("verify", exemplar_store, "--json")
    assert doc["ok"] is True and doc["checked"] == checked == 19 and problems == [] and doc["problems"] == []
    assert doc["counts"] == {"ok": 19, "corrupt": 0, "failed": 1, "missing": 1}
    states = {(b["layer"], b["block"]): b["state"] for b in doc["blocks"]}
    assert states[("conv2", 1)] == "failed" and states[("relu1", 0)] == "missing" and states[("fc2", 1)] == "ok"
    # a changed byte after commit: corrupt, exit 1 even with --json
    bad = tmp_path / "bad.zarr"
    shutil.copytree(exemplar_store, bad)
    zarr.open_group(str(bad), mode="r+")["layers/fc2/activation"][9, 0, 0] = 123.0
    doc = run_json("verify", str(bad), "--json", code=1)
    _, problems = verify_store(ls.open_store(str(bad)))
    assert doc["ok"] is False and doc["problems"] == [str(p) for p in problems] and len(problems) == 1
    assert doc["counts"] == {"ok": 18, "corrupt": 1, "failed": 1, "missing": 1}
    corrupt = [b for b in doc["blocks"] if b["state"] == "corrupt"]
    assert [(b["layer"], b["block"]) for b in corrupt] == [("fc2", 1)] and "checksum mismatch" in corrupt[0]["problems"][0]


def test_compare_json_equals_compare_stores(exemplar_store, digits_model, tmp_path):
    other = tmp_path / "other.zarr"
    shutil.copytree(exemplar_store, other)
    lp = ls.open_store(str(other)).layer_plan("fc2")
    res = ls.sample(digits_model, "fc2", lp.block_units(0), chains=2, steps=20, seed=1, snapshot_every=10)
    commit(str(other), BlockWriter(str(other)).write("fc2", 0, res))  # fc2 units 0-7 resampled with other seeds
    cmp = compare_stores(exemplar_store, str(other))
    doc = run_json("compare", exemplar_store, str(other), "--json")
    assert same(doc["layers"], cmp.layers) and same(doc["units"], cmp.units.to_pylist())
    fc2 = {r["unit"]: r for r in doc["units"] if r["layer"] == "fc2"}
    assert fc2[0]["sample_distance"] > 0.01 and fc2[9]["sample_distance"] == 0.0 and doc["report"] is None


def test_errors_leave_stdout_empty_and_exit_2(tmp_path):
    res = runner.invoke(app, ["status", str(tmp_path / "nope.zarr"), "--json"])
    assert res.exit_code == 2 and res.stdout == "" and "is not an ldam-sweep store" in res.stderr


def test_json_safe_turns_non_finite_into_null():
    from ldam_sweep.cli import json_safe

    got = json_safe({"a": float("nan"), "b": (np.float32(1.5), np.inf), "c": np.arange(2), "d": dt.date(2020, 1, 2)})
    assert got == {"a": None, "b": [1.5, None], "c": [0, 1], "d": "2020-01-02"}
