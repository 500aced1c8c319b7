"""The batched LDAM samplers on the real digits model: activation, noise, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ldam_sweep as ls
from ldam_sweep.sampling import langevin, noise
from ldam_sweep.settings import REFERENCE_LDAM, parse_options
from ldam_sweep.objectives import DEFAULT_BY_KIND, OBJECTIVES, unit_objective, units_objective

pytestmark = pytest.mark.fast  # the whole file is in the quick tier (make test-fast)


def _mix32_reference(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_integer_hash_matches_exact_32bit_arithmetic():
    rng = np.random.default_rng(0)
    vals = [0, 1, 0xFFFFFFFF, 0x80000000, *rng.integers(0, 2**32, 200).tolist()]
    as_i32 = torch.tensor([v - 2**32 if v >= 2**31 else v for v in vals], dtype=torch.int32)
    got = (noise.mix32(as_i32).to(torch.int64) & 0xFFFFFFFF).tolist()
    assert got == [_mix32_reference(v) for v in vals]


def test_noise_streams_are_pinned_across_versions():
    """A store's chains must be re-runnable by later versions: the uniform streams are exact integer
    arithmetic and pinned bit for bit (digest from the original int64 implementation; the int32
    rewrite matches it); the normals are Box-Muller of those uniforms, whose log/cos/sin may round
    differently across CPUs and GPUs, so they are checked against a float64 recomputation."""
    import hashlib
    import math

    keys = noise.chain_keys(0, "conv2", np.arange(3), 2)
    u = noise.uniform(keys, 0, (1, 7, 7)).numpy()
    assert hashlib.sha256(u.tobytes()).hexdigest() == "fee75729c7fab102c591520e8fa7fef0f9fd9f74c1adc4ea2bf0f73977f4ecb3"
    n, half = 49, 25
    u1 = noise.uniform(keys, 5, (half,)).double()  # lane 0 of draw 5 feeds r, lane 1 feeds theta
    u2 = noise._unit_interval(noise._bits(keys, 5, half, 1)).double()
    r, theta = torch.sqrt(-2.0 * torch.log(u1)), 2.0 * math.pi * u2
    expect = torch.cat((r * torch.cos(theta), r * torch.sin(theta)), dim=1)[:, :n].reshape(6, 1, 7, 7)
    assert torch.allclose(noise.normal(keys, 5, (1, 7, 7)).double(), expect, atol=1e-5)


def test_a_normal_stream_gives_each_draw_bit_equal_to_normal():
    """The sampler hashes several draws at once (fewer small ops per step); every draw must stay
    the exact bits of ``normal``, across refills and at the run's end, for odd sizes too."""
    keys = noise.chain_keys(3, "conv2", np.arange(5), 3)  # 15 chains
    shape = (3, 7, 9)  # 189 values: an odd half for Box-Muller
    stream = noise.NormalStream(keys, shape, last_draw=40, budget=6 * 2 * 4 * 95 * 15)
    assert stream.ahead == 6
    for draw in range(1, 41):
        assert torch.equal(stream(draw), noise.normal(keys, draw, shape)), draw
    assert len(stream.bits[0]) == 4  # the last refill stops at the run's last draw (37..40)
    one = noise.NormalStream(keys, shape, last_draw=40, budget=1)
    assert one.ahead == 1 and torch.equal(one(7), noise.normal(keys, 7, shape))


def test_per_chain_noise_is_standard_normal_and_independent():
    keys = noise.chain_keys(0, "fc2", np.arange(4), 2)
    z = noise.normal(keys, 1, (50_000,))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z.abs() > 1.96).float().mean()) - 0.05) < 0.005
    corr = np.corrcoef(z.numpy())
    assert np.abs(corr - np.eye(8)).max() < 0.03
    u = noise.uniform(keys, 0, (50_000,))
    assert float(u.min()) > 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.005
    # a chain's stream depends only on its key and the draw: not on the other rows
    assert torch.equal(noise.normal(keys[3:4], 1, (50_000,)), z[3:4])
    assert not torch.equal(noise.normal(keys, 2, (50_000,)), z)


