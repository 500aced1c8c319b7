"""Model adapters, layer discovery and the truncated forward, on real models."""

from __future__ import annotations

import os
import pickle
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import ldam_sweep as ls
from ldam_sweep.data import digits
from ldam_sweep.model.zoo import ZOO, TrainRecipe, cache_dir


@pytest.mark.fast
def test_digits_cnn_is_trained_to_95_percent(digits_model):
    x, y = digits(28, "test")
    with torch.no_grad():
        pred = digits_model.forward(torch.from_numpy(x)).argmax(1).numpy()
    acc = float((pred == y).mean())
    assert acc >= 0.95
    assert digits_model.metadata["train_metrics"]["test_accuracy"] == pytest.approx(acc, abs=1e-6)
    assert len(y) == 450  # the fixed held-out split


@pytest.mark.fast
def test_zoo_weights_are_cached_by_recipe_hash(digits_model, model_cache, monkeypatch):
    from ldam_sweep.model import zoo

    files = [f for f in (cache_dir() / "zoo").glob("digits-cnn-*.pt") if not f.name.startswith("digits-cnn-ema")]
    assert [f.name for f in files] == [f"digits-cnn-{ZOO['digits-cnn'].recipe.key()}.pt"]
    mtime = files[0].stat().st_mtime_ns

    def no_training(*_args, **_kwargs):
        raise AssertionError("the cached weights were retrained instead of read")

    monkeypatch.setattr(zoo, "train_digits_model", no_training)
    again = ls.load_model("digits-cnn", device="cpu")
    assert files[0].stat().st_mtime_ns == mtime
    assert again.fingerprint == digits_model.fingerprint
    assert TrainRecipe(epochs=13).key() != TrainRecipe().key()


def test_corrupt_cache_file_is_retrained(model_cache, tmp_path, monkeypatch):
    """A torn zoo cache file is neither loaded nor fatal: digits-cnn is trained again (a whole training)."""
    monkeypatch.setenv("LDAM_SWEEP_CACHE", str(tmp_path))
    path = tmp_path / "zoo" / f"digits-cnn-{ZOO['digits-cnn'].recipe.key()}.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"torn write")
    model = ls.load_model("digits-cnn", device="cpu")
    assert model.metadata["train_metrics"]["test_accuracy"] >= 0.95
    assert path.stat().st_size > 10_000


@pytest.mark.fast
def test_digits_layers_discovered_by_dry_run(digits_model):
    got = [(l.name, l.module_type, l.kind, l.units, l.output_shape) for l in digits_model.layers]
    assert got == [
        ("conv1", "Conv2d", "conv", 16, (16, 28, 28)),
        ("relu1", "ReLU", "conv", 16, (16, 28, 28)),
        ("pool1", "MaxPool2d", "conv", 16, (16, 14, 14)),
        ("conv2", "Conv2d", "conv", 32, (32, 14, 14)),
        ("relu2", "ReLU", "conv", 32, (32, 14, 14)),
        ("pool2", "MaxPool2d", "conv", 32, (32, 7, 7)),
        ("fc1", "Linear", "linear", 128, (128,)),
        ("relu3", "ReLU", "linear", 128, (128,)),
        ("fc2", "Linear", "logit", 10, (10,)),
    ]


@pytest.fixture(scope="module")
def resnet64():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ls.RandomWeightsWarning)
        return ls.load_model({"torchvision": "resnet18", "input": {"channels": 3, "height": 64, "width": 64}}, device="cpu")


@pytest.mark.fast
def test_resnet_discovery_handles_aliases_and_inplace_ops(resnet64):
    by_name = {l.name: l for l in resnet64.layers}
    # ReLU(inplace=True) returns bn1's tensor object with new values: two layers, not one
    assert "bn1" in by_name and "relu" in by_name
    # out += identity in BasicBlock modifies bn2's output in place: bn2 is its own layer
    assert "layer1.0.bn2" in by_name and "layer1.0" in by_name
    # a Sequential returns its last block's tensor unchanged: one layer, two names
    assert by_name["layer1"].aliases == ("layer1.1",)
    assert resnet64.layer("layer1.1").name == "layer1"
    # the shared block relu runs twice per forward: no single output, not a layer
    assert "layer1.0.relu" not in by_name
    assert by_name["fc"].kind == "logit" and by_name["fc"].units == 1000
    assert by_name["layer3"].output_shape == (256, 4, 4)


