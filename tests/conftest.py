"""Shared fixtures: a hermetic model cache per test session and the trained demo model."""

from __future__ import annotations

import contextlib
import os

import pytest

from ldam_sweep.cluster.runtime import WORKER_NICENESS_ENV

# The tests that start Ray themselves (ray.cluster_utils.Cluster for multi-node) get what
# run_sweep gives a local Ray: workers at normal priority, not Ray's nice 15 (see _init_ray).
os.environ.setdefault(WORKER_NICENESS_ENV, "0")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory):
    """Zoo weights are trained once per session into a fresh cache: tests never depend on a
    developer's ~/.cache."""
    path = tmp_path_factory.mktemp("ldam-cache")
    old = os.environ.get("LDAM_SWEEP_CACHE")
    os.environ["LDAM_SWEEP_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LDAM_SWEEP_CACHE", None)
    else:
        os.environ["LDAM_SWEEP_CACHE"] = old


@pytest.fixture(autouse=True)
def restore_thread_pools():
    """A SweepWorker built in-process sizes torch's and zarr's thread pools for its actor (1 thread in
    test_pipeline): every later test gets the session's pools back instead of running on one core."""
    import torch
    import zarr

    threads, workers = torch.get_num_threads(), zarr.config.get("threading.max_workers")
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if zarr.config.get("threading.max_workers") != workers:
        zarr.config.set({"threading.max_workers": workers})


@pytest.fixture
def env(model_cache):
    """The environment of a real `ldam-sweep` process a test starts: the session's model cache,
    local Ray without auth tokens, a wide terminal (no wrapped tables)."""
    return {**os.environ, "LDAM_SWEEP_CACHE": str(model_cache), "RAY_AUTH_MODE": "disabled", "COLUMNS": "200"}


@pytest.fixture(scope="session")
def digits_model(model_cache):
    import ldam_sweep as ls

    return ls.load_model("digits-cnn", device="cpu")


@pytest.fixture(scope="session")
def real_max_logits(digits_model):
    from ldam_sweep.model.zoo import class_max_logits

    return class_max_logits(digits_model.net)


@pytest.fixture(scope="session")
def exemplar_store(tmp_path_factory, digits_model):
    """A small in-process sweep of digits-cnn with dataset exemplars (k = 8 from the train digits),
    the way the worker stores one: fc1 and fc2 whole, conv2 block 0 done and block 1 failed,
    relu1 planned but not run (missing). 2 chains x 20 steps: the scores are real, the samples rough."""
    import torch

    import ldam_sweep as ls
    from ldam_sweep.data import digits
    from ldam_sweep.sampling.chains import default_snapshot_steps
    from ldam_sweep.sampling.exemplars import exemplar_pass, unit_label_columns
    from ldam_sweep.sampling.scoring import score_result
    from ldam_sweep.store import BlockWriter, commit, create_store, failed_rows
    from ldam_sweep.planning import plan_store

    url = str(tmp_path_factory.mktemp("exemplars") / "sweep.zarr")
    sampler = {"method": "ldam", "steps": 20, "chains": 2, "seed": 0}
    plan = plan_store(digits_model, {"relu1": [0, 1, 2, 3], "conv2": list(range(16)), "fc1": None, "fc2": None},
                      chains=2, steps=20, snapshot_steps=default_snapshot_steps(20, 10), block_size=8, exemplars_k=8,
                      spec={"model": {"zoo": "digits-cnn"}, "sampler": sampler, "data": {"source": "digits"}})
    create_store(url, plan)
    images, classes = digits(28, "train")
    pool = torch.from_numpy(images)
    writer = BlockWriter(url)
    for lp in plan.layers:
        if lp.name == "relu1":
            continue
        for b in lp.planned_blocks():
            if lp.name == "conv2" and b == 1:
                rows = failed_rows(lp, b, "RuntimeError: injected", attempt=3, spec_hash=plan.spec_hash())
                commit(url, [{**r, "generation": writer.generation} for r in rows])  # as the driver stamps them
                continue
            res = ls.sample(digits_model, lp.name, lp.block_units(b), chains=2, steps=20, seed=0, snapshot_every=10)
            found = exemplar_pass(digits_model, lp.name, res.units, lp.objective, pool, 8, labels=classes,
                                  class_names=digits_model.class_names)
            scores = score_result(digits_model, res, real_pool=pool, exemplar_max=found.activations[:, 0])
            for u, columns in unit_label_columns(digits_model, res, found).items():  # labels, as the worker adds them
                scores.setdefault(u, {}).update(columns)
            commit(url, writer.write(lp.name, b, res, exemplars=(found.images, found.activations), unit_columns=scores))
    return url


