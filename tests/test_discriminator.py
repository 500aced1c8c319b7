"""The discriminator: real-data sources, adversarial training, persistence, and the lambda trade-off
on the real digits model (numbers measured against the lambda = 0 baseline)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import ldam_sweep as ls
from ldam_sweep.settings import REFERENCE_LDAM
from ldam_sweep.data import digits, image_folder, npy_images, photo_crops, real_images
from ldam_sweep.errors import DataError
from ldam_sweep.sampling.discriminator import (
    DiscriminatorError,
    DiscriminatorModelWarning,
    ResidualDiscriminator,
    SmallDiscriminator,
    load_discriminator,
    train_discriminator,
)
from ldam_sweep.spec import DataSpec, InputSpec, parse_job

DIGITS_IN = InputSpec(channels=1, height=28, width=28)


@pytest.fixture(scope="session")
def digits_split():
    return digits(28, "train")[0], digits(28, "test")


@pytest.fixture(scope="session")
def d_lam0(digits_model, digits_split):
    """The paper's setting (reference form: chains from uniform noise), where D has much to learn."""
    train, (test, _) = digits_split
    return train_discriminator(digits_model, [("fc2", range(10))], train, test,
                               {"updates": 40, "lam": 0.0, "sampler": REFERENCE_LDAM})


@pytest.fixture(scope="session")
def d_ref05(digits_model, digits_split):
    train, (test, _) = digits_split
    return train_discriminator(digits_model, [("fc2", range(10))], train, test,
                               {"updates": 60, "lam": 0.5, "sampler": REFERENCE_LDAM})


@pytest.fixture(scope="session")
def d_lam05(digits_model, digits_split):
    train, (test, _) = digits_split
    return train_discriminator(digits_model, [("fc2", range(10))], train, test, {"updates": 60, "lam": 0.5})


def _nearest_real_rms(samples: np.ndarray, real: np.ndarray) -> float:
    """Mean over samples of the RMS pixel distance to the nearest real image (realism without D)."""
    a = samples.reshape(-1, real[0].size).astype(np.float64)
    b = real.reshape(len(real), -1).astype(np.float64)
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None] - 2 * a @ b.T
    return float(np.sqrt(np.maximum(d2.min(1), 0) / a.shape[1]).mean())


@pytest.fixture(scope="session")
def lambda_sweep(digits_model, d_ref05):
    """lambda in the paper's setting: the reference form from uniform noise, with a D trained against it
    (today's default, which starts from real exemplars, is compared with it in test_realism.py)."""
    out = {}
    for lam in (0.0, 0.5, 1.0):
        res = ls.sample(digits_model, "fc2", range(10), chains=4, steps=300, lam=lam, discriminator=d_ref05.module,
                        **REFERENCE_LDAM)
        with torch.no_grad():
            pred = digits_model.forward(torch.from_numpy(res.final_samples.reshape(-1, 1, 28, 28))).argmax(1).numpy()
        out[lam] = (res, float((pred.reshape(10, 4) == np.arange(10)[:, None]).mean()))
    return out


@pytest.fixture(scope="session")
def old_and_new_default(digits_model, d_lam05, digits_split):
    """fc2 at lambda 0.5, 5 classes x 6 chains, same D and seeds: the paper's reference form (the
    first default) and today's default (diverse starts from the unit's exemplars, the data preconditioner,
    the activation target)."""
    from ldam_sweep.sampling.exemplars import top_exemplars

    train, _ = digits_split
    units = np.arange(0, 10, 2)
    ex, _ = top_exemplars(digits_model, "fc2", units, "logit", torch.from_numpy(train), 64)
    kw = dict(chains=6, steps=300, lam=0.5, discriminator=d_lam05.module, exemplars=ex)
    return {"old": ls.sample(digits_model, "fc2", units, init="uniform", **REFERENCE_LDAM, **kw),
            "new": ls.sample(digits_model, "fc2", units, preconditioner=train, **kw)}


