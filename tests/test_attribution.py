"""The paired stratified bootstrap and the gains it attributes to fine-tuning and to the counterfactuals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spur_assets.core.metrics.attribution import (
    QueryScores,
    attributable_gains,
    better_direction,
    headline_path,
    paired_bootstrap_gain,
)
from spur_assets.core.metrics.evaluation import CheckpointEvaluation, build_eval_index, evaluate_embeddings
from tests.test_evaluation import _toy_eval_set


def _naive_bootstrap(base, tuned, strata, resamples, seed):
    """The loop bench/experiments/pipeline_seeds.py used to run: resample each stratum's scored queries, macro mean."""
    strata = np.asarray(strata)
    diff = np.asarray(tuned, dtype=float) - np.asarray(base, dtype=float)
    rows = [np.flatnonzero((strata == s) & np.isfinite(diff)) for s in sorted(set(strata.tolist()))]
    rng = np.random.default_rng(seed)
    return np.array([np.mean([diff[rng.choice(r, r.size)].mean() for r in rows]) for _ in range(resamples)])


def test_gain_is_the_macro_difference_and_a_constant_gain_cannot_move():
    # Two pairs of unequal size; one query not scored (nan), skipped like the metric skips it.
    base = np.array([0.1, 0.2, 0.3, 0.4, np.nan, 0.0])
    tuned = np.array([0.3, 0.4, 0.5, 0.6, np.nan, 0.0])
    pairs = ["a->b"] * 5 + ["c->d"]
    out = paired_bootstrap_gain(base, tuned, pairs, resamples=300)
    assert out["gain"] == pytest.approx((0.2 + 0.0) / 2)
    assert out["n"] == 5
    assert out["sd"] == pytest.approx(0.0, abs=1e-12) and out["ci95"] == pytest.approx([0.1, 0.1])
    # The plain mean over queries instead: (4 * 0.2 + 0) / 5.
    plain = paired_bootstrap_gain(base, tuned, pairs, resamples=300, macro=False)
    assert plain["gain"] == pytest.approx(0.8 / 5)
    assert paired_bootstrap_gain(base, tuned, None, resamples=300)["gain"] == pytest.approx(0.8 / 5)


def test_ci_covers_a_known_effect_and_excludes_zero():
    rng = np.random.default_rng(11)
    strata = np.repeat(["a->b", "c->d", "e->f"], [200, 300, 400])
    base = rng.uniform(0.2, 0.6, strata.size)
    tuned = base + 0.03 + rng.normal(0.0, 0.1, strata.size)  # true gain 0.03 in every pair
    out = paired_bootstrap_gain(base, tuned, strata, resamples=2000, seed=1)
    lo, hi = out["ci95"]
    assert 0 < lo < 0.03 < hi
    assert lo < out["gain"] < hi
    # The standard error of a macro mean of independent per-pair means, analytically.
    diff = tuned - base
    se = math.sqrt(sum(diff[strata == s].var() / (strata == s).sum() for s in ("a->b", "c->d", "e->f"))) / 3
    assert out["sd"] == pytest.approx(se, rel=0.1)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_vectorised_draws_agree_with_the_naive_loop():
    rng = np.random.default_rng(5)
    strata = np.repeat(["p", "q"], [60, 25])
    base = rng.uniform(0, 1, strata.size)
    tuned = np.clip(base + rng.normal(0.05, 0.2, strata.size), 0, 1)
    base[[3, 70]] = np.nan
    tuned[[3, 70]] = np.nan
    ours = paired_bootstrap_gain(base, tuned, strata, resamples=2000, seed=0)
    naive = _naive_bootstrap(base, tuned, strata, 2000, seed=1)
    assert ours["n"] == 83
    assert ours["sd"] == pytest.approx(float(np.std(naive)), rel=0.1)
    assert ours["ci95"] == pytest.approx(np.percentile(naive, [2.5, 97.5]).tolist(), abs=0.25 * ours["sd"])


def test_identical_checkpoints_gain_nothing_and_exchangeable_ones_straddle_zero():
    rng = np.random.default_rng(2)
    strata = np.repeat(["a->b", "c->d"], [150, 150])
    scores = rng.uniform(0, 1, strata.size)
    same = paired_bootstrap_gain(scores, scores.copy(), strata, resamples=500)
    assert same == {"gain": 0.0, "ci95": [0.0, 0.0], "sd": 0.0, "n": 300}
    # Every pair gains exactly +d on half its queries and -d on the other half: gain 0, and the
    # resampled gains spread evenly on both sides of it.
    tuned = scores + np.tile([0.1, -0.1], 150)
    out = paired_bootstrap_gain(scores, tuned, strata, resamples=2000, seed=3)
    lo, hi = out["ci95"]
    assert out["gain"] == pytest.approx(0.0, abs=1e-12)
    assert lo < 0 < hi and abs(lo + hi) < 0.15 * (hi - lo)