def _later_call_counter(model: ls.ModelHandle, names: list[str]) -> tuple[dict, list]:
    counts = {n: 0 for n in names}
    mods = dict(model.net.named_modules())

    def make(n):
        def pre(_m, _i):
            counts[n] += 1
        return pre

    return counts, [mods[n].register_forward_pre_hook(make(n)) for n in names]


@pytest.mark.fast
def test_truncated_forward_never_calls_later_modules(digits_model):
    counts, handles = _later_call_counter(digits_model, ["conv2", "pool2", "fc1", "fc2"])
    try:
        x = torch.rand(3, 1, 28, 28)
        acts = digits_model.activations(x, "relu1")
        assert acts.shape == (3, 16, 28, 28)
        assert counts == {"conv2": 0, "pool2": 0, "fc1": 0, "fc2": 0}
        digits_model.activations(x, "pool2")
        assert counts == {"conv2": 1, "pool2": 1, "fc1": 0, "fc2": 0}
    finally:
        for h in handles:
            h.remove()
    # only the target's temporary hook was added, and it is gone
    assert all(not m._forward_hooks for m in digits_model.net.modules())


@pytest.mark.fast
def test_truncated_output_equals_full_forward_output(resnet64):
    x = torch.rand(2, 3, 64, 64)
    seen = {}
    mods = dict(resnet64.net.named_modules())

    def keep(name):
        def hook(_m, _i, out):
            seen[name] = out.clone()  # returns None: the model's own output is left alone
        return hook

    hs = [mods[n].register_forward_hook(keep(n)) for n in ("bn1", "layer2", "layer1.0.bn2")]
    try:
        with torch.no_grad():
            resnet64.forward(x)
    finally:
        for h in hs:
            h.remove()
    with torch.no_grad():
        for name in ("bn1", "layer2", "layer1.0.bn2"):
            assert torch.allclose(resnet64.activations(x, name), seen[name], atol=1e-6), name


@pytest.mark.fast
def test_hook_removed_when_forward_raises(digits_model):
    with pytest.raises(ls.ModelError, match="expected"):
        digits_model.check_input(torch.zeros(1, 3, 28, 28))
    with pytest.raises(RuntimeError):
        digits_model.activations(torch.zeros(1, 3, 28, 28), "fc1")
    assert all(not m._forward_hooks for m in digits_model.net.modules())


@pytest.mark.fast
def test_unknown_layer_lists_valid_names(digits_model):
    with pytest.raises(ls.LayerError) as err:
        digits_model.layer("fc3")
    msg = str(err.value)
    assert "unknown layer 'fc3'" in msg and "conv1, relu1, pool1" in msg and "fc2" in msg


@pytest.mark.fast
def test_unit_out_of_range_names_the_range(digits_model):
    with pytest.raises(ls.LayerError, match=r"unit 32 is out of range for layer 'conv2': valid units are 0\.\.31"):
        digits_model.check_units("conv2", [0, 32])
    with pytest.raises(ls.LayerError, match="unit -1"):
        digits_model.check_units("fc2", -1)


@pytest.mark.fast
def test_unknown_model_names():
    with pytest.raises(ls.ModelError, match="unknown zoo model 'digits-cn'.*Did you mean 'digits-cnn'"):
        ls.load_model("digits-cn")
    with pytest.raises(ls.ModelError, match="unknown torchvision model 'resnet19'.*resnet18"):
        ls.load_model("torchvision:resnet19")


@pytest.mark.fast
def test_torchvision_without_weights_warns_and_is_the_same_network_every_time():
    """Random weights come from a fixed seed: a sweep's driver and workers (separate processes)
    build one network, and the caller's random state is left as it was."""
    spec = {"torchvision": "resnet18", "input": {"channels": 3, "height": 32, "width": 32}}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with pytest.warns(ls.RandomWeightsWarning, match="RANDOM weights"):
        a = ls.load_model(spec, device="cpu")
    assert torch.equal(torch.rand(3), expected_next)  # fork_rng: the global stream untouched
    torch.rand(1000)  # another state: the next network is still the same
    with pytest.warns(ls.RandomWeightsWarning):
        b = ls.load_model(spec, device="cpu")
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sa["conv1.weight"].std() > 0  # initialised, not zeros


