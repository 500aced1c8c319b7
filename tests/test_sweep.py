"""The sweep on a real local Ray runtime: real processes killed, resumed, failing, on two nodes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml
from typer.testing import CliRunner

import ldam_sweep as ls
from ldam_sweep.cli import app
from ldam_sweep.failpoints import FAIL_BLOCKS_ENV, HOLD_BLOCKS_ENV, SIGNAL_DIR_ENV
from ldam_sweep.store import verify_store

ROOT = Path(__file__).resolve().parents[1]

SPEC = {
    "name": "kill-test",
    "model": {"zoo": "digits-cnn"},
    "layers": ["conv2"],
    "sampler": {"steps": 400, "chains": 2, "seed": 3},
    "resources": {"actors": 2, "block_size": 4, "commit_every": 1, "cpus_per_actor": 1, "max_attempts": 3},
}


def write_spec(tmp_path: Path, **changes) -> Path:
    doc = json.loads(json.dumps(SPEC))
    for key, value in changes.items():
        doc[key] = value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def default_sigint() -> None:
    """In the child: Ctrl-C raises KeyboardInterrupt, also when the test runner was started in the
    background (a shell starts background jobs with SIGINT ignored, and Python keeps it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args: str, env: dict, cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ldam_sweep.cli", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint, **kw)


def committed_blocks(url: str) -> int:
    try:
        return len({r["block"] for r in ls.open_store(url).units().to_pylist()})
    except ls.StoreError:
        return 0


# Waits below end on events (a commit, a file); this only bounds how long a broken run can hang, and
# is generous because a busy 2-core box takes minutes to start Ray and the actors.
PATIENCE = 600


def wait_for_blocks(url: str, n: int, proc: subprocess.Popen, timeout: float = PATIENCE) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = committed_blocks(url)
        if got >= n:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"driver ended early: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError(f"no {n} committed blocks after {timeout}s")


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = PATIENCE) -> Path:
    """Poll for a file a worker's test hook writes (an event), failing early if the driver ended."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists():
            return path
        if proc.poll() is not None:
            raise AssertionError(f"driver ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError(f"no {path} after {timeout}s")


def hold(signals: Path, *blocks: str) -> dict:
    """Environment that makes the sweep's workers announce themselves and hold the named blocks."""
    signals.mkdir(exist_ok=True)
    return {SIGNAL_DIR_ENV: str(signals), HOLD_BLOCKS_ENV: ",".join(blocks)}


def test_worker_killed_mid_sweep_loses_nothing(tmp_path, env):
    """A Ray worker SIGKILLed mid-block: another process retries the block and the sweep loses nothing."""
    spec = write_spec(tmp_path)
    url = str(tmp_path / "storage" / "kill-test.zarr")
    signals = tmp_path / "signals"
    proc = cli("run", str(spec), env={**env, **hold(signals, "conv2:0")}, cwd=tmp_path)
    try:
        # block 0 is provably running in this sweep's own actor (not some other Ray's) when it dies
        pid = int(wait_for_file(signals / "held-conv2-0", proc).read_text())
        assert signals.joinpath(f"worker-{pid}").exists()
        os.kill(pid, signal.SIGKILL)
    except BaseException:  # a failed or timed-out test does not leave its sweep running
        proc.kill()
        raise
    finally:
        (signals / "release-conv2-0").touch()  # the retry of block 0 runs through
    out, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 0, err
    assert len(list(signals.glob("worker-*"))) >= 2  # the sweep's two actors (plus Ray's restart, if it came up in time)
    st = ls.open_store(url)
    units = st.units()
    assert sorted(units["unit"].to_pylist()) == list(range(32))  # every planned unit, each exactly once after de-duplication
    block0 = [r for r in units.to_pylist() if r["block"] == 0]
    assert block0[0]["attempt"] >= 2  # the killed worker's block was retried, by another process
    assert not block0[0]["worker"].split("@")[0].endswith(f":{pid}")
    assert verify_store(st) == (8, [])


