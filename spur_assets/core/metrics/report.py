"""The metric report: report.json (docs/data-contract.md#reportjson), report.md, a self-contained report.html, plots.

Input is one `evaluation.CheckpointEvaluation` per checkpoint name: "base", "finetuned",
"control" (the same fine-tuning on originals only, no counterfactuals) and any other
named model. This module only reads their `.metrics`, `.per_pair`, `.examples` and
`.per_query` (optional), so it does not import the evaluation code (which re-exports
`write_report` for convenience). Tables and plots show the checkpoints in the order
base, control, finetuned, then the others as given.

report.json:
    {"title", "k", "checkpoints": {name: M}, "per_pair": [rows], "examples": {name: [...]},
     "gains": {metric: {"finetuned-base"|"finetuned-control": {"gain", "ci95": [lo, hi],
     "sd", "n"}}}, "verdict": str, "plots": {plot: file name}, ...extra}
    per_pair is long format: one row per (checkpoint, pair), with a "checkpoint" key and the
    evaluation's per-pair fields, so it loads straight into a table. gains come from the
    per-query scores (`attribution.attributable_gains`): the fine-tuned checkpoint over
    each reference present, with a paired stratified bootstrap 95% CI; {} without
    per-query scores. nan (a metric with no query behind it) is written as null. The
    per-query scores themselves go to per_query.parquet beside it (long format:
    checkpoint, metric, query, stratum, value), not into report.json.
"""

from __future__ import annotations

import base64
import html
import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from PIL import Image  # noqa: E402

from spur_assets.core.metrics.attribution import (  # noqa: E402
    attributable_gains,
    better_direction,
    comparison_name,
    headline_path,
)

__all__ = [
    "CHECKPOINT_ORDER",
    "SHORTCUT_FACTOR",
    "SMALL_DELTA_CTRL",
    "check_report_shape",
    "report_document",
    "verdict",
    "write_report",
]

SHORTCUT_FACTOR = 2.0  # "shortcut visible": HR@10 on I^-b at least this times the natural rate
SMALL_DELTA_CTRL = 0.02  # |Delta_ctrl| at most this counts as small
DEFAULT_K = 10

CHECKPOINT_ORDER = ("base", "control", "finetuned")  # shown first, in this order; other names follow
TUNED, CONTROL = "finetuned", "control"
# Gains the counterfactuals are meant to earn; the verdict names which they did over the control.
EARNED_METRICS = ("odmap_i2t", "odmap_t2i", "hr", "pairwise_i2t", "pairwise_t2i")
RECALL_METRICS = tuple(f"recall_{d}_{r}" for d in ("i2t", "t2i") for r in (1, 5, 10))
# Over-correction guards: fine-tuned falling below the control here is named in the verdict.
OVERCORRECTION_METRICS = ("b_mention_rate", "recall_i2t_5_with_b")
PER_QUERY_FILE = "per_query.parquet"
NO_CONTROL_TEXT = (
    "No control checkpoint (the same fine-tuning on originals only) was scored, so no gain can be "
    "attributed to the counterfactuals themselves."
)

OFFENDING_COLOUR = "#c62828"
RELEVANT_COLOUR = "#2e7d32"
PLOT_FILES = {
    "odmap_per_pair": "odmap_per_pair.png",
    "hr_per_pair": "hr_per_pair.png",
    "example_retrievals": "example_retrievals.png",
    "gains": "gains.png",
}


# --------------------------------------------------------------------------- shape check


def _k_of(metrics: Mapping, default: int | None) -> int:
    if default is not None:
        return int(default)
    k = metrics.get("k", DEFAULT_K) if isinstance(metrics, Mapping) else DEFAULT_K
    return int(k) if isinstance(k, int) and not isinstance(k, bool) else DEFAULT_K


def _fixed_fields(k: int) -> list[tuple[tuple[str, ...], float]]:
    """(key path, lowest allowed value) of every fixed field of M; highest is always 1."""
    key = str(k)
    fields: list[tuple[tuple[str, ...], float]] = []
    fields += [(("recall", direction, str(r)), 0.0) for direction in ("i2t", "t2i") for r in (1, 5, 10)]
    fields += [(("odmap", direction, key), 0.0) for direction in ("i2t", "t2i")]
    fields += [(("hr", name), 0.0) for name in (key, f"natural_{key}", f"anchor_only_{key}")]
    fields += [(("delta_ctrl",), -1.0)]  # a difference of two mAPs
    return fields


# Metrics an M may hold (newer evaluations do); null (nan) allowed, else a number in [0, 1].
_OPTIONAL_FIELDS = (
    ("pairwise", "i2t"),
    ("pairwise", "t2i"),
    ("overcorrection", "b_mention_rate"),
    ("overcorrection", "recall_i2t_5"),
)