def test_objectives_are_one_gather_equal_to_a_per_element_loop():
    torch.manual_seed(0)
    conv = torch.randn(6, 5, 7, 6)
    lin = torch.randn(6, 9)
    units = torch.tensor([4, 0, 2, 2, 1, 3])
    ref_channel = torch.stack([conv[i, u].mean() for i, u in enumerate(units)])
    ref_neuron = torch.stack([conv[i, u, 3, 3] for i, u in enumerate(units)])
    ref_unit = torch.stack([lin[i, u] for i, u in enumerate(units)])
    assert torch.allclose(unit_objective(conv, units, "channel"), ref_channel)
    assert torch.equal(unit_objective(conv, units, "neuron"), ref_neuron)
    assert torch.equal(unit_objective(lin, units, "unit"), ref_unit)
    assert torch.equal(unit_objective(lin, units, "logit"), ref_unit)


def test_token_objectives_read_the_tokens_a_person_would_name():
    """(B, T, D) outputs of a ViT with a class token and a 3x4 patch grid (T = 13): token_mean
    averages all tokens, cls reads token 0, token the grid's centre (row 1, col 2 -> 1 + 1*4 + 2),
    token:R,C a grid position and token:N a sequence index; bad positions name what is allowed."""
    from ldam_sweep.errors import SamplerError
    from ldam_sweep.objectives import check_objective, token_geometry

    torch.manual_seed(0)
    tokens = torch.randn(6, 13, 5)  # as the module returns it
    acts = tokens.transpose(1, 2)  # unit-first, as ModelHandle.activations gives it
    units = torch.tensor([4, 0, 2, 2, 1, 3])
    geo = token_geometry(13, height=30, width=40)  # 3 x 4 patches of 10 px, plus one class token
    assert (geo.prefix, geo.grid, geo.has_cls) == (1, (3, 4), True)
    rows = torch.arange(6)
    assert torch.allclose(unit_objective(acts, units, "token_mean"), tokens[rows, :, units].mean(1))
    assert torch.equal(unit_objective(acts, units, check_objective("cls", "token", "b", geo)), tokens[rows, 0, units])
    assert check_objective("token", "token", "b", geo) == "token:7"
    assert check_objective("token:2,3", "token", "b", geo) == "token:12"
    assert check_objective("token:5", "token", "b", geo) == "token:5"
    assert torch.equal(unit_objective(acts, units, "token:12"), tokens[rows, 12, units])
    no_cls = token_geometry(12, height=30, width=40)
    assert (no_cls.prefix, no_cls.grid, no_cls.has_cls) == (0, (3, 4), False)
    for bad, words in (("token:3,0", "outside the 3x4 patch grid"), ("token:13", "tokens 0..12"),
                       ("token:a", "token:ROW,COL"), ("cls:1", "takes no parameter"), ("channel", "allowed: token_mean")):
        with pytest.raises(SamplerError, match=words):
            check_objective(bad, "token", "b", geo)
    with pytest.raises(SamplerError, match="no class token"):
        check_objective("cls", "token", "b", no_cls)


def test_every_objective_of_the_table_scores_a_unit_alike_for_sampling_and_exemplars():
    """The sampler's one-gather objective and the exemplar ranking give the same floats for every
    table entry and layer kind, and every kind's default is an entry that applies to it."""
    torch.manual_seed(0)
    outputs = {"conv": torch.randn(6, 5, 7, 6).contiguous(memory_format=torch.channels_last),
               "linear": torch.randn(6, 9), "logit": torch.randn(6, 9),
               "token": torch.randn(6, 10, 9).transpose(1, 2)}  # (B, T, D) read unit-first, as the handle does
    units = torch.tensor([4, 0, 2, 2, 1, 3])
    for name, obj in OBJECTIVES.items():
        for kind in obj.kinds:
            acts = outputs[kind]
            ranked = torch.stack([units_objective(acts[i : i + 1], units[i : i + 1], name)[0, 0] for i in range(6)])
            assert torch.equal(unit_objective(acts, units, name), ranked), (name, kind)
    assert set(DEFAULT_BY_KIND) == set(outputs)
    assert all(kind in OBJECTIVES[name].kinds for kind, name in DEFAULT_BY_KIND.items())