def _load_summary(out: str) -> dict:
    """The summary `run --json` prints: one JSON object on stdout."""
    doc = json.loads(out)
    assert doc["command"] == "run"
    return doc


def test_driver_killed_then_resumed_matches_an_uninterrupted_run(tmp_path, env):
    """A driver SIGKILLed mid-sweep resumes from its commits and ends equal to an uninterrupted run."""
    spec = write_spec(tmp_path)
    url = str(tmp_path / "storage" / "kill-test.zarr")
    signals = tmp_path / "signals"
    proc = cli("run", str(spec), env={**env, **hold(signals, "conv2:0")}, cwd=tmp_path)
    try:
        wait_for_file(signals / "held-conv2-0", proc)
        wait_for_blocks(url, 2, proc)  # block 0 is held: the driver dies with blocks provably pending
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    except BaseException:  # a failed or timed-out test does not leave its sweep running
        proc.kill()
        raise
    finally:
        (signals / "release-conv2-0").touch()
    done_before = committed_blocks(url)
    assert 2 <= done_before < 8
    again = cli("run", str(spec), "--json", env=env, cwd=tmp_path)
    out, err = again.communicate(timeout=PATIENCE)
    assert again.returncode == 0, err
    assert f"resume: {done_before} of 8 blocks already committed, {8 - done_before} to run" in err
    summary = _load_summary(out)
    assert summary["skipped_blocks"] == done_before and summary["done_blocks"] == 8 - done_before

    ref_url = str(tmp_path / "reference.zarr")
    ref = cli("run", str(spec), "--store", ref_url, env=env, cwd=tmp_path)
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    a, b = ls.open_store(url), ls.open_store(ref_url)
    assert verify_store(a) == (8, [])
    for unit in range(32):
        np.testing.assert_allclose(a.samples("conv2", unit), b.samples("conv2", unit), atol=1e-3)
        np.testing.assert_allclose(a.trace("conv2", unit), b.trace("conv2", unit), rtol=1e-5, atol=1e-5)


def test_block_that_always_fails_is_recorded_and_the_rest_completes(tmp_path, env):
    """A block that always fails is recorded after max_attempts, the rest completes, and a rerun retries only it."""
    spec = write_spec(tmp_path, sampler={"steps": 30, "chains": 2},
                      resources={**SPEC["resources"], "max_attempts": 2})
    url = str(tmp_path / "storage" / "kill-test.zarr")
    proc = cli("run", str(spec), "--json", env={**env, FAIL_BLOCKS_ENV: "conv2:5"}, cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    summary = _load_summary(out)
    assert summary["failed_blocks"] == 1 and summary["done_blocks"] == 7
    st = ls.open_store(url)
    failed = st.units(status="failed")
    assert failed["unit"].to_pylist() == [20, 21, 22, 23]
    assert set(failed["attempt"].to_pylist()) == {2} and "injected failure" in failed["error"][0].as_py()
    assert st.units().num_rows == 28
    status = CliRunner().invoke(app, ["status", url], env={"COLUMNS": "200"})
    row = [l for l in status.stdout.splitlines() if "conv2" in l][0]
    assert [c.strip() for c in row.split("│")][3:7] == ["32", "28", "4", "0"]
    assert "injected failure" in status.stdout
    # fixed: the same command retries only the failed block
    again = cli("run", str(spec), env=env, cwd=tmp_path)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0 and "resume: 7 of 8 blocks already committed, 1 to run" in err
    assert ls.open_store(url).units().num_rows == 32


def test_ctrl_c_keeps_what_is_committed(tmp_path, env):
    """Ctrl-C on a real driver keeps every committed block (exit 130), and the rerun finishes the rest."""
    spec = write_spec(tmp_path)
    url = str(tmp_path / "storage" / "kill-test.zarr")
    signals = tmp_path / "signals"
    proc = cli("run", str(spec), "--json", env={**env, **hold(signals, "conv2:0")}, cwd=tmp_path)
    try:
        wait_for_file(signals / "held-conv2-0", proc)
        wait_for_blocks(url, 1, proc)  # the other actor has committed a block; block 0 is provably pending
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=PATIENCE)
    except BaseException:  # a failed or timed-out test does not leave its sweep running
        proc.kill()
        raise
    finally:
        (signals / "release-conv2-0").touch()  # a worker the driver failed to stop does not linger
    assert proc.returncode == 130, err
    assert _load_summary(out)["interrupted"] is True
    st = ls.open_store(url)
    units = st.units()
    blocks = set(units["block"].to_pylist())
    assert blocks and 0 not in blocks and units.num_rows == 4 * len(blocks)
    assert verify_store(st) == (len(blocks), [])
    again = cli("run", str(spec), env=env, cwd=tmp_path)
    out, err = again.communicate(timeout=PATIENCE)
    assert again.returncode == 0, err
    assert f"resume: {len(blocks)} of 8 blocks already committed, {8 - len(blocks)} to run" in err
    st = ls.open_store(url)
    assert sorted(st.units()["unit"].to_pylist()) == list(range(32)) and verify_store(st) == (8, [])