FACTORY_SRC = textwrap.dedent(
    """
    import torch
    from torch import nn

    def tiny(width=4, channels=3):
        return nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5),
        )
    """
)


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "user_models_for_test.py").write_text(FACTORY_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_models_for_test", None)
    return "user_models_for_test:tiny"


@pytest.mark.fast
def test_factory_model_with_state_dict(factory_module, tmp_path):
    import importlib

    net = importlib.import_module("user_models_for_test").tiny(width=6)
    torch.manual_seed(1)
    for p in net.parameters():
        nn.init.normal_(p)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    spec = {"factory": factory_module, "kwargs": {"width": 6}, "weights": str(tmp_path / "w.pt"),
            "input": {"channels": 3, "height": 16, "width": 16, "mean": [0.5], "std": [0.25]}}
    model = ls.load_model(spec, device="cpu")
    assert [(l.name, l.kind, l.units) for l in model.layers] == [("0", "conv", 6), ("1", "conv", 6), ("2", "conv", 6), ("4", "logit", 5)]
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.forward(x), net((x - 0.5) / 0.25), atol=1e-6)  # normalisation inside
    other = ls.load_model({**spec, "weights": None}, device="cpu")
    assert other.fingerprint != model.fingerprint


@pytest.mark.fast
def test_weights_errors(factory_module, tmp_path):
    base = {"factory": factory_module, "input": {"channels": 3, "height": 8, "width": 8}}
    with pytest.raises(ls.ModelError, match="does not exist"):
        ls.load_model({**base, "weights": str(tmp_path / "missing.pt")})
    (tmp_path / "corrupt.pt").write_bytes(b"\x00not a torch file")
    with pytest.raises(ls.ModelError, match="corrupt.pt.*cannot be read"):
        ls.load_model({**base, "weights": str(tmp_path / "corrupt.pt")})
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(ls.ModelError, match="does not fit the model"):
        ls.load_model({**base, "weights": str(tmp_path / "wrong.pt")})


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ldam_sweep_pwned",))


@pytest.mark.fast
def test_weights_file_with_pickled_code_is_refused(factory_module, tmp_path):
    marker = "/tmp/ldam_sweep_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    torch.save({"0.weight": _Evil()}, tmp_path / "evil.pt", pickle_module=pickle)
    with pytest.raises(ls.ModelError, match="weights_only=True"):
        ls.load_model({"factory": factory_module, "weights": str(tmp_path / "evil.pt"),
                       "input": {"channels": 3, "height": 8, "width": 8}})
    assert not os.path.exists(marker)


@pytest.mark.fast
def test_wrong_input_shape_is_a_clear_error(factory_module):
    with pytest.raises(ls.ModelError, match=r"failed on an input of shape \(1, 1, 8, 8\).*input section"):
        ls.load_model({"factory": factory_module, "input": {"channels": 1, "height": 8, "width": 8}})


@pytest.mark.fast
def test_torchscript_model(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    torch.jit.script(net).save(str(tmp_path / "m.pt"))
    model = ls.load_model({"torchscript": str(tmp_path / "m.pt"), "input": {"channels": 1, "height": 8, "width": 8}}, device="cpu")
    assert [(l.name, l.kind, l.units) for l in model.layers] == [("output", "logit", 3)]
    res = ls.sample(model, "output", [0, 2], chains=2, steps=20)
    assert res.samples.shape == (2, 2, 4, 1, 8, 8)
    with pytest.raises(ls.ModelError, match="could not be loaded"):
        (tmp_path / "bad.pt").write_bytes(b"junk")
        ls.load_model({"torchscript": str(tmp_path / "bad.pt"), "input": {"channels": 1, "height": 8, "width": 8}})


@pytest.mark.fast
def test_spec_validation_errors(tmp_path):
    with pytest.raises(ls.SpecError, match="exactly one model source"):
        ls.load_model({"zoo": "digits-cnn", "torchvision": "resnet18"})
    with pytest.raises(ls.SpecError, match="input section"):
        ls.load_model({"factory": "a.b:c"})
    with pytest.raises(ls.SpecError, match=r"factory: .*package.module:function"):
        ls.load_model({"factory": "nocolon", "input": {"channels": 1, "height": 4, "width": 4}})
    with pytest.raises(ls.SpecError, match=r"zooo: unknown field"):
        ls.load_model({"zooo": "digits-cnn"})
    with pytest.raises(ls.SpecError, match=r"input.channels: .*greater than or equal to 1"):
        ls.load_model({"torchvision": "resnet18", "input": {"channels": 0, "height": 4, "width": 4}})
    with pytest.raises(ls.SpecError, match=r"std needs 1 value or one per channel \(3\), got 2"):
        ls.load_model({"torchvision": "resnet18", "input": {"channels": 3, "height": 4, "width": 4, "std": [1, 1]}})


@pytest.mark.fast
def test_spec_file_paths_are_relative_to_the_file(tmp_path, factory_module):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "job.yaml").write_text(
        f"model:\n  factory: '{factory_module}'\n  weights: ../w.pt\n  input: {{channels: 3, height: 8, width: 8}}\n"
    )
    spec = ls.load_model_spec(tmp_path / "jobs" / "job.yaml")
    assert spec.weights == (tmp_path / "w.pt").resolve()
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ls.SpecError, match="not valid YAML"):
        ls.load_model_spec(tmp_path / "bad.yaml")
    with pytest.raises(ls.SpecError, match="does not exist"):
        ls.load_model_spec(tmp_path / "nope.yaml")