def test_update_rules_and_method_settings_name_the_same_methods():
    from ldam_sweep.sampling.langevin import RULES
    from ldam_sweep.settings import METHODS

    assert list(RULES) == list(METHODS)
    for name, rule in RULES.items():
        assert rule.options_type is METHODS[name]


def test_job_spec_methods_and_objectives_come_from_the_tables(digits_model):
    from ldam_sweep.planning import job_objectives
    from ldam_sweep.spec import parse_job

    job = parse_job({"model": {"zoo": "digits-cnn"}, "sampler": {"method": "am"},
                     "objective": {"conv": "neuron", "logit": "unit"}})
    assert job.sampler.method == "am" and job.objective == {"conv": "neuron", "logit": "unit"}
    with pytest.raises(ls.SpecError, match=r"sampler.method: unknown method 'mala'; allowed: ldam, sgld, am"):
        parse_job({"model": {"zoo": "digits-cnn"}, "sampler": {"method": "mala"}})
    with pytest.raises(ls.SpecError, match=r"objective 'unit' does not apply to conv layers; allowed for conv: channel, neuron"):
        parse_job({"model": {"zoo": "digits-cnn"}, "objective": {"conv": "unit"}})
    with pytest.raises(ls.SpecError, match=r"unknown objective 'maxpool' for layer 'pool1'; objectives: channel, cls,"):
        parse_job({"model": {"zoo": "digits-cnn"}, "objective": {"pool1": "maxpool"}})
    # a layer's own entry wins over its kind's, and is checked against the layer once the model is known
    job = parse_job({"model": {"zoo": "digits-cnn"}, "objective": {"conv": "neuron", "conv2": "channel", "fc1": "unit"}})
    assert job_objectives(job, digits_model) == {"conv1": "neuron", "relu1": "neuron", "pool1": "neuron",
                                                  "conv2": "channel", "relu2": "neuron", "pool2": "neuron",
                                                  "fc1": "unit", "relu3": "unit", "fc2": "logit"}
    with pytest.raises(ls.SpecError, match=r"objective: objective 'cls' does not apply to conv layer 'conv2'"):
        job_objectives(parse_job({"model": {"zoo": "digits-cnn"}, "objective": {"conv2": "cls"}}), digits_model)
    with pytest.raises(ls.SpecError, match=r"objective.fc3: .*unknown layer 'fc3'"):
        job_objectives(parse_job({"model": {"zoo": "digits-cnn"}, "objective": {"fc3": "unit"}}), digits_model)


def test_ldam_logits_exceed_the_best_real_digit(digits_model, real_max_logits):
    res = ls.sample(digits_model, "fc2", range(10), chains=8, steps=300, seed=0)
    assert res.samples.shape == (10, 8, 4, 1, 28, 28)
    assert res.activation.shape == (10, 8, 301)
    mean_final = res.final_activation.mean(axis=1)
    # every class: the mean over chains beats the largest logit any real test digit gives it
    assert (mean_final > real_max_logits).all(), (mean_final, real_max_logits)
    # and the chains started far below it: the sampler did the work
    assert (res.activation[:, :, 0].mean(axis=1) < real_max_logits).all()
    with torch.no_grad():
        pred = digits_model.forward(torch.from_numpy(res.final_samples.reshape(-1, 1, 28, 28))).argmax(1)
    assert (pred.numpy().reshape(10, 8) == np.arange(10)[:, None]).mean() == 1.0


