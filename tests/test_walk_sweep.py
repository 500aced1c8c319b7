"""``method: walk`` in a sweep: stage 1 trains the score prior once, the store keeps it (its bytes and a
sealed record with their sha256, as the discriminator's), the workers walk on it and every row names
its digest; a damaged prior is found by verify and made again by the next run (docs/spec.md, "prior")."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import ldam_sweep as ls
from ldam_sweep.cli import app
from ldam_sweep.errors import SpecError
from ldam_sweep.spec import parse_job

from conftest import one_line_error

# a tiny prior (the default, 1,024 wide and 16,000 steps, takes ~6 min on 2 cores): the wiring is
# under test here, the prior's quality in test_walk.py and docs/method.md
WALK_SPEC = {
    "name": "walk",
    "model": {"zoo": "digits-cnn"},
    "layers": ["conv2", "fc2"],
    "units": {"conv2": "0-7", "fc2": "0-3"},
    "sampler": {"method": "walk", "steps": 40, "chains": 4, "seed": 0},
    "prior": {"train": {"steps": 300, "hidden": 64}},
    "data": {"source": "digits", "limit": 256},
    "exemplars": 4,
    "resources": {"actors": 1, "block_size": 4, "commit_every": 1},
}
runner = CliRunner()


def cli(*args, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldam_sweep.cli", *map(str, args)], env={**env, "COLUMNS": "400"},
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})


@pytest.fixture(scope="module")
def walked(tmp_path_factory, model_cache):
    """(spec path, store, env, stderr) of one ``ldam-sweep run`` of WALK_SPEC (a real process, local Ray)."""
    import os

    folder = tmp_path_factory.mktemp("walk-sweep")
    spec = folder / "walk.yaml"
    spec.write_text(yaml.safe_dump(WALK_SPEC))
    env = {**os.environ, "LDAM_SWEEP_CACHE": str(model_cache), "RAY_AUTH_MODE": "disabled"}
    out = cli("run", spec, "--store", folder / "s.zarr", "--no-realism", env=env, cwd=folder)
    assert out.returncode == 0, out.stderr
    return spec, str(folder / "s.zarr"), env, out.stderr


def test_a_walk_sweep_keeps_its_prior_and_every_row_names_it(walked):
    """Stage 1 trained the prior once and says so; the store's prior is intact and loads without code;
    every unit's row names its digest; the chains moved like walks (median RMS from their start >=
    0.15, an ascent from the same starts moves ~0.06) and reached their unit's best real activation."""
    spec, url, _, stderr = walked
    assert "stage 1: training the score prior on cpu (300 steps, 3 hidden layers of 64" in stderr
    assert "stage 1: score prior ready (256 images, 64 components, 300 steps" in stderr
    st = ls.open_store(url)
    assert st.prior_state() == ("ok", "")
    info = st.prior_info()
    prior = ls.load_score_prior(st.prior_bytes())
    assert prior.digest() == info["digest"] and info["training"]["steps"] == 300 and prior.hidden == 64
    rows = st.units(status=None)
    assert set(rows["status"].to_pylist()) == {"ok"} and rows.num_rows == 12
    assert set(rows["prior"].to_pylist()) == {info["digest"]} and set(rows["method"].to_pylist()) == {"walk"}
    moves, reached = [], []
    for layer, units in (("conv2", range(8)), ("fc2", range(4))):
        for u in units:
            v = st.unit(layer, u)
            final, start = v.samples[:, -1].astype(np.float64), st.starts(layer, u).astype(np.float64)
            moves += list(np.sqrt(((final - start) ** 2).reshape(len(final), -1).mean(1)))
            best = float(v.exemplar_activation[0])
            if best > 0:
                reached += list(v.activation[:, -1] >= 0.95 * best)
    print(f"median move {np.median(moves):.3f}, at 0.95 x best real: {np.mean(reached):.2f} of {len(reached)} chains")
    assert np.median(moves) >= 0.15
    assert np.mean(reached) >= 0.8
    out = invoke("status", url, "--json")
    assert out.exit_code == 0 and '"prior": {' in out.output and info["digest"] in out.output


