"""Faults of real clusters and object stores, each replayed with real processes and a real server:
a first run on a new S3 bucket, an S3 outage (moto's S3 server on loopback behind a proxy that cuts
every connection), a Ray worker node lost and new nodes joining (ray.cluster_utils.Cluster),
SIGTERM before and after Ray starts, an unreachable Ray address, and a store whose spec names code.
Each sweep is SWEEP_SPEC, so its store is compared with the shared uninterrupted run."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import SWEEP_SPEC, assert_equal_stores, edit_root_attrs, one_line_error, wait_until
from netfault import CutProxy, free_port

import ldam_sweep as ls
from ldam_sweep.failpoints import HOLD_BLOCKS_ENV, SIGNAL_DIR_ENV
from ldam_sweep.store.lease import read_lease

OUTAGE_S = 120  # what an overnight job meets: an endpoint gone for two minutes


def write_spec(folder: Path, **resources) -> Path:
    doc = json.loads(json.dumps(SWEEP_SPEC))
    doc["resources"].update(resources)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def start(*args: str, env: dict, cwd: Path) -> subprocess.Popen:
    # faulthandler: a run that does not finish is stopped with SIGABRT, which prints every thread's stack
    return subprocess.Popen([sys.executable, "-m", "ldam_sweep.cli", *map(str, args)],
                            env={**env, "COLUMNS": "400", "PYTHONFAULTHANDLER": "1"},
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 480) -> tuple[str, str]:
    """The run's (stdout, stderr) once it exits; one that is still running after ``timeout`` seconds fails
    the test with where each of its threads was (the stacks faulthandler prints on SIGABRT)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        raise AssertionError(f"the run did not finish in {timeout:.0f}s; its stderr (stacks last):\n{err[-12000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def hold(folder: Path, *blocks: str) -> dict[str, str]:
    """The environment that makes workers announce the named blocks and wait for their release."""
    folder.mkdir(exist_ok=True)
    return {SIGNAL_DIR_ENV: str(folder), HOLD_BLOCKS_ENV: ",".join(blocks)}


def released(folder: Path, block: str) -> None:
    (folder / f"release-{block.replace(':', '-')}").touch()


# -- S3 -------------------------------------------------------------------------------------------

@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on loopback behind a CutProxy; clients (this process and the CLI's) reach it
    only through the proxy, by the standard AWS_ENDPOINT_URL."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = CutProxy(("127.0.0.1", port)).start()
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": proxy.url}
    for k, v in aws.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance of another test's (dead) endpoint
    boto3.client("s3", endpoint_url=proxy.url).create_bucket(Bucket="fresh")
    yield proxy, aws
    proxy.stop()
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.timeout(900)
def test_a_2_minute_s3_outage_is_ridden_out_or_stops_the_sweep_with_exit_4(s3, finished_sweep, tmp_path):
    """Two first runs on a new S3 bucket meet the same 120 s outage mid-sweep (moto behind a proxy that
    cuts every connection). With the default patience the sweep retries through it: exit 0, verify
    passes, the store equals an uninterrupted run, no lease left. With a patience of 4 s it stops in
    one line, exit 4, and once S3 is back the rerun takes over the lease the outage kept and ends
    equal to a clean run. `status` during the outage: one line, exit 4."""
    proxy, aws = s3
    spec, clean, env = finished_sweep
    # a request the cut leaves hanging (a half-open connection) is abandoned after 30 s, not the default 300
    env = {**env, **aws, "LDAM_SWEEP_REQUEST_TIMEOUT": "30"}
    runs = {}
    for name, resources in (("patient", {}), ("impatient", {"storage_patience": 4})):
        signals = tmp_path / name / "signals"  # each sweep holds its last block: the outage comes mid-sweep
        job = write_spec(tmp_path / name, **resources)
        url = f"s3://fresh/runs/{name}.zarr"  # nothing under the bucket yet: the first run creates the store
        runs[name] = (start("run", job, "--store", url, env={**env, **hold(signals, "fc2:0")}, cwd=tmp_path / name),
                      signals, job, url)
    try:
        for proc, signals, _, _ in runs.values():
            wait_until(lambda: (signals / "held-fc2-0").exists(), proc, what="the last block to start")
        proxy.cut()
        cut_at = time.monotonic()
        for _, signals, _, _ in runs.values():
            released(signals, "fc2:0")  # the blocks sample now; their writes, and the commits, meet the outage
        status = subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "status", runs["patient"][3]],
                                env={**env, "COLUMNS": "400"}, capture_output=True, text=True, timeout=300)
        impatient, _, job, url = runs["impatient"]
        _, err = finish(impatient)
        assert impatient.returncode == 4, err
        line = one_line_error(err)
        assert "did not answer for" in line and "rerun the same command" in line and "Traceback" not in err
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut_at)))  # the outage's length is the test's input
        proxy.restore()
        _, err = finish(runs["patient"][0], timeout=300)  # within the test's own time limit: the stacks if it hangs
    finally:
        if proxy.is_cut:
            proxy.restore()
        for proc, *_ in runs.values():
            if proc.poll() is None:
                proc.kill()
    assert status.returncode == 4, status.stderr
    assert "the store did not answer" in one_line_error(status.stderr) and "Traceback" not in status.stderr
    assert runs["patient"][0].returncode == 0, err
    assert "lease heartbeat failed" in err and "lease heartbeat works again" in err and "Traceback" not in err
    again = start("run", job, "--store", url, env=env, cwd=tmp_path / "impatient")
    _, err = finish(again)
    assert again.returncode == 0, err
    for _, _, _, url in runs.values():
        verify = subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "verify", url], env={**env, "COLUMNS": "400"},
                                capture_output=True, text=True, timeout=300)
        assert verify.returncode == 0, verify.stderr
        assert_equal_stores(clean, url)
        assert read_lease(url) is None