def test_snapshots_and_traces_agree(digits_model):
    res = ls.sample(digits_model, "conv2", [3, 7], chains=3, steps=40, snapshot_every=15)
    assert res.snapshot_steps.tolist() == [15, 30, 40]
    assert res.samples.shape == (2, 3, 3, 1, 28, 28)
    x = torch.from_numpy(res.final_samples.reshape(-1, 1, 28, 28))
    with torch.no_grad():
        acts = digits_model.activations(x, "conv2").mean(dim=(2, 3))
    expected = acts[torch.arange(6), torch.tensor([3, 3, 3, 7, 7, 7])].numpy().reshape(2, 3)
    assert np.allclose(res.final_activation, expected, atol=1e-5)
    lo, hi = digits_model.input.range
    assert res.samples.min() >= lo and res.samples.max() <= hi


@pytest.mark.parametrize("method", ["ldam", "sgld"])
def test_noise_makes_chains_of_one_start_differ(digits_model, method):
    start = np.full((1, 28, 28), 0.5, dtype=np.float32)
    res = ls.sample(digits_model, "fc2", [3], chains=4, steps=100, method=method, init=start)
    final = res.final_samples[0].reshape(4, -1)
    gaps = [np.sqrt(((final[i] - final[j]) ** 2).mean()) for i in range(4) for j in range(i + 1, 4)]
    assert min(gaps) > 1e-3


def test_zero_noise_same_start_gives_identical_chains(digits_model):
    start = np.full((1, 28, 28), 0.5, dtype=np.float32)
    res = ls.sample(digits_model, "fc2", [3, 8], chains=4, steps=100, noise=0.0, init=start)
    for u in range(2):
        assert np.array_equal(res.samples[u], np.broadcast_to(res.samples[u, :1], res.samples[u].shape))
    assert not np.array_equal(res.samples[0, 0], res.samples[1, 0])  # different units, different images


@pytest.mark.parametrize("method", ["ldam", "sgld"])
@pytest.mark.parametrize("layer", ["conv2", "fc1"])
def test_unit_alone_equals_unit_inside_a_block_of_16(digits_model, method, layer):
    block = ls.sample(digits_model, layer, list(range(16)), chains=4, steps=50, method=method, seed=3)
    alone = ls.sample(digits_model, layer, [11], chains=4, steps=50, method=method, seed=3)
    assert np.abs(block.samples[11] - alone.samples[0]).max() <= 1e-4
    assert np.abs(block.activation[11] - alone.activation[0]).max() <= 1e-4 * max(1.0, np.abs(alone.activation).max())
    reordered = ls.sample(digits_model, layer, [11, 2], chains=4, steps=50, method=method, seed=3)
    assert np.abs(reordered.samples[0] - alone.samples[0]).max() <= 1e-4
    assert np.abs(reordered.samples[1] - block.samples[2]).max() <= 1e-4


def test_seed_controls_everything(digits_model):
    a = ls.sample(digits_model, "fc1", [1, 2], chains=2, steps=20, seed=5)
    b = ls.sample(digits_model, "fc1", [1, 2], chains=2, steps=20, seed=5)
    c = ls.sample(digits_model, "fc1", [1, 2], chains=2, steps=20, seed=6)
    assert np.array_equal(a.samples, b.samples) and np.array_equal(a.activation, b.activation)
    assert not np.allclose(a.samples, c.samples)


def test_one_batched_forward_per_step_for_the_whole_block(digits_model):
    calls = {"conv1": 0, "fc1": 0}
    mods = dict(digits_model.net.named_modules())

    def count(name):
        def pre(_m, _i):
            calls[name] += 1
        return pre

    hs = [mods[n].register_forward_pre_hook(count(n)) for n in calls]
    try:
        ls.sample(digits_model, "conv2", list(range(16)), chains=4, steps=25)
    finally:
        for h in hs:
            h.remove()
    assert calls == {"conv1": 27, "fc1": 0}  # the dead-unit probe, 25 steps, the final evaluation; never past conv2


