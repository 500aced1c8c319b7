"""The atlas, driven in a real headless Chromium (Debian's package) through Playwright."""

from __future__ import annotations

import functools
import re
import shutil
import sys

import numpy as np
import pytest

import ldam_sweep as ls
from ldam_sweep.atlas.format import unit_page
from ldam_sweep.atlas.site import build_atlas, slug
from ldam_sweep.data import digits
from ldam_sweep.sampling.chains import default_snapshot_steps
from ldam_sweep.sampling.exemplars import exemplar_pass, top_exemplars, unit_label_columns
from ldam_sweep.sampling.observer import Observer, observer_columns, query_subset
from ldam_sweep.sampling.scoring import score_result
from ldam_sweep.store import BlockWriter, commit, create_store
from ldam_sweep.planning import plan_store

from conftest import DEAD_CHANNEL

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="make test installs Debian's chromium; run it through make")

EVIL = "<script>alert('pwned')</script>"
DIGITS = [str(d) for d in range(10)]
EVIL_CLASSES = [f"<img src=x onerror=alert({d})>" for d in range(10)]  # class names (folder names) with markup
FACTORY = f'''
from collections import OrderedDict
from torch import nn
def build():
    return nn.Sequential(OrderedDict([({EVIL!r}, nn.Conv2d(1, 4, 5, stride=2)), ("relu", nn.ReLU()),
                                      ("flat", nn.Flatten()), ("out", nn.Linear(4 * 12 * 12, 10))]))
'''


@functools.cache
def _observer() -> Observer:
    """The observer a digits sweep has: held-out digits as queries."""
    import torch

    return Observer(torch.from_numpy(query_subset(digits(28, "test")[0])))


def _sweep_block(url, model, layer, block, pool, labels=None, names=DIGITS):
    """Sample, score and commit one block the way a worker does; ``labels``: the pool's digit classes
    (the store then gets labels, activation histograms and chain starts, as today's sweeps do)."""
    w = BlockWriter(url)
    lp = w.plan.layer(layer)
    res = ls.sample(model, layer, lp.block_units(block), chains=3, steps=30, snapshot_every=10)
    if labels is None:  # a store as written before labels existed
        ex = top_exemplars(model, layer, res.units, lp.objective, pool, 4)
        extra = {}
    else:
        found = exemplar_pass(model, layer, res.units, lp.objective, pool, 4, labels=labels, class_names=names)
        ex = (found.images, found.activations)
        extra = unit_label_columns(model, res, found)
    scores = score_result(model, res, real_pool=pool[:200], exemplar_max=ex[1][:, 0], exemplars=ex[0])
    if labels is not None:  # informativeness, as today's sweeps score it (held-out digits as queries)
        for u, row in observer_columns(model, layer, lp.objective, res, ex[0], _observer(), real_starts=False).items():
            scores.setdefault(u, {}).update(row)
    columns = {u: {**scores.get(u, {}), **extra.get(u, {})} for u in map(int, res.units)}
    commit(url, w.write(layer, block, res, exemplars=ex, unit_columns=columns))


