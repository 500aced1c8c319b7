"""find (which units respond to this image), UnitView in a notebook, and the find benchmark."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import ldam_sweep as ls
from ldam_sweep.cli import app
from ldam_sweep.data import digits
from ldam_sweep.errors import StoreError
from ldam_sweep.store import commit
from ldam_sweep.store.query import READER_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def one_per_class() -> tuple[np.ndarray, np.ndarray]:
    """The first held-out digit of each class 0..9."""
    images, labels = digits(28, "test")
    pick = [int(np.flatnonzero(labels == c)[0]) for c in range(10)]
    return images[pick], labels[pick]


@pytest.mark.fast
def test_a_digit_finds_its_class_logit_and_fc1_units_with_its_class_exemplars(exemplar_store):
    finder = ls.Finder(ls.open_store(exemplar_store))
    images, labels = one_per_class()
    fc2 = finder.find(images, layer="fc2", top=3)
    first = [fc2.for_image(i)[0] for i in range(10)]
    assert all(h["reference_column"] == "exemplar_max" and h["layer"] == "fc2" for h in first)
    assert sum(h["unit"] == c for h, c in zip(first, labels)) >= 9
    assert fc2.load_seconds > 0 and finder.find(images[:1], layer="fc2").load_seconds == 0.0  # the model is kept


def exemplar_classes(st, layer: str) -> dict[int, int]:
    """Each committed unit's majority class among its stored exemplars, found by matching every
    exemplar to the train digit it came from (float16 storage, so nearest within 1e-3)."""
    train, train_labels = digits(28, "train")
    flat = train.reshape(len(train), -1)
    out = {}
    for u in st.units(layer=layer, status="ok").column("unit").to_pylist():
        ex, _ = st.exemplars(layer, u)
        d = ((ex.reshape(len(ex), 1, -1) - flat[None]) ** 2).sum(-1)
        assert d.min(axis=1).max() < 1e-3  # every exemplar is a train digit
        out[u] = int(np.bincount(train_labels[d.argmin(axis=1)], minlength=10).argmax())
    return out


@pytest.mark.fast
def test_fc1_top_unit_exemplars_share_the_query_class_far_above_raw_activation_and_chance(exemplar_store):
    """For each of the 450 held-out digits: does the fc1 unit that find ranks first (by lift, see
    ldam_sweep/find.py) have exemplars of the digit's class? Measured over six trainings of digits-cnn
    (recipe seeds 0-5; one machine's training differs from another's in its rounding, so which model a
    machine trains is not pinned) with the ranking before lift (activation ÷ reference): 52-68%, raw
    activation 23-54%, a random live unit 10%. On this machine's fixture: lift 60%, the ratio 62%, raw
    38%; within one layer lift and ratio agree closely (they part across layers, see the next tests)."""
    st = ls.open_store(exemplar_store)
    classes = exemplar_classes(st, "fc1")
    images, labels = digits(28, "test")
    res = ls.find_units(st, images, layer="fc1", top=len(classes))
    by_lift = by_raw = 0
    for i, c in enumerate(labels):
        hits = res.for_image(i)
        by_lift += classes[hits[0]["unit"]] == c
        by_raw += classes[max(hits, key=lambda h: h["activation"])["unit"]] == c
    live = [h["unit"] for h in res.for_image(0)]  # units with a positive reference (dead ones are not ranked)
    assert 60 <= len(live) < len(classes)
    chance = np.mean([np.mean([classes[u] == c for u in live]) for c in labels])
    n = len(labels)
    assert by_lift / n >= 0.45 and by_lift / n >= 4 * chance, (by_lift, n, chance)
    assert by_lift >= by_raw + 0.02 * n, (by_lift, by_raw, n)  # lift ~ the ratio - 2 points; the ratio beat raw by >= 29


@pytest.mark.fast
def test_lift_is_the_rise_above_the_units_typical_response_over_its_best_real_images(exemplar_store, digits_model):
    st = ls.open_store(exemplar_store)
    images, _ = one_per_class()
    res = ls.Finder(st).find(images[3], top=5)  # (C, H, W) works; every swept layer
    with torch.no_grad():
        logits = digits_model.forward(torch.from_numpy(images[3:4])).numpy()[0]
    rows = {(r["layer"], r["unit"]): r for r in st.units(status="ok").to_pylist()}
    for h in res.for_image(0):
        row = rows[(h["layer"], h["unit"])]
        assert h["reference"] == pytest.approx(row["exemplar_max"]) and h["typical"] == pytest.approx(row["data_p50"])
        assert h["typical"] < h["reference"]
        assert h["lift"] == pytest.approx((h["activation"] - h["typical"]) / (h["reference"] - h["typical"]))
        assert h["ratio"] == pytest.approx(h["activation"] / h["reference"])
        if h["layer"] == "fc2":
            assert h["activation"] == pytest.approx(float(logits[h["unit"]]), rel=1e-5)
    lifts = [h["lift"] for h in res.for_image(0)]
    assert lifts == sorted(lifts, reverse=True) and len(lifts) == 5
    assert "layer 'relu1': no committed units" in res.notes


@pytest.mark.fast
def test_across_layers_lift_finds_the_class_logit_where_the_ratio_finds_early_units(exemplar_store):
    """Ranking every swept layer at once (conv2, fc1, fc2 here) for 50 held-out digits (5 per class):
    where does the digit's own class logit (fc2 unit = class) rank? By activation ÷ reference (the
    ranking before lift) it sinks under units whose ordinary response is already near their maximum.
    Measured on this fixture: by lift top 10 for 84% of the digits, median rank 2; by ratio 46%,
    median rank 11. On the quick demo's store, where conv1/pool1 are swept too, the gap is wider
    (lift: 60%, median 4; ratio: none in the top 10, median 154 of 365 units)."""
    images, labels = digits(28, "test")
    pick = np.concatenate([np.flatnonzero(labels == c)[:5] for c in range(10)])
    res = ls.find_units(ls.open_store(exemplar_store), images[pick], top=1000)
    by_lift, by_ratio = [], []
    for i, c in enumerate(labels[pick]):
        hits = res.for_image(i)
        by_lift.append(next(h["rank"] for h in hits if h["layer"] == "fc2" and h["unit"] == c))
        by_ratio.append(1 + sorted(hits, key=lambda h: -h["ratio"]).index(
            next(h for h in hits if h["layer"] == "fc2" and h["unit"] == c)))
    top10_lift, top10_ratio = np.mean(np.array(by_lift) <= 10), np.mean(np.array(by_ratio) <= 10)
    assert top10_lift >= 0.6 and top10_lift >= top10_ratio + 0.15, (by_lift, by_ratio)
    assert np.median(by_lift) <= np.median(by_ratio) / 2, (by_lift, by_ratio)


@pytest.mark.fast
def test_activations_at_equals_one_layer_at_a_time(digits_model):
    x = torch.from_numpy(digits(28, "test")[0][:16])
    names = ["relu1", "conv2", "pool2", "fc1", "fc2"]
    with torch.no_grad():
        many = digits_model.activations_at(x, names)
        for name in names:
            torch.testing.assert_close(many[name], digits_model.activations(x, name), rtol=0, atol=0)


@pytest.mark.fast
def test_non_positive_references_are_skipped_and_final_mean_is_the_fallback(exemplar_store, tmp_path):
    url = str(tmp_path / "edited.zarr")
    shutil.copytree(exemplar_store, url)
    st = ls.open_store(url)
    rows = st.units("fc2").to_pylist()
    for r in rows:
        r.pop("committed_at")
        for name in READER_COLUMNS:  # added by the reader (realism and verify records), not manifest columns
            r.pop(name)
        if r["unit"] in (8, 9):
            r["exemplar_max"] = -1.0
        if r["unit"] == 7:
            r["exemplar_max"] = None  # no exemplar: the chains' final mean is the reference
    commit(url, rows)
    res = ls.Finder(ls.open_store(url)).find(one_per_class()[0], layer="fc2", top=10)
    assert "layer 'fc2': 2 of 10 units skipped (reference activation not positive, or not above the unit's " \
           "typical response)" in res.notes
    hits = res.for_image(7)
    assert sorted(h["unit"] for h in hits) == list(range(8))
    seven = [h for h in hits if h["unit"] == 7][0]
    assert seven["reference_column"] == "act_final_mean"
    assert seven["reference"] == pytest.approx([r["act_final_mean"] for r in rows if r["unit"] == 7][0])


@pytest.mark.fast
def test_cli_find_reads_png_files_and_folders_and_links_the_atlas(exemplar_store, tmp_path):
    from ldam_sweep.atlas.site import build_atlas

    images, labels = one_per_class()
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in (2, 5):
        Image.fromarray(np.round(images[i, 0] * 255).astype(np.uint8)).save(folder / f"digit{i}.png")
    atlas = tmp_path / "atlas"
    build_atlas(exemplar_store, atlas)
    res = CliRunner().invoke(app, ["find", exemplar_store, str(folder), str(folder / "digit5.png"), "--layer", "fc2",
                                   "--top", "2", "--atlas", str(atlas), "--json"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["command"] == "find" and doc["top"] == 2 and doc["layer"] == "fc2"
    assert [r["image"] for r in doc["results"]] == [str(folder / "digit2.png"), str(folder / "digit5.png"),
                                                     str(folder / "digit5.png")]
    assert [r["hits"][0]["unit"] for r in doc["results"]] == [2, 5, 5]
    page = Path(doc["results"][0]["hits"][0]["atlas_page"])
    assert page.is_file() and page.parent.parent == atlas / "units" and page.name == "2.html"
    assert doc["seconds"]["load"] > 0 and doc["seconds"]["compute"] > 0
    # the same image as an array gives the same numbers (PNG rounding aside)
    api = ls.find_units(ls.open_store(exemplar_store), images[5], layer="fc2", top=2).for_image(0)
    assert [h["unit"] for h in api] == [h["unit"] for h in doc["results"][1]["hits"]]
    assert api[0]["lift"] == pytest.approx(doc["results"][1]["hits"][0]["lift"], rel=0.02)
    table = CliRunner().invoke(app, ["find", exemplar_store, str(folder / "digit2.png"), "--layer", "fc2"],
                               env={"COLUMNS": "200"})  # a wide terminal: no column header is cut
    assert table.exit_code == 0 and "typical" in table.stdout and "fc2" in table.stdout
    bad = CliRunner().invoke(app, ["find", exemplar_store, str(tmp_path / "missing.png"), "--json"])
    assert bad.exit_code == 2 and bad.stdout == "" and "does not exist" in bad.stderr


@pytest.mark.fast
def test_unit_view_shows_itself_as_a_png(exemplar_store):
    st = ls.open_store(exemplar_store)
    view = st.unit("fc2", 4)
    assert view.samples.shape == (2, 2, 1, 28, 28) and view.activation.shape == (2, 21)
    assert view.exemplars.shape == (8, 1, 28, 28) and view.scores["exemplar_max"] == view.exemplar_activation[0]
    png = view._repr_png_()
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG"
    # render_grid: 3x upscaled 28 px tiles, 2 px padding, 12 px cell labels, 14 px column headers
    assert img.size[1] == 14 + 2 * (84 + 2 + 12) + 2
    assert img.size[0] > 2 * (84 + 2) + 2 and np.asarray(img.convert("L")).std() > 10
    assert "UnitView('fc2', unit 4" in repr(view)
    with pytest.raises(StoreError, match="not committed yet"):
        st.unit("relu1", 0)


@pytest.mark.fast
def test_unit_view_to_xarray(exemplar_store, monkeypatch):
    view = ls.open_store(exemplar_store).unit("fc1", 0)
    try:
        import xarray  # noqa: F401
    except ImportError:
        with pytest.raises(StoreError, match=r"pip install 'ldam-sweep\[xarray\]'"):
            view.to_xarray()
        pytest.skip("xarray is not installed (optional extra): checked the error")
    ds = view.to_xarray()
    assert ds["samples"].dims == ("chain", "snapshot", "c", "y", "x")
    assert ds["activation"].sel(step=20).values.tolist() == view.activation[:, 20].tolist()
    assert ds["snapshot"].values.tolist() == [10, 20] and ds.attrs["layer"] == "fc1"
    monkeypatch.setitem(sys.modules, "xarray", None)
    with pytest.raises(StoreError, match=r"ldam-sweep\[xarray\]"):
        view.to_xarray()


@pytest.mark.fast
def test_units_to_pandas(exemplar_store):
    pd = pytest.importorskip("pandas")
    frame = ls.open_store(exemplar_store).units("fc2").to_pandas()
    assert isinstance(frame, pd.DataFrame) and len(frame) == 10 and frame["unit"].tolist() == list(range(10))


def test_find_benchmark_quick_mode(tmp_path):
    """benchmarks/find.py --quick times find on 1 and 100 images over all 410 digits-cnn units."""
    out = tmp_path / "find.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "find.py"), "--quick", "--out", str(out),
                          "--dir", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rec = json.loads(out.read_text())
    assert rec["benchmark"] == "find" and rec["units"] == 410 and rec["layers"] == 9 and rec["hits_per_image"] == 10
    for key in ("model_load_seconds", "find_1_image_seconds", "find_100_images_seconds", "per_image_ms_at_100"):
        assert np.isfinite(rec[key]) and rec[key] > 0, key
    assert "find_1_image_seconds" in run.stdout