def _gains_problems(gains: object) -> list[str]:
    if not isinstance(gains, Mapping):
        return [f"gains is a {type(gains).__name__}, not an object of metric -> comparison -> gain"]
    problems = []
    for metric, comparisons in gains.items():
        if not isinstance(comparisons, Mapping):
            problems.append(f"gains.{metric} is a {type(comparisons).__name__}, not an object of comparisons")
            continue
        for name, entry in comparisons.items():
            where = f"gains.{metric}.{name}"
            if not isinstance(entry, Mapping) or not {"gain", "ci95", "sd", "n"} <= set(entry):
                problems.append(f"{where} must hold gain, ci95, sd and n")
                continue
            for key in ("gain", "sd"):
                if entry[key] is not None and not (_finite(entry[key]) or _is_nan(entry[key])):
                    problems.append(f"{where}.{key} is {entry[key]!r}, not a number or null")
            ci = entry["ci95"]
            if not isinstance(ci, (list, tuple)) or len(ci) != 2:
                problems.append(f"{where}.ci95 is {ci!r}, not [lo, hi]")
            elif all(_finite(v) for v in ci) and ci[0] > ci[1]:
                problems.append(f"{where}.ci95 = {list(ci)} has lo > hi")
            elif not all(v is None or _finite(v) or _is_nan(v) for v in ci):
                problems.append(f"{where}.ci95 is {ci!r}, not two numbers (or nulls)")
            n = entry["n"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                problems.append(f"{where}.n is {n!r}, not a count of queries")
    return problems


def check_report_shape(report: Mapping, k: int | None = None) -> list[str]:
    """Problems with a report.json object against docs/data-contract.md#reportjson; empty when it conforms.

    Contract: report["checkpoints"] is a non-empty mapping of name -> M, each M holding
    recall.{i2t,t2i}.{1,5,10}, odmap.{i2t,t2i}.<k>, hr.{<k>, natural_<k>, anchor_only_<k>}
    and delta_ctrl as finite numbers in [0, 1] (delta_ctrl, a difference of two mAPs, in
    [-1, 1]); pairwise.{i2t,t2i} and overcorrection.{b_mention_rate, recall_i2t_5}, when
    present, are null or numbers in [0, 1]; report["per_pair"], when present, is a list
    of objects; report["gains"], when present, maps metric -> comparison -> {gain, ci95:
    [lo, hi], sd, n}. k defaults to each M's "k" entry, else 10. Each problem names the
    checkpoint (or gain) and key path.
    """
    problems: list[str] = []
    if not isinstance(report, Mapping):
        return [f"report is a {type(report).__name__}, not a JSON object"]
    checkpoints = report.get("checkpoints")
    if not isinstance(checkpoints, Mapping) or not checkpoints:
        return ["report['checkpoints'] is missing or empty; it must map checkpoint names to metric dicts"]
    for name, metrics in checkpoints.items():
        if not isinstance(metrics, Mapping):
            problems.append(f"checkpoints.{name} is a {type(metrics).__name__}, not a metric dict")
            continue
        for path, lowest in _fixed_fields(_k_of(metrics, k)):
            where = f"checkpoints.{name}." + ".".join(path)
            value: object = metrics
            for part in path:
                value = value.get(part) if isinstance(value, Mapping) else None
            if value is None:
                problems.append(f"{where} is missing (or null)")
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"{where} is {value!r}, not a number")
            elif not math.isfinite(value):
                problems.append(f"{where} is {value}, not finite (no query behind it?)")
            elif not lowest <= value <= 1.0:
                problems.append(f"{where} = {value} is outside [{lowest:g}, 1]")
        for path in _OPTIONAL_FIELDS:
            value = _lookup(metrics, path)
            where = f"checkpoints.{name}." + ".".join(path)
            if value is None or _is_nan(value):
                continue
            if not _finite(value):
                problems.append(f"{where} is {value!r}, not a number or null")
            elif not 0.0 <= value <= 1.0:
                problems.append(f"{where} = {value} is outside [0, 1]")
    if "gains" in report:
        problems += _gains_problems(report["gains"])
    per_pair = report.get("per_pair")
    if per_pair is not None and (
        not isinstance(per_pair, list) or not all(isinstance(row, Mapping) for row in per_pair)
    ):
        problems.append("per_pair must be a list of objects (one per checkpoint and pair)")
    return problems


# --------------------------------------------------------------------------- verdict


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _shortcut(metrics: Mapping, k: int) -> tuple[bool | None, str]:
    key = str(k)
    hr, natural = _num(metrics["hr"][key]), _num(metrics["hr"][f"natural_{key}"])
    if not (_finite(hr) and _finite(natural)):
        return None, f"HR@{k} cannot be judged (HR {hr}, natural rate {natural}: no queries?)"
    threshold = SHORTCUT_FACTOR * natural
    # With a natural rate of 0 any HR clears the bar; demand at least one hallucinated caption.
    visible = hr >= threshold and hr > 0
    relation = "≥" if visible else "<"
    word = "visible" if visible else "not visible"
    return visible, (
        f"shortcut {word} (HR@{k} on I⁻ᵇ {hr:.3f} {relation} {SHORTCUT_FACTOR:g} × natural rate {natural:.3f})"
    )


def _num(value) -> float:
    """A metric as float; None (nan in report.json) and non-numbers become nan."""
    return float(value) if _finite(value) else float("nan")


def _small_delta(value) -> bool | None:
    return abs(value) <= SMALL_DELTA_CTRL if _finite(value) else None


def _delta_text(value) -> str:
    if not _finite(value):
        return "Δ_ctrl undefined (no controls)"
    small = _small_delta(value)
    return f"Δ_ctrl {value:+.3f} {'small' if small else 'NOT small'} (|Δ_ctrl| {'≤' if small else '>'} {SMALL_DELTA_CTRL:g})"


