"""A user's own model: a live nn.Module from Python (load_model, sample, run_sweep), a factory module
beside the spec from the CLI, and what a user is told when it is missing or D is weak."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

import ldam_sweep as ls
from ldam_sweep.cli import app
from ldam_sweep.data import digits
from ldam_sweep.errors import ModelError


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 6, 3, padding=1)), ("relu", nn.ReLU()),
                                      ("pool", nn.AdaptiveAvgPool2d(4)), ("flat", nn.Flatten()), ("fc", nn.Linear(96, 5))]))


@pytest.mark.fast
def test_load_model_and_sample_take_a_live_module(capsys):
    """``ls.load_model(module, input=(C, H, W))`` discovers the module's layers; ``ls.sample(module, ...)``
    raises the asked units' activations from their starts and draws a progress bar on stderr when asked."""
    net = small_net()
    handle = ls.load_model(net, input=(1, 12, 12))
    names = [layer.name for layer in handle.layers]
    assert {"conv", "relu", "fc"} <= set(names) and handle.layer("fc").units == 5
    assert handle.net is net or all(torch.equal(a, b) for a, b in zip(handle.net.state_dict().values(), net.state_dict().values()))
    with pytest.raises(Exception, match="input"):  # a module alone does not say what images it takes
        ls.load_model(small_net())
    res = ls.sample(net, "fc", [0, 3], chains=2, steps=30, seed=0, input=(1, 12, 12), progress=True)
    assert res.final_samples.shape == (2, 2, 1, 12, 12)
    act = np.asarray(res.activation)  # (unit, chain, step)
    assert (act[..., -1] > act[..., 0]).all()
    with torch.no_grad():  # the samples are scored by this very module
        again = net(torch.from_numpy(np.ascontiguousarray(res.final_samples[1])).float())[:, 3].numpy()
    np.testing.assert_allclose(again, act[1, :, -1], rtol=1e-4, atol=1e-4)
    err = capsys.readouterr().err
    assert "30/30" in err


FACTORY = '''
from collections import OrderedDict
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 3, 3, padding=1)), ("relu", nn.ReLU()),
                                      ("flat", nn.Flatten()), ("fc", nn.Linear(3 * 8 * 8, 4))]))
'''


