"""Ownership of a store: one driver holds its lease, a replaced store stops the old driver and its
workers, verify finds rows another store wrote, --fresh asks before deleting committed work.
Real driver processes on real local Ray where a process matters; in-process otherwise."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from conftest import wait_until

import ldam_sweep as ls
from ldam_sweep.errors import StoreOwnedError, StoreReplacedError
from ldam_sweep.failpoints import HOLD_BLOCKS_ENV, NO_HEARTBEAT_ENV, SIGNAL_DIR_ENV
from ldam_sweep.store import commit, create_store, verify_store
from ldam_sweep.store.integrity import ATTRS_SEAL, METADATA_KEY, ROOT_COPY
from ldam_sweep.store.layout import read_generation
from ldam_sweep.store.lease import INTERVAL_ENV, MISSED_ENV, LEASE_FILE, StoreLease, read_lease
from ldam_sweep.store.manifest import FILE_SCHEMA

SPEC = {
    "name": "own",
    "model": {"zoo": "digits-cnn"},
    "layers": ["fc2"],
    "sampler": {"steps": 20, "chains": 2, "seed": 7},
    "resources": {"actors": 1, "block_size": 2, "commit_every": 1, "cpus_per_actor": 1, "max_attempts": 2},
}


def write_spec(path: Path, **changes) -> Path:
    doc = json.loads(json.dumps(SPEC))
    doc.update(changes)
    path.write_text(yaml.safe_dump(doc))
    return path


def cli(*args: str, env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ldam_sweep.cli", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def committed_blocks(url: str) -> int:
    try:
        return len({r["block"] for r in ls.open_store(url).units().to_pylist()})
    except ls.StoreError:
        return 0


def hold_env(env: dict, hold_dir: Path, block: str) -> dict:
    return {**env, HOLD_BLOCKS_ENV: block, SIGNAL_DIR_ENV: str(hold_dir)}


# -- the lease, in-process -----------------------------------------------------------------------

def _lease_flow(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Acquire, refuse a second owner, go stale, be taken over, never delete the new owner's lease."""
    messages: list[str] = []
    first = StoreLease.acquire(url)
    first.set_generation("gen-a")
    with pytest.raises(StoreOwnedError) as err:
        StoreLease.acquire(url, doing="--fresh")
    text = str(err.value)
    assert f"host {socket.gethostname()} pid {os.getpid()}" in text and "last heartbeat" in text
    assert "Refused (--fresh)" in text and "Wait for that driver to finish, or stop it" in text
    first.check("gen-a")
    with pytest.raises(StoreReplacedError, match="replaced or taken over.*nothing more was committed"):
        first.check("gen-b")  # the store's generation changed under the lease
    first.release()
    assert read_lease(url) is None

    monkeypatch.setenv(INTERVAL_ENV, "0.01")
    monkeypatch.setenv(MISSED_ENV, "1")
    stale = StoreLease.acquire(url)  # never renewed: stale 10 ms after it was taken
    stale.set_generation("gen-a")
    monkeypatch.delenv(INTERVAL_ENV)
    monkeypatch.delenv(MISSED_ENV)
    wait_until(lambda: read_lease(url).stale(), what="the lease to go stale")
    taker = StoreLease.acquire(url, log=messages.append)
    assert len(messages) == 1 and "took over the lease" in messages[0] and f"owner {stale.record.owner[:8]}" in messages[0]
    assert "no heartbeat for more than 0s" in messages[0]
    with pytest.raises(StoreReplacedError, match=f"held by host .* \\(owner {taker.record.owner[:8]}\\)"):
        stale.check("gen-a")
    stale.release()  # not its lease any more: left alone
    assert read_lease(url).owner == taker.record.owner
    taker.release()
    assert read_lease(url) is None