@pytest.fixture(scope="module")
def atlas_site(tmp_path_factory, digits_model, dead_channel_model):
    import torch

    tmp = tmp_path_factory.mktemp("atlas")
    (tmp / "evil_model_for_test.py").write_text(FACTORY)
    sys.path.insert(0, str(tmp))
    try:
        evil = ls.load_model({"factory": "evil_model_for_test:build", "input": {"channels": 1, "height": 28, "width": 28}}, device="cpu")
    finally:
        sys.path.remove(str(tmp))
    dead = ls.load_model(dead_channel_model[0], device="cpu")
    images, labels = digits(28, "train")
    pool = torch.from_numpy(images)
    stores = {}
    # the digits and evil stores are written as today's sweeps write (labels, histograms, chain
    # starts; the evil store's class names are markup); the dead one as older code wrote it
    for key, model, layers in (("digits", digits_model, {"fc2": None, "conv2": list(range(8))}), ("evil", evil, {EVIL: None}),
                               ("dead", dead, {"relu": None})):
        url = str(tmp / f"{key}.zarr")
        plan = plan_store(model, layers, chains=3, steps=30, snapshot_steps=default_snapshot_steps(30, 10), block_size=4,
                          exemplars_k=4, spec={"name": key, "note": EVIL}, starts=key != "dead")
        create_store(url, plan)
        for lp in plan.layers:
            for b in lp.planned_blocks():
                if (key, lp.name, b) != ("digits", "fc2", 2):  # leave one block pending
                    _sweep_block(url, model, lp.name, b, pool, None if key == "dead" else labels,
                                 EVIL_CLASSES if key == "evil" else DIGITS)
        stores[key] = url
    report = build_atlas(stores["digits"], tmp / "site")
    evil_report = build_atlas(stores["evil"], tmp / "evil-site")
    build_atlas(stores["dead"], tmp / "dead-site")
    return {"tmp": tmp, "stores": stores, "report": report, "evil": evil_report, "model": digits_model, "pool": pool,
            "labels": labels}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def hit_rows(page) -> list[list[str]]:
    """The search's result rows as cells (layer, unit, label, from, purity, flags), after the picture."""
    return [r.split("\t")[1:] for r in page.locator("tr.hit").all_inner_texts()]


def _images_loaded(page) -> list[int]:
    return page.eval_on_selector_all("img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")


def test_browse_index_layer_unit(atlas_site, browser):
    """A real browser walks index, layer page (sort, filter) and unit page: the store's numbers, every image, no network."""
    site = atlas_site["tmp"] / "site"
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto((site / "index.html").as_uri())
    rows = page.locator("table tr").all_inner_texts()
    fc2 = [r for r in rows if r.startswith("fc2")][0].split("\t")
    assert fc2[4:9] == ["10", "8", "0", "0", "2"]  # units, done, failed, corrupt, pending
    conv2 = [r for r in rows if r.startswith("conv2")][0].split("\t")
    assert conv2[5] == "8"
    assert "zoo:digits-cnn" in page.inner_text("h1")
    # the index shows pictures: each layer's units with the highest activation ratio, loaded
    st = ls.open_store(atlas_site["stores"]["digits"])
    top = st.units("fc2", sort="activation_ratio", limit=4)["unit"].to_pylist()
    thumbs = page.locator("tr:has(a:text-is('fc2')) img.thumb")
    assert [t.get_attribute("title") for t in thumbs.all()] == [f"unit {u}" for u in top]
    assert page.locator("img.thumb").count() == 8 and all(w > 0 for w in _images_loaded(page))
    info = st.informativeness()["fc2"]  # samples / starts / exemplars: the last column
    assert info["starts"] is None  # ls.sample without exemplars starts from noise: its starts are not scored
    assert fc2[-1] == f"{info['samples']:.2f} / – / {info['exemplars']:.2f}"
    page.click("text=fc2")
    page.wait_for_selector(".cell img")
    assert page.inner_text("#count") == "10 of 10 units"
    assert f"mean of {info['units']} units: samples {info['samples']:.2f}, their starts –, top exemplars {info['exemplars']:.2f}" in page.inner_text("body")
    assert page.locator(".cell img").count() == 8  # two units are pending: no picture
    assert all(w > 0 for w in _images_loaded(page))
    # sort by activation ratio: the first cell is the unit with the highest ratio, showing that one score
    best = st.units("fc2", sort="activation_ratio", limit=1)["unit"][0].as_py()
    page.select_option("#sort", "activation_ratio")
    assert page.locator(".cell b").first.inner_text() == f"unit {best}"
    ratio = st.units("fc2", unit=best)["activation_ratio"][0].as_py()
    assert page.locator(".cell .score").first.inner_text() == f"activation ratio {float(f'{ratio:.4g}'):g}"
    page.select_option("#sort", "realism_final_mean")
    assert page.locator(".cell .score").first.inner_text().startswith("realism (log D) ")
    page.select_option("#sort", "activation_ratio")
    page.fill("#min", "1e9")
    assert page.inner_text("#count").startswith("0 of")
    page.fill("#min", "")
    page.locator(".cell a").first.click()
    page.wait_for_selector("h2")
    assert page.inner_text("h1") == f"fc2 · unit {best}"
    text = page.inner_text("body")
    assert "Dataset exemplars" in text and "activation ratio" in text and "ls.open_store(" in text
    ratio = st.units("fc2", unit=best)["activation_ratio"][0].as_py()
    assert f"{ratio:.4g}" in text
    assert page.locator("svg polyline").count() == 3  # one trace per chain
    # the final samples grouped by facet, one row each, beside the exemplars
    facets = st.units("fc2", unit=best)["facets"][0].as_py()
    labels = page.locator(".facet > div").all_inner_texts()
    assert len(labels) == facets >= 1
    sizes = [int(re.fullmatch(rf"facet {i} \((\d+) chains?\)", t).group(1)) for i, t in enumerate(labels, 1)]
    assert sum(sizes) == 3 and sizes == sorted(sizes, reverse=True)
    side = page.locator(".side > div h2").all_inner_texts()
    assert side == ["Final samples by facet", "Dataset exemplars (top real images)"]
    loaded = _images_loaded(page)
    assert len(loaded) == 3 + facets and all(w > 0 for w in loaded)  # chains x snapshots, facets, exemplars, change
    page.screenshot(path=str(atlas_site["tmp"] / "unit.png"), full_page=True)
    assert (atlas_site["tmp"] / "unit.png").stat().st_size > 10_000
    # previous / next walk the layer's units that have a page, in unit order; arrow keys too
    paged = sorted(st.units("fc2", status=("ok", "dead"))["unit"].to_pylist())
    at = paged.index(best)
    for key, link, step in (("ArrowRight", "#next", 1), ("ArrowLeft", "#prev", -1)):
        if 0 <= at + step < len(paged):
            page.keyboard.press(key)
            page.wait_for_url(f"**/{paged[at + step]}.html")
            assert page.inner_text("h1") == f"fc2 · unit {paged[at + step]}"
            page.click("#next" if step < 0 else "#prev")  # and back with the link
            page.wait_for_url(f"**/{best}.html")
        else:
            assert page.get_attribute(link, "href") is None  # no unit before the first / after the last
    assert all(u.startswith("file://") for u in requests)  # nothing fetched from the network