def verdict(
    checkpoints: Mapping[str, Mapping], recall_tolerance: float = 0.0, gains: Mapping | None = None
) -> str:
    """One line a person can read about the checkpoints' metric dicts M.

    Contract: with "base" alone: whether the shortcut is visible (HR@k on I^-b >= 2x the
    natural rate, and > 0) and whether Delta_ctrl is small (|Delta_ctrl| <= 0.02). With
    "base" and "finetuned": the ODmAP@k and R@5 changes in both directions, the HR@k
    change, and whether the claim (docs/definitions.md#the-verdict-and-the-claim) holds: base shows the shortcut, ODmAP@k rises
    (strictly) both ways, R@5 falls by no more than `recall_tolerance` both ways (0: does
    not fall), and |Delta_ctrl| <= 0.02 for both checkpoints. Without "base": says so.
    With "control" too, a sentence follows from `gains` (report.json's gains, as
    `attribution.attributable_gains` gives them): which of ODmAP@k both ways, HR@k and
    pairwise accuracy both ways the counterfactuals earned (95% CI of finetuned - control
    wholly on the improving side of 0: above, below for HR) and which they did not, and,
    when finetuned's b-mention rate or Recall@5 on images showing b lies below the
    control's with the CI excluding 0, that the fine-tune over-corrects. Without gains
    for finetuned-control, it says attribution needs them. With "finetuned" but no
    "control", a last sentence says no gain can be attributed to the counterfactuals.
    Other checkpoints are ignored.
    """
    if "base" not in checkpoints:
        return f"no verdict: the checkpoints are {sorted(checkpoints)}; the verdict reads 'base' (and 'finetuned')"
    base = checkpoints["base"]
    k = _k_of(base, None)
    key = str(k)
    visible, shortcut_text = _shortcut(base, k)
    if "finetuned" not in checkpoints:
        return f"base: {shortcut_text}; {_delta_text(base['delta_ctrl'])}."
    tuned = checkpoints["finetuned"]

    def change(path: tuple[str, ...]) -> tuple[float, float, float]:
        before, after = base, tuned
        for part in path:
            before, after = before[part], after[part]
        return _num(before), _num(after), _num(after) - _num(before)

    parts, failures = [], []
    odmap = {d: change(("odmap", d, key)) for d in ("i2t", "t2i")}
    recall = {d: change(("recall", d, "5")) for d in ("i2t", "t2i")}
    hr = change(("hr", key))
    parts.append(
        f"ODmAP@{k} i2t {odmap['i2t'][0]:.3f}→{odmap['i2t'][1]:.3f} ({odmap['i2t'][2]:+.3f}), "
        f"t2i {odmap['t2i'][0]:.3f}→{odmap['t2i'][1]:.3f} ({odmap['t2i'][2]:+.3f})"
    )
    parts.append(f"R@5 i2t {recall['i2t'][2]:+.3f}, t2i {recall['t2i'][2]:+.3f}")
    parts.append(f"HR@{k} {hr[0]:.3f}→{hr[1]:.3f} ({hr[2]:+.3f})")
    parts.append(f"Δ_ctrl base {_num(base['delta_ctrl']):+.3f}, finetuned {_num(tuned['delta_ctrl']):+.3f}")

    if not visible:
        failures.append(f"base {shortcut_text}")
    for direction, (_, _, delta) in odmap.items():
        if not (_finite(delta) and delta > 0):
            failures.append(f"ODmAP@{k} {direction} did not rise ({delta:+.3f})")
    for direction, (_, _, delta) in recall.items():
        if not (_finite(delta) and delta >= -recall_tolerance):
            failures.append(f"R@5 {direction} fell by {-delta:.3f}")
    for name, metrics in (("base", base), ("finetuned", tuned)):
        if not _small_delta(metrics["delta_ctrl"]):
            failures.append(f"{name} {_delta_text(metrics['delta_ctrl'])}")
    claim = (
        "The claim holds (base shows the shortcut; ODmAP rose both ways; R@5 did not fall; Δ_ctrl small)"
        if not failures
        else "The claim does not hold: " + "; ".join(failures)
    )
    line = "finetuned vs base: " + "; ".join(parts) + ". " + claim + "."
    return line + " " + (_attribution_text(gains or {}, k) if CONTROL in checkpoints else NO_CONTROL_TEXT)


def _ci_text(entry: Mapping, over: str = "") -> str:
    """'+0.040 over the control, CI +0.020 to +0.060' for one gain entry."""
    lo, hi = (_num(v) for v in entry["ci95"])
    return f"{_num(entry['gain']):+.3f}{over}, CI {lo:+.3f} to {hi:+.3f}"


def _improves(entry: Mapping, direction: int) -> bool:
    """The whole 95% CI lies on the improving side of 0 (a nan bound improves nothing)."""
    lo, hi = (_num(v) for v in entry["ci95"])
    if direction > 0:
        return lo > 0
    return hi < 0 if direction < 0 else False


def _worsens(entry: Mapping, direction: int) -> bool:
    lo, hi = (_num(v) for v in entry["ci95"])
    if direction > 0:
        return hi < 0
    return lo > 0 if direction < 0 else False


def _attribution_text(gains: Mapping, k: int) -> str:
    """The verdict's sentences on what the counterfactuals earned over the control."""
    against = comparison_name(TUNED, CONTROL)
    entries = {m: gains[m][against] for m in EARNED_METRICS if isinstance(gains.get(m), Mapping) and against in gains[m]}
    if not entries:
        return (
            "finetuned vs control: no per-query gains given, so nothing is attributed to the counterfactuals "
            "(write the report from evaluations with per_query)."
        )
    earned = [m for m, entry in entries.items() if _improves(entry, better_direction(m))]
    missed = [m for m in entries if m not in earned]
    text = (
        "The counterfactuals earned: "
        + ", ".join(f"{_label(m, k, short=True)} ({_ci_text(entries[m], ' over the control')})" for m in earned)
        + "."
        if earned
        else "The counterfactuals earned none of the gains they target over the control."
    )
    if missed:
        text += " Not attributable to them (no better than the same fine-tuning on originals): " + ", ".join(
            f"{_label(m, k, short=True)} ({_ci_text(entries[m])})" for m in missed
        ) + "."
    def below_control(metrics: Sequence[str], heading: str) -> str:
        """A sentence naming the metrics whose CI against the control lies wholly on the worsening side."""
        worse = [
            m for m in metrics
            if isinstance(gains.get(m), Mapping) and against in gains[m] and _worsens(gains[m][against], better_direction(m))
        ]
        if not worse:
            return ""
        return f" {heading} " + ", ".join(f"{_label(m, k, short=True)} ({_ci_text(gains[m][against])})" for m in worse) + "."

    text += below_control(OVERCORRECTION_METRICS, "Over-correction: on unedited images that show b, finetuned falls below the control in")
    # Standard retrieval the counterfactual training cost, measured against the same amount of plain training.
    text += below_control(RECALL_METRICS, "Standard retrieval below the control:")
    return text


# --------------------------------------------------------------------------- report.json