def test_no_host_synchronisation_inside_the_step_loop(digits_model, monkeypatch):
    """Every way a tensor's value reaches the host raises inside run_chains: traces stay on the device."""
    from ldam_sweep.sampling import chains as chains_mod
    from ldam_sweep.sampling import langevin

    real_run = langevin.run_chains

    def guarded(*args, **kwargs):
        def refuse(*_a, **_k):
            raise AssertionError("host synchronisation inside the Langevin loop")

        with monkeypatch.context() as m:
            for attr in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
                m.setattr(torch.Tensor, attr, refuse)
            return real_run(*args, **kwargs)

    monkeypatch.setattr(chains_mod, "run_chains", guarded)
    res = ls.sample(digits_model, "fc2", [0, 1], chains=2, steps=10, method="ldam")
    assert res.activation.shape == (2, 2, 11)
    res = ls.sample(digits_model, "fc2", [0, 1], chains=2, steps=10, method="sgld", step_decay=0.5)
    assert np.isfinite(res.activation).all()
    ex = np.random.default_rng(0).uniform(0, 1, (2, 5, 1, 28, 28)).astype(np.float32)
    res = ls.sample(digits_model, "fc2", [0, 1], chains=3, steps=10, lam=0.5, discriminator=_smooth_log_d, exemplars=ex)
    assert np.isfinite(res.activation).all()


def test_realism_term_accepts_any_callable(digits_model):
    """A stand-in log D that prefers one target image: at lam=1 the chains go to it; at lam=0
    the trace is recorded but the update ignores it."""
    target = torch.zeros(1, 1, 28, 28)
    target[..., 8:20, 12:16] = 1.0

    def log_d(x):
        return -((x - target) ** 2).flatten(1).sum(1)

    far = ls.sample(digits_model, "fc2", [4], chains=2, steps=150, lam=0.0, discriminator=log_d)
    near = ls.sample(digits_model, "fc2", [4], chains=2, steps=150, lam=1.0, discriminator=log_d, l2=0.0)
    assert far.realism is not None and far.realism.shape == (1, 2, 151)
    assert near.realism[..., -1].mean() > far.realism[..., -1].mean() + 50
    assert np.abs(near.final_samples - target.numpy()).mean() < 0.05
    half = ls.sample(digits_model, "fc2", [4], chains=2, steps=150, method="sgld", lam=0.5, discriminator=log_d)
    assert half.realism[..., -1].mean() > far.realism[..., -1].mean()


def test_init_one_image_per_unit_and_chain(digits_model):
    rng = np.random.default_rng(0)
    init = rng.uniform(0, 1, (2, 3, 1, 28, 28)).astype(np.float32)
    res = ls.sample(digits_model, "fc2", [1, 2], chains=3, steps=1, noise=0.0, init=init)
    assert res.activation.shape == (2, 3, 2)
    with torch.no_grad():
        start = digits_model.forward(torch.from_numpy(init.reshape(6, 1, 28, 28)))
    assert np.allclose(res.activation[:, :, 0].reshape(-1), start[torch.arange(6), torch.tensor([1, 1, 1, 2, 2, 2])].numpy(), atol=1e-5)