@pytest.mark.fast
def test_cli_layers_table_and_clean_errors(model_cache):
    from typer.testing import CliRunner

    from ldam_sweep.cli import app

    ok = CliRunner().invoke(app, ["layers", "digits-cnn"], env={"COLUMNS": "200"})
    assert ok.exit_code == 0, ok.stderr
    assert "fc2" in ok.stdout and "logit" in ok.stdout and "total units: 410" in ok.stdout
    bad = CliRunner().invoke(app, ["layers", "torchvision:resnet-18"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2
    assert "error: unknown torchvision model 'resnet-18'" in bad.stderr and "resnet18" in bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout


@pytest.mark.fast
def test_memory_format_auto_picks_channels_last_for_conv_nets_and_agrees_with_contiguous(digits_model):
    assert digits_model.memory_format == "channels_last"  # auto, the model has Conv2d layers
    assert digits_model.net.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    flat = ls.load_model("digits-cnn", device="cpu")
    mlp = ls.ModelHandle(nn.Sequential(nn.Flatten(), nn.Linear(16, 4)), ls.InputSpec(channels=1, height=4, width=4),
                         name="mlp", memory_format="auto")
    assert mlp.memory_format == "contiguous"
    contiguous = ls.load_model({"zoo": "digits-cnn", "memory_format": "contiguous"}, device="cpu")
    assert contiguous.memory_format == "contiguous" and contiguous.net.conv2.weight.is_contiguous()
    assert contiguous.fingerprint == flat.fingerprint  # the layout is not part of the weights' identity
    x = torch.rand(16, 1, 28, 28, requires_grad=True)
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        a, b = digits_model.activations(x, layer), contiguous.activations(x, layer)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), layer
        ga = torch.autograd.grad(a.sum(), x)[0]
        gb = torch.autograd.grad(b.sum(), x)[0]
        assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-4), layer
    with pytest.raises(ls.SpecError, match=r"memory_format: .*'channels_last'"):
        ls.load_model({"zoo": "digits-cnn", "memory_format": "nhwc"})


@pytest.mark.fast
def test_bf16_precision_runs_the_model_in_bfloat16_and_keeps_the_chains_float32(digits_model):
    bf = ls.load_model({"zoo": "digits-cnn", "precision": "bf16"}, device="cpu")
    x = torch.rand(32, 1, 28, 28, requires_grad=True)
    inner = []
    h = bf.net.conv2.register_forward_hook(lambda _m, _i, out: inner.append(out.dtype))
    try:
        a = bf.activations(x, "fc2")
    finally:
        h.remove()
    assert inner == [torch.bfloat16] and a.dtype == torch.float32
    ref = digits_model.activations(x, "fc2")
    assert not torch.equal(a, ref)  # really computed in bf16 ...
    assert (a - ref).abs().max() < 0.05 * ref.abs().max()  # ... and close to float32
    g = torch.autograd.grad(a.sum(), x)[0]
    assert g.dtype == torch.float32
    r32 = ls.sample(digits_model, "fc2", [3], chains=4, steps=60, seed=1)
    r16 = ls.sample(bf, "fc2", [3], chains=4, steps=60, seed=1)
    assert r16.samples.dtype == np.float32 and r16.activation.dtype == np.float32
    start = r32.activation[..., 0].mean()
    # both climb the same way: bf16 reaches within 10% of float32's gain in activation
    assert abs(r16.final_activation.mean() - r32.final_activation.mean()) < 0.1 * (r32.final_activation.mean() - start)
    with pytest.raises(ls.SpecError, match=r"precision: .*'bf16'"):
        ls.load_model({"zoo": "digits-cnn", "precision": "fp8"})