# -- Ray nodes ------------------------------------------------------------------------------------

def test_the_only_worker_node_lost_then_new_nodes_joining_finish_the_sweep(finished_sweep, tmp_path, monkeypatch):
    """The only worker node dies mid-block; a node that joins later runs its blocks (the actor is
    asked again, not dropped), and a node that joins mid-sweep gets an actor of its own and runs a
    block (`actors: auto`). Exit 0, equal to an uninterrupted run.

    Every block is held until the test releases it: the first node holds conv2:0 and conv2:1 when it
    dies; the second holds fc2:0 and one conv2 block, so the other can only run on the third."""
    from ray.cluster_utils import Cluster

    spec, clean, env = finished_sweep
    signals = tmp_path / "signals"
    # the nodes' raylets start the workers, with this process's environment (not the driver's)
    for key, value in {"RAY_AUTH_MODE": "disabled", **hold(signals, "conv2:0", "conv2:1", "fc2:0")}.items():
        monkeypatch.setenv(key, value)
    pid_of = lambda block: (signals / f"held-{block}").read_text() if (signals / f"held-{block}").exists() else None  # noqa: E731
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    proc = None
    try:
        first = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        url = tmp_path / "nodes.zarr"
        proc = start("run", write_spec(tmp_path, actors="auto"), "--store", url, "--address", cluster.address,
                     env=env, cwd=tmp_path)
        wait_until(lambda: pid_of("conv2-0") and pid_of("conv2-1"), proc, what="two blocks held on the first node")
        lost = pid_of("conv2-0")
        cluster.remove_node(first)  # the only node with CPUs: its actor and both blocks are lost
        second = cluster.add_node(num_cpus=1)
        again = lambda: [b for b in ("conv2-0", "conv2-1") if pid_of(b) not in (None, lost)]  # noqa: E731
        wait_until(lambda: pid_of("fc2-0") and again(), proc, what="the second node to hold fc2:0 and a conv2 block")
        queued = ({"conv2-0", "conv2-1"} - set(again())).pop()
        released(signals, queued.replace("-", ":"))  # waits in the queue: the second node has no free slot
        third = cluster.add_node(num_cpus=1)  # joins mid-sweep
        wait_until(lambda: third.node_id[:12] in _committed_nodes(url), proc, what="a block committed on the third node")
        for block in ("conv2:0", "conv2:1", "fc2:0"):
            released(signals, block)
        out, err = finish(proc)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        cluster.shutdown()
    assert proc.returncode == 0, err
    assert "failed to start" not in err and "the cluster grew" in err
    nodes = _committed_nodes(url)
    assert nodes == {second.node_id[:12], third.node_id[:12]}
    assert_equal_stores(clean, str(url))


def _committed_nodes(url) -> set[str]:
    try:
        workers = ls.open_store(str(url)).units()["worker"].to_pylist()
    except ls.StoreError:
        return set()
    return {w.rsplit("@", 1)[-1] for w in workers}


def test_workers_that_can_never_start_stop_the_sweep_once_with_exit_3(finished_sweep, tmp_path):
    """Every actor's constructor fails (a worker's disk full at start): each failure is printed once,
    then one error line, exit 3 (a cluster fault, not bad input)."""
    from ldam_sweep.failpoints import ENV as FAILPOINTS

    _, _, env = finished_sweep
    proc = start("run", write_spec(tmp_path, actors=2), "--store", tmp_path / "w.zarr",
                 env={**env, FAILPOINTS: "worker.start=enospc"}, cwd=tmp_path)
    _, err = finish(proc)
    assert proc.returncode == 3, err
    assert "no worker can run" in one_line_error(err) and "Traceback" not in err
    told = sorted(line.split(" failed to start:")[0] for line in err.splitlines() if line.startswith("worker "))
    assert told == ["worker 0", "worker 1"], err  # each actor's failure once


# -- signals --------------------------------------------------------------------------------------

def ray_processes(marker: str) -> list[int]:
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines() if marker in line and "ps -ww" not in line]