def test_bad_sampler_input_is_a_clear_error(digits_model):
    with pytest.raises(ls.SamplerError, match="needs a discriminator"):
        ls.sample(digits_model, "fc2", [0], lam=0.5)
    with pytest.raises(ls.SamplerError, match=r"step_sise: unknown option.*Allowed options for ldam: step_size"):
        ls.sample(digits_model, "fc2", [0], step_sise=0.1)
    with pytest.raises(ls.SamplerError, match=r"temperature: .*greater than 0"):
        ls.sample(digits_model, "fc2", [0], method="sgld", temperature=0)
    with pytest.raises(ls.SamplerError, match="unknown method 'mala'; allowed: ldam, sgld"):
        ls.sample(digits_model, "fc2", [0], method="mala")
    with pytest.raises(ls.SamplerError, match=r"init array has shape \(28, 28\)"):
        ls.sample(digits_model, "fc2", [0], init=np.zeros((28, 28), dtype=np.float32))
    with pytest.raises(ls.SamplerError, match=r"inside the model's pixel range \[0.0, 1.0\]"):
        ls.sample(digits_model, "fc2", [0], init=np.full((1, 28, 28), 2.0, dtype=np.float32))
    with pytest.raises(ls.SamplerError, match=r"objective 'neuron' does not apply to linear layer 'fc1'; allowed: unit"):
        ls.sample(digits_model, "fc1", [0], objective="neuron")
    with pytest.raises(ls.SamplerError, match=r"discriminator must return log D\(x\) of shape \(2,\)"):
        ls.sample(digits_model, "fc2", [0], chains=2, steps=2, lam=0.5, discriminator=lambda x: x.sum())
    with pytest.raises(ls.SamplerError, match="lam must be in"):
        ls.sample(digits_model, "fc2", [0], lam=1.5, discriminator=lambda x: x.sum((1, 2, 3)))
    with pytest.raises(ls.LayerError, match="unknown layer"):
        ls.sample(digits_model, "fc9", [0])
    with pytest.raises(ls.SamplerError, match="chains must be a positive integer"):
        ls.sample(digits_model, "fc2", [0], chains=0)


def _smooth_log_d(x: torch.Tensor) -> torch.Tensor:
    """A differentiable stand-in for log D (higher for images near mid-grey with a bright centre)."""
    return -((x - 0.5) ** 2).mean(dim=(1, 2, 3)) + x[:, :, 10:18, 10:18].mean(dim=(1, 2, 3))


class _ReferenceLdamRule(langevin.LdamRule):
    """The ldam step as it was before the repulsion and the relative eps (the paper's reference
    form), verbatim: ``repel=0`` with the old eps must reproduce it bit for bit."""

    def step(self, s):
        o = self.options
        xi = s.noise()
        g_a, g_d = s.grads()
        x = s.x.detach()
        rho = o.rms_decay
        self.v_a.mul_(rho).addcmul_(g_a, g_a, value=1 - rho)
        step = g_a.div_(torch.sqrt(self.v_a + o.eps)).mul_(1 - s.lam)
        if g_d is not None:
            if self.v_d is None:
                self.v_d = torch.zeros_like(x)
            self.v_d.mul_(rho).addcmul_(g_d, g_d, value=1 - rho)
            step.add_(g_d.div_(torch.sqrt(self.v_d + o.eps)), alpha=s.lam)
        tb = s.t % o.noise_block
        step.add_(xi, alpha=o.noise / (1.0 + tb * tb))
        step.add_(x, alpha=-2.0 * o.l2)
        self.m.mul_(o.momentum).add_(step, alpha=1 - o.momentum)
        return (x + o.step_size * self.m).clamp_(*s.box)


REFERENCE_FORM = REFERENCE_LDAM  # repel 0, eps 1e-8, no preconditioner, no target, log D normalised by itself, L2 0.1


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_repel_0_with_the_old_eps_is_the_reference_form_bit_for_bit(digits_model, monkeypatch, lam):
    kw = dict(chains=3, steps=120, lam=lam, discriminator=_smooth_log_d, seed=4, **REFERENCE_FORM)
    ex = np.random.default_rng(1).uniform(0, 1, (2, 4, 1, 28, 28)).astype(np.float32)
    now = ls.sample(digits_model, "fc2", [2, 7], init="uniform", exemplars=ex, **kw)  # exemplars only size the kernel
    monkeypatch.setitem(langevin.RULES, "ldam", _ReferenceLdamRule)
    before = ls.sample(digits_model, "fc2", [2, 7], **kw)
    assert np.array_equal(now.samples, before.samples) and np.array_equal(now.activation, before.activation)
    assert np.array_equal(now.realism, before.realism)