DEAD_CHANNEL = 2
DEAD_CHANNEL_SRC = f'''
from collections import OrderedDict
import torch
from torch import nn

DEAD = {DEAD_CHANNEL}


def build():
    """A conv layer whose channel DEAD has zero weights and bias -1: after the ReLU it is 0 with 0
    gradient for every image in [0, 1]. The other channels have positive weights: alive everywhere."""
    net = nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 4, 3, padding=1)), ("relu", nn.ReLU()),
                                     ("pool", nn.AdaptiveAvgPool2d(4)), ("flat", nn.Flatten()), ("fc", nn.Linear(64, 10))]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every weight from a fixed generator: the same model (fingerprint) in every process
        for p in net.parameters():
            p.copy_(torch.rand(p.shape, generator=g) - 0.5)
        net.conv.weight.copy_(torch.rand(net.conv.weight.shape, generator=g) * 0.5)
        net.conv.bias.zero_()
        net.conv.weight[DEAD] = 0.0
        net.conv.bias[DEAD] = -1.0
    return net
'''


@pytest.fixture(scope="session")
def dead_channel_model(tmp_path_factory):
    """(model spec, folder to put on PYTHONPATH) of a factory model whose layer 'relu' has exactly one
    dead channel, DEAD_CHANNEL."""
    import sys

    folder = tmp_path_factory.mktemp("dead-model")
    (folder / "dead_channel_model_for_test.py").write_text(DEAD_CHANNEL_SRC)
    sys.path.insert(0, str(folder))
    yield {"factory": "dead_channel_model_for_test:build", "input": {"channels": 1, "height": 28, "width": 28}}, folder
    sys.path.remove(str(folder))


def edit_root_attrs(url: str, change) -> None:
    """Edit a store's root attributes in place (``change(attrs)`` mutates the dict), as an older
    ldam-sweep left them, and seal them again: the store stays intact for verify and readers."""
    import json

    from ldam_sweep.store.integrity import ATTRS_SEAL, write_root
    from ldam_sweep.store.location import StoreLocation

    loc = StoreLocation.parse(url)
    attrs = json.loads(loc.fs.cat_file(loc.join("zarr.json")))["attributes"]
    attrs.pop(ATTRS_SEAL, None)
    change(attrs)
    write_root(loc, attrs)


