"""Unit labels and activation distributions: computed in the exemplar pass, stored in the manifest,
the same for a folder of class subfolders as for the digits source they were made from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ldam_sweep as ls
from ldam_sweep.cluster.worker import SweepWorker
from ldam_sweep.data import digits, folder_labels, npy_labels, real_data
from ldam_sweep.errors import DataError
from ldam_sweep.planning import sweep_store_plan
from ldam_sweep.sampling.exemplars import HIST_BINS, distribution_columns, exemplar_pass, label_columns
from ldam_sweep.spec import DataSpec, parse_job
from ldam_sweep.store import create_store

DIGITS = [str(d) for d in range(10)]


@pytest.mark.fast
def test_label_is_the_most_common_class_of_the_top_exemplars_ties_to_the_better_ranked():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])  # base rates 0.3, 0.2, 0.5
    order = np.array([[3, 0, 4, 1, -1],  # classes 1, 0, 1, 0: a tie, class 1 ranks first
                      [5, 6, 0, 7, 8],  # 2, 2, 0, 2, 2
                      [-1, -1, -1, -1, -1]])  # no exemplar
    out = label_columns(order, labels, ["zero", "one", "two"])
    assert out[0] == {"label": "one", "label_purity": 0.5, "label_base_rate": 0.2}
    assert out[1] == {"label": "two", "label_purity": 0.8, "label_base_rate": 0.5}
    assert out[2] == {}


@pytest.mark.fast
def test_distribution_columns_match_numpy():
    rng = np.random.default_rng(0)
    scores = np.stack([rng.normal(size=500), np.maximum(rng.normal(size=500), 0), np.full(500, 2.0)], 1)
    cols = distribution_columns(scores)
    for u, c in enumerate(cols):
        assert sum(c["data_hist"]) == 500 and len(c["data_hist"]) == HIST_BINS
        assert c["data_active_fraction"] == pytest.approx(float((scores[:, u] > 0).mean()))
        assert c["data_p90"] == pytest.approx(float(np.quantile(scores[:, u], 0.9)))
        assert c["data_hist_lo"] == pytest.approx(scores[:, u].min())
    assert cols[1]["data_hist"][0] >= 240  # a ReLU's zeros fill its first bin
    assert cols[2]["data_hist"][0] == 500  # a constant unit: one bin


@pytest.mark.fast
def test_label_sources_and_their_errors(tmp_path, digits_model):
    from PIL import Image

    img = Image.fromarray(np.zeros((8, 8), np.uint8))
    (tmp_path / "flat").mkdir()
    for i in range(4):
        img.save(tmp_path / "flat" / f"{i}.png")
    assert folder_labels(tmp_path / "flat") == (None, None)  # images not in class subfolders: no labels
    (tmp_path / "mixed" / "cat").mkdir(parents=True)
    img.save(tmp_path / "mixed" / "cat" / "a.png")
    img.save(tmp_path / "mixed" / "b.png")
    assert folder_labels(tmp_path / "mixed") == (None, None)
    (tmp_path / "one" / "train").mkdir(parents=True)
    img.save(tmp_path / "one" / "train" / "a.png")
    assert folder_labels(tmp_path / "one") == (None, None)  # one subfolder is a place, not a class
    np.save(tmp_path / "y.npy", np.array([10, 2, 2, 10]))
    labels, names = npy_labels(tmp_path / "y.npy", 4)
    assert names == ["2", "10"] and labels.tolist() == [1, 0, 0, 1]  # integers in numeric order
    np.save(tmp_path / "short.npy", np.array([1, 2]))
    with pytest.raises(DataError, match=r"data.labels: .* must be a 1-D array of 4 integers or strings .* shape \(2,\)"):
        npy_labels(tmp_path / "short.npy", 4)
    np.save(tmp_path / "x.npy", digits(28, "all")[0][:8])
    np.save(tmp_path / "y8.npy", np.array(["odd", "even"] * 4))
    images, labels, names = real_data(DataSpec(source="npy", path=tmp_path / "x.npy", labels=tmp_path / "y8.npy"),
                                      digits_model.input, "train")
    assert len(images) == 6 and names == ["even", "odd"] and labels.tolist() == [1, 0, 1, 1, 0, 1]  # every 4th held out
    with pytest.raises(ValueError, match="labels is for the npy source"):
        DataSpec(source="digits", labels=tmp_path / "y.npy")


@pytest.mark.fast
def test_model_class_names_from_a_labels_file_relative_to_the_spec(tmp_path, model_cache):
    import yaml

    from ldam_sweep.errors import ModelError
    from ldam_sweep.spec import load_spec

    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "classes.txt").write_text("".join(f"digit {d}\n" for d in range(10)))
    (tmp_path / "specs" / "three.txt").write_text("a\nb\nc\n")
    (tmp_path / "specs" / "x.npy").write_bytes(b"")
    doc = {"name": "n", "model": {"zoo": "digits-cnn", "labels": "classes.txt"}, "layers": ["fc2"],
           "data": {"source": "npy", "path": "x.npy", "labels": "y.npy"}}
    (tmp_path / "specs" / "job.yaml").write_text(yaml.safe_dump(doc))
    job = load_spec(tmp_path / "specs" / "job.yaml")  # relative paths are relative to the spec file
    assert job.model.labels == tmp_path / "specs" / "classes.txt" and job.data.labels == tmp_path / "specs" / "y.npy"
    assert ls.load_model(job.model, device="cpu").class_names == [f"digit {d}" for d in range(10)]
    with pytest.raises(ModelError, match=r"model.labels: .*three.txt' names 3 classes, but the model has 10 outputs"):
        ls.load_model({"zoo": "digits-cnn", "labels": str(tmp_path / "specs" / "three.txt")}, device="cpu")


def _folder_of_digits(root, size=28):
    """The train digits as 8-bit PNGs in class subfolders, named so that the folder source's train
    split (every image but each 4th, in sorted path order) is exactly the digits source's: a
    held-out image of the same class fills each 4th place."""
    from PIL import Image

    train, train_y = digits(size, "train")
    test, test_y = digits(size, "test")
    position = 0
    for c in range(10):
        folder = root / str(c)
        folder.mkdir(parents=True)
        own, fill = train[train_y == c], test[test_y == c]
        placed = filled = 0
        while placed < len(own):
            if position % 4 == 3:
                image, filled = fill[filled % len(fill)], filled + 1
            else:
                image, placed = own[placed], placed + 1
            Image.fromarray(np.round(image[0] * 255).astype(np.uint8)).save(folder / f"{position:05d}.png")
            position += 1
    return root


def _labelled_rows(tmp_path, name, data, model):
    """A real worker (no Ray) sweeping fc2 and conv2 with these data: its manifest rows by (layer, unit)."""
    doc = {"name": name, "model": {"zoo": "digits-cnn"}, "layers": ["fc2", "conv2"],
           "sampler": {"steps": 2, "chains": 2, "seed": 0}, "data": data, "exemplars": 8,
           "resources": {"block_size": 32}}
    job = parse_job(doc)
    url = str(tmp_path / f"{name}.zarr")
    create_store(url, sweep_store_plan(job, model, job.model_dump(mode="json", exclude_none=True)))
    worker = SweepWorker(job.model_dump(mode="json", exclude_none=True), url, num_threads=1)
    rows = worker.run_batch("fc2", [(0, list(range(10)))], [1])[0] + worker.run_batch("conv2", [(0, list(range(32)))], [1])[0]
    return {(r["layer"], r["unit"]): r for r in rows}


@pytest.mark.fast
def test_a_folder_of_class_subfolders_gives_the_digits_labels(tmp_path, digits_model):
    folder = _folder_of_digits(tmp_path / "digits-png")
    images, labels, names = real_data(DataSpec(source="folder", path=folder), digits_model.input, "train")
    ref_images, ref_labels, ref_names = real_data(DataSpec(source="digits"), digits_model.input, "train")
    assert names == ref_names == DIGITS and len(images) == len(ref_images)
    # the same images and labels (8-bit PNG rounding aside), by class
    assert np.bincount(labels).tolist() == np.bincount(ref_labels).tolist()
    for c in range(10):
        np.testing.assert_allclose(np.sort(images[labels == c].reshape(-1)), np.sort(ref_images[ref_labels == c].reshape(-1)),
                                   atol=1 / 255)
    a = _labelled_rows(tmp_path, "digits", {"source": "digits"}, digits_model)
    b = _labelled_rows(tmp_path, "folder", {"source": "folder", "path": str(folder)}, digits_model)
    assert [a[("fc2", u)]["label"] for u in range(10)] == DIGITS  # each logit's label is its own class
    assert [a[k]["label"] for k in sorted(a)] == [b[k]["label"] for k in sorted(b)]  # fc2 and every conv2 channel
    for k in a:
        assert b[k]["label_purity"] == pytest.approx(a[k]["label_purity"], abs=0.125)  # one exemplar of 8 at most
        assert b[k]["label_base_rate"] == pytest.approx(a[k]["label_base_rate"])
        assert b[k]["data_active_fraction"] == pytest.approx(a[k]["data_active_fraction"], abs=0.01)
    # the network's reading of the samples: each logit's chains end up read as its class
    assert [a[("fc2", u)]["sample_label"] for u in range(10)] == DIGITS
    assert all(a[("fc2", u)]["label_match"] == 1.0 for u in range(10))


@pytest.mark.fast
def test_photos_have_no_labels_but_the_network_still_reads_the_samples(tmp_path, digits_model):
    rows = _labelled_rows(tmp_path, "photos", {"source": "photos", "count": 64}, digits_model)
    assert all(r.get("label") is None and r.get("label_purity") is None for r in rows.values())
    assert all(r["sample_label"] in DIGITS and r.get("label_match") is None for r in rows.values())
    assert all(sum(r["data_hist"]) == 64 for r in rows.values())  # the distribution needs no labels


@pytest.mark.fast
def test_exemplar_pass_against_a_direct_computation(digits_model):
    """Top-5 images, their activations and the distribution columns of 4 conv2 channels, against the
    channel means of the layer's output computed here in one forward pass."""
    pool = torch.from_numpy(digits(28, "train")[0])
    found = exemplar_pass(digits_model, "conv2", np.arange(4), "channel", pool, 5)
    with torch.no_grad():
        direct = digits_model.activations(pool, "conv2")[:, :4].mean((2, 3)).numpy().astype(np.float64)  # (N, 4)
    best = np.argsort(-direct, axis=0, kind="stable")[:5].T  # (4, 5)
    np.testing.assert_allclose(found.activations, np.take_along_axis(direct.T, best, 1), rtol=1e-5)
    np.testing.assert_array_equal(found.images, pool.numpy()[found.order])  # the images are the pool's, in rank order
    assert (np.sort(found.order, 1) == np.sort(best, 1)).mean() > 0.9  # the same images (up to float ties)
    for u, col in enumerate(found.columns):
        assert col["data_active_fraction"] == pytest.approx(float((direct[:, u] > 0).mean()))
        assert col["data_p50"] == pytest.approx(float(np.median(direct[:, u])), rel=1e-4, abs=1e-6)
        assert "label" not in col  # no labels given: none
    assert found.columns != [{}] * 4 and top_exemplars_has_no_columns(digits_model, pool)