def test_exemplar_starts_cycle_through_each_units_own_exemplars(digits_model):
    ex = np.random.default_rng(2).uniform(0, 1, (2, 3, 1, 28, 28)).astype(np.float32)
    ex[1, 2] = np.nan  # unit 1 has only 2 real images (top_exemplars pads with NaN)
    res = ls.sample(digits_model, "fc2", [4, 9], chains=5, steps=1, exemplars=ex, noise=0.0)
    with torch.no_grad():
        logits = digits_model.forward(torch.from_numpy(np.stack([ex[0, [0, 1, 2, 0, 1]], ex[1, [0, 1, 0, 1, 0]]]).reshape(10, 1, 28, 28)))
    expect = logits[torch.arange(10), torch.tensor([4] * 5 + [9] * 5)].numpy().reshape(2, 5)
    assert np.allclose(res.activation[:, :, 0], expect, atol=1e-5)
    with pytest.raises(ls.SamplerError, match="init='exemplars' needs"):
        ls.sample(digits_model, "fc2", [4], chains=2, steps=1, init="exemplars")
    with pytest.raises(ls.SamplerError, match=r"exemplars have shape \(1, 3, 1, 28, 28\)"):
        ls.sample(digits_model, "fc2", [4, 9], chains=2, steps=1, exemplars=ex[:1])
    with pytest.raises(ls.SamplerError, match="eps and eps_rel are both 0"):
        ls.sample(digits_model, "fc2", [4], chains=2, steps=1, eps=0.0, eps_rel=0.0)


class _Scaled(torch.nn.Module):
    def __init__(self, fn, k: float) -> None:
        super().__init__()
        self.fn, self.k = fn, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.k * self.fn(x)


def _run(digits_model, method: str, k_act: float, k_d: float, steps: int = 150, **options) -> torch.Tensor:
    """Final states of 2 fc2 units x 3 chains with the activation scaled by k_act and log D by k_d."""
    units = np.array([1, 8])
    keys = noise.chain_keys(0, "fc2", units, 3)
    idx = torch.from_numpy(np.repeat(units, 3))
    x0 = noise.uniform(keys, 0, (1, 28, 28))
    out = langevin.run_chains(
        _Scaled(lambda x: unit_objective(digits_model.activations(x, "fc2"), idx, "logit"), k_act), x0, keys,
        steps=steps, method=method, options=parse_options(method, options), box=(0.0, 1.0),
        snapshot_steps=[steps], chains=3, lam=0.5, log_d=_Scaled(_smooth_log_d, k_d))
    return out.snapshots[-1]