def test_script_in_a_layer_name_is_text_not_code(atlas_site, browser):
    """Markup in a layer name or a label is text on every page and in the search: no script runs in the browser."""
    site = atlas_site["tmp"] / "evil-site"
    page = browser.new_page()
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto((site / "index.html").as_uri())
    assert EVIL in page.inner_text("body")  # the layer name and the spec note, shown as text
    page.click(f"text={EVIL}")
    page.wait_for_selector(".cell img")
    assert EVIL in page.inner_text("h1")
    page.locator(".cell a").first.click()
    page.wait_for_selector("h2")
    assert EVIL in page.inner_text("h1")
    assert dialogs == []
    assert (site / "layers" / f"{slug(EVIL)}.html").is_file() and "<" not in slug(EVIL)
    # labels made of markup are text on the unit page, in the layer page's cells and in the search
    label = ls.open_store(atlas_site["stores"]["evil"]).units(EVIL, unit=0)["label"][0].as_py()
    assert label in EVIL_CLASSES and label in page.inner_text("p.label")
    page.goto((site / "layers" / f"{slug(EVIL)}.html").as_uri())
    page.wait_for_selector(".cell .label")
    assert f"label {label}" in page.locator(".cell .label").all_inner_texts()
    page.goto((site / "index.html").as_uri())
    page.fill("#search", label)
    page.wait_for_selector("tr.hit")
    assert label in [r[2] for r in hit_rows(page)]
    # the only images are the atlas's own thumbnails: no markup from a label became an element
    srcs = page.eval_on_selector_all("img", "els => els.map(e => [e.className, e.getAttribute('src')])")
    assert srcs and all(cls == "thumb" and src.startswith("img/") for cls, src in srcs), srcs
    assert dialogs == []