def _json_safe(value):
    """nan/inf -> None, numpy and torch scalars -> Python, tuples -> lists, paths -> str."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _ordered(checkpoints: Mapping[str, object]) -> dict[str, object]:
    """Checkpoints in display order: base, control, finetuned, then the others as given."""
    first = [name for name in CHECKPOINT_ORDER if name in checkpoints]
    return {name: checkpoints[name] for name in first + [n for n in checkpoints if n not in first]}


def report_document(
    checkpoints: Mapping[str, object],
    title: str,
    extra: Mapping | None = None,
    bootstrap_resamples: int = 2000,
    bootstrap_seed: int = 0,
) -> dict:
    """The report.json object for evaluations keyed by checkpoint name (no files written).

    Contract: see the module docstring. gains: `attribution.attributable_gains` of
    "finetuned" over "base" and "control" with `bootstrap_resamples` draws from `bootstrap_seed`.
    `extra` keys are added at top level and may not reuse a report key (ValueError names it).
    """
    if not checkpoints:
        raise ValueError("write_report: no checkpoint evaluations given; pass {'base': evaluate_checkpoint(...)}")
    checkpoints = _ordered(checkpoints)
    metrics = {name: ev.metrics for name, ev in checkpoints.items()}
    gains = attributable_gains(
        checkpoints, of=TUNED, against=("base", CONTROL), resamples=bootstrap_resamples, seed=bootstrap_seed
    )
    document = {
        "title": title,
        "k": _k_of(next(iter(metrics.values())), None),
        "checkpoints": metrics,
        "per_pair": [{"checkpoint": name, **row} for name, ev in checkpoints.items() for row in ev.per_pair],
        "examples": {name: ev.examples for name, ev in checkpoints.items()},
        "gains": gains,
        "verdict": verdict(metrics, gains=gains),
    }
    clashes = sorted(set(extra or {}) & (set(document) | {"plots"}))
    if clashes:
        raise ValueError(f"write_report: extra keys {clashes} would overwrite the report's own keys; rename them")
    return _json_safe({**document, **(extra or {})})


# --------------------------------------------------------------------------- plots


def _colours(n: int) -> list:
    return [plt.get_cmap("tab10")(i % 10) for i in range(n)]


def _label_bars(ax, bars, values, floors=None) -> None:
    floors = floors if floors is not None else [float("nan")] * len(values)
    for bar, value, floor in zip(bars, values, floors, strict=True):
        text = "n/a" if not np.isfinite(value) else f"{value:.2f}"
        height = 0.0 if not np.isfinite(value) else value
        if np.isfinite(floor) and height - 0.01 < floor < height + 0.06:
            height = floor  # a tick just above the bar would cut through the label: go above it
        ax.text(bar.get_x() + bar.get_width() / 2, height + 0.01, text, ha="center", va="bottom", fontsize=7)


def _pair_rows(checkpoints: Mapping[str, object]) -> tuple[list[str], dict[str, dict[str, dict]]]:
    """Pair names in first-seen order, and row by checkpoint then pair."""
    pairs: list[str] = []
    rows: dict[str, dict[str, dict]] = {}
    for name, ev in checkpoints.items():
        rows[name] = {}
        for row in ev.per_pair:
            rows[name][row["pair"]] = row
            if row["pair"] not in pairs:
                pairs.append(row["pair"])
    return pairs, rows


def _value(row: dict | None, key: str) -> float:
    value = None if row is None else row.get(key)
    return float(value) if _finite(value) else float("nan")


def plot_odmap_per_pair(checkpoints: Mapping[str, object], out_png: Path, k: int) -> Path:
    """Bars of per-pair ODmAP@k, image->text and text->image side by side, one bar per checkpoint."""
    pairs, rows = _pair_rows(checkpoints)
    names = list(checkpoints)
    width = 0.8 / max(1, len(names))
    x = np.arange(len(pairs))
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.6 * len(pairs) * 2 + 2), 4.0), sharey=True)
    for ax, (direction, label) in zip(axes, (("odmap_i2t", "image → text"), ("odmap_t2i", "text → image")), strict=True):
        for i, (name, colour) in enumerate(zip(names, _colours(len(names)), strict=True)):
            values = [_value(rows[name].get(pair), direction) for pair in pairs]
            bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, np.nan_to_num(values), width, label=name, color=colour)
            _label_bars(ax, bars, values)
        ax.set_title(f"ODmAP@{k}, {label}", fontsize=10)
        ax.set_xticks(x, pairs, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1.08)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(f"ODmAP@{k} (higher is better)")
    axes[1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out_png


def plot_hr_per_pair(checkpoints: Mapping[str, object], out_png: Path, k: int) -> Path:
    """Per-pair HR@k on I^-b beside the anchor-only and natural rates, one panel per checkpoint.

    A dashed tick over each HR bar marks 2x the natural rate: the bar reaching it means
    the shortcut is visible for that pair.
    """
    pairs, rows = _pair_rows(checkpoints)
    names = list(checkpoints)
    x = np.arange(len(pairs))
    width = 0.26
    fig, axes = plt.subplots(
        1, len(names), figsize=(max(5.5, 1.5 * len(pairs) + 2) * len(names), 4.0), sharey=True, squeeze=False
    )
    series = (
        ("hr", f"HR@{k} on I⁻ᵇ (companion removed)", None, ""),
        ("anchor_only", "anchor-only rate (a without b)", "#f39c12", "//"),
        ("natural", "natural rate (neither a nor b)", "#9e9e9e", ""),
    )
    for ax, name, colour in zip(axes[0], names, _colours(len(names)), strict=True):
        natural = [_value(rows[name].get(pair), "natural") for pair in pairs]
        for i, (key, label, series_colour, hatch) in enumerate(series):
            values = [_value(rows[name].get(pair), key) for pair in pairs]
            # The HR label sits above the threshold tick when the bar is shorter than it.
            floors = [SHORTCUT_FACTOR * rate for rate in natural] if key == "hr" else None
            bars = ax.bar(
                x + (i - 1) * width, np.nan_to_num(values), width, label=label,
                color=series_colour or colour, hatch=hatch, edgecolor="white" if not hatch else "#7f5200",
            )
            _label_bars(ax, bars, values, floors)
        for xi, rate in zip(x, natural, strict=True):
            if np.isfinite(rate):
                ax.hlines(SHORTCUT_FACTOR * rate, xi - width - width / 2, xi - width + width / 2,
                          colors="black", linestyles="dashed", linewidth=1.2)
        ax.set_title(f"{name}: HR@{k} per pair (lower is better)", fontsize=10)
        ax.set_xticks(x, pairs, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1.08)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(f"share of top-{k} captions mentioning b")
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="black", linestyle="dashed"))
    labels.append(f"{SHORTCUT_FACTOR:g} × natural rate (shortcut threshold)")
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(out_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out_png


def _thumbnail(path: str, side: int = 256) -> np.ndarray | None:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((side, side))
            return np.asarray(image)
    except (OSError, ValueError):
        return None


def _show_image(ax, path: str, title: str) -> None:
    pixels = _thumbnail(path)
    if pixels is None:
        ax.text(0.5, 0.5, f"cannot read\n{Path(path).name}", ha="center", va="center", fontsize=8, color="grey")
    else:
        ax.imshow(pixels)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_example_retrievals(checkpoints: Mapping[str, object], out_png: Path, k: int) -> Path | None:
    """Original | removal image, then each checkpoint's top captions; offending (mention b) in red.

    Rows are the first checkpoint's examples; other checkpoints show the same removal
    query (matched by cf_image_id) when they have it. None when there is no example.
    """
    names = list(checkpoints)
    lead = checkpoints[names[0]].examples
    if not lead:
        return None
    by_query = {name: {ex["cf_image_id"]: ex for ex in checkpoints[name].examples} for name in names}
    wrap = 58
    fig_width = 2 * 2.4 + 4.6 * len(names)
    fig = plt.figure(figsize=(fig_width, 2.9 * len(lead) + 0.4))
    grid = fig.add_gridspec(len(lead), 2 + len(names), width_ratios=[2.4, 2.4] + [4.6] * len(names))
    for r, example in enumerate(lead):
        _show_image(fig.add_subplot(grid[r, 0]), example["original_path"], f"original (image {example['source_image_id']})")
        _show_image(fig.add_subplot(grid[r, 1]), example["removal_path"], f"{example['companion']} removed ({example['pair']})")
        for c, name in enumerate(names):
            ax = fig.add_subplot(grid[r, 2 + c])
            ax.axis("off")
            shown = by_query[name].get(example["cf_image_id"])
            if shown is None:
                ax.text(0, 1, f"{name}: this query is not among its examples", fontsize=8, va="top")
                continue
            ax.text(
                0, 1.0,
                f"{name}: top {len(shown['top'])} captions   AP@{k} {shown['ap']:.2f}   HR@{k} {shown['hr']:.2f}",
                fontsize=9, fontweight="bold", va="top", transform=ax.transAxes,
            )
            # Offsets in points, not axes fractions, so line spacing does not depend on the row height.
            offset = 16.0
            for item in shown["top"]:
                if item["offending"]:
                    colour, mark = OFFENDING_COLOUR, "✗"
                elif item["relevant"]:
                    colour, mark = RELEVANT_COLOUR, "✓"
                else:
                    colour, mark = "black", "·"
                edit = " [edit]" if item["is_edit"] else ""
                lines = textwrap.wrap(f"{item['rank']}. {mark} {item['caption']}{edit}", wrap, subsequent_indent="     ")
                ax.annotate(
                    "\n".join(lines), xy=(0, 1), xycoords="axes fraction", xytext=(0, -offset),
                    textcoords="offset points", fontsize=8, color=colour, va="top", linespacing=1.2,
                )
                offset += 8 * 1.35 * len(lines) + 5
    fig.suptitle(
        "Example retrievals for removal queries I⁻ᵇ:  ✗ red = mentions the removed companion b (offending),  "
        "✓ green = relevant (I's captions without b, or their accepted edits)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out_png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out_png


def plot_gains(document: dict, out_png: Path) -> Path | None:
    """Fine-tuned's gain over each reference per metric, a dot with its 95% bootstrap CI; None without gains.

    Metrics whose lower value is better (HR@k) are marked in their label; a CI clear of
    the dashed zero line on the improving side is a gain the comparison earned.
    """
    gains, k = document.get("gains") or {}, document["k"]
    metrics = [m for m in GAIN_ROWS if m in gains] + [m for m in gains if m not in GAIN_ROWS]
    comparisons = list(dict.fromkeys(name for m in metrics for name in gains[m]))
    if not metrics or not comparisons:
        return None
    fig, ax = plt.subplots(figsize=(8.0, 0.42 * len(metrics) + 1.6))
    y = np.arange(len(metrics))[::-1].astype(float)
    step = 0.3 / max(1, len(comparisons) - 1) if len(comparisons) > 1 else 0.0
    for i, (name, colour) in enumerate(zip(comparisons, _colours(len(comparisons)), strict=True)):
        offset = (i - (len(comparisons) - 1) / 2) * step
        label: str | None = name.replace("-", " − ")  # the legend names each comparison once
        for yi, metric in zip(y, metrics, strict=True):
            entry = gains[metric].get(name)
            if entry is None or not _finite(entry.get("gain")):
                continue
            gain = float(entry["gain"])
            lo, hi = (_num(v) for v in entry["ci95"])
            # A percentile CI need not contain the estimate (a constant gain misses it by rounding).
            below = max(0.0, gain - lo) if np.isfinite(lo) else 0.0
            above = max(0.0, hi - gain) if np.isfinite(hi) else 0.0
            errors = [[below], [above]]
            ax.errorbar(gain, yi - offset, xerr=errors, fmt="o", color=colour, capsize=3, markersize=4, label=label)
            label = None
    ax.axvline(0.0, color="black", linestyle="dashed", linewidth=1)
    ax.set_yticks(y, [_label(m, k, short=True) + (" (lower is better)" if better_direction(m) < 0 else "")
                      for m in metrics], fontsize=8)
    ax.set_xlabel("gain with 95% paired bootstrap CI")
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("What fine-tuning and the counterfactuals earned", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out_png


# --------------------------------------------------------------------------- per-query scores


def write_per_query(checkpoints: Mapping[str, object], out_path: Path) -> Path | None:
    """Every checkpoint's per-query scores as one long Parquet table; None when no checkpoint has any.

    Columns: checkpoint, metric, query (position in the metric's QueryScores), stratum
    (the pair, null for unstratified metrics), value (null where the metric skips the query).
    """
    frames = []
    for name, ev in checkpoints.items():
        for metric, scores in (getattr(ev, "per_query", None) or {}).items():
            n = len(scores.values)
            strata = [str(v) for v in scores.strata] if scores.strata is not None else [None] * n
            frames.append(pl.DataFrame(
                {"checkpoint": [name] * n, "metric": [metric] * n, "query": np.arange(n, dtype=np.int32),
                 "stratum": strata, "value": scores.values},
                schema={"checkpoint": pl.Utf8, "metric": pl.Utf8, "query": pl.Int32, "stratum": pl.Utf8,
                        "value": pl.Float64},
            ))
    if not frames:
        return None
    pl.concat(frames).with_columns(pl.col("value").fill_nan(None)).write_parquet(out_path)
    return out_path


# --------------------------------------------------------------------------- tables


def _fmt(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _lookup(metrics: Mapping, path: Sequence[str]):
    value = metrics
    for part in path:
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _label(metric: str, k: int, short: bool = False) -> str:
    """A per-query metric's name for people: table row label, or the verdict's short form."""
    if metric.startswith("recall_") and not metric.endswith("_with_b"):
        _, direction, r = metric.split("_")
        return f"R@{r} {direction}" if short else f"Recall@{r} {_ARROW[direction]}"
    labels = {
        "odmap_i2t": (f"ODmAP@{k} i2t", f"ODmAP@{k} image→text (macro)"),
        "odmap_t2i": (f"ODmAP@{k} t2i", f"ODmAP@{k} text→image (macro)"),
        "hr": (f"HR@{k}", f"HR@{k} on I⁻ᵇ (lower is better)"),
        "delta_ctrl": ("Δ_ctrl", "Δ_ctrl"),
        "pairwise_i2t": ("pairwise accuracy i2t", "pairwise accuracy image→text (edit over its b-caption)"),
        "pairwise_t2i": ("pairwise accuracy t2i", "pairwise accuracy text→image (I over I⁻ᵇ)"),
        "b_mention_rate": (f"b-mention rate@{k}", f"b-mention rate@{k} on unedited images showing b"),
        "recall_i2t_5_with_b": ("R@5 i2t on images showing b", "Recall@5 image→text on unedited images showing b"),
    }
    short_label, long_label = labels.get(metric, (metric, metric))
    return short_label if short else long_label


_ARROW = {"i2t": "image→text", "t2i": "text→image"}


def _metric_table(document: dict) -> tuple[list[str], list[list[str]]]:
    k = document["k"]
    key = str(k)
    metrics = document["checkpoints"]
    names = list(metrics)
    compare = "base" in metrics and "finetuned" in metrics
    header = ["metric", *names] + (["finetuned − base"] if compare else [])
    lines = [
        *[(f"Recall@{r} image→text", ("recall", "i2t", str(r))) for r in (1, 5, 10)],
        *[(f"Recall@{r} text→image", ("recall", "t2i", str(r))) for r in (1, 5, 10)],
        (f"ODmAP@{k} image→text (macro)", ("odmap", "i2t", key)),
        (f"ODmAP@{k} text→image (macro)", ("odmap", "t2i", key)),
        (f"ODmAP@{k} image→text (micro)", ("odmap_micro", "i2t", key)),
        (f"ODmAP@{k} text→image (micro)", ("odmap_micro", "t2i", key)),
        (f"HR@{k} on I⁻ᵇ (lower is better)", ("hr", key)),
        (f"natural rate@{k}", ("hr", f"natural_{key}")),
        (f"anchor-only rate@{k}", ("hr", f"anchor_only_{key}")),
        ("Δ_ctrl", ("delta_ctrl",)),
    ]
    # Newer metrics, shown when some checkpoint has them.
    lines += [
        (_label(metric, k), headline_path(metric, k))
        for metric in ("pairwise_i2t", "pairwise_t2i", "b_mention_rate", "recall_i2t_5_with_b")
        if any(_lookup(m, headline_path(metric, k)) is not None for m in metrics.values())
    ]
    rows = []
    for label, path in lines:
        values = [_lookup(metrics[name], path) for name in names]
        row = [label, *[_fmt(v, signed=path == ("delta_ctrl",)) for v in values]]
        if compare:
            before, after = _lookup(metrics["base"], path), _lookup(metrics["finetuned"], path)
            row.append(_fmt(after - before, signed=True) if _finite(before) and _finite(after) else "n/a")
        rows.append(row)
    counts = _lookup(metrics[names[0]], ("counts",)) or {}
    for label, count_key in (
        ("test images / captions", ("test_images", "test_captions")),
        ("removal queries I⁻ᵇ (scored)", ("removal_queries", "removal_queries_scored")),
        ("text queries / controls", ("t2i_queries", "controls")),
        ("accepted caption edits", ("accepted_edits",)),
    ):
        if all(c in counts for c in count_key):
            text = " / ".join(str(counts[c]) for c in count_key)
            if count_key == ("removal_queries", "removal_queries_scored"):
                text = f"{counts[count_key[0]]} ({counts[count_key[1]]})"
            rows.append([label, *[text] * len(names)] + ([""] if compare else []))
    return header, rows


PER_PAIR_COLUMNS = (
    ("pair", "pair"),
    ("checkpoint", "checkpoint"),
    ("n_removal", "I⁻ᵇ queries"),
    ("n_t2i_queries", "text queries"),
    ("odmap_i2t", "ODmAP i2t"),
    ("odmap_t2i", "ODmAP t2i"),
    ("hr", "HR"),
    ("natural", "natural"),
    ("anchor_only", "anchor-only"),
    ("delta_ctrl", "Δ_ctrl"),
    # Newer fields: a column only when some row has it.
    ("pairwise_i2t", "pairwise i2t"),
    ("pairwise_t2i", "pairwise t2i"),
    ("n_with_b", "images with b"),
    ("b_mention_rate", "b-mention rate"),
    ("recall_i2t_5_with_b", "R@5 i2t with b"),
)
_ALWAYS_PER_PAIR = 10  # the first columns above are shown even when missing (as n/a)


def _per_pair_table(document: dict) -> tuple[list[str], list[list[str]]]:
    order = {name: i for i, name in enumerate(document["checkpoints"])}
    pairs = list(dict.fromkeys(row["pair"] for row in document["per_pair"]))
    rows = sorted(document["per_pair"], key=lambda row: (pairs.index(row["pair"]), order.get(row["checkpoint"], 0)))
    columns = [
        column for i, column in enumerate(PER_PAIR_COLUMNS)
        if i < _ALWAYS_PER_PAIR or any(column[0] in row for row in rows)
    ]
    header = [label for _, label in columns]
    body = [[_fmt(row.get(key), signed=key == "delta_ctrl") for key, _ in columns] for row in rows]
    return header, body


# The order of the "What the counterfactuals earned" table.
GAIN_ROWS = (
    "odmap_i2t", "odmap_t2i", "hr", "pairwise_i2t", "pairwise_t2i", "b_mention_rate", "recall_i2t_5_with_b",
    *(f"recall_{d}_{r}" for d in ("i2t", "t2i") for r in (1, 5, 10)), "delta_ctrl",
)


def _gain_cell(entry: Mapping | None) -> str:
    if entry is None or not _finite(entry.get("gain")):
        return "n/a"
    lo, hi = entry["ci95"]
    return f"{entry['gain']:+.3f} [{_fmt(lo, signed=True)}, {_fmt(hi, signed=True)}]"


def _gains_table(document: dict) -> tuple[list[str], list[list[str]]] | None:
    """Metric | base | control | fine-tuned | gains with 95% CI | attributable?; None without gains.

    References (base, control) absent from the report get no column; "attributable?" needs
    the control: "yes" when the CI of fine-tuned − control lies wholly on the improving
    side of 0 (below for HR), "no" otherwise, "—" for Δ_ctrl (no improving side).
    """
    gains, metrics, k = document.get("gains") or {}, document["checkpoints"], document["k"]
    if not gains or TUNED not in metrics:
        return None
    references = [name for name in ("base", CONTROL) if name in metrics]
    header = ["metric", *references, "fine-tuned"]
    header += [f"fine-tuned − {name} [95% CI]" for name in references]
    if CONTROL in references:
        header.append("attributable?")
    rows = []
    for metric in [m for m in GAIN_ROWS if m in gains] + [m for m in gains if m not in GAIN_ROWS]:
        path = headline_path(metric, k) if metric in GAIN_ROWS else None
        signed = metric == "delta_ctrl"
        values = [_fmt(_lookup(metrics[name], path), signed=signed) if path else "n/a" for name in (*references, TUNED)]
        row = [_label(metric, k), *values]
        row += [_gain_cell(gains[metric].get(comparison_name(TUNED, name))) for name in references]
        if CONTROL in references:
            entry = gains[metric].get(comparison_name(TUNED, CONTROL))
            direction = better_direction(metric)
            if direction == 0:
                row.append("—")
            elif entry is None or not _finite(entry.get("gain")):
                row.append("n/a")
            else:
                # "no" alone would hide a loss: a CI wholly on the worsening side says so.
                row.append("yes" if _improves(entry, direction) else "no: worse" if _worsens(entry, direction) else "no")
        rows.append(row)
    return header, rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# --------------------------------------------------------------------------- documents


PLOT_TITLES = {
    "odmap_per_pair": "ODmAP@{k} per pair",
    "hr_per_pair": "HR@{k} per pair, with the natural and anchor-only rates",
    "example_retrievals": "Example retrievals",
    "gains": "Gains of the fine-tuned checkpoint with 95% CIs",
}

DEFINITIONS = (
    "Definitions are this project's own (docs/definitions.md in spur-assets), written to match Kim et al., CVPR 2023 W, "
    "arXiv 2304.03391, whose full text was not available. Recall@K: COCO protocol on the original test "
    "images and captions. ODmAP@k image→text: queries I⁻ᵇ (the companion b inpainted away), relevant = I's "
    "captions without b plus their accepted edits. ODmAP@k text→image: I's original b-captions, relevant = I, "
    "I⁻ᵇ in the gallery as the hard negative. Macro = mean over pairs of per-pair means. HR@k: share of "
    "the top-k captions of I⁻ᵇ that mention b (lower is better); the natural rate uses unedited images "
    "with neither a nor b, the anchor-only rate those with a but not b. Δ_ctrl = mAP@k(I) − mAP@k(Iᶜ) "
    "for the equal-area control Iᶜ; it lies in [−1, 1] and near 0 means inpainting alone does not move "
    "retrieval. Pairwise accuracy (macro over pairs): image→text, the share of (I⁻ᵇ, accepted edit) where "
    "I⁻ᵇ scores the edit strictly above the original b-caption it was edited from; text→image, the share "
    "of I's b-captions that score I strictly above I⁻ᵇ. Over-correction (macro over pairs): on unedited "
    "test images that show b, the share of their top-k original captions that mention b (b is there, so "
    "a drop means the model stopped naming it) and their Recall@5 image→text. The control checkpoint is "
    "the same fine-tuning on the original captions and images only; a gain of fine-tuned over it is what "
    "the counterfactuals earned. CIs: paired bootstrap over eval queries (the same draw for both "
    "checkpoints), resampled within each pair, 2.5th to 97.5th percentile."
)

EARNED_NOTE = (
    "Gains of the fine-tuned checkpoint with 95% paired bootstrap CIs over eval queries. "
    "“attributable?” is yes when the CI of fine-tuned − control lies wholly on the improving side of 0 "
    "(below 0 for HR@k): the counterfactuals, not the fine-tuning itself, earned it; “no: worse” when it "
    "lies wholly on the other side (the fine-tune is worse than the same training on originals)."
)


def _markdown(document: dict, plots: dict[str, Path]) -> str:
    k = document["k"]
    parts = [f"# {document['title']}", "", f"**Verdict.** {document['verdict']}", ""]
    parts += ["## Metrics", "", _markdown_table(*_metric_table(document)), ""]
    earned = _gains_table(document)
    if earned is not None:
        parts += ["## What the counterfactuals earned", "", EARNED_NOTE, "", _markdown_table(*earned), ""]
    parts += ["## Per pair", "", _markdown_table(*_per_pair_table(document)), ""]
    if plots:
        parts += ["## Plots", ""]
        for name, path in plots.items():
            parts += [f"### {PLOT_TITLES[name].format(k=k)}", "", f"![{PLOT_TITLES[name].format(k=k)}]({path.name})", ""]
    parts += ["## Definitions", "", DEFINITIONS, ""]
    provenance = {key: value for key, value in document.items() if key not in _OWN_KEYS}
    if provenance:
        parts += ["## Provenance", "", "```json", json.dumps(provenance, indent=2, ensure_ascii=False), "```", ""]
    return "\n".join(parts)


_OWN_KEYS = {"title", "k", "checkpoints", "per_pair", "examples", "gains", "verdict", "plots"}

_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
    "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th:first-child,td:first-child{text-align:left}"
    "th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}"
    ".verdict{background:#f6f8fa;border-left:4px solid #555;padding:0.6em 1em}"
    "pre{background:#f6f8fa;padding:0.8em;overflow-x:auto}"
)


def _html(document: dict, plots: dict[str, Path]) -> str:
    k = document["k"]
    title = html.escape(document["title"])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title><style>{_CSS}</style></head><body>",
        f"<h1>{title}</h1>",
        f'<p class="verdict"><strong>Verdict.</strong> {html.escape(document["verdict"])}</p>',
        "<h2>Metrics</h2>",
        _html_table(*_metric_table(document)),
    ]
    earned = _gains_table(document)
    if earned is not None:
        parts += ["<h2>What the counterfactuals earned</h2>", f"<p>{html.escape(EARNED_NOTE)}</p>", _html_table(*earned)]
    parts += ["<h2>Per pair</h2>", _html_table(*_per_pair_table(document))]
    if plots:
        parts.append("<h2>Plots</h2>")
        for name, path in plots.items():
            encoded = base64.b64encode(path.read_bytes()).decode("ascii")
            label = html.escape(PLOT_TITLES[name].format(k=k))
            parts.append(f'<h3>{label}</h3><img alt="{label}" src="data:image/png;base64,{encoded}">')
    parts += ["<h2>Definitions</h2>", f"<p>{html.escape(DEFINITIONS)}</p>"]
    provenance = {key: value for key, value in document.items() if key not in _OWN_KEYS}
    if provenance:
        text = html.escape(json.dumps(provenance, indent=2, ensure_ascii=False))
        parts += ["<h2>Provenance</h2>", f"<pre>{text}</pre>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    checkpoints: Mapping[str, object],
    out_dir: Path,
    title: str = "spur-assets metric report",
    extra: Mapping | None = None,
    bootstrap_resamples: int = 2000,
    bootstrap_seed: int = 0,
) -> dict[str, Path]:
    """Write report.json, report.md, report.html, the plots and the per-query scores for checkpoint evaluations.

    Contract: `checkpoints` maps a name ("base", "control", "finetuned", any other) to an
    `evaluation.CheckpointEvaluation`; its `per_query` (optional) feeds report.json's
    gains (`bootstrap_resamples` paired bootstrap draws from `bootstrap_seed`) and per_query.parquet. All files go
    directly in `out_dir` (created): report.json (see the module docstring;
    `check_report_shape` finds nothing wrong when every fixed metric is defined),
    report.md (tables, verdict, the "What the counterfactuals earned" table when there
    are gains, plots as relative image links), report.html (self-contained: plots inlined
    as base64, no links), the PNGs odmap_per_pair, hr_per_pair, example_retrievals (only
    when there are examples) and gains (only when there are gains), and per_query.parquet
    (only when some checkpoint has per-query scores). Returns {"json", "markdown",
    "html", <plot name>, "per_query" when written: path}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = _ordered(checkpoints)
    document = report_document(
        checkpoints, title, extra, bootstrap_resamples=bootstrap_resamples, bootstrap_seed=bootstrap_seed
    )
    k = document["k"]
    plots: dict[str, Path] = {
        "odmap_per_pair": plot_odmap_per_pair(checkpoints, out_dir / PLOT_FILES["odmap_per_pair"], k),
        "hr_per_pair": plot_hr_per_pair(checkpoints, out_dir / PLOT_FILES["hr_per_pair"], k),
    }
    examples = plot_example_retrievals(checkpoints, out_dir / PLOT_FILES["example_retrievals"], k)
    if examples is not None:
        plots["example_retrievals"] = examples
    gains_png = plot_gains(document, out_dir / PLOT_FILES["gains"])
    if gains_png is not None:
        plots["gains"] = gains_png
    document["plots"] = {name: path.name for name, path in plots.items()}
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "html": out_dir / "report.html"}
    paths["json"].write_text(json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(_markdown(document, plots), encoding="utf-8")
    paths["html"].write_text(_html(document, plots), encoding="utf-8")
    per_query = write_per_query(checkpoints, out_dir / PER_QUERY_FILE)
    return {**paths, **plots, **({"per_query": per_query} if per_query is not None else {})}