def test_a_damaged_prior_is_found_removed_and_made_again_by_the_next_run(walked, tmp_path):
    """A flipped byte in the stored prior: every read refuses it, verify names it, --repair removes it
    and the next run trains it again, checks it is the one the committed rows walked on, and keeps it;
    an incomplete prior (a stage 1 killed between its bytes and its record) is made again too."""
    spec, url, env, _ = walked
    copy = tmp_path / "copy.zarr"
    shutil.copytree(url, copy)
    digest = ls.open_store(url).prior_info()["digest"]
    chunk = copy / "prior" / "file" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    st = ls.open_store(copy)
    assert st.prior_state()[0] == "corrupt" and st.prior_info() is None
    with pytest.raises(ls.StoreError, match="score prior stored in .* is corrupt: its bytes do not match"):
        st.prior_bytes()  # what a worker reads: it never walks on a damaged prior
    out = invoke("verify", copy)
    assert out.exit_code == 1 and "prior: the stored score prior is corrupt: its bytes do not match" in out.output
    out = invoke("verify", copy, "--repair")
    assert out.exit_code == 1 and "repaired: prior: removed" in out.output, out.output  # 1: something was wrong
    assert ls.open_store(copy).prior_state()[0] == "absent"
    out = cli("run", spec, "--store", copy, "--no-realism", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "stage 1: training the score prior" in out.stderr and "3 of 3 blocks already committed, 0 to run" in out.stderr
    st = ls.open_store(copy)
    assert st.prior_info()["digest"] == digest and invoke("verify", copy).exit_code == 0

    # a record that was never written (the group and bytes are there): incomplete, made again
    record = copy / "prior" / "zarr.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "attributes": {}}))
    assert ls.open_store(copy).prior_state()[0] == "incomplete"
    out = cli("run", spec, "--store", copy, "--no-realism", env=env, cwd=tmp_path)
    assert out.returncode == 0 and "the stored score prior is incomplete" in out.stderr, out.stderr
    assert ls.open_store(copy).prior_state() == ("ok", "")


@pytest.mark.fast
def test_walk_specs_say_which_section_is_missing_or_wrong():
    """walk needs a prior section and data; a prior section needs method walk; walk takes lam 0."""
    base = {"name": "t", "model": {"zoo": "digits-cnn"}, "layers": ["fc2"], "data": {"source": "digits"}}
    walk = {"method": "walk"}
    cases = [
        ({"sampler": walk}, "sampler.method 'walk' walks on a score prior: add a prior section"),
        ({"sampler": walk, "prior": {"train": {}}, "data": None}, "starts its chains from the units' real exemplars"),
        ({"prior": {"train": {}}}, "the prior section is method walk's score prior; sampler.method 'ldam' does not use it"),
        ({"sampler": {**walk, "lam": 0.5}, "prior": {"train": {}}}, "use lam 0 \\(got 0.5\\)"),
        ({"sampler": {**walk, "init": "uniform"}, "prior": {"train": {}}}, "init 'uniform' is not allowed"),
        ({"sampler": walk, "prior": {"train": {"hidden": 4}}}, r"prior.train settings: hidden: .*greater than or equal to 8"),
        ({"sampler": walk, "prior": {"train": {}, "file": "p.pt"}}, "exactly one of file .* or train"),
        ({"sampler": walk, "prior": {"train": {"stepz": 1}}}, "stepz: unknown field"),
    ]
    for change, message in cases:
        doc = {k: v for k, v in {**base, **change}.items() if v is not None}
        with pytest.raises(SpecError, match=message):
            parse_job(doc)
    job = parse_job({**base, "sampler": walk, "prior": {"train": {"steps": 10}}})
    assert job.prior.train == {"steps": 10} and job.sampler.method == "walk"


def test_train_prior_saves_what_a_spec_names_and_a_prior_for_other_images_is_refused(tmp_path, digits_model):
    """``ldam-sweep train-prior`` trains the spec's prior alone and saves it; ``prior: {file: ...}``
    (relative to the spec) loads it and checks it against the model before a store is made: a prior
    of 16x16 images for the 28x28 digits model is one clear line, exit 2, and no store."""
    from ldam_sweep.cluster.stages import check_stage_inputs
    from ldam_sweep.data import digits
    from ldam_sweep.spec import load_spec

    spec = tmp_path / "train.yaml"
    spec.write_text(yaml.safe_dump({**WALK_SPEC, "prior": {"train": {"steps": 20, "hidden": 16}}}))
    out = invoke("train-prior", spec, "-o", tmp_path / "priors" / "p28.pt")
    assert out.exit_code == 0 and "score prior: 256 images, 64 components, 20 steps" in out.output, out.output
    spec.write_text(yaml.safe_dump({**WALK_SPEC, "prior": {"file": "priors/p28.pt"}}))
    job = load_spec(spec)
    loaded = check_stage_inputs(job, digits_model).prior
    assert f"digest {loaded.digest()[:12]}" in out.output and loaded.hidden == 16  # the prior it trained, saved
    out = invoke("train-prior", tmp_path / "train.yaml", "-o", tmp_path / "again.pt")  # a file prior: nothing to train
    assert out.exit_code == 2 and "train-prior needs a prior.train section" in one_line_error(out.output)

    ls.train_score_prior(digits(16, "train")[0], steps=5, hidden=16).save(tmp_path / "priors" / "p16.pt")
    spec = tmp_path / "walk.yaml"
    spec.write_text(yaml.safe_dump({**WALK_SPEC, "prior": {"file": "priors/p16.pt"}}))
    out = invoke("run", spec, "--store", tmp_path / "s.zarr")
    line = one_line_error(out.output)
    assert out.exit_code == 2 and "the score prior is for images (1, 16, 16)" in line and "(1, 28, 28)" in line, out.output
    assert not (tmp_path / "s.zarr").exists()


def test_the_gpu_memory_probe_of_a_walk_worker_starts_from_real_images(walked):
    """On a GPU a worker sizes its batches by sampling a few steps (``_probe_kwargs``); walk refuses
    to start from anything but real images, so the probe gives it real starts. Checked here on the
    CPU: the probe's call samples a walk instead of raising."""
    from ldam_sweep.cluster.worker import PROBE_STEPS, SweepWorker

    worker = SweepWorker(WALK_SPEC, walked[1], num_threads=1)
    kwargs = worker._probe_kwargs("conv2", 4)
    assert kwargs["method"] == "walk" and kwargs["prior"] is not None and kwargs["exemplars"].shape[0] == 4
    res = ls.sample(worker.model, "conv2", range(4), **kwargs)
    assert res.activation.shape == (4, WALK_SPEC["sampler"]["chains"], PROBE_STEPS + 1)
    assert np.isfinite(res.final_samples).all()