def top_exemplars_has_no_columns(model, pool) -> bool:
    """``top_exemplars`` (the discriminator's and the scripts' call) skips the distributions."""
    from ldam_sweep.sampling.exemplars import top_exemplars

    images, acts = top_exemplars(model, "fc2", np.arange(2), "logit", pool, 3)
    return images.shape == (2, 3, 1, 28, 28) and acts.shape == (2, 3)


@pytest.mark.fast
def test_non_finite_activations_and_non_classifiers_do_not_fail_a_batch(digits_model):
    cols = distribution_columns(np.array([[1.0, np.nan], [np.inf, np.nan], [3.0, np.nan]]))
    assert sum(cols[0]["data_hist"]) == 2 and cols[0]["data_hist_hi"] == 3.0 and cols[1] == {}
    from torch import nn

    from ldam_sweep.model.handle import ModelHandle
    from ldam_sweep.sampling.exemplars import sample_label_columns

    class TwoOutputs(nn.Module):  # (logits, features): a classifier whose output is not one tensor
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 5), nn.Linear(4 * 24 * 24, 10)

        def forward(self, x):
            h = self.conv(x).flatten(1)
            return self.fc(h), h

    model = ModelHandle(TwoOutputs(), digits_model.input, name="two")
    final = np.random.default_rng(0).random((2, 3, 1, 28, 28), dtype=np.float32)
    assert sample_label_columns(model, final, None, [None, None]) == [{}, {}]
    reading = sample_label_columns(digits_model, final, DIGITS, ["3", None])
    assert all(r["sample_label"] in DIGITS for r in reading) and reading[1]["label_match"] is None


