"""Diversity scores, chain diagnostics, exemplars and the am baseline, on the real digits model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ldam_sweep as ls
from ldam_sweep.data import digits
from ldam_sweep.sampling.diagnostics import autocorr_ess, split_rhat, unit_scores
from ldam_sweep.sampling.diversity import (facet_count, facet_labels, feature_diversity, lowpass_diversity, mode_count,
                                           pixel_diversity)
from ldam_sweep.sampling.exemplars import top_exemplars
from ldam_sweep.sampling.scoring import score_result

RANGE = (0.0, 1.0)


@pytest.mark.fast
def test_diversity_scores_on_known_configurations():
    a, b = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    same = torch.stack([a, a, a]).unsqueeze(0)  # (U=1, K=3, C, H, W)
    two = torch.stack([a, a, b, b]).unsqueeze(0)
    assert float(pixel_diversity(same, RANGE)[0]) == 0.0 and int(mode_count(same, RANGE)[0]) == 1
    assert float(pixel_diversity(two, RANGE)[0]) == pytest.approx(4 / 6)  # 4 of 6 pairs are 1.0 apart
    assert int(mode_count(two, RANGE)[0]) == 2
    chain = torch.stack([a, a + 0.06, a + 0.12, a + 0.5]).unsqueeze(0)  # 0.06 steps link 0-1-2 transitively
    assert int(mode_count(chain, RANGE)[0]) == 2
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]])
    assert float(feature_diversity(feats)[0]) == pytest.approx(2 / 3)


@pytest.mark.fast
def test_lowpass_diversity_ignores_speckle_and_facets_group_shapes():
    g = torch.Generator().manual_seed(0)
    vertical, horizontal = torch.zeros(1, 16, 16), torch.zeros(1, 16, 16)
    vertical[:, 2:14, 5:11] = 1.0
    horizontal[:, 5:11, 2:14] = 1.0

    def speckled(img):
        return (img + (torch.rand(img.shape, generator=g) - 0.5) * 0.6).clamp(0, 1)

    same = torch.stack([speckled(vertical) for _ in range(4)]).unsqueeze(0)
    px, low = float(pixel_diversity(same, RANGE)[0]), float(lowpass_diversity(same, RANGE)[0])
    assert px > 0.12 and low < 0.3 * px  # the speckle is most of the pixel distance; the blur removes it
    assert int(mode_count(same, RANGE)[0]) == 4 and int(facet_count(same, RANGE)[0]) == 1
    two = torch.stack([speckled(vertical), speckled(horizontal), speckled(vertical), speckled(horizontal)]).unsqueeze(0)
    assert float(lowpass_diversity(two, RANGE)[0]) > 0.15
    assert facet_labels(two, RANGE)[0].tolist() == [0, 1, 0, 1]
    nan = two.clone()
    nan[0, 3] = float("nan")  # a diverged chain has no facet
    assert facet_labels(nan, RANGE)[0].tolist() == [0, 1, 0, -1] and int(facet_count(nan, RANGE)[0]) == 2


@pytest.mark.fast
def test_diversity_ratios_are_one_when_the_chains_are_as_varied_as_the_exemplars():
    g = torch.Generator().manual_seed(1)
    final = torch.rand(2, 4, 1, 8, 8, generator=g)
    samples = final.unsqueeze(2).numpy()  # one snapshot
    act = np.ones((2, 4, 3), dtype=np.float32)
    feats = torch.rand(2, 4, 5, generator=g)
    exemplars = torch.cat([final[:1], final[1:] * 0.5], 0)  # unit 1: exemplars half as varied
    ex_feats = torch.cat([feats[:1], torch.rand(1, 4, 5, generator=g)], 0)
    rows = unit_scores(samples, act, np.array([2]), RANGE, features=feats, exemplars=exemplars, exemplar_features=ex_feats)
    assert rows[0]["lowpass_diversity_ratio"] == pytest.approx(1.0, rel=1e-5)
    assert rows[0]["feature_diversity_ratio"] == pytest.approx(1.0, rel=1e-5)
    assert rows[1]["lowpass_diversity_ratio"] == pytest.approx(2.0, rel=1e-5)
    assert rows[0]["lowpass_diversity"] == pytest.approx(float(lowpass_diversity(final[:1], RANGE)[0]), rel=1e-6)
    without = unit_scores(samples, act, np.array([2]), RANGE, features=feats)
    assert without[0]["lowpass_diversity_ratio"] is None and without[0]["feature_diversity_ratio"] is None


@pytest.mark.fast
def test_activation_ratio_is_empty_where_no_real_image_gives_a_positive_value():
    """A pre-activation unit that is negative on all the data (best real value -0.5): chains at -0.25
    would read 0.5 and chains at -1 would read 2.0, "twice the best real image", as a quotient. Left empty
    instead, so such units sort last; a unit with a positive best keeps its quotient, whatever its sign."""
    samples = torch.rand(4, 2, 1, 1, 8, 8, generator=torch.Generator().manual_seed(0)).numpy()
    act = np.zeros((4, 2, 3), dtype=np.float32)
    act[:, :, -1] = np.array([[-1.0], [-0.25], [3.0], [-1.0]], dtype=np.float32)
    rows = unit_scores(samples, act, np.array([2]), RANGE, exemplar_max=np.array([-0.5, -0.5, 2.0, 0.0]))
    assert [r["activation_ratio"] for r in rows] == [None, None, pytest.approx(1.5), None]
    assert [r["activation_ratio"] for r in unit_scores(samples, act, np.array([2]), RANGE)] == [None] * 4


@pytest.mark.fast
def test_ess_and_rhat_behave():
    g = torch.Generator().manual_seed(0)
    white = torch.randn(1, 4, 2000, generator=g)
    walk = white.cumsum(-1)
    assert float(autocorr_ess(white).mean()) > 1000
    assert float(autocorr_ess(walk).mean()) < 100
    assert float(split_rhat(white)[0]) == pytest.approx(1.0, abs=0.01)
    shifted = white + torch.tensor([0.0, 0.0, 5.0, 5.0]).view(1, 4, 1)
    assert float(split_rhat(shifted)[0]) > 2.0


@pytest.fixture(scope="module")
def digits_pool():
    x, y = digits(28, "train")
    return torch.from_numpy(x), y


@pytest.mark.fast
def test_exemplars_of_logit_units_are_digits_of_that_class(digits_model, digits_pool):
    pool, labels = digits_pool
    images, acts = top_exemplars(digits_model, "fc2", np.arange(10), "logit", pool, 8)
    assert images.shape == (10, 8, 1, 28, 28) and acts.shape == (10, 8)
    assert (np.diff(acts, axis=1) <= 0).all()  # sorted, best first
    flat = pool.flatten(1).numpy()
    hits = 0
    for unit in range(10):
        idx = [int(np.argmin(((flat - img.reshape(-1)) ** 2).sum(1))) for img in images[unit]]
        hits += np.bincount(labels[idx], minlength=10).argmax() == unit
    assert hits / 10 >= 0.9


@pytest.fixture(scope="module")
def pair(digits_model, digits_pool):
    """LDAM (defaults) and the am baseline, 10 logits x 6 chains, all from the same start image."""
    start = np.full((1, 28, 28), 0.5, dtype=np.float32)
    out = {}
    for method in ("ldam", "am"):
        res = ls.sample(digits_model, "fc2", range(10), chains=6, steps=300, method=method, init=start, snapshot_every=25)
        out[method] = res
    return out


def test_ldam_explores_where_am_collapses(pair, digits_model, digits_pool, real_max_logits):
    """From one start am's chains coincide while LDAM's spread and keep moving, beyond the best real digit."""
    pool, labels = digits_pool
    _, ex = top_exemplars(digits_model, "fc2", np.arange(10), "logit", pool, 1)
    scores = {m: score_result(digits_model, r, exemplar_max=ex[:, 0]) for m, r in pair.items()}
    spread = {m: np.mean([s["pixel_diversity"] for s in sc.values()]) for m, sc in scores.items()}
    ratio = {m: np.mean([s["activation_ratio"] for s in sc.values()]) for m, sc in scores.items()}
    # (a) same start: am is deterministic, so its chains coincide; LDAM's noise spreads them
    assert spread["am"] < 1e-6 and spread["ldam"] > 0.05
    assert all(s["modes"] == 1 for s in scores["am"].values())
    # (b) LDAM keeps moving after burn-in more than am, which converges. Measured from independent
    # starts, as docs/scripts/exploration.py does: from one shared start am's 10 trajectories depend
    # on float rounding (0.0096 vs 0.0131 between memory layouts), from 60 independent ones they do not.
    free = {m: ls.sample(digits_model, "fc2", range(10), chains=6, steps=300, method=m, snapshot_every=25)
            for m in ("ldam", "am")}
    move = {m: np.mean([s["movement"] for s in score_result(digits_model, r).values()]) for m, r in free.items()}
    assert move["ldam"] > 1.8 * move["am"], move
    # and LDAM still excites every unit beyond the best real digit at lambda 0
    assert ratio["ldam"] >= 1.0 and all(s["activation_ratio"] >= 1.0 for s in scores["ldam"].values())


def test_scores_are_deterministic_and_invariant_to_chain_order(pair, digits_model, digits_pool):
    """The scores of a 300-step run are deterministic and the same for any order of its chains."""
    pool, _ = digits_pool
    res = pair["ldam"]
    one = score_result(digits_model, res, real_pool=pool[:300])
    again = score_result(digits_model, res, real_pool=pool[:300])
    assert one == again
    perm = np.random.default_rng(0).permutation(res.chains)
    import dataclasses

    shuffled = dataclasses.replace(res, samples=res.samples[:, perm], activation=res.activation[:, perm])
    other = score_result(digits_model, shuffled, real_pool=pool[:300])
    for unit in one:
        for key, val in one[unit].items():
            if val is None:
                assert other[unit][key] is None
            else:
                assert other[unit][key] == pytest.approx(val, rel=1e-4, abs=1e-6), (unit, key)


@pytest.mark.fast
def test_a_diverged_chain_is_flagged_and_the_rest_stored(digits_model, tmp_path):
    """log D is NaN for one batch element: that chain diverges; the block is still written and
    verified, and the other chains stay finite (without the repulsion: equal a run without the fault)."""
    from ldam_sweep.sampling.chains import default_snapshot_steps
    from ldam_sweep.store import BlockWriter, commit, create_store, verify_store
    from ldam_sweep.planning import plan_store

    def base(x):
        return -((x - 0.3) ** 2).flatten(1).mean(1)

    def poisoned(x):
        scale = torch.ones(x.shape[0])
        scale[1] = float("nan")  # unit 0, chain 1: NaN value and NaN gradient
        return base(x) * scale

    # the repulsion couples a unit's chains, so "equal a run without the fault" holds without it;
    # with it (default) a diverged chain drops out of its unit's kernel and the others stay finite
    repelled = ls.sample(digits_model, "fc2", [0, 1], discriminator=poisoned, chains=3, steps=40, lam=0.5)
    assert not np.isfinite(repelled.samples[0, 1]).all()
    assert np.isfinite(repelled.samples[0, [0, 2]]).all() and np.isfinite(repelled.samples[1]).all()
    kw = dict(chains=3, steps=40, lam=0.5, snapshot_every=20, repel=0.0)
    good = ls.sample(digits_model, "fc2", [0, 1], discriminator=base, **kw)
    res = ls.sample(digits_model, "fc2", [0, 1], discriminator=poisoned, **kw)
    assert not np.isfinite(res.samples[0, 1]).all()
    np.testing.assert_array_equal(res.samples[0, [0, 2]], good.samples[0, [0, 2]])
    np.testing.assert_array_equal(res.samples[1], good.samples[1])
    scores = score_result(digits_model, res)
    assert scores[0]["diverged_fraction"] == pytest.approx(1 / 3) and scores[1]["diverged_fraction"] == 0.0
    assert scores[0]["pixel_diversity"] is not None and np.isfinite(scores[0]["pixel_diversity"])
    url = str(tmp_path / "s.zarr")
    plan = plan_store(digits_model, {"fc2": [0, 1]}, chains=3, steps=40, snapshot_steps=default_snapshot_steps(40, 20),
                      block_size=4, realism=True)
    create_store(url, plan)
    commit(url, BlockWriter(url).write("fc2", 0, res, unit_columns=scores))
    st = ls.open_store(url)
    assert st.units()["diverged_fraction"].to_pylist() == pytest.approx([1 / 3, 0.0])
    assert verify_store(st) == (1, [])
    np.testing.assert_allclose(st.samples("fc2", 1), good.samples[1], atol=2e-3)


@pytest.mark.fast
def test_am_is_the_peer_libraries_baseline(digits_model):
    with pytest.raises(ls.SamplerError, match="no realism term"):
        ls.sample(digits_model, "fc2", [0], method="am", lam=0.5, discriminator=lambda x: x.sum((1, 2, 3)))
    with pytest.raises(ls.SamplerError, match="Allowed options for am: lr, l2"):
        ls.sample(digits_model, "fc2", [0], method="am", noise=0.1)
    a = ls.sample(digits_model, "fc2", [2], chains=2, steps=30, method="am", seed=1)
    b = ls.sample(digits_model, "fc2", [2], chains=2, steps=30, method="am", seed=1)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert (np.diff(a.activation[0].mean(0)) > -1e-3).mean() > 0.9  # ascent


@pytest.mark.fast
def test_facets_split_chains_only_where_they_differ_more_than_real_digits_of_one_class():
    """Real digits stand in for chains: 8 of one class are mostly one facet, 4 + 4 of two classes
    mostly two or more. The old rule (half the class spacing) gave nearly every digit its own."""
    from ldam_sweep.settings import FACET_THRESHOLD

    x, y = digits(28, "test")
    rng = np.random.default_rng(0)
    by_class = [np.flatnonzero(y == c) for c in range(10)]
    one = np.stack([rng.choice(by_class[c], 8, replace=False) for c in range(10) for _ in range(10)])
    two = np.stack([np.concatenate([rng.choice(by_class[a], 4, replace=False), rng.choice(by_class[b], 4, replace=False)])
                    for a in range(10) for b in range(a + 1, 10) for _ in range(2)])
    count = lambda idx, t=FACET_THRESHOLD: facet_count(torch.from_numpy(x[idx]), RANGE, t).numpy()  # noqa: E731
    n_one, n_two = count(one), count(two)
    assert (n_one == 1).mean() >= 0.7 and n_one.mean() <= 1.4
    assert (n_two >= 2).mean() >= 0.55 and n_two.mean() >= n_one.mean() + 0.5
    assert count(one, 0.095).mean() >= 6  # the baseline that could not say "one facet"


@pytest.mark.fast
def test_the_observer_reads_a_units_preference_from_its_exemplars_and_not_from_another_units(digits_model, digits_pool):
    """Shown a logit's top training digits, the observer picks the stronger of two held-out digits
    most of the time; shown another logit's, it does not: the score measures the shown images."""
    from ldam_sweep.sampling.exemplars import pool_scores
    from ldam_sweep.sampling.observer import Observer, query_subset

    pool, _ = digits_pool
    observer = Observer(torch.from_numpy(query_subset(digits(28, "test")[0])))
    assert len(observer.queries) == 256
    acts = pool_scores(digits_model, "fc2", np.arange(10), "logit", observer.queries)  # (Q, 10)
    own, _ = top_exemplars(digits_model, "fc2", np.arange(10), "logit", pool, 8)
    other = np.roll(own, 1, axis=0)  # unit u shown unit u-1's exemplars
    nothing = np.full_like(own, np.nan)
    rows = observer.scores(acts, {"own": own, "other": other, "nothing": nothing}, np.arange(10))
    mine = np.array([r["observer_own"] for r in rows])
    theirs = np.array([r["observer_other"] for r in rows])
    assert mine.mean() >= 0.8 and (mine > theirs).mean() >= 0.9 and theirs.mean() <= 0.6
    # a unit silent on most queries: its strong ones against silent ones, a valid task
    sparse = acts.clone()
    sparse[sparse < sparse.quantile(0.8, dim=0)] = 0
    assert all(r["observer_own"] is not None for r in observer.scores(sparse, {"own": own}, np.arange(10)))
    few = Observer(observer.queries[:30])  # 2 strong x 7 moderate pairs: too few for a score
    assert few.scores(acts[:30], {"own": own}, np.arange(10)) == [{"observer_own": None}] * 10
    assert all(r["observer_nothing"] is None for r in rows)  # nothing finite shown: no score
    flat = observer.scores(torch.zeros(len(observer.queries), 1), {"own": own}, np.array([3]))
    assert flat == [{"observer_own": None}]  # a unit flat on the queries has no strong/moderate split


