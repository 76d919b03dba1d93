"""Which gains did the counterfactuals earn: per-query scores and a paired stratified bootstrap.

A headline metric of the report is a mean of per-query scores: plain (Recall@K,
Delta_ctrl) or macro over pairs (ODmAP, HR, pairwise accuracy, the over-correction
check). `QueryScores` keeps one checkpoint's per-query scores of one metric with the
strata (pairs) its mean runs over, so the headline value is reproduced from it exactly.
Two checkpoints scored on one eval index see the same queries, so their gain can be
resampled query by query with the same draw for both (`paired_bootstrap_gain`), and
`attributable_gains` does that for every metric: the fine-tuned checkpoint against the
base (what fine-tuning earned) and against the control (the same fine-tuning on
originals only: what the counterfactuals themselves earned).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from spur_assets.core.metrics.retrieval_metrics import grouped_mean

__all__ = [
    "QueryScores",
    "attributable_gains",
    "better_direction",
    "comparison_name",
    "headline_path",
    "paired_bootstrap_gain",
]

# Gathered values per block of resamples; bounds the bootstrap's memory (~32 MB of indices).
_BLOCK_VALUES = 1 << 22

# Per-query metric name -> its headline in the metric dict M ("{k}" is the report's k).
_HEADLINE_PATHS: dict[str, tuple[str, ...]] = {
    **{f"recall_{d}_{r}": ("recall", d, str(r)) for d in ("i2t", "t2i") for r in (1, 5, 10)},
    "odmap_i2t": ("odmap", "i2t", "{k}"),
    "odmap_t2i": ("odmap", "t2i", "{k}"),
    "hr": ("hr", "{k}"),
    "delta_ctrl": ("delta_ctrl",),
    "pairwise_i2t": ("pairwise", "i2t"),
    "pairwise_t2i": ("pairwise", "t2i"),
    "b_mention_rate": ("overcorrection", "b_mention_rate"),
    "recall_i2t_5_with_b": ("overcorrection", "recall_i2t_5"),
}
_LOWER_IS_BETTER = frozenset({"hr"})
_NO_DIRECTION = frozenset({"delta_ctrl"})  # an artifact check: near 0 is right, neither side improves


def headline_path(metric: str, k: int) -> tuple[str, ...]:
    """Key path of a per-query metric's headline value in the metric dict M, e.g. ("odmap", "i2t", "10").

    Raises KeyError naming the known metrics for an unknown name.
    """
    if metric not in _HEADLINE_PATHS:
        raise KeyError(f"{metric!r} is not a per-query metric; known: {sorted(_HEADLINE_PATHS)}")
    return tuple(part.format(k=k) for part in _HEADLINE_PATHS[metric])


def better_direction(metric: str) -> int:
    """+1 when a higher value of the metric is better, -1 when lower is (HR@k), 0 when neither is (Delta_ctrl)."""
    if metric in _LOWER_IS_BETTER:
        return -1
    return 0 if metric in _NO_DIRECTION else 1


def comparison_name(of: str, against: str) -> str:
    """The key of one gain in `attributable_gains`' result and report.json's gains: "finetuned-base"."""
    return f"{of}-{against}"


@dataclass(frozen=True)
class QueryScores:
    """One checkpoint's per-query scores of one metric, and how its headline value averages them.

    values: float64 [n_query], nan where the metric skips the query. strata: the pair of
    each query (same length), or None for one stratum. macro: the headline is the mean
    over strata of the stratum means (strata with no scored query left out); otherwise
    the plain mean over scored queries (strata then only guide resampling).
    """

    values: np.ndarray
    strata: np.ndarray | None
    macro: bool

    def __post_init__(self) -> None:
        values = np.asarray(self.values, dtype=np.float64)
        if values.ndim != 1:
            raise ValueError(f"QueryScores.values must be 1-D (one score per query), got shape {values.shape}")
        object.__setattr__(self, "values", values)
        if self.strata is not None:
            strata = np.asarray(self.strata)
            if strata.shape != values.shape:
                raise ValueError(
                    f"QueryScores.strata has shape {strata.shape} but values has {values.shape}; "
                    "give one stratum per query"
                )
            object.__setattr__(self, "strata", strata)
        elif self.macro:
            raise ValueError("QueryScores: a macro mean needs strata (the pair of each query)")

    def headline(self) -> float:
        """The headline value: macro or plain mean, skipping nan (nan when no query is scored)."""
        return _mean(self.values, self.strata, self.macro)


def _mean(values: np.ndarray, strata: np.ndarray | None, macro: bool) -> float:
    # retrieval_metrics.grouped_mean is what the report's macro values come from, so the
    # headline reproduced here equals the report's to the last bit.
    groups = list(strata) if strata is not None else [0] * len(values)
    summary = grouped_mean(values, groups)
    return summary["macro"] if macro and strata is not None else summary["micro"]


def paired_bootstrap_gain(
    base: Sequence[float] | np.ndarray,
    tuned: Sequence[float] | np.ndarray,
    strata: Sequence | np.ndarray | None = None,
    resamples: int = 2000,
    seed: int = 0,
    macro: bool = True,
) -> dict:
    """Gain of tuned over base in a (macro) mean of per-query scores, with a paired stratified bootstrap.

    Contract: base[q] and tuned[q] score query q under two checkpoints; strata[q] is its
    stratum (pair), None for one stratum. A query is used when both score it (not nan);
    on one eval index both skip the same queries, so "gain" equals the difference of the
    two headline values (`QueryScores.headline`) exactly. macro: mean over strata of
    stratum means; else (or with strata None) the plain mean over queries. Each of the
    `resamples` draws resamples the used queries with replacement within each stratum,
    the same draw for both checkpoints, and recomputes the gain; seed fixes the draws.
    Returns {"gain", "ci95": [2.5th, 97.5th percentile of the resampled gains], "sd":
    their standard deviation, "n": queries used}; all nan (n 0) when no query is used.
    """
    base = np.asarray(base, dtype=np.float64)
    tuned = np.asarray(tuned, dtype=np.float64)
    if base.ndim != 1 or base.shape != tuned.shape:
        raise ValueError(
            f"paired_bootstrap_gain: base {base.shape} and tuned {tuned.shape} must be 1-D "
            "with one score per query each"
        )
    if strata is not None:
        strata = np.asarray(strata)
        if strata.shape != base.shape:
            raise ValueError(f"paired_bootstrap_gain: strata has shape {strata.shape}, not one per query {base.shape}")
    if resamples < 1:
        raise ValueError(f"paired_bootstrap_gain: resamples={resamples} must be at least 1")
    used = np.isfinite(base) & np.isfinite(tuned)
    n = int(used.sum())
    if n == 0:
        nan = float("nan")
        return {"gain": nan, "ci95": [nan, nan], "sd": nan, "n": 0}
    kept_strata = strata[used] if strata is not None else None
    gain = _mean(tuned[used], kept_strata, macro) - _mean(base[used], kept_strata, macro)

    diff = (tuned - base)[used]
    if kept_strata is None:
        members = [np.arange(n)]
    else:
        _, codes = np.unique(kept_strata, return_inverse=True)
        members = [np.flatnonzero(codes == c) for c in range(int(codes.max()) + 1)]
    # The gain of a (macro) mean is the (macro) mean of per-query differences: resample those.
    rng = np.random.default_rng(seed)
    stratum_sums = np.empty((resamples, len(members)))
    for s, rows in enumerate(members):
        values = diff[rows]
        block = max(1, _BLOCK_VALUES // rows.size)
        for start in range(0, resamples, block):
            stop = min(resamples, start + block)
            stratum_sums[start:stop, s] = values[rng.integers(0, rows.size, size=(stop - start, rows.size))].sum(axis=1)
    sizes = np.array([rows.size for rows in members], dtype=np.float64)
    if macro and kept_strata is not None:
        boots = (stratum_sums / sizes).mean(axis=1)
    else:
        boots = stratum_sums.sum(axis=1) / n
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"gain": float(gain), "ci95": [float(lo), float(hi)], "sd": float(np.std(boots)), "n": n}


def _per_query_of(evaluation: object) -> Mapping[str, QueryScores]:
    return getattr(evaluation, "per_query", None) or {}


def attributable_gains(
    evaluations: Mapping[str, object],
    of: str = "finetuned",
    against: Sequence[str] = ("base", "control"),
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, dict]]:
    """Gain of checkpoint `of` over each reference in `against`, per metric, with its bootstrap CI.

    Contract: evaluations maps checkpoint names to objects with a `per_query` mapping of
    metric name -> QueryScores (`evaluation.CheckpointEvaluation`). Returns {metric:
    {"<of>-<reference>": paired_bootstrap_gain(...)}} for every metric of `of`'s
    per_query that a present reference also scored, in that order; references that are
    absent or have no per-query scores are left out, and the result is {} when `of` is.
    Every comparison uses the same seed, so all gains of one metric share each draw.
    Each gain equals the difference of the two headline values exactly. Raises
    ValueError when two checkpoints scored a metric on different queries (lengths,
    strata or skipped queries differ): they were not evaluated on one eval index.
    """
    tuned_scores = _per_query_of(evaluations.get(of))
    result: dict[str, dict[str, dict]] = {}
    for metric, tuned in tuned_scores.items():
        for reference in against:
            if reference == of or reference not in evaluations:
                continue
            base = _per_query_of(evaluations[reference]).get(metric)
            if base is None:
                continue
            _check_same_queries(metric, of, tuned, reference, base)
            result.setdefault(metric, {})[comparison_name(of, reference)] = paired_bootstrap_gain(
                base.values, tuned.values, tuned.strata, resamples=resamples, seed=seed, macro=tuned.macro
            )
    return result


def _check_same_queries(metric: str, of: str, tuned: QueryScores, reference: str, base: QueryScores) -> None:
    def refuse(what: str) -> None:
        raise ValueError(
            f"attributable_gains: checkpoints {of!r} and {reference!r} scored {metric} on different queries "
            f"({what}); evaluate every checkpoint on the same eval index before comparing them"
        )

    if tuned.values.shape != base.values.shape:
        refuse(f"{tuned.values.size} vs {base.values.size} queries")
    if tuned.macro != base.macro:
        refuse("one averages over pairs, the other over queries")
    if (tuned.strata is None) != (base.strata is None) or (
        tuned.strata is not None and not np.array_equal(tuned.strata, base.strata)
    ):
        refuse("the pairs of the queries differ")
    if not np.array_equal(np.isnan(tuned.values), np.isnan(base.values)):
        refuse("different queries are skipped")
