"""The same store protocol on an S3-compatible object store: moto's server on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import ldam_sweep as ls
from ldam_sweep.sampling.chains import default_snapshot_steps
from ldam_sweep.store import BlockWriter, StoreError, commit, create_store, verify_store
from ldam_sweep.planning import plan_store

pytestmark = pytest.mark.fast  # the whole file is in the quick tier (make test-fast)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    import s3fs
    from moto.server import ThreadedMotoServer

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches filesystems: one from another test's server is dead
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="sweeps")
    yield endpoint
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_create_write_commit_query_on_s3(s3_endpoint, digits_model):
    url = "s3://sweeps/runs/digits.zarr"
    plan = plan_store(digits_model, {"fc2": None}, chains=2, steps=10,
                      snapshot_steps=default_snapshot_steps(10, 5), block_size=4, spec={"s3": True})
    create_store(url, plan)
    create_store(url, plan)  # idempotent on S3 too
    lp = plan.layer("fc2")
    writer = BlockWriter(url)
    results = {b: ls.sample(digits_model, "fc2", lp.block_units(b), chains=2, steps=10, snapshot_every=5) for b in (0, 2)}
    rows = [r for b, res in results.items() for r in writer.write("fc2", b, res)]
    assert ls.open_store(url).units().num_rows == 0  # written, not committed: invisible
    commit(url, rows)
    st = ls.open_store(url)
    assert sorted(st.units()["unit"].to_pylist()) == [0, 1, 2, 3, 8, 9]
    np.testing.assert_allclose(st.samples("fc2", 9), results[2].samples[1], atol=2e-2)
    np.testing.assert_array_equal(st.trace("fc2", 9), results[2].activation[1])
    assert verify_store(st) == (2, [])
    assert st.units(sort="act_final_mean", limit=1)["act_final_mean"][0].as_py() == pytest.approx(
        max(r.final_activation.mean(1).max() for r in results.values()), rel=1e-6)
    with pytest.raises(StoreError, match="different spec"):
        create_store(url, plan_store(digits_model, {"fc2": None}, chains=2, steps=10,
                                     snapshot_steps=default_snapshot_steps(10, 5), block_size=4, spec={"s3": "other"}))
    # the CLI reaches the same store through the standard AWS_ENDPOINT_URL variable
    out = subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "verify", url], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "ok: every file and 2 committed blocks verified" in out.stdout


def test_a_request_that_is_never_answered_ends_at_its_deadline_as_a_transport_fault(monkeypatch):
    """An endpoint that accepts connections and never answers -- what a connection left half open by an
    outage looks like to the client -- with socket timeouts of an hour: each of the store's own calls
    (the generation check a worker makes after writing a block, the lease) and zarr's reads still end,
    at LDAM_SWEEP_REQUEST_TIMEOUT, with a transport fault, and ``retrying`` turns them into exit 4's
    error instead of waiting for ever."""
    import threading

    import s3fs

    from ldam_sweep.errors import StorageUnreachableError
    from ldam_sweep.store.layout import read_generation
    from ldam_sweep.store.lease import read_lease
    from ldam_sweep.store.location import StoreLocation
    from ldam_sweep.store.transport import is_transport_fault, retrying

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(silent.accept()[0])  # kept open, never read from or answered
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://127.0.0.1:{silent.getsockname()[1]}",
                 "LDAM_SWEEP_REQUEST_TIMEOUT": "1"}.items():
        monkeypatch.setenv(k, v)
    hour = {"config_kwargs": {"read_timeout": 3600, "connect_timeout": 3600}}
    s3fs.S3FileSystem.clear_instance_cache()
    loc = StoreLocation.parse("s3://sweeps/never.zarr", hour)
    outcomes: dict[str, BaseException | None] = {}

    def attempt(name: str, fn) -> None:
        try:
            fn()
            outcomes[name] = None
        except BaseException as err:  # noqa: BLE001 - the outcome is the test's subject
            outcomes[name] = err

    calls = {"generation": lambda: read_generation(loc), "lease": lambda: read_lease(loc),
             "zarr": lambda: loc.open_group(mode="r"),
             "retried": lambda: retrying("reading the store", read_generation, loc, patience=2)}
    try:
        threads = [threading.Thread(target=attempt, args=item, daemon=True) for item in calls.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)  # a bound on a broken run only: without the deadline each waits an hour
        assert set(outcomes) == set(calls), f"still waiting: {set(calls) - set(outcomes)}"
        for name in ("generation", "lease", "zarr"):
            assert outcomes[name] is not None and is_transport_fault(outcomes[name]), (name, repr(outcomes[name]))
        assert isinstance(outcomes["retried"], StorageUnreachableError), repr(outcomes["retried"])
        assert "did not answer for" in str(outcomes["retried"])
        assert held, "the requests reached the endpoint"
    finally:
        silent.close()
        for c in held:
            c.close()
        s3fs.S3FileSystem.clear_instance_cache()