@pytest.mark.fast
def test_lease_on_local_disk(tmp_path, monkeypatch):
    url = str(tmp_path / "store.zarr")
    _lease_flow(url, monkeypatch)
    # a holder that died on this host is taken over at once, a torn lease goes stale by its file time
    dead = subprocess.Popen(["true"])
    dead.wait()
    lease = StoreLease.acquire(url)
    record = json.loads(Path(url, LEASE_FILE).read_text())
    Path(url, LEASE_FILE).write_text(json.dumps({**record, "pid": dead.pid, "owner": "ghost"}))
    messages: list[str] = []
    StoreLease.acquire(url, log=messages.append).release()
    assert "its process is gone" in messages[0] and "owner ghost" in messages[0]
    Path(url, LEASE_FILE).write_text("")
    with pytest.raises(StoreOwnedError, match="owned by another driver: host unknown host"):
        StoreLease.acquire(url)
    os.utime(Path(url, LEASE_FILE), (time.time() - 3600, time.time() - 3600))
    StoreLease.acquire(url, log=messages.append).release()
    assert "no heartbeat for more than 60s" in messages[-1]
    lease.release()  # its lease was taken over long ago: nothing of the others' is deleted
    assert sorted(os.listdir(url)) == []  # no temp or set-aside files left behind


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.fast
def test_lease_on_s3_with_conditional_writes(monkeypatch):
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(k, v)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="leases")
        from ldam_sweep.store.lease import _S3LeaseFile, _lease_file
        from ldam_sweep.store.location import StoreLocation

        url = "s3://leases/runs/x.zarr"
        assert isinstance(_lease_file(StoreLocation.parse(url)), _S3LeaseFile)  # If-None-Match / If-Match
        _lease_flow(url, monkeypatch)
    finally:
        server.stop()
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # a cached filesystem would keep this dead endpoint


# -- manifest and verify, in-process --------------------------------------------------------------

def _fc2_plan(model, seed: int = 7):
    from ldam_sweep.planning import sweep_store_plan
    from ldam_sweep.spec import parse_job

    job = parse_job({**SPEC, "sampler": {**SPEC["sampler"], "seed": seed}})
    return job, sweep_store_plan(job, model, job.model_dump(mode="json", exclude_none=True))


def _write_block(url: str, model, plan, block: int) -> list[dict]:
    from ldam_sweep.store import BlockWriter

    lp = plan.layer("fc2")
    res = ls.sample(model, "fc2", lp.block_units(block), chains=2, steps=20, seed=7)
    rows = BlockWriter(url).write("fc2", block, res)
    commit(url, rows)
    return rows


@pytest.mark.fast
def test_old_part_files_read_back_a_null_generation_and_verify_checks_rows(tmp_path, digits_model):
    url = str(tmp_path / "rows.zarr")
    _, plan = _fc2_plan(digits_model)
    create_store(url, plan)
    generation = read_generation(url)
    assert generation and len(generation) == 32
    rows = _write_block(url, digits_model, plan, 0)
    assert {r["generation"] for r in rows} == {generation}
    assert verify_store(ls.open_store(url)) == (1, [])
    # a part file written before the generation column existed
    old_schema = pa.schema([f for f in FILE_SCHEMA if f.name != "generation"])
    old = {**{k: v for k, v in rows[0].items() if k in old_schema.names}, "unit": 2, "block": 1,
           "status": "failed", "error": "boom", "committed_at": dt.datetime.now(dt.timezone.utc)}
    folder = Path(url, "manifest", "parts", "layer=fc2")
    pq.write_table(pa.Table.from_pylist([old], schema=old_schema), folder / "part-0-old.parquet")
    manifest = ls.open_store(url).manifest("fc2")
    got = {r["unit"]: r["generation"] for r in manifest.to_pylist()}
    assert got == {0: generation, 1: generation, 2: None}
    st = ls.open_store(url)
    checked, problems = verify_store(st)
    assert [str(p) for p in problems] == [
        f"layer 'fc2' block 1: manifest rows of units [2] were not written for this store: generation None, "
        f"the store's is {generation}"]
    # a store made before generations existed (and before its root was sealed): null is its generation
    zmeta = Path(url, "zarr.json")
    meta = json.loads(zmeta.read_text())
    for key in ("generation", ATTRS_SEAL, METADATA_KEY):
        del meta["attributes"][key]
    zmeta.write_text(json.dumps(meta))
    Path(url, ROOT_COPY, "zarr.json").unlink()
    assert read_generation(url) == ""
    assert [str(p) for p in verify_store(ls.open_store(url))[1]] == [  # null is fine now, the uuid is not
        f"layer 'fc2' block 0: manifest rows of units [0, 1] were not written for this store: generation {generation}, "
        "the store's is none"]
    meta["attributes"]["generation"] = generation
    zmeta.write_text(json.dumps(meta))
    # rows of another spec, and units outside the plan
    commit(url, [{"layer": "fc2", "unit": 9, "block": 4, "status": "failed", "spec_hash": "f" * 64},
                 {"layer": "fc2", "unit": 42, "block": 21, "status": "failed", "spec_hash": plan.spec_hash()},
                 {"layer": "conv9", "unit": 0, "block": 0, "status": "failed", "spec_hash": plan.spec_hash()}])
    problems = [str(p) for p in verify_store(ls.open_store(url))[1] if "generation" not in p.problem]
    assert problems == [
        "layer 'conv9' block 0: manifest rows of units [0] were not written for this store: layer not in the store's plan",
        f"layer 'fc2' block 4: manifest rows of units [9] were not written for this store: spec_hash ffffffffffff, "
        f"the store's is {plan.spec_hash()[:12]}",
        "layer 'fc2' block 21: manifest rows of units [42] were not written for this store: unit not in the store's plan",
    ]