def test_a_sweep_scores_the_informativeness_of_samples_starts_and_exemplars(finished_sweep):
    from ldam_sweep.store.schema import OBSERVER_COLUMNS

    _, url, _ = finished_sweep
    st = ls.open_store(url)
    rows = st.units(status="ok").to_pylist()
    scored = [r for r in rows if r["observer_samples"] is not None]
    assert len(scored) >= len(rows) // 2
    assert all(0 <= r[c] <= 1 for r in scored for c in OBSERVER_COLUMNS if r[c] is not None)
    per_layer = st.informativeness()
    assert set(per_layer) == {"conv2", "fc2"} and sum(e["units"] for e in per_layer.values()) == len(scored)
    fc2 = [r["observer_samples"] for r in scored if r["layer"] == "fc2"]
    assert per_layer["fc2"]["samples"] == pytest.approx(np.mean(fc2), rel=1e-5)


@pytest.mark.fast
def test_atlas_facet_groups_equal_the_facets_score():
    """The atlas groups chains in numpy (no torch); the groups must be the score's components."""
    import numpy as np
    import torch

    from ldam_sweep.atlas.facets import facet_groups
    from ldam_sweep.sampling.diversity import facet_count, facet_labels

    rng = np.random.default_rng(0)
    centres = rng.random((3, 1, 12, 12))
    for spread in (0.02, 0.08, 0.3):  # tight, medium and wide spreads around 3 centres
        final = np.clip(centres[rng.integers(0, 3, 8)] + spread * rng.standard_normal((8, 1, 12, 12)), 0, 1)
        final[5] = np.nan  # a diverged chain belongs to no facet
        labels = facet_labels(torch.from_numpy(final)[None], (0.0, 1.0))[0].tolist()
        want: dict[int, list[int]] = {}
        for chain, label in enumerate(labels):
            if label >= 0:
                want.setdefault(label, []).append(chain)
        groups = facet_groups(final, (0.0, 1.0))
        assert sorted(groups) == sorted(want.values())
        assert len(groups) == int(facet_count(torch.from_numpy(final)[None], (0.0, 1.0))[0])
        assert all(5 not in g for g in groups)