@pytest.mark.fast
def test_bad_specs_fail_before_any_work(tmp_path, monkeypatch):
    cases = {
        "unknown field": ({"bogus": 1}, "bogus: unknown field"),
        "wrong type": ({"sampler": {"steps": "many"}}, "sampler.steps: Input should be a valid integer"),
        "unknown layer": ({"layers": ["conv9"]}, "unknown layer 'conv9'"),
        "units out of range": ({"units": {"conv2": "30-40"}}, "unit 32 is out of range for layer 'conv2': valid units are 0..31"),
        "unwritable store": ({"store": "/proc/ldam/x.zarr"}, "is not writable"),
    }
    monkeypatch.chdir(tmp_path)  # where the spec's default store would go
    for name, (change, message) in cases.items():
        spec = write_spec(tmp_path, **change)
        got = CliRunner().invoke(app, ["run", str(spec)], env={"COLUMNS": "200"})
        assert got.exit_code == 2, (name, got.stderr, got.exception)
        assert message in got.stderr, (name, got.stderr)
        assert "Ray instance" not in got.stderr, name
    assert not (tmp_path / "storage").exists()
    assert not ray.is_initialized()  # refused before Ray started


@pytest.mark.fast
def test_cluster_yaml_passes_rays_schema_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["provider"]["type"] == "aws"
    gpu = [t for t in config["available_node_types"].values() if "g" in t["node_config"]["InstanceType"][:2]]
    assert gpu and any("ldam-sweep" in c or "pip install" in c for c in config["setup_commands"])


@pytest.mark.fast
def test_shipped_job_specs_parse_and_demo_matches():
    from ldam_sweep.cluster.demo import DEMO_DOC

    for path in sorted((ROOT / "jobs").glob("*.yaml")):
        ls.load_spec(path)
    assert yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text()) == DEMO_DOC


@pytest.mark.fast
def test_split_batches_equal_one_batch(digits_model):
    whole = ls.sample(digits_model, "conv2", list(range(6)), chains=2, steps=20)
    parts = ls.ChainResult.concat([ls.sample(digits_model, "conv2", [0, 1, 2], chains=2, steps=20),
                                   ls.sample(digits_model, "conv2", [3, 4, 5], chains=2, steps=20)])
    np.testing.assert_allclose(parts.samples, whole.samples, atol=1e-5)
    assert parts.units.tolist() == list(range(6))
    for name in ls.ChainResult.PER_UNIT:  # every per-unit array joined, and take() cuts each back out
        joined, alone = getattr(parts, name), getattr(whole, name)
        assert (joined is None) == (alone is None), name
        if joined is not None:
            np.testing.assert_allclose(np.asarray(joined, np.float64), np.asarray(alone, np.float64), atol=1e-5)
            np.testing.assert_array_equal(getattr(parts.take(slice(3, 6)), name), joined[3:6])
    with pytest.raises(ValueError, match="same layer"):
        ls.ChainResult.concat([whole, ls.sample(digits_model, "conv2", [0], chains=2, steps=20, seed=1)])