@pytest.mark.fast
def test_a_factory_module_beside_the_spec_loads_from_any_folder_and_a_missing_one_names_the_folders(tmp_path, monkeypatch):
    jobs = tmp_path / "project" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "besidenet.py").write_text(FACTORY)
    spec = {"model": {"factory": "besidenet:build", "input": {"channels": 1, "height": 8, "width": 8}}, "layers": ["fc"]}
    (jobs / "job.yaml").write_text(yaml.safe_dump(spec))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the folder the loader adds is this test's only
    out = CliRunner().invoke(app, ["layers", str(jobs / "job.yaml"), "--json"])
    assert out.exit_code == 0, out.output
    assert [layer["name"] for layer in json.loads(out.stdout)["layers"]] == ["conv", "relu", "fc"]  # Flatten is not a layer of units
    spec["model"]["factory"] = "nosuchnet:build"
    (jobs / "missing.yaml").write_text(yaml.safe_dump(spec))
    out = CliRunner().invoke(app, ["layers", str(jobs / "missing.yaml")])
    assert out.exit_code == 2
    line = " ".join(out.stderr.split())
    assert "factory module 'nosuchnet' cannot be imported: no nosuchnet.py" in line
    assert str(jobs) in line and str(elsewhere) in line and "beside the job spec" in line
    (jobs / "brokennet.py").write_text("import nosuchdependency\n")  # found, but its own import fails
    spec["model"]["factory"] = "brokennet:build"
    (jobs / "broken.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ModelError, match="'brokennet' .* cannot be imported: No module named 'nosuchdependency'"):
        ls.load_model(ls.load_model_spec(jobs / "broken.yaml"))


@pytest.mark.fast
def test_a_discriminator_that_does_not_beat_chance_is_warned_about_once(digits_model, capsys):
    """An untrained D (2 updates at a learning rate of 1e-9) scores about chance on held-out images:
    ``train_discriminator`` warns once (WeakDiscriminatorWarning, naming its accuracy and lambda) and
    ``progress=True`` draws its bar."""
    from ldam_sweep.sampling.discriminator import WeakDiscriminatorWarning, train_discriminator

    x, _ = digits(28, "train")
    t, _ = digits(28, "test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = train_discriminator(digits_model, [("fc2", range(10))], x[:256], t[:128],
                                {"updates": 2, "lr": 1e-9, "eval_steps": 5, "steps_per_update": 2}, progress=True)
    weak = [w for w in caught if issubclass(w.category, WeakDiscriminatorWarning)]
    assert d.heldout_accuracy < 0.55 and len(weak) == 1
    assert f"{d.heldout_accuracy:.2f}" in str(weak[0].message) and "lambda 0.5" in str(weak[0].message)
    assert "training D" in capsys.readouterr().err


SWEEP_WITH_MODULE = '''
import sys
from collections import OrderedDict
import numpy as np, torch
from torch import nn
import ldam_sweep as ls

torch.manual_seed(7)  # random weights that exist only in this process: the workers must be sent them
net = nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 4, 3, padding=1)), ("relu", nn.ReLU()),
                                 ("pool", nn.AdaptiveAvgPool2d(2)), ("flat", nn.Flatten()), ("fc", nn.Linear(16, 3))]))
spec = {"model": {"input": {"channels": 1, "height": 10, "width": 10}}, "layers": ["fc"], "sampler": {"steps": 12, "chains": 2, "seed": 0},
        "resources": {"actors": 1, "block_size": 3}}
summary = ls.run_sweep(spec, sys.argv[1], model=net, num_cpus=2)
st = ls.open_store(sys.argv[1])
finals = np.stack([st.samples("fc", u)[:, -1] for u in range(3)])  # (unit, chain, C, H, W)
with torch.no_grad():
    acts = np.stack([net(torch.from_numpy(finals[u]).float())[:, u].numpy() for u in range(3)])
hits = ls.Finder(st, model=net).find(finals[2][:1], layer="fc", top=3).for_image(0)  # readers are given the module again
with torch.no_grad():
    direct = net(torch.from_numpy(finals[2][:1]).float())[0].numpy()
print(summary.units_done, st.model_spec().module, float(np.abs(acts - np.stack([st.unit("fc", u).activation[:, -1] for u in range(3)])).max()),
      len(hits), max(abs(h["activation"] - direct[h["unit"]]) for h in hits))
'''


def test_run_sweep_ships_a_live_module_to_the_workers(tmp_path, env):
    """``run_sweep(spec, store, model=module)`` (a real process, local Ray): the actors sample the
    module's own random weights (the stored final activations are that module's, to float16 rounding
    of the stored samples), and the store records the model as a module readers must be given again
    (``Finder(st, model=module)`` works; `find` without it says so)."""
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP_WITH_MODULE)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "m.zarr")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    done, module, error, hits, find_error = out.stdout.split()
    assert done == "3" and module == "torch.nn.modules.container.Sequential" and float(error) < 0.02
    assert int(hits) >= 1 and float(find_error) < 1e-4  # units whose reference is not positive are skipped
    assert not re.search(r"\b\w+\.(py|cc):\d+", out.stderr), out.stderr  # no Ray log line (the module is not a constructor argument)
    find = CliRunner().invoke(app, ["find", str(tmp_path / "m.zarr"), str(script)])
    assert find.exit_code == 2 and "live torch.nn.Module" in find.stderr


def test_factory_beside_the_spec_runs_a_sweep_from_another_folder(tmp_path, env):
    """`ldam-sweep run project/jobs/job.yaml` from the project's parent, the factory module beside the
    spec: the workers (other processes) import it too."""
    jobs = tmp_path / "project" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "sweepnet.py").write_text(textwrap.dedent(FACTORY))
    spec = {"model": {"factory": "sweepnet:build", "input": {"channels": 1, "height": 8, "width": 8}}, "layers": ["fc"],
            "sampler": {"steps": 8, "chains": 2, "seed": 0}, "resources": {"actors": 1, "block_size": 4}}
    (jobs / "job.yaml").write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, "-m", "ldam_sweep.cli", "run", "project/jobs/job.yaml", "--store", "s.zarr",
                          "--json"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["units_done"] == 4


def test_a_weak_discriminator_is_one_warning_line_in_run_and_recorded_in_status(finished_sweep):
    """SWEEP_SPEC trains D for 5 updates: it ends near chance. `run` said so in one warning line (and
    what λ then means); `status` shows it, and `status --json` records it."""
    spec, url, env = finished_sweep
    said = (spec.parent / "run.stderr").read_text()
    warned = [line for line in said.splitlines() if line.startswith("warning: ") and "discriminator" in line]
    acc = ls.open_store(url).discriminator_info()["heldout_accuracy"]
    assert acc < 0.55 and len(warned) == 1, said
    assert f"{acc:.2f}" in warned[0] and "lambda" in warned[0]
    out = CliRunner().invoke(app, ["status", url, "--json"], env={"COLUMNS": "200"})
    assert json.loads(out.stdout)["discriminator"] == {"heldout_accuracy": pytest.approx(acc), "weak": True}
    text = CliRunner().invoke(app, ["status", url], env={"COLUMNS": "200"}).stdout
    assert re.search(r"discriminator: held-out accuracy [0-9.]+ \(0\.5 = chance\) -- weak", text), text