def test_new_scores_sort_the_layer_page(atlas_site, browser):
    """The layer page's sort menu offers the diversity scores and sorts by them in the browser as the API does."""
    page = browser.new_page()
    page.goto((atlas_site["tmp"] / "site" / "layers" / f"{slug('fc2')}.html").as_uri())
    options = page.eval_on_selector_all("#sort option", "els => els.map(e => e.value)")
    for col in ("lowpass_diversity", "lowpass_diversity_ratio", "feature_diversity_ratio", "facets", "observer_samples"):
        assert col in options
    st = ls.open_store(atlas_site["stores"]["digits"])
    best = st.units("fc2", sort="lowpass_diversity_ratio", limit=1)["unit"][0].as_py()
    page.select_option("#sort", "lowpass_diversity_ratio")
    assert page.locator(".cell b").first.inner_text() == f"unit {best}"


def test_a_dead_unit_has_a_badge_and_its_page_gives_the_reason(atlas_site, browser):
    """In the browser a dead unit has a badge and a filter on its layer page, and its unit page gives the reason."""
    site = atlas_site["tmp"] / "dead-site"
    page = browser.new_page()
    page.goto((site / "index.html").as_uri())
    relu = [r for r in page.locator("table tr").all_inner_texts() if r.startswith("relu")][0].split("\t")
    assert relu[5:10] == ["4", "0", "0", "0", "1"]  # done, failed, corrupt, pending, dead
    page.click("text=relu")
    page.wait_for_selector(".cell")
    assert page.locator(".cell img").count() == 3  # the live units have a picture
    dead = page.locator(".cell.dead")
    assert dead.count() == 1 and dead.locator("b").inner_text() == f"unit {DEAD_CHANNEL}"
    assert dead.locator(".badge").inner_text() == "dead"
    page.select_option("#filter", "dead")
    assert page.inner_text("#count") == "1 of 4 units"
    dead.locator("a").click()
    page.wait_for_selector("h2")
    text = page.inner_text("body")
    assert "activation and input gradient are 0 for all 3 starting images" in text and "Dataset exemplars" in text
    assert "Final samples by facet" not in text and page.locator("svg").count() == 0


def test_rebuild_renders_only_what_changed(atlas_site):
    """A second atlas build renders nothing, and one after a new block renders only that block's units."""
    url = atlas_site["stores"]["digits"]
    site = atlas_site["tmp"] / "site"
    first = atlas_site["report"]
    assert first.units_rendered == 16 and first.units_skipped == 0
    again = build_atlas(url, site)
    assert again.units_rendered == 0 and again.units_skipped == 16
    _sweep_block(url, atlas_site["model"], "fc2", 2, atlas_site["pool"], atlas_site["labels"])
    third = build_atlas(url, site)
    assert third.units_rendered == 2 and third.units_skipped == 16
    assert (site / "units" / slug("fc2") / "9.html").is_file()