def test_new_default_samples_the_class_not_one_image_and_stays_realistic(digits_model, old_and_new_default, digits_split):
    """Today's default sampler (real starts, trained D) keeps the class, varies like real digits and loses no realism."""
    from ldam_sweep.model.zoo import class_max_logits
    from ldam_sweep.sampling.lowpass import variety

    _, (test, test_y) = digits_split
    units = old_and_new_default["new"].units
    real = np.array([float(variety(torch.from_numpy(test[test_y == u][None]))[0]) for u in units])
    m = {}
    for name, res in old_and_new_default.items():
        x = torch.from_numpy(res.final_samples.reshape(-1, 1, 28, 28))
        with torch.no_grad():
            pred = digits_model.forward(x).argmax(1).numpy().reshape(len(units), -1)
        m[name] = {"variety": float((variety(torch.from_numpy(res.final_samples)).numpy() / real).mean()),
                   "argmax": float((pred == units[:, None]).mean()),
                   "near": _nearest_real_rms(res.final_samples, test),
                   "act": float((res.final_activation.mean(1) / class_max_logits(digits_model.net)[units]).mean())}
    # measured on the demo (200-update D, 10 classes x 8 chains): variety 0.27 -> 0.83 of the real
    # class's, nearest real 0.216 -> 0.197, activation ratio 1.18 -> 1.12, argmax 1.00 both
    assert m["new"]["variety"] > 2.0 * m["old"]["variety"], m
    assert m["new"]["argmax"] >= 0.9 and m["new"]["act"] >= 1.0, m
    # starts from real digits: no realism is lost (0.02 = the noise between D trainings of this size)
    assert m["new"]["near"] <= m["old"]["near"] + 0.02, m


def test_d_trained_against_lam0_chains_tells_them_from_heldout_digits(d_lam0):
    """A D trained 40 updates against lam=0 chains tells them from held-out digits (>= 90%) and its loss falls."""
    assert d_lam0.heldout_accuracy >= 0.9
    assert d_lam0.heldout_real_accuracy >= 0.9 and d_lam0.heldout_fake_accuracy >= 0.9
    assert len(d_lam0.log["loss"]) == 40 and d_lam0.log["loss"][-1] < d_lam0.log["loss"][0]
    assert isinstance(d_lam0.module.net, SmallDiscriminator)


def test_realism_rises_with_lambda_and_the_target_stays_the_argmax(lambda_sweep):
    """Raising lambda raises log D of the final samples while the target logit stays the argmax."""
    (r0, argmax0), (r5, argmax5) = lambda_sweep[0.0], lambda_sweep[0.5]
    logd0, logd5 = float(r0.realism[..., -1].mean()), float(r5.realism[..., -1].mean())
    # measured on this box: -13.0 at lambda 0, -1.4 at lambda 0.5 (margin ~11.6)
    assert logd5 > logd0 + 5.0, (logd0, logd5)
    assert argmax5 >= 0.9 and argmax0 == 1.0


def test_samples_move_towards_real_digits_without_asking_d(lambda_sweep, digits_split):
    """At lambda 0.5 the samples end nearer to real digits than at lambda 0, measured without D."""
    _, (test, _) = digits_split
    near0 = _nearest_real_rms(lambda_sweep[0.0][0].final_samples, test)
    near5 = _nearest_real_rms(lambda_sweep[0.5][0].final_samples, test)
    # measured: 0.48 at lambda 0 vs 0.22 at lambda 0.5 (real digits of one class are ~0.22 apart)
    assert near5 < 0.75 * near0, (near0, near5)


def test_at_lambda_1_samples_stop_depending_on_the_unit(lambda_sweep):
    """At lambda 1 only D moves the chains: the samples stop depending on the unit (argmax at chance)."""
    r1, argmax1 = lambda_sweep[1.0]
    r0, _ = lambda_sweep[0.0]
    assert argmax1 <= 0.3  # measured 0.10: chance level for 10 classes

    def between_units(res):
        m = res.final_samples.mean(axis=1).reshape(10, -1)
        return float(np.sqrt(((m[:, None] - m[None]) ** 2).mean(-1)).mean())

    assert between_units(r1) < 0.5 * between_units(r0)