@contextlib.contextmanager
def mounted_tmpfs(folder, size: str):
    """A real tmpfs of ``size`` (e.g. "8m") mounted at a new ``folder`` (needs root and a sandbox that
    allows mounts; the test is skipped otherwise), unmounted afterwards."""
    import subprocess

    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def one_line_error(text: str) -> str:
    """The one 'error: ...' line of a command's output (log lines may precede it), and nothing after it."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == len(lines) - 1, text
    return lines[-1]


# A small sweep with everything a store can hold: a discriminator, exemplars, realism (3 blocks:
# conv2 0-3, conv2 4-7, fc2 0-3). The fault tests (test_faults, test_integrity) copy it and break it.
SWEEP_SPEC = {
    "name": "integrity",
    "model": {"zoo": "digits-cnn"},
    "layers": ["conv2", "fc2"],
    "units": {"conv2": "0-7", "fc2": "0-3"},
    "sampler": {"steps": 10, "chains": 2, "seed": 1, "lam": 0.5},
    "discriminator": {"train": {"updates": 5}},
    "data": {"source": "digits", "limit": 64},
    "exemplars": 2,
    "resources": {"actors": 1, "block_size": 4, "commit_every": 1, "max_attempts": 2},
}


@pytest.fixture(scope="session")
def finished_sweep(tmp_path_factory, model_cache):
    """(spec path, store path, environment) of one uninterrupted ``ldam-sweep run`` of SWEEP_SPEC
    (a real process, local Ray), shared read-only: tests break copies of it."""
    import subprocess
    import sys

    import yaml

    folder = tmp_path_factory.mktemp("finished-sweep")
    spec = folder / "job.yaml"
    spec.write_text(yaml.safe_dump(SWEEP_SPEC))
    env = {**os.environ, "LDAM_SWEEP_CACHE": str(model_cache), "RAY_AUTH_MODE": "disabled"}
    url = str(folder / "s.zarr")
    out = subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "run", str(spec), "--store", url], env=env, cwd=folder,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    (folder / "run.stderr").write_text(out.stderr)  # what the user saw (tests of the terminal read it)
    return spec, url, env


def assert_equal_stores(a_url: str, b_url: str) -> None:
    """Every array byte for byte, every unit's status and checksum, and the discriminator's weights."""
    import numpy as np

    import ldam_sweep as ls

    a, b = ls.open_store(a_url), ls.open_store(b_url)
    for lp in a.plan.layers:
        for name in a.plan.arrays(lp):
            np.testing.assert_array_equal(a._array(lp.name, name)[:], b._array(lp.name, name)[:], err_msg=f"{lp.name}/{name}")
    rows = lambda st: {(r["layer"], r["unit"]): (r["status"], r["checksum"], r["discriminator"])  # noqa: E731
                       for r in st.units(status=None).to_pylist()}
    assert rows(a) == rows(b)
    assert a.discriminator_info()["digest"] == b.discriminator_info()["digest"]


def wait_until(condition, proc=None, timeout: float = 600, what: str = "the event") -> None:
    """Poll ``condition`` (an event another process causes: a file, a commit); fail at once if the
    process ``proc`` ended first. ``timeout`` only bounds a broken run."""
    import time

    t0 = time.monotonic()
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {proc.communicate()}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory, model_cache):
    """A folder laid out as the README's examples expect after `make demo`, made with the quick demo
    (the same whole-network sweep, fewer steps): ``jobs/`` (the repository's specs, with
    ``jobs/demo.yaml`` the quick demo's spec), ``storage/demo.zarr`` and ``storage/demo-atlas``
    written by ``ldam-sweep demo --quick --store storage/demo.zarr`` (a real process, local Ray, an
    80-column terminal: its stderr is kept as ``demo.stderr``),
    and ``digit.png`` (a held-out digit). Returns (folder, the demo's stdout, its environment)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    import yaml
    from PIL import Image

    from ldam_sweep.cluster.demo import demo_job
    from ldam_sweep.data import digits

    work = tmp_path_factory.mktemp("demo-work")
    shutil.copytree(Path(__file__).resolve().parents[1] / "jobs", work / "jobs")
    (work / "jobs" / "demo.yaml").write_text(yaml.safe_dump(demo_job(quick=True).model_dump(mode="json", exclude_none=True)))
    Image.fromarray((digits(28, "test")[0][3, 0] * 255).round().astype(np.uint8)).save(work / "digit.png")
    env = {**os.environ, "LDAM_SWEEP_CACHE": str(model_cache), "RAY_AUTH_MODE": "disabled", "COLUMNS": "80"}
    out = subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "demo", "--quick", "--store", "storage/demo.zarr"],
                         capture_output=True, text=True, env=env, cwd=work, timeout=1700)
    assert out.returncode == 0, out.stderr
    (work / "demo.stderr").write_text(out.stderr)  # what the user saw in an 80-column terminal
    return work, out.stdout, {**env, "COLUMNS": "100"}