@pytest.mark.fast
def test_fresh_without_yes_is_refused_with_the_unit_count(tmp_path, digits_model, monkeypatch):
    from ldam_sweep import cli as cli_module

    url = str(tmp_path / "kept.zarr")
    spec = write_spec(tmp_path / "job.yaml")
    _, plan = _fc2_plan(digits_model)
    create_store(url, plan)
    generation = read_generation(url)
    _write_block(url, digits_model, plan, 0)
    runner = CliRunner()
    result = runner.invoke(cli_module.app, ["run", str(spec), "--store", url, "--fresh"])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, output
    assert "--fresh would delete 2 committed units" in output and "nothing was deleted" in output
    assert "Pass --fresh --yes" in output
    monkeypatch.setattr(cli_module, "_stdin_is_tty", lambda: True)
    result = runner.invoke(cli_module.app, ["run", str(spec), "--store", url, "--fresh"], input="kept\n")
    assert result.exit_code == 2 and "Type the store's name (kept.zarr)" in " ".join(result.output.split())
    st = ls.open_store(url)
    assert st.units().num_rows == 2 and read_generation(url) == generation and read_lease(url) is None
    assert sorted(os.listdir(url)) == ["layers", "manifest", "root-copy", "zarr.json"]


@pytest.mark.fast
def test_fresh_on_a_store_without_commits_needs_no_confirmation(tmp_path, digits_model):
    from ldam_sweep.cluster.driver import _confirm_fresh
    from ldam_sweep.store.location import StoreLocation

    url = str(tmp_path / "empty.zarr")
    _, plan = _fc2_plan(digits_model)
    create_store(url, plan)
    _confirm_fresh(StoreLocation.parse(url), lambda *_: pytest.fail("asked for an empty store"))
    first = read_generation(url)
    create_store(url, plan, fresh=True)
    assert read_generation(url) not in (None, "", first)  # recreated: a new generation


# -- real drivers --------------------------------------------------------------------------------

