"""Dead units (0 activation and 0 input gradient at every start): found by one probe in ls.sample,
not sampled, committed as 'dead' with the reason, done for resume, accepted by verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import ldam_sweep as ls
from ldam_sweep.cli import app
from ldam_sweep.cluster.worker import SweepWorker
from ldam_sweep.planning import sweep_store_plan
from ldam_sweep.spec import parse_job
from ldam_sweep.store import create_store
from ldam_sweep.store import verify_store

from conftest import DEAD_CHANNEL

CHAINS = 4


@pytest.mark.fast
def test_sample_flags_exactly_the_dead_channel_and_its_neighbours_are_unchanged(dead_channel_model):
    spec, _ = dead_channel_model
    model = ls.load_model(spec, device="cpu")
    res = ls.sample(model, "relu", range(4), chains=CHAINS, steps=20)
    assert res.dead.tolist() == [u == DEAD_CHANNEL for u in range(4)]
    assert np.isnan(res.samples[DEAD_CHANNEL]).all() and np.isnan(res.activation[DEAD_CHANNEL]).all()
    assert res.dead_reason == f"activation and input gradient are 0 for all {CHAINS} starting images"
    live = [u for u in range(4) if u != DEAD_CHANNEL]
    alone = ls.sample(model, "relu", live, chains=CHAINS, steps=20)
    assert not alone.dead.any()
    np.testing.assert_array_equal(alone.samples, res.samples[live])  # dropping the dead unit changes nothing else
    np.testing.assert_array_equal(alone.activation, res.activation[live])
    assert (res.activation[live][..., -1] > 0).all()
    # the conv output before the ReLU is a constant -1 for that channel: not 0, so not dead
    assert not ls.sample(model, "conv", range(4), chains=2, steps=2).dead.any()


@pytest.mark.fast
def test_a_batch_with_a_dead_unit_records_the_live_units_it_sampled_together(dead_channel_model, tmp_path):
    """``batch_units`` is the batch's size on the device (what re-sampling on a GPU must match): the
    dead unit is dropped before sampling, so a block of 4 with one dead unit ran as 3."""
    spec, _ = dead_channel_model
    doc = {"name": "dead-batch", "model": spec, "layers": ["relu"], "sampler": {"steps": 5, "chains": 2, "seed": 1},
           "resources": {"actors": 1, "block_size": 4, "cpus_per_actor": 1}}
    job = parse_job(doc)
    url = str(tmp_path / "batch.zarr")
    create_store(url, sweep_store_plan(job, ls.load_model(spec, device="cpu"), job.model_dump(mode="json", exclude_none=True)))
    rows = SweepWorker(doc, url, num_threads=1).run_batch("relu", [(0, [0, 1, 2, 3])], [1])[0]
    assert [r["status"] for r in rows] == ["dead" if u == DEAD_CHANNEL else "ok" for u in range(4)]
    assert [r["batch_units"] for r in rows] == [3] * 4


def test_a_sweep_commits_the_dead_unit_as_dead_and_a_rerun_does_not_redo_it(dead_channel_model, tmp_path, model_cache):
    """Through `ldam-sweep run` (local Ray) a dead unit is committed as dead, verified, shown as dead, and not rerun."""
    spec, folder = dead_channel_model
    job = {"name": "dead-test", "model": spec, "layers": ["relu"], "data": {"source": "digits"},
           "sampler": {"steps": 20, "chains": CHAINS, "seed": 1},
           "resources": {"actors": 1, "block_size": 1, "commit_every": 1, "cpus_per_actor": 1}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    url = str(tmp_path / "dead.zarr")
    env = {**os.environ, "LDAM_SWEEP_CACHE": str(model_cache), "RAY_AUTH_MODE": "disabled", "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}
    run = [sys.executable, "-m", "ldam_sweep.cli", "run", "job.yaml", "--store", url]
    first = subprocess.run(run, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]

    st = ls.open_store(url)
    rows = {r["unit"]: r for r in st.units(status=None).to_pylist()}
    assert {u: r["status"] for u, r in rows.items()} == {u: "dead" if u == DEAD_CHANNEL else "ok" for u in range(4)}
    dead = rows[DEAD_CHANNEL]
    assert dead["error"] == f"activation and input gradient are 0 for all {CHAINS} starting images"
    assert dead["act_final_mean"] is None and dead["lowpass_diversity"] is None and dead["exemplar_max"] == 0.0
    alive = rows[(DEAD_CHANNEL + 1) % 4]
    assert alive["lowpass_diversity"] > 0 and alive["lowpass_diversity_ratio"] > 0 and alive["facets"] >= 1
    assert st.units(status="dead")["unit"].to_pylist() == [DEAD_CHANNEL]
    assert st.exemplars("relu", DEAD_CHANNEL)[0].shape[0] > 0  # real data: kept for a dead unit
    checked, problems = verify_store(st)
    assert checked == 4 and problems == []
    info = st.layers()[0]
    assert (info["done"], info["dead"], info["failed"], info["pending"]) == (4, 1, 0, 0)

    cli = CliRunner()
    status = cli.invoke(app, ["status", url], env={"COLUMNS": "200"})
    line = [l for l in status.stdout.splitlines() if "│ relu" in l][0]
    assert [c.strip() for c in line.split("│")][3:9] == ["4", "4", "0", "0", "0", "1"]  # planned done failed corrupt pending dead
    out = cli.invoke(app, ["query", url, "--status", "dead", "--json"])
    assert [r["unit"] for r in json.loads(out.stdout)["units"]] == [DEAD_CHANNEL]
    assert "is dead" in cli.invoke(app, ["show", url, "relu", str(DEAD_CHANNEL), "-o", str(tmp_path / "d.png")]).stderr

    again = subprocess.run(run, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "resume: 4 of 4 blocks already committed, 0 to run" in again.stderr, again.stderr[-3000:]