def test_rgb_path_resnet18_with_d_on_photo_crops():
    """On RGB resnet18 at 64 px the residual D trains on photo crops above chance and drives the sampler."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ls.RandomWeightsWarning)
        model = ls.load_model({"torchvision": "resnet18", "input": {"channels": 3, "height": 64, "width": 64,
                                "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}, device="cpu")
    spec_in = model.input
    train, test = photo_crops(spec_in, 256, "train"), photo_crops(spec_in, 64, "test")
    trained = train_discriminator(model, [("layer2", range(8))], train, test, {
        "updates": 30, "steps_per_update": 4, "chains": 16, "batch": 32, "eval_chains": 16, "eval_steps": 10, "lam": 0.0,
        "sampler": REFERENCE_LDAM,  # chains from noise: something for 30 updates to learn (real starts barely move)
    })
    assert isinstance(trained.module.net, ResidualDiscriminator)
    print(f"RGB D held-out accuracy {trained.heldout_accuracy:.3f} in {trained.seconds:.1f}s")
    assert trained.heldout_accuracy > 0.6, trained.heldout_accuracy  # chance is 0.5
    res = ls.sample(model, "layer2", [0, 5], chains=2, steps=5, lam=0.5, discriminator=trained.module)
    assert res.samples.shape == (2, 2, 5, 3, 64, 64) and res.realism.shape == (2, 2, 6)


def test_save_load_roundtrip_and_model_checks(d_lam0, digits_model, tmp_path, factory_digits_like):
    """A trained D saves and loads back equal; another model warns, another input shape and junk files are refused."""
    path = d_lam0.save(tmp_path / "d.pt")
    loaded = load_discriminator(path, digits_model)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), d_lam0.module(x))
    assert loaded.heldout_accuracy == d_lam0.heldout_accuracy and loaded.log == d_lam0.log
    with pytest.warns(DiscriminatorModelWarning, match="trained against another model"):
        load_discriminator(path, factory_digits_like)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ls.RandomWeightsWarning)
        rgb = ls.load_model({"torchvision": "resnet18", "input": {"channels": 3, "height": 32, "width": 32}}, device="cpu")
    with pytest.raises(DiscriminatorError, match=r"takes images \(1, 28, 28\).*model 'torchvision:resnet18' takes \(3, 32, 32\)"):
        load_discriminator(path, rgb)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(DiscriminatorError, match="cannot be read"):
        load_discriminator(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(DiscriminatorError, match="not an ldam-sweep discriminator"):
        load_discriminator(tmp_path / "other.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ldam_sweep_d_pwned",))


@pytest.mark.fast
def test_discriminator_file_with_pickled_code_is_refused(tmp_path):
    marker = "/tmp/ldam_sweep_d_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    torch.save({"format": "ldam-sweep-discriminator-v1", "config": _Evil()}, tmp_path / "evil.pt", pickle_module=pickle)
    with pytest.raises(DiscriminatorError, match="weights_only=True"):
        load_discriminator(tmp_path / "evil.pt")
    assert not os.path.exists(marker)


@pytest.fixture(scope="module")
def factory_digits_like(tmp_path_factory):
    mod_dir = tmp_path_factory.mktemp("factory")
    (mod_dir / "digits_like_for_test.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))\n"
    )
    sys.path.insert(0, str(mod_dir))
    try:
        yield ls.load_model({"factory": "digits_like_for_test:build", "input": {"channels": 1, "height": 28, "width": 28}}, device="cpu")
    finally:
        sys.path.remove(str(mod_dir))


@pytest.mark.fast
def test_training_chains_are_distinct_and_cover_every_layer(digits_model):
    from ldam_sweep.data import digits
    from ldam_sweep.sampling.discriminator import ChainSetting, _ChainGroup, _spread
    from ldam_sweep.settings import parse_options

    groups = _spread([("fc2", np.arange(10))], 32)
    assert [(l, len(u)) for l, u in groups] == [("fc2", 32)]
    noise_only = ChainSetting(method="ldam", options=parse_options("ldam", {}), lam=0.5)
    g = _ChainGroup(digits_model, "fc2", groups[0][1], "logit", 0, "train", noise_only)
    flat = g.x.flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(1.0).min() > 0.1  # chains on one unit are not copies
    # with real data, stage 1's chains start as a sweep's do: from their units' real exemplars, no two alike
    train = digits(28, "train")[0]
    g = _ChainGroup(digits_model, "fc2", groups[0][1], "logit", 0, "train",
                    ChainSetting(method="ldam", options=parse_options("ldam", {}), lam=0.5, real=train))
    flat = g.x.flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(1.0).min() > 0.1
    nearest = torch.cdist(flat, torch.from_numpy(train).flatten(1)).min(1).values
    assert (nearest < 0.05).all()  # every start is a training digit (two distinct digits are ~6 apart)
    assert g.target is not None and torch.isfinite(g.target).all()  # and climbs to its unit's best one
    many = _spread([("conv2", np.arange(32)), ("fc1", np.arange(128)), ("fc2", np.arange(10))], 16)
    assert {l for l, _ in many} == {"conv2", "fc1", "fc2"}


@pytest.mark.fast
def test_image_folder_resizes_crops_and_converts_channels(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "a" / "x.png")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(tmp_path / "a" / "b" / "y.jpg")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    grey = image_folder(tmp_path, DIGITS_IN)
    assert grey.shape == (2, 1, 28, 28) and grey.min() >= 0 and grey.max() <= 1
    rgb = image_folder(tmp_path, InputSpec(channels=3, height=16, width=16, range=(-1.0, 1.0)))
    assert rgb.shape == (2, 3, 16, 16) and rgb.min() >= -1 and rgb.min() < 0


@pytest.mark.fast
def test_bad_data_sources_name_the_file_and_problem(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        image_folder(tmp_path / "empty", DIGITS_IN)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"image file '.*broken.png' cannot be read"):
        image_folder(tmp_path / "bad", DIGITS_IN)
    with pytest.raises(DataError, match="does not exist"):
        image_folder(tmp_path / "missing", DIGITS_IN)
    np.save(tmp_path / "rgb.npy", np.zeros((4, 3, 28, 28), dtype=np.float32))
    with pytest.raises(DataError, match="has 3 channels, the model takes 1"):
        npy_images(tmp_path / "rgb.npy", DIGITS_IN)
    np.save(tmp_path / "last.npy", np.zeros((4, 28, 28, 1), dtype=np.float32))
    with pytest.raises(DataError, match="channels-last"):
        npy_images(tmp_path / "last.npy", DIGITS_IN)
    np.save(tmp_path / "range.npy", np.full((4, 1, 28, 28), 255.0, dtype=np.float32))
    with pytest.raises(DataError, match=r"values span \[255, 255\], outside the model's pixel range \[0.0, 1.0\]"):
        npy_images(tmp_path / "range.npy", DIGITS_IN)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="cannot be read as a numeric array"):
        npy_images(tmp_path / "obj.npy", DIGITS_IN)
    np.save(tmp_path / "two.npy", np.zeros((2, 1, 28, 28), dtype=np.float32))
    with pytest.raises(DataError, match="at least 4 are needed"):
        real_images(DataSpec(source="npy", path=tmp_path / "two.npy"), DIGITS_IN, "train")


@pytest.mark.fast
def test_job_spec_discriminator_rules():
    with pytest.raises(ls.SpecError, match="discriminator.train needs a data section"):
        parse_job({"model": {"zoo": "digits-cnn"}, "discriminator": {"train": {}}})
    with pytest.raises(ls.SpecError, match="exactly one of file .* or train"):
        parse_job({"model": {"zoo": "digits-cnn"}, "discriminator": {}})
    with pytest.raises(ls.SpecError, match=r"updatez: unknown field"):
        parse_job({"model": {"zoo": "digits-cnn"}, "discriminator": {"train": {"updatez": 2}}, "data": {"source": "digits"}})
    with pytest.raises(ls.SpecError, match="photos.*takes no path"):
        parse_job({"model": {"zoo": "digits-cnn"}, "data": {"source": "photos", "path": "x"}})


def test_cli_train_discriminator_and_store_roundtrip(tmp_path, model_cache, digits_model):
    """`ldam-sweep train-discriminator` writes a D that loads, and a store's D bytes load back equal."""
    spec = tmp_path / "job.yaml"
    spec.write_text("model: {zoo: digits-cnn}\nlayers: [fc2]\ndata: {source: digits}\n"
                    "discriminator: {train: {updates: 6, steps_per_update: 5, eval_steps: 10, lam: 0.0}}\n")
    out = subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "train-discriminator", str(spec), "-o", str(tmp_path / "d.pt")],
                         capture_output=True, text=True, env={**os.environ, "LDAM_SWEEP_CACHE": str(model_cache)})
    assert out.returncode == 0, out.stderr
    assert "held-out accuracy" in out.stdout and (tmp_path / "d.pt").is_file()
    trained = load_discriminator(tmp_path / "d.pt", digits_model)
    assert trained.settings["updates"] == 6

    from ldam_sweep.planning import plan_store
    from ldam_sweep.settings import default_snapshot_steps
    from ldam_sweep.stage import discriminator_record
    from ldam_sweep.store import create_store
    from ldam_sweep.store.layout import write_discriminator

    url = str(tmp_path / "s.zarr")
    create_store(url, plan_store(digits_model, {"fc2": None}, chains=2, steps=4, snapshot_steps=default_snapshot_steps(4, None),
                                 block_size=4, realism=True))
    write_discriminator(url, trained.to_bytes(), discriminator_record(trained))
    st = ls.open_store(url)
    assert st.discriminator_info()["heldout_accuracy"] == trained.heldout_accuracy
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_discriminator(st.discriminator_bytes(), digits_model).module(x), trained.module(x))


@pytest.mark.fast
def test_residual_d_halves_resolution_first_above_32px_and_old_configs_keep_stride_1():
    from ldam_sweep.sampling.discriminator import Discriminator, discriminator_config

    cfg = discriminator_config(ls.InputSpec(channels=3, height=64, width=64))
    assert cfg["arch"] == "residual" and cfg["stem_stride"] == 2
    new = Discriminator(cfg)
    old = Discriminator({k: v for k, v in cfg.items() if k != "stem_stride"})  # a checkpoint from before the key
    assert new.net.features[0].stride == (2, 2) and old.net.features[0].stride == (1, 1)
    x = torch.rand(4, 3, 64, 64)
    assert new(x).shape == old(x).shape == (4,)
    assert "stem_stride" not in discriminator_config(ls.InputSpec(channels=3, height=32, width=32))
    from torch.utils.flop_counter import FlopCounterMode

    def flops(d):
        with FlopCounterMode(display=False) as fc:
            d(x)
        return fc.get_total_flops()

    assert flops(new) < 0.3 * flops(old)  # the full-resolution residual block was most of D's cost
