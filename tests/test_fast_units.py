"""Small checks of modules no other fast test reaches: stage 1's discriminator (ldam_sweep.stage),
the realism record (ldam_sweep.realism, made cheap with few images) and the driver's commit path
(ldam_sweep.cluster.commit). In-process, no Ray."""

from __future__ import annotations

import errno
import shutil

import pytest
import torch

import ldam_sweep as ls

pytestmark = pytest.mark.fast  # the whole file is in the quick tier (make test-fast)

TINY_D = {"updates": 2, "steps_per_update": 2, "chains": 4, "batch": 8, "eval_chains": 4, "eval_steps": 2}


def test_stage_1_gives_no_d_a_trained_d_or_the_files_and_its_record(digits_model, tmp_path):
    from ldam_sweep.spec import parse_job
    from ldam_sweep.stage import discriminator_record, job_discriminator

    base = {"model": {"zoo": "digits-cnn"}, "layers": ["fc2"], "data": {"source": "digits", "limit": 64}}
    assert job_discriminator(parse_job(base), digits_model) is None
    progress = []
    trained = job_discriminator(parse_job({**base, "discriminator": {"train": TINY_D}}), digits_model,
                                progress=lambda i, stats: progress.append(i))
    assert trained is not None and len(trained.log["loss"]) == 2 and progress
    record = discriminator_record(trained)
    assert record["settings"]["updates"] == 2 and record["model_fingerprint"] == digits_model.fingerprint
    assert record["digest"] == trained.digest() and 0.0 <= record["heldout_accuracy"] <= 1.0
    path = trained.save(tmp_path / "d.pt")
    loaded = job_discriminator(parse_job({**base, "discriminator": {"file": str(path)}}), digits_model)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), trained.module(x))


def test_realism_record_with_few_images(exemplar_store, tmp_path, monkeypatch):
    """update_realism end to end on a copy of the exemplar store, with 24 images per side (the slow
    test_realism.py measures with the real sizes)."""
    import ldam_sweep.realism as realism
    import ldam_sweep.sampling.realism as sampling_realism

    monkeypatch.setattr(sampling_realism, "MAX_IMAGES", 24)
    monkeypatch.setattr(realism, "POOLED_MAX_IMAGES", 24)
    url = str(tmp_path / "copy.zarr")
    shutil.copytree(exemplar_store, url)
    st = ls.open_store(url)
    assert st.realism() is None
    doc = realism.update_realism(st, seed=0)
    assert set(doc["layers"]) == {"conv2", "fc1", "fc2"}  # relu1 has no committed unit
    for name, entry in doc["layers"].items():
        assert 0.0 <= entry["c2st"] <= 1.0 and entry["hf_ratio"] > 0 and doc["current"][name], name
        assert all(0.0 <= v <= 1.0 for v in entry["detected"].values())
        assert realism.layer_line(name, entry).startswith(f"{name}: two-sample ")
    assert doc["pooled"]["samples"] == sum(e["samples"] for e in doc["layers"].values())
    fc2 = st.refresh().units("fc2")["detected_fraction"].to_pylist()
    assert any(v is not None for v in fc2) and realism.fmt(None) == "n/a"


def test_commit_buffer_commits_every_n_blocks_and_storage_errors_stop_the_sweep(digits_model, tmp_path):
    from ldam_sweep.cluster.commit import CommitBuffer, storage_stop
    from ldam_sweep.errors import StorageStopError
    from ldam_sweep.planning import plan_store
    from ldam_sweep.settings import default_snapshot_steps
    from ldam_sweep.store import BlockWriter, create_store, failed_rows

    url = str(tmp_path / "s.zarr")
    plan = plan_store(digits_model, {"fc2": None}, chains=2, steps=4, snapshot_steps=default_snapshot_steps(4, None),
                      block_size=4, spec={"model": {"zoo": "digits-cnn"}})
    create_store(url, plan)
    lp, generation = plan.layer("fc2"), BlockWriter(url).generation
    seen = []
    buffer = CommitBuffer(url, commit_every=2, on_commit=lambda rows, blocks: seen.append((len(rows), blocks)))
    for block in range(3):
        rows = failed_rows(lp, block, "RuntimeError: injected", attempt=1, spec_hash=plan.spec_hash())
        buffer.add([{**r, "generation": generation} for r in rows])
        if buffer.due():
            buffer.flush()
    assert seen == [(8, 2)] and ls.open_store(url).units(status="failed").num_rows == 8
    buffer.flush()  # the end of the sweep: the rest
    assert seen == [(8, 2), (2, 1)] and ls.open_store(url).units(status="failed").num_rows == 10
    buffer.flush()  # nothing left: no empty commit
    assert len(seen) == 2

    full = storage_stop(OSError(errno.ENOSPC, "No space left on device", "/x/part"), "committing")
    assert isinstance(full, StorageStopError) and "No space left on device (/x/part) while committing" in str(full)
    assert storage_stop(OSError(errno.EIO, "I/O error"), "committing") is None  # a retry may fix it
    assert storage_stop(ValueError("x"), "committing") is None