def test_search_lists_units_by_label_across_layers_and_opens_them(atlas_site, browser):
    """The index's search finds units by label across layers, label hits first, and opens them (in Chromium).

    Typing a label ("1": the fixture's conv2 channels and fc2's logit 1 have it) in the index lists
    every unit with that label (the API's units(label=...)) in every layer, before the units numbered
    1; a click opens the unit's page."""
    st = ls.open_store(atlas_site["stores"]["digits"])
    want = {(r["layer"], r["unit"]) for r in st.units(label="1", status=("ok", "dead")).to_pylist()}
    assert {layer for layer, _ in want} == {"fc2", "conv2"}  # labels in both layers
    assert st.units("fc2", label="3")["unit"].to_pylist() == [3]  # a logit's label is its own class
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto((atlas_site["tmp"] / "site" / "index.html").as_uri())
    page.fill("#search", "1")
    page.wait_for_selector("tr.hit")
    hits = hit_rows(page)
    labelled = [(layer, int(unit.removeprefix("unit "))) for layer, unit, label, *_ in hits if label == "1"]
    assert set(labelled) == want and len(labelled) == len(want)
    assert [h[2] for h in hits[: len(want)]] == ["1"] * len(want)  # the label's units come first
    numbered = [(layer, unit) for layer, unit, label, *_ in hits if label != "1"]
    assert numbered == [("conv2", "unit 1")]  # then the units numbered 1 (fc2's unit 1 is labelled 1)
    pictured = [h for h in hits if not {"dead", "pending", "failed", "corrupt"} & set(h[5].split())]
    assert page.locator("tr.hit img.thumb").count() == len(pictured) > 0  # each sampled unit with its picture
    assert all(w > 0 for w in _images_loaded(page))
    assert float(page.locator("#found").get_attribute("data-ms")) < 1000
    assert page.evaluate("location.hash") == "#q=1"  # the search itself has a link
    layer, unit = labelled[0]
    page.locator("tr.hit a").first.click()
    page.wait_for_selector("h2")
    assert page.inner_text("h1") == f"{layer} · unit {unit}"
    assert "label 1:" in page.inner_text("p.label")
    # words combine: a layer and unit:N find that one unit; a bare number is a label or a unit number
    page.goto((atlas_site["tmp"] / "site" / "index.html").as_uri() + "#q=conv2%20unit:5")
    page.wait_for_selector("tr.hit")
    assert [r[:2] for r in hit_rows(page)] == [["conv2", "unit 5"]]
    page.fill("#search", "conv2 5")
    fives = {r[1] for r in hit_rows(page)}
    assert fives == {f"unit {u}" for u in st.units("conv2", label="5")["unit"].to_pylist()} | {"unit 5"}


def test_unit_page_shows_histogram_markers_and_what_each_chain_changed(atlas_site, browser):
    """The unit page's histogram marks the exemplars and each chain's final; its strip shows what each chain changed."""
    st = ls.open_store(atlas_site["stores"]["digits"])
    row = st.units("fc2", unit=1).to_pylist()[0]
    assert sum(row["data_hist"]) == len(atlas_site["pool"]) and row["data_hist_lo"] < row["data_hist_hi"]
    site = atlas_site["tmp"] / "site"
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(unit_page(site, "fc2", 1).as_uri())
    hist = page.locator("figure.hist svg")
    assert hist.locator("rect.bin").count() == sum(1 for c in row["data_hist"] if c > 0)
    assert hist.locator(".mark-exemplar").count() == 4  # the top-4 exemplars
    assert hist.locator(".mark-sample").count() == 3  # one per chain's final sample
    ex_act = st.exemplars("fc2", 1)[1]
    titles = hist.locator(".mark-exemplar title").all_text_contents()
    assert titles == [f"exemplar {v:.3g}" for v in ex_act]
    assert f"Above 0 on {100 * row['data_active_fraction']:.0f}% of them" in page.inner_text("figure.hist figcaption")
    change = page.locator("img.change")
    assert change.count() == 1 and change.evaluate("e => e.complete && e.naturalWidth") > 0
    assert "What each chain changed" in page.inner_text("body")
    link = page.inner_text("code.stable-link")
    assert (site / link).resolve() == unit_page(site, "fc2", 1).resolve()
    # the strip is start | final | change of each chain: its start and final halves are the stored images
    from PIL import Image

    strip = np.asarray(Image.open(site / "img" / slug("fc2") / "1-change.png").convert("RGB"))
    assert strip.shape[0] > 3 * 28 and strip.shape[1] > 3 * 28
    assert page.locator("svg polyline").count() == 3  # the activation traces are still there
    page.screenshot(path=str(atlas_site["tmp"] / "unit-labelled.png"), full_page=True)