def test_sigterm_mid_sweep_commits_what_finished_and_exits_143(finished_sweep, tmp_path):
    """SIGTERM (a scheduler, spot preemption) mid-sweep: finished blocks committed, exit 143, the lease
    released, no Ray process left; the rerun resumes and ends equal to an uninterrupted run."""
    spec, clean, env = finished_sweep
    signals, ray_tmp = tmp_path / "signals", Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    url = tmp_path / "term.zarr"
    job = write_spec(tmp_path)
    proc = start("run", job, "--store", url, "--json", env={**env, "RAY_TMPDIR": str(ray_tmp), **hold(signals, "fc2:0")},
                 cwd=tmp_path)
    try:
        wait_until(lambda: (signals / "held-fc2-0").exists(), proc, what="the last block to start")
        wait_until(lambda: len(_committed_nodes(url)) > 0, proc, what="a committed block")
        proc.send_signal(signal.SIGTERM)
        out, err = finish(proc, timeout=300)
    finally:
        released(signals, "fc2:0")
    try:
        assert proc.returncode == 143, err
        assert "SIGTERM: committing finished blocks" in err and "Traceback" not in err
        assert json.loads(out)["signal"] == "SIGTERM"
        assert read_lease(str(url)) is None
        wait_until(lambda: not ray_processes(str(ray_tmp)), timeout=30, what="Ray's processes to exit")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    kept = ls.open_store(str(url)).units()
    assert 0 < kept.num_rows < 12 and "fc2" not in kept["layer"].to_pylist()
    again = start("run", job, "--store", url, env=env, cwd=tmp_path)
    _, err = finish(again)
    assert again.returncode == 0, err
    assert_equal_stores(clean, str(url))


def test_sigterm_before_ray_starts_exits_143_and_releases_the_lease(finished_sweep, tmp_path):
    """SIGTERM during stage 1 (no Ray yet): exit 143 in one line, no traceback, the lease released."""
    _, _, env = finished_sweep
    url = tmp_path / "early.zarr"
    proc = start("run", write_spec(tmp_path), "--store", url, env=env, cwd=tmp_path)
    try:
        for line in proc.stderr:  # the driver's own announcement is the event
            if line.startswith("stage 1: training the discriminator"):
                break
        proc.send_signal(signal.SIGTERM)
        _, rest = finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, rest
    assert rest.strip().splitlines()[-1] == "stopped by SIGTERM" and "Traceback" not in rest
    assert read_lease(str(url)) is None


# -- addresses and stored code --------------------------------------------------------------------

def test_an_unreachable_ray_address_fails_in_seconds_before_any_store_exists(finished_sweep, tmp_path):
    _, _, env = finished_sweep
    url = tmp_path / "never.zarr"
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "run", str(write_spec(tmp_path)), "--store", str(url),
                          "--address", "127.0.0.1:1"], env={**env, "COLUMNS": "400"}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert time.monotonic() - t0 < 30
    assert out.returncode == 3, out.stderr
    assert "cannot join Ray at address '127.0.0.1:1'" in one_line_error(out.stderr)
    assert not url.exists()


@pytest.mark.fast
def test_a_store_naming_code_is_never_run_by_readers_without_the_users_word(exemplar_store, tmp_path):
    """A store whose spec names a factory (here one that would run a shell command): `find` and
    ls.Finder refuse it, naming --model/--trust-store; no marker file appears; `verify` says so;
    --model runs; --trust-store is the user's word and only then does the code run."""
    from PIL import Image
    from typer.testing import CliRunner

    from ldam_sweep.cli import app

    store = tmp_path / "evil.zarr"
    shutil.copytree(exemplar_store, store)
    marker = tmp_path / "ran"
    edit_root_attrs(str(store), lambda attrs: attrs["spec"].update(model={
        "factory": "subprocess:getoutput", "kwargs": {"cmd": f"touch {marker}"},
        "input": {"channels": 1, "height": 28, "width": 28}}))
    image = tmp_path / "digit.png"
    Image.fromarray((np.eye(28) * 255).astype(np.uint8)).save(image)
    runner = CliRunner()
    with pytest.raises(ls.StoreError, match="--trust-store"):
        ls.Finder(ls.open_store(str(store))).find(str(image))
    refused = runner.invoke(app, ["find", str(store), str(image)], env={"COLUMNS": "400"})
    assert refused.exit_code == 2 and "never runs code named in it" in refused.output
    verify = runner.invoke(app, ["verify", str(store), "--json"], env={"COLUMNS": "400"})
    assert "subprocess:getoutput" in json.loads(verify.stdout)["model_runs_code"]
    assert not marker.exists()
    given = runner.invoke(app, ["find", str(store), str(image), "--model", "digits-cnn", "--json"], env={"COLUMNS": "400"})
    assert given.exit_code == 0, given.output
    assert json.loads(given.stdout)["results"][0]["hits"]
    assert not marker.exists()
    trusted = runner.invoke(app, ["find", str(store), str(image), "--trust-store"], env={"COLUMNS": "400"})
    assert marker.exists() and trusted.exit_code != 0  # the code ran (and built no model)
