"""``walk``: annealed Langevin on a denoising score prior (docs/method.md, "Walks on a score prior").
The prior is really trained on the digits; the claims are measured against baselines that could
beat them: the default ascent from the same starts (moves less) and the same kick without the prior
(moves as far, lands off the data)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import ldam_sweep as ls
from ldam_sweep.data import digits
from ldam_sweep.errors import SamplerError
from ldam_sweep.sampling.exemplars import top_exemplars

# a smaller prior than the default (hidden 1024, 16,000 steps: ~6 min on 2 cores) keeps the test short
QUICK = {"hidden": 256, "steps": 1500}


@pytest.fixture(scope="module")
def train():
    return digits(28, "train")[0]


@pytest.fixture(scope="module")
def prior(train):
    return ls.train_score_prior(train, **QUICK)


def _rms(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a.astype(np.float64) - b) ** 2).reshape(*a.shape[:-3], -1).mean(-1))


@pytest.mark.fast
def test_prior_subspace_holds_the_digits_and_round_trips_without_code(train, tmp_path):
    """The digits (8x8 upsampled) lie in a 64-dim span: image(coords(x)) gives them back; noise of
    sigma in z moves an image by an RMS of sigma per pixel; save/load keeps the model (weights_only),
    and a file that would run code is refused."""
    p = ls.train_score_prior(train, steps=20, hidden=32)
    x = torch.from_numpy(train[:64])
    assert p.components == 64
    assert torch.allclose(p.image(p.coords(x)), x, atol=1e-4)
    xi = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    moved = p.image(p.coords(x[:1]) + 0.1 * xi) - x[:1]
    assert abs(float(moved.pow(2).mean().sqrt()) - 0.1) < 0.01
    path = p.save(tmp_path / "prior.pt")
    q = ls.load_score_prior(path)
    z = p.coords(x[:8])
    assert torch.equal(q(z, 0.1), p(z, 0.1)) and q.record["steps"] == 20
    evil = tmp_path / "evil.pt"
    torch.save({"format": "ldam-sweep-score-prior-1", "config": _Boom()}, evil)
    with pytest.raises(SamplerError, match=r"cannot be read: it holds pickled Python objects \(exec\)"):
        ls.load_score_prior(evil)
    evil.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(SamplerError, match="cannot be read: it is not a file torch.save wrote"):
        ls.load_score_prior(evil)
    with pytest.raises(SamplerError, match="at least 32"):
        ls.train_score_prior(train[:10])
    rng = torch.get_rng_state()
    ls.train_score_prior(torch.from_numpy(train), steps=2, hidden=8)  # a tensor is taken too
    ls.load_score_prior(path)
    assert torch.equal(torch.get_rng_state(), rng)  # training and loading leave the caller's random state alone
    torch.save({"format": "ldam-sweep-score-prior-1"}, tmp_path / "partial.pt")
    with pytest.raises(SamplerError, match="incomplete"):
        ls.load_score_prior(tmp_path / "partial.pt")


class _Boom:
    def __reduce__(self):  # unpickling would call this: weights_only must refuse it
        return (exec, ("raise SystemExit('code ran')",))


@pytest.mark.fast
def test_walk_refuses_what_it_cannot_use(digits_model, train):
    prior = ls.train_score_prior(train, steps=5, hidden=16)
    with pytest.raises(SamplerError, match="needs a score prior"):
        ls.sample(digits_model, "fc2", [0], method="walk", steps=2)
    from ldam_sweep.settings import DiscriminatorSettings

    with pytest.raises(ValueError, match="stage 1's chains run one of ldam, sgld, am"):
        DiscriminatorSettings(method="walk")
    with pytest.raises(SamplerError, match="use lam=0"):
        ls.sample(digits_model, "fc2", [0], method="walk", steps=2, prior=prior, lam=0.5,
                  discriminator=lambda x: torch.zeros(len(x)))
    with pytest.raises(SamplerError, match="does not use it"):
        ls.sample(digits_model, "fc2", [0], steps=2, prior=prior)
    with pytest.raises(SamplerError, match="sigma_min"):
        ls.sample(digits_model, "fc2", [0], method="walk", steps=2, prior=prior, sigma_min=0.5, sigma_max=0.1)
    with pytest.raises(SamplerError, match=r"must lie in \[0.005, 1.0\]"):
        ls.sample(digits_model, "fc2", [0], method="walk", steps=2, prior=prior, sigma_max=2.0)
    with pytest.raises(SamplerError, match="walks from real images"):
        ls.sample(digits_model, "fc2", [0], method="walk", steps=2, prior=prior)  # no exemplars: uniform starts
    other = ls.train_score_prior(digits(16, "train")[0], steps=5, hidden=16)
    with pytest.raises(SamplerError, match=r"for images \(1, 16, 16\)"):
        ls.sample(digits_model, "fc2", [0], method="walk", steps=2, prior=other)


def test_walk_moves_further_than_the_ascent_and_stays_on_the_data(digits_model, prior, train):
    """From the same starts on fc2 (10 logits x 8 chains): the walk moves ~3x as far as the default
    ascent and reaches the unit's best real activation; the same kick without the prior moves as far
    but lands off the data (a classifier tells it from real digits, more high-frequency energy); another seed
    gives other samples (the noise matters)."""
    from ldam_sweep.sampling.realism import hf_energy, two_sample_test

    pool = torch.from_numpy(train)
    ex, exv = top_exemplars(digits_model, "fc2", np.arange(10), "logit", pool, 64)
    walk = ls.sample(digits_model, "fc2", range(10), method="walk", prior=prior, exemplars=ex)
    ascent = ls.sample(digits_model, "fc2", range(10), exemplars=ex, preconditioner=pool)
    assert np.array_equal(walk.starts, ascent.starts)  # the same diverse real starts
    move_walk = np.median(_rms(walk.final_samples, walk.starts))
    move_ascent = np.median(_rms(ascent.final_samples, ascent.starts))
    ratio = walk.final_activation / exv[:, :1]
    print(f"move: walk {move_walk:.3f}, ascent {move_ascent:.3f}; activation / best real: median {np.median(ratio):.3f}")
    assert move_walk > 0.12 and move_walk > 2 * move_ascent
    assert np.mean(ratio >= 0.99) > 0.8

    # the baseline: noise of the walk's move (RMS) in the same subspace, no prior
    keys = torch.Generator().manual_seed(1)
    z = prior.coords(torch.from_numpy(walk.starts.reshape(-1, 1, 28, 28)))
    kicked = prior.image(z + move_walk * torch.randn(z.shape, generator=keys)).clamp(0, 1).numpy()
    fin = walk.final_samples.reshape(-1, 1, 28, 28)
    real = digits(28, "test")[0]
    ts_walk, ts_kick = (two_sample_test(v, real[: len(v)], seed=0).accuracy for v in (fin, kicked))
    hf_walk, hf_kick = (float(hf_energy(v).mean() / hf_energy(real).mean()) for v in (fin, kicked))
    print(f"two-sample: walk {ts_walk:.2f}, noise alone {ts_kick:.2f}; HF walk {hf_walk:.2f}, noise {hf_kick:.2f}")
    assert ts_walk < 0.85 and hf_walk < 1.15 < hf_kick  # two-sample on 80 images: walk 0.73, noise 0.82

    again = ls.sample(digits_model, "fc2", range(10), method="walk", prior=prior, exemplars=ex, seed=1)
    assert np.median(_rms(again.final_samples, walk.final_samples)) > 0.05