def test_a_store_written_before_labels_builds_its_atlas_without_them(atlas_site, browser):
    """The atlas of a store without labels searches by unit number and its unit pages leave the label parts out."""
    page = browser.new_page()
    site = atlas_site["tmp"] / "dead-site"
    page.goto((site / "index.html").as_uri())
    page.fill("#search", "0")  # no labels: only units numbered 0
    page.wait_for_selector("tr.hit")
    assert [r[1] for r in hit_rows(page)] == ["unit 0"]
    page.locator("tr.hit a").first.click()
    page.wait_for_selector("h2")
    text = page.inner_text("body")
    assert "What each chain changed" not in text and "Activation on real data" not in text and "Chains × snapshots" in text
    page.goto((site / "layers" / f"{slug('relu')}.html").as_uri())
    assert "Informativeness" not in page.inner_text("body")  # not scored: no line, no made-up number


def test_layer_page_filters_by_label(atlas_site, browser):
    """The layer page's label filter shows, in the browser, exactly the API's units(label=...)."""
    page = browser.new_page()
    page.goto((atlas_site["tmp"] / "site" / "layers" / f"{slug('conv2')}.html").as_uri())
    st = ls.open_store(atlas_site["stores"]["digits"])
    label = st.units("conv2", sort="label_purity", limit=1)["label"][0].as_py()
    page.fill("#label", label)
    want = st.units("conv2", label=label).num_rows
    assert page.inner_text("#count") == f"{want} of 8 units" and want >= 1
    assert all(t == f"label {label}" for t in page.locator(".cell .label").all_inner_texts())


def test_a_copied_atlas_names_no_path_of_the_machine_that_built_it(atlas_site, browser, tmp_path):
    """No file of an atlas holds an absolute path of the machine that built it (the store's path, its
    folder, the atlas's), so a copy works anywhere: its pages, pictures and links open from the copy."""
    site = atlas_site["tmp"] / "site"
    built_where = [str(atlas_site["tmp"]), str(site), atlas_site["stores"]["digits"]]
    copy = tmp_path / "elsewhere" / "atlas"
    shutil.copytree(site, copy)
    files = [p for p in copy.rglob("*") if p.is_file()]
    assert len(files) > 50
    for p in files:
        data = p.read_bytes()
        assert not [w for w in built_where if w.encode() in data], p
    text = (copy / "index.html").read_text()
    assert "<code>digits.zarr</code>" in text  # the store is named by its folder's name
    page = browser.new_page()
    page.goto((copy / "index.html").as_uri())
    assert page.locator("img.thumb").count() > 0 and all(w > 0 for w in _images_loaded(page))
    page.locator("tr:has(a:text-is('fc2')) img.thumb").first.click()
    page.wait_for_selector("h2")
    assert "ls.open_store('digits.zarr')" in page.inner_text("pre")
    assert all(w > 0 for w in _images_loaded(page))


@pytest.mark.fast
def test_portable_names_drop_the_build_machines_paths_but_keep_urls(tmp_path):
    """What the atlas prints of a model name or error text: local paths shortened, URLs untouched."""
    from types import SimpleNamespace

    from ldam_sweep.atlas.site import portable

    st = SimpleNamespace(loc=SimpleNamespace(is_local=True, root=str(tmp_path / "runs" / "s.zarr")))
    assert portable("torchscript:/home/me/nets/model.pt", st) == "torchscript:model.pt"
    assert portable("/home/me/weights/r18.pth", st) == "r18.pth"
    assert portable(f"block 3 of {tmp_path}/runs/s.zarr/layers/fc1 is damaged", st) == "block 3 of s.zarr/layers/fc1 is damaged"
    assert portable("s3://bucket/runs/s.zarr", st) == "s3://bucket/runs/s.zarr"
    assert portable({"model": {"weights": "/opt/w.pt"}, "zoo": "zoo:digits-cnn"}, st) == {"model": {"weights": "w.pt"},
                                                                                         "zoo": "zoo:digits-cnn"}