def test_bootstrap_refuses_bad_inputs_and_says_nothing_about_nothing():
    with pytest.raises(ValueError, match="one score per query"):
        paired_bootstrap_gain([0.1, 0.2], [0.1], None)
    with pytest.raises(ValueError, match="strata"):
        paired_bootstrap_gain([0.1, 0.2], [0.1, 0.3], ["a"])
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap_gain([0.1], [0.2], None, resamples=0)
    empty = paired_bootstrap_gain([np.nan], [np.nan], ["a"])
    assert empty["n"] == 0 and math.isnan(empty["gain"]) and all(math.isnan(v) for v in empty["ci95"])


def test_query_scores_headline_and_directions():
    scores = QueryScores([1.0, 0.0, np.nan, 0.5], ["a", "a", "b", "c"], macro=True)
    assert scores.headline() == pytest.approx((0.5 + 0.5) / 2)  # pair b has no scored query: left out
    assert QueryScores([1.0, 0.0, np.nan, 0.5], None, macro=False).headline() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="needs strata"):
        QueryScores([1.0], None, macro=True)
    assert (better_direction("hr"), better_direction("odmap_i2t"), better_direction("delta_ctrl")) == (-1, 1, 0)
    assert headline_path("hr", 10) == ("hr", "10") and headline_path("recall_i2t_5_with_b", 10)[0] == "overcorrection"


# ----------------------------------------------------------------------------- gains of real evaluations


def _evaluation(index, seed: int, k: int = 3) -> CheckpointEvaluation:
    gen = torch.Generator().manual_seed(seed)

    def unit(n: int) -> torch.Tensor:
        return F.normalize(torch.randn(n, 8, generator=gen), dim=1)

    return evaluate_embeddings(
        index, unit(index.n_images), unit(index.n_captions), unit(len(index.removal_paths)),
        unit(len(index.control_paths)), k=k,
    )


def test_attributable_gains_equal_the_difference_of_headline_values():
    index = build_eval_index(_toy_eval_set())
    evaluations = {"base": _evaluation(index, 0), "control": _evaluation(index, 1), "finetuned": _evaluation(index, 2)}
    gains = attributable_gains(evaluations, resamples=200)
    assert set(gains) == set(evaluations["finetuned"].per_query)
    for metric, comparisons in gains.items():
        assert set(comparisons) == {"finetuned-base", "finetuned-control"}
        path = headline_path(metric, 3)
        for reference in ("base", "control"):
            tuned, other = evaluations["finetuned"].metrics, evaluations[reference].metrics
            for part in path:
                tuned, other = tuned[part], other[part]
            entry = comparisons[f"finetuned-{reference}"]
            assert entry["gain"] == tuned - other or (math.isnan(tuned - other) and math.isnan(entry["gain"])), metric
            if math.isfinite(entry["gain"]):
                assert entry["ci95"][0] <= entry["gain"] <= entry["ci95"][1], metric


def test_attributable_gains_skip_missing_references_and_refuse_different_queries():
    index = build_eval_index(_toy_eval_set())
    base, tuned = _evaluation(index, 0), _evaluation(index, 2)
    only_base = attributable_gains({"base": base, "finetuned": tuned}, resamples=50)
    assert {name for comparisons in only_base.values() for name in comparisons} == {"finetuned-base"}
    assert attributable_gains({"base": base}, resamples=50) == {}
    older = CheckpointEvaluation(base.metrics, base.per_pair, base.examples)  # made before per_query existed
    assert attributable_gains({"base": older, "finetuned": tuned}, resamples=50) == {}

    shorter = CheckpointEvaluation(base.metrics, base.per_pair, base.examples, per_query=dict(base.per_query))
    hr = base.per_query["hr"]
    shorter.per_query["hr"] = QueryScores(hr.values[:-1], hr.strata[:-1], macro=True)
    with pytest.raises(ValueError, match="'finetuned' and 'base' scored hr on different queries"):
        attributable_gains({"base": shorter, "finetuned": tuned}, resamples=50)