def test_second_driver_and_fresh_are_refused_while_a_driver_writes(tmp_path, env, digits_model):
    """While a real driver holds the lease, a second `run` and `run --fresh` exit 5 and change nothing."""
    spec = write_spec(tmp_path / "job.yaml")
    other = write_spec(tmp_path / "other.yaml", sampler={**SPEC["sampler"], "seed": 9})
    url = str(tmp_path / "one.zarr")
    hold = tmp_path / "hold"
    hold.mkdir()
    first = cli("run", str(spec), "--store", url, env=hold_env(env, hold, "fc2:2"), cwd=tmp_path)
    wait_until(lambda: (hold / "held-fc2-2").exists() and committed_blocks(url) >= 2, first, what="block 2 held")
    for args, doing in [((str(spec),), "this run"), ((str(other), "--fresh", "--yes"), "--fresh")]:
        second = cli("run", *args, "--store", url, env=env, cwd=tmp_path)
        _, err = second.communicate(timeout=120)
        err = " ".join(err.split())
        assert second.returncode == 5, err
        assert f"is owned by another driver: host {socket.gethostname()} pid {first.pid}" in err, err
        assert f"Refused ({doing}): nothing was changed" in err and "Traceback" not in err
    assert committed_blocks(url) >= 2  # --fresh deleted nothing
    (hold / "release-fc2-2").touch()
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    st = ls.open_store(url)
    assert sorted(st.manifest()["unit"].to_pylist()) == list(range(10))  # every unit once, no duplicates
    assert set(st.manifest()["generation"].to_pylist()) == {read_generation(url)}
    assert verify_store(st) == (5, []) and read_lease(url) is None


def test_replaced_store_stops_the_old_driver_and_its_workers(tmp_path, env, digits_model):
    """A store taken over by `run --fresh` stops the old real driver (exit 5); its workers write nothing after."""
    old_spec = write_spec(tmp_path / "old.yaml", resources={**SPEC["resources"], "block_size": 5})
    new_spec = write_spec(tmp_path / "new.yaml", sampler={**SPEC["sampler"], "seed": 8},
                          resources={**SPEC["resources"], "block_size": 5})
    url = str(tmp_path / "race.zarr")
    hold = tmp_path / "hold"
    hold.mkdir()
    # the old driver stops renewing its lease (stale 50 ms after it took it) and holds block 0
    old_env = {**hold_env(env, hold, "fc2:0"), NO_HEARTBEAT_ENV: "1", INTERVAL_ENV: "0.05", MISSED_ENV: "1"}
    old = cli("run", str(old_spec), "--store", url, env=old_env, cwd=tmp_path)
    wait_until(lambda: (hold / "held-fc2-0").exists(), old, what="block 0 held")
    old_generation = read_generation(url)
    wait_until(lambda: read_lease(url).stale(), old, what="the old lease to go stale")

    new = cli("run", str(new_spec), "--store", url, "--fresh", "--yes", env=env, cwd=tmp_path)
    _, err = new.communicate(timeout=300)
    err = " ".join(err.split())
    assert new.returncode == 0, err
    assert "took over the lease" in err and f"pid {old.pid}" in err and "no heartbeat for more than 0s" in err
    st = ls.open_store(url)
    new_generation = read_generation(url)
    assert new_generation not in (None, old_generation) and st.spec()["sampler"]["seed"] == 8
    before = {u: st.samples("fc2", u).tobytes() for u in range(10)}

    (hold / "release-fc2-0").touch()
    _, err = old.communicate(timeout=300)
    err = " ".join(err.split())
    assert old.returncode == 5, err
    assert "was replaced or taken over while this driver ran" in err and "nothing more was committed" in err
    st = ls.open_store(url)
    manifest = st.manifest()
    assert manifest.num_rows == 10  # only the new driver's rows
    assert set(manifest["spec_hash"].to_pylist()) == {st.attrs["spec_hash"]}
    assert set(manifest["generation"].to_pylist()) == {new_generation}
    assert {u: st.samples("fc2", u).tobytes() for u in range(10)} == before  # the old worker wrote nothing
    assert verify_store(st) == (2, [])

    # a row another driver published by hand is reported by `verify` (exit 1)
    # unit 3's own row (block 0): the manifest's row order follows which actor committed first
    row = {k: v for k, v in next(r for r in manifest.to_pylist() if r["unit"] == 3).items() if k != "committed_at"}
    commit(url, [{**row, "unit": 3, "spec_hash": "0" * 64, "generation": old_generation}])
    out = subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "verify", url], capture_output=True, text=True,
                         env=env)
    stderr = " ".join(out.stderr.split())
    assert out.returncode == 1, stderr
    assert "layer 'fc2' block 0: manifest rows of units [3] were not written for this store: spec_hash 000000000000" \
        in stderr
    assert f"generation {old_generation}, the store's is {new_generation}" in stderr