def test_a_parallel_build_writes_the_same_site_as_one_process(atlas_site, tmp_path):
    """`ldam-sweep atlas -j 2`: Ray tasks render the unit pages (straight into the atlas folder, which
    they see) and the site is byte for byte the one a single process writes; a rebuild renders
    nothing. A task that does not see the folder (another node, no shared filesystem) returns the
    same files as bytes."""
    from ldam_sweep.atlas.parallel import WRITER_TOKEN, _render_task
    from ldam_sweep.atlas.site import STATE_FILE, render_blocks

    import os
    import subprocess

    url = atlas_site["stores"]["digits"]
    one = build_atlas(url, tmp_path / "one")

    def cli_build() -> str:  # its own process: its local Ray never touches this test session's
        out = subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "atlas", url, "-o", str(tmp_path / "two"), "-j", "2"],
                             env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert f"{one.units_rendered} units rendered, 0 unchanged" in cli_build() and one.units_rendered >= 16

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != STATE_FILE}

    a, b = files(tmp_path / "one"), files(tmp_path / "two")
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
    assert sum(k.endswith(".png") for k in a) >= 3 * one.units_rendered
    assert f"0 units rendered, {one.units_rendered} unchanged" in cli_build()
    assert not (tmp_path / "two" / WRITER_TOKEN).exists()

    # the task itself, as on a node without the atlas folder: no token there, so the files come back
    st = ls.open_store(url)
    rows = st.units("fc2", status=None).to_pylist()
    jobs = [("fc2", 0, [r for r in rows if r["block"] == 0])]
    (tmp_path / "elsewhere").mkdir()
    n, corrupt, returned = _render_task(render_blocks, url, None, jobs, str(tmp_path / "elsewhere"), "token")
    assert n == len(jobs[0][2]) > 0 and corrupt == {} and list((tmp_path / "elsewhere").iterdir()) == []
    assert returned and {rel: data for rel, data in returned} == {rel: b[rel] for rel, _ in returned}
    assert {rel.split("/")[0] for rel, _ in returned} == {"units", "img"}
    # ... and with the token it writes them where it was told (the same bytes)
    (tmp_path / "elsewhere" / WRITER_TOKEN).write_text("token")
    assert _render_task(render_blocks, url, None, jobs, str(tmp_path / "elsewhere"), "token")[2] == []
    assert files(tmp_path / "elsewhere") == {**{rel: data for rel, data in returned}, WRITER_TOKEN: b"token"}


def test_the_demo_unit_page_shows_the_ladder_and_the_change_strip_in_chromium(demo_workdir, browser):
    """The quick demo sweeps with the activation ladder: a logit's page shows, loaded in Chromium,
    the change strip and the ladder (one row per chain: start, 1x, 1.5x, 2x), and the numbers
    under the ladder's images are the store's activations / the best real digit's."""
    work, _, _ = demo_workdir
    st = ls.open_store(str(work / "storage" / "demo.zarr"))
    site = work / "storage" / "demo-atlas"
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(unit_page(site, "fc2", 3).as_uri())
    for alt in ("activation ladder per chain", "start, final and change per chain"):
        img = page.locator(f"img[alt='{alt}']")
        assert img.count() == 1 and img.evaluate("e => e.complete && e.naturalWidth") > 0, alt
    assert "then on to 1.5×, 2× of it" in page.inner_text("body")
    from PIL import Image

    strip = Image.open(site / "img" / slug("fc2") / "3-ladder.png")
    chains = st.plan.chains
    assert strip.height > chains * 28 * 2 and strip.width > 4 * 28 * 2  # chains x (start, 1x, 1.5x, 2x) at 2x scale
    lad, best = st.ladder("fc2", 3), st.exemplars("fc2", 3)[1][0]
    assert (lad["activation"][:, 0] / best >= 1.5 * 0.995).all()  # the 1.5x rung got there on every chain
    page.screenshot(path=str(work / "unit-ladder.png"), full_page=True)
