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