def test_a_store_made_before_chain_starts_resumes_verifies_and_builds_its_atlas(tmp_path, digits_model, model_cache):
    """A store made before chain starts were stored resumes via `ldam-sweep run`, verifies and builds its atlas.

    A store whose plan has no ``starts`` array (made by the code before it) resumes under today's
    code as it is: same plan hash, no new array, verify clean, and its atlas builds without strips."""
    import os
    import subprocess
    import sys

    import yaml

    import ldam_sweep as ls
    from ldam_sweep.atlas.site import build_atlas

    doc = {"name": "old", "model": {"zoo": "digits-cnn"}, "layers": ["fc2"], "units": {"fc2": "0-7"},
           "sampler": {"steps": 4, "chains": 2, "seed": 0}, "data": {"source": "digits", "limit": 64}, "exemplars": 2,
           "resources": {"actors": 1, "block_size": 4}}
    job = parse_job(doc)
    spec_doc = job.model_dump(mode="json", exclude_none=True)
    old_plan = sweep_store_plan(job, digits_model, spec_doc).legacy_formats()[-1]  # float16, full size, no starts
    assert not old_plan.starts and old_plan.pixels == "float16"
    url = str(tmp_path / "old.zarr")
    create_store(url, old_plan)
    from ldam_sweep.store import commit

    commit(url, SweepWorker(spec_doc, url, num_threads=1).run_batch("fc2", [(0, [0, 1, 2, 3])], [1])[0])
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "LDAM_SWEEP_CACHE": str(model_cache), "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "run", str(tmp_path / "job.yaml"), "--store", url,
                          "--no-realism"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "resume: 1 of 2 blocks already committed" in out.stderr
    st = ls.open_store(url)
    assert st.plan.starts is False and st.attrs["plan_hash"] == old_plan.plan_hash() and "starts" not in st.plan.arrays("fc2")
    assert st.units("fc2").num_rows == 8 and st.units("fc2", label="5")["unit"].to_pylist() == [5]
    verify = subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "verify", url], env=env, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report = build_atlas(st, tmp_path / "site")
    assert report.units_rendered == 8 and not list((tmp_path / "site" / "img").rglob("*-change.png"))