def off_pixels(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> float:
    """Fraction of pixels on which two runs' final states differ by more than ``tol``."""
    return float(((a - b).abs() > tol).float().mean())


@pytest.mark.parametrize("k", [1e-8, 1e-4, 1e4, 1e8])
def test_ldam_trajectory_is_invariant_to_the_scale_of_the_activation_and_of_log_d(digits_model, k):
    """Up to float rounding. The activation's scale never matters. log D's does by default
    (realism_scale: logit): it is a log-probability, and 1 - D decides how hard the realism term pushes;
    with realism_scale: log_d (the reference form's normalisation) it does not. Measured after 30 steps
    on six trainings of digits-cnn (recipe seeds 0-5), reference normalisation: a mean difference
    <= 1.2e-6 and, in most runs, a largest one <= 2.7e-6; in some, a 1-ulp difference met a clipping or
    ReLU kink and 8-10 of the 4704 pixels ended ~1e-3 apart. The default (no L2 term) meets more kinks:
    a mean difference of 1.25e-5 and 1.8% of the pixels > 1e-4 apart at k = 1e-4 and 1e8. Without the invariance (the reference form's
    absolute eps, test below) 99% of the pixels move, by 0.1 on average. (The power-of-two test below
    checks the long run bit for bit.)"""
    base = _run(digits_model, "ldam", 1.0, 1.0, steps=30)
    scaled = _run(digits_model, "ldam", k, 1.0, steps=30)
    assert (scaled - base).abs().mean() < 5e-5 and off_pixels(scaled, base) <= 0.03
    base = _run(digits_model, "ldam", 1.0, 1.0, steps=30, realism_scale="log_d")
    for scaled in (_run(digits_model, "ldam", k, 1.0, steps=30, realism_scale="log_d"),
                   _run(digits_model, "ldam", 1.0, k, steps=30, realism_scale="log_d")):
        assert (scaled - base).abs().mean() < 1e-5 and off_pixels(scaled, base) <= 0.01


@pytest.mark.parametrize("k", [2.0**-27, 2.0**27])
def test_ldam_trajectory_is_exactly_invariant_to_power_of_two_scales(digits_model, k):
    """k = 2^±27 (~1e∓8) scales every gradient without rounding: the whole run is bit for bit the same."""
    assert torch.equal(_run(digits_model, "ldam", k, 1.0), _run(digits_model, "ldam", 1.0, 1.0))
    base = _run(digits_model, "ldam", 1.0, 1.0, realism_scale="log_d")
    assert torch.equal(_run(digits_model, "ldam", k, k, realism_scale="log_d"), base)


def test_ldam_reference_eps_is_not_scale_invariant(digits_model):
    """Why eps_rel exists: with the absolute eps, a tiny activation's gradient drowns in it."""
    base = _run(digits_model, "ldam", 1.0, 1.0, steps=30, **REFERENCE_FORM)
    scaled = _run(digits_model, "ldam", 1e-8, 1.0, steps=30, **REFERENCE_FORM)
    assert (scaled - base).abs().mean() > 0.05 and off_pixels(scaled, base) >= 0.5  # seeds 0-5: mean 0.099-0.106, 99% of pixels


@pytest.mark.parametrize("k", [1e-3, 1e3])
def test_sgld_scaling_the_energy_by_k_is_dividing_temperature_and_l2_by_k(digits_model, k):
    """sgld is not scale invariant by design: a -> k a (and log D -> k log D) is T -> T / k, c -> c / k."""
    opts = {"temperature": 0.01, "l2": 0.1}
    base = _run(digits_model, "sgld", 1.0, 1.0, **opts)
    scaled = _run(digits_model, "sgld", k, k, **opts)
    same = _run(digits_model, "sgld", 1.0, 1.0, temperature=0.01 / k, l2=0.1 / k)
    # equal up to rounding: over 150 steps at T = 1e-5 a rounding difference can send a pixel to the other
    # bound (seeds 0-5 of digits-cnn: 0-179 of 4704 pixels, mean difference <= 0.016); the unscaled
    # run differs everywhere (>= 94% of pixels, mean >= 0.09)
    assert (scaled - same).abs().mean() < 0.1 * (scaled - base).abs().mean()
    assert off_pixels(scaled, same) <= 0.1 and off_pixels(scaled, base) >= 0.5


@pytest.mark.fast
def test_parsed_options_sample_as_keywords_do_and_a_mismatch_is_refused(digits_model):
    """The typed boundary: a sweep parses the method's options once (SamplerPlan) and hands the
    object to sample(); it gives exactly what the same settings as keywords give."""
    from ldam_sweep.sampling import LdamOptions
    from ldam_sweep.settings import REFERENCE_LDAM

    typed = ls.sample(digits_model, "fc2", [1, 2], chains=2, steps=5, options=LdamOptions(**REFERENCE_LDAM))
    keywords = ls.sample(digits_model, "fc2", [1, 2], chains=2, steps=5, **REFERENCE_LDAM)
    np.testing.assert_array_equal(typed.samples, keywords.samples)
    assert typed.options == keywords.options
    with pytest.raises(ls.SamplerError, match="method 'sgld' takes SgldOptions"):
        ls.sample(digits_model, "fc2", [1], chains=2, steps=5, method="sgld", options=LdamOptions())
    with pytest.raises(ls.SamplerError, match="not both"):
        ls.sample(digits_model, "fc2", [1], chains=2, steps=5, options=LdamOptions(), noise=0.2)