@pytest.mark.fast
def test_auto_layout_falls_back_for_models_that_view_conv_outputs(tmp_path):
    """A LeNet-style model calling .view() on a conv output cannot run NHWC: auto falls back to
    contiguous, an explicit channels_last says what to change, TorchScript refuses channels_last."""

    class LeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2, self.fc = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5), nn.Linear(16 * 5 * 5, 10)

        def forward(self, x):
            x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
            return self.fc(x.view(-1, 16 * 5 * 5))

    spec = ls.InputSpec(channels=3, height=32, width=32)
    h = ls.ModelHandle(LeNet(), spec, name="lenet")
    assert h.memory_format == "contiguous" and [layer.name for layer in h.layers] == ["conv1", "conv2", "fc"]
    assert h.activations(torch.rand(4, 3, 32, 32), "fc").shape == (4, 10)
    with pytest.raises(ls.ModelError, match="memory_format: contiguous"):
        ls.ModelHandle(LeNet(), spec, name="lenet", memory_format="channels_last")
    scripted = torch.jit.script(LeNet())
    assert ls.ModelHandle(scripted, spec, name="ts", scripted=True).memory_format == "contiguous"
    with pytest.raises(ls.ModelError, match="not supported for TorchScript"):
        ls.ModelHandle(scripted, spec, name="ts", scripted=True, memory_format="channels_last")


@pytest.mark.fast
def test_the_ladder_in_a_spec_is_checked_before_any_work(digits_model):
    """sampler.ladder: rising multiples above the target, ldam only, and only with data; a store plan
    without a ladder keeps the JSON (and plan hash) of stores made before it."""
    from ldam_sweep.planning import resolve
    from ldam_sweep.spec import parse_job

    base = {"name": "t", "model": {"zoo": "digits-cnn"}, "layers": ["fc2"], "data": {"source": "digits"}}
    with pytest.raises(ls.SpecError, match=r"ladder must rise above the target \(1\).*got \[2.0, 1.5\]"):
        parse_job({**base, "sampler": {"ladder": [2.0, 1.5]}})
    with pytest.raises(ls.SpecError, match=r"ladder must rise above the target \(1.2\)"):
        parse_job({**base, "sampler": {"ladder": [1.1], "target": 1.2}})
    with pytest.raises(ls.SpecError, match="method 'sgld' has none"):
        parse_job({**base, "sampler": {"method": "sgld", "ladder": [1.5]}})
    no_data = {k: v for k, v in base.items() if k != "data"}
    with pytest.raises(ls.SpecError, match="sampler.ladder: .* needs data"):
        resolve(parse_job({**no_data, "sampler": {"ladder": [1.5]}}), digits_model)
    with_ladder = resolve(parse_job({**base, "sampler": {"ladder": [1.5, 2]}}), digits_model).store
    plain = resolve(parse_job(base), digits_model).store
    assert with_ladder.ladder == (1.5, 2.0) and "rungs" in with_ladder.arrays("fc2") and "rungs" not in plain.arrays("fc2")
    assert "ladder" not in plain.to_json() and type(plain).from_json(with_ladder.to_json()) == with_ladder
    # in an 8-bit store a rung that has no activation (a dead unit, a diverged chain) reads back as NaN, not black
    from ldam_sweep.store.query import decode_block, stored_names

    act = np.array([[[2.0, np.nan]]], dtype=np.float32)  # (unit, chain, rung)
    got = decode_block(with_ladder, {"rungs": np.full((1, 1, 2, 1, 28, 28), 0, np.uint8), "rung_activation": act}, ["rungs"])
    assert (got["rungs"][0, 0, 0] == 0).all() and np.isnan(got["rungs"][0, 0, 1]).all()
    assert stored_names(with_ladder, with_ladder.layer("fc2"), ["rungs"]) == ["rungs", "rung_activation"]
