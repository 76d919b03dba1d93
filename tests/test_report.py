"""The metric report: the shape of docs/data-contract.md#reportjson, the verdict line, and the files written."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
from PIL import Image

from spur_assets.core.metrics.evaluation import CheckpointEvaluation
from spur_assets.core.metrics.report import check_report_shape, verdict, write_report

PAIRS = [("dog", "frisbee"), ("person", "surfboard"), ("car", "traffic light")]


def _metrics(odmap_i2t=0.2, odmap_t2i=0.34, hr=0.28, natural=0.05, anchor_only=0.31, delta=0.004, r5_i2t=0.6, r5_t2i=0.5):
    return {
        "recall": {"i2t": {"1": 0.3, "5": r5_i2t, "10": 0.8}, "t2i": {"1": 0.2, "5": r5_t2i, "10": 0.7}},
        "odmap": {"i2t": {"10": odmap_i2t}, "t2i": {"10": odmap_t2i}},
        "hr": {"10": hr, "natural_10": natural, "anchor_only_10": anchor_only},
        "delta_ctrl": delta,
        "odmap_micro": {"i2t": {"10": odmap_i2t}, "t2i": {"10": odmap_t2i}},
        "k": 10,
        "counts": {"test_images": 40, "test_captions": 200, "accepted_edits": 12, "removal_queries": 9,
                   "removal_queries_scored": 9, "t2i_queries": 14, "controls": 9},
    }


def _per_pair(scale: float) -> list[dict]:
    rows = []
    for i, (anchor, companion) in enumerate(PAIRS):
        rows.append({
            "pair": f"{anchor}->{companion}", "anchor": anchor, "companion": companion,
            "n_removal": 3, "n_t2i_queries": 5, "n_controls": 3,
            "odmap_i2t": scale * (0.2 + 0.1 * i), "odmap_t2i": scale * 0.3, "hr": 0.4 / scale - 0.1 * i,
            "natural": 0.05, "anchor_only": 0.3, "delta_ctrl": 0.01 * i - 0.01,
        })
    rows[2]["odmap_t2i"] = float("nan")  # a pair whose text queries all went missing
    return rows


def _write_png(path, colour):
    Image.fromarray(np.full((48, 64, 3), colour, dtype=np.uint8)).save(path)
    return str(path)


def _examples(tmp_path, offending_first: bool) -> list[dict]:
    original = _write_png(tmp_path / "orig.png", (200, 120, 40))
    removal = _write_png(tmp_path / "removal.png", (40, 120, 200))
    top = [
        {"rank": 1, "caption": "A dog catches a frisbee in the park on a sunny afternoon while people watch.",
         "caption_id": 1, "is_edit": False, "relevant": False, "offending": True},
        {"rank": 2, "caption": "A dog in the park.", "caption_id": 7, "is_edit": True, "relevant": True, "offending": False},
        {"rank": 3, "caption": "A cat on a sofa.", "caption_id": 9, "is_edit": False, "relevant": False, "offending": False},
    ]
    if not offending_first:
        top = [top[1], top[2], top[0]]
        for rank, item in enumerate(top, start=1):
            item["rank"] = rank
    return [{
        "pair": "dog->frisbee", "anchor": "dog", "companion": "frisbee", "source_image_id": 5, "cf_image_id": 11,
        "original_path": original, "removal_path": removal, "ap": 0.25 if offending_first else 1.0,
        "hr": 0.33, "top": copy.deepcopy(top),
    }]


def _evaluations(tmp_path) -> dict[str, CheckpointEvaluation]:
    return {
        "base": CheckpointEvaluation(_metrics(), _per_pair(1.0), _examples(tmp_path, True)),
        "finetuned": CheckpointEvaluation(
            _metrics(odmap_i2t=0.29, odmap_t2i=0.36, hr=0.09, r5_i2t=0.61, r5_t2i=0.5, delta=-0.003),
            _per_pair(1.4),
            _examples(tmp_path, False),
        ),
    }


# ----------------------------------------------------------------------------- check_report_shape


def test_shape_check_accepts_a_conforming_report():
    assert check_report_shape({"checkpoints": {"base": _metrics(), "finetuned": _metrics()}, "per_pair": []}) == []
    assert check_report_shape({"checkpoints": {"base": _metrics(delta=-0.4)}}) == []  # delta_ctrl may be negative


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda m: m["recall"]["i2t"].pop("5"), "checkpoints.base.recall.i2t.5 is missing"),
        (lambda m: m["odmap"]["t2i"].update({"10": 1.2}), "checkpoints.base.odmap.t2i.10 = 1.2 is outside [0, 1]"),
        (lambda m: m["hr"].update({"natural_10": float("nan")}), "checkpoints.base.hr.natural_10 is nan, not finite"),
        (lambda m: m["hr"].update({"anchor_only_10": None}), "checkpoints.base.hr.anchor_only_10 is missing"),
        (lambda m: m["hr"].update({"10": True}), "checkpoints.base.hr.10 is True, not a number"),
        (lambda m: m.update({"delta_ctrl": -1.5}), "checkpoints.base.delta_ctrl = -1.5 is outside [-1, 1]"),
        (lambda m: m["recall"]["t2i"].update({"1": -0.1}), "checkpoints.base.recall.t2i.1 = -0.1 is outside [0, 1]"),
        (lambda m: m.pop("hr"), "checkpoints.base.hr.10 is missing"),
    ],
)
def test_shape_check_names_each_problem(mutate, expected):
    metrics = _metrics()
    mutate(metrics)
    problems = check_report_shape({"checkpoints": {"base": metrics}})
    assert any(expected in problem for problem in problems), problems


def test_shape_check_on_whole_report_problems():
    assert check_report_shape({}) and check_report_shape({"checkpoints": {}})
    assert check_report_shape([]) == ["report is a list, not a JSON object"]
    assert any("per_pair" in p for p in check_report_shape({"checkpoints": {"base": _metrics()}, "per_pair": {"a": 1}}))
    # k other than 10: the odmap/hr keys follow it, recall keeps 1/5/10.
    metrics = _metrics()
    metrics["odmap"] = {"i2t": {"5": 0.5}, "t2i": {"5": 0.5}}
    metrics["hr"] = {"5": 0.1, "natural_5": 0.0, "anchor_only_5": 0.2}
    metrics["k"] = 5
    assert check_report_shape({"checkpoints": {"base": metrics}}) == []
    assert check_report_shape({"checkpoints": {"base": metrics}}, k=10)


# ----------------------------------------------------------------------------- verdict


def test_verdict_base_only_shortcut_visible_and_small_delta():
    line = verdict({"base": _metrics(hr=0.28, natural=0.05, delta=0.004)})
    assert line.startswith("base: shortcut visible")
    assert "0.280 ≥ 2 × natural rate 0.050" in line
    assert "Δ_ctrl +0.004 small" in line and "\n" not in line


def test_verdict_base_only_no_shortcut_and_large_delta():
    line = verdict({"base": _metrics(hr=0.09, natural=0.05, delta=-0.05)})
    assert "shortcut not visible" in line and "0.090 < 2 × natural rate 0.050" in line
    assert "Δ_ctrl -0.050 NOT small" in line
    # A natural rate of 0 does not make HR = 0 a visible shortcut.
    assert "shortcut not visible" in verdict({"base": _metrics(hr=0.0, natural=0.0)})
    assert "cannot be judged" in verdict({"base": _metrics(hr=None)})


def test_verdict_claim_holds():
    line = verdict({
        "base": _metrics(odmap_i2t=0.2, odmap_t2i=0.34, hr=0.28, r5_i2t=0.6, r5_t2i=0.5),
        "finetuned": _metrics(odmap_i2t=0.29, odmap_t2i=0.36, hr=0.09, r5_i2t=0.6, r5_t2i=0.52),
    })
    assert "ODmAP@10 i2t 0.200→0.290 (+0.090), t2i 0.340→0.360 (+0.020)" in line
    assert "R@5 i2t +0.000, t2i +0.020" in line and "HR@10 0.280→0.090 (-0.190)" in line
    assert "The claim holds" in line and "\n" not in line


def test_verdict_claim_fails_and_says_why():
    # The prototype's numbers: t2i did not rise and R@5 fell.
    base = _metrics(odmap_i2t=0.20, odmap_t2i=0.34, hr=0.28, r5_i2t=0.600, r5_t2i=0.500)
    tuned = _metrics(odmap_i2t=0.29, odmap_t2i=0.34, hr=0.09, r5_i2t=0.582, r5_t2i=0.490, delta=0.03)
    line = verdict({"base": base, "finetuned": tuned})
    assert "The claim does not hold" in line
    assert "ODmAP@10 t2i did not rise (+0.000)" in line
    assert "R@5 i2t fell by 0.018" in line and "R@5 t2i fell by 0.010" in line
    assert "finetuned Δ_ctrl +0.030 NOT small" in line
    assert "ODmAP@10 i2t did not rise" not in line
    # With a recall tolerance of 0.02 the recall drops are forgiven, the rest is not.
    tolerant = verdict({"base": base, "finetuned": tuned}, recall_tolerance=0.02)
    assert "R@5" not in tolerant.split("does not hold")[1]
    # No shortcut in the base model: the claim fails on that too.
    assert "base shortcut not visible" in verdict({"base": _metrics(hr=0.05, natural=0.05), "finetuned": tuned})


def test_verdict_without_base_says_so():
    assert verdict({"other": _metrics()}).startswith("no verdict")


# ----------------------------------------------------------------------------- write_report


def test_write_report_files(tmp_path):
    out = tmp_path / "report"
    paths = write_report(_evaluations(tmp_path), out, title="toy report", extra={"lineage": {"base": "m-1"}})
    assert set(paths) == {"json", "markdown", "html", "odmap_per_pair", "hr_per_pair", "example_retrievals"}
    for path in paths.values():
        assert path.parent == out and path.is_file() and path.stat().st_size > 0

    report = json.loads(paths["json"].read_text())
    assert check_report_shape(report) == []
    assert set(report["checkpoints"]) == {"base", "finetuned"}
    assert report["checkpoints"]["finetuned"]["odmap"]["i2t"]["10"] == pytest.approx(0.29)
    assert report["lineage"] == {"base": "m-1"} and report["title"] == "toy report"
    assert report["verdict"] == verdict({"base": _metrics(), "finetuned": report["checkpoints"]["finetuned"]})
    # Long per-pair format: one row per checkpoint and pair; nan becomes null.
    assert len(report["per_pair"]) == 2 * len(PAIRS)
    assert {(row["checkpoint"], row["pair"]) for row in report["per_pair"]} == {
        (name, f"{a}->{b}") for name in ("base", "finetuned") for a, b in PAIRS
    }
    assert [row["odmap_t2i"] for row in report["per_pair"] if row["pair"] == "car->traffic light"] == [None, None]
    assert report["plots"] == {
        "odmap_per_pair": "odmap_per_pair.png", "hr_per_pair": "hr_per_pair.png",
        "example_retrievals": "example_retrievals.png",
    }

    for name in ("odmap_per_pair", "hr_per_pair", "example_retrievals"):
        with Image.open(paths[name]) as image:
            image.verify()
        with Image.open(paths[name]) as image:
            assert image.format == "PNG" and min(image.size) >= 300

    markdown = paths["markdown"].read_text()
    assert markdown.startswith("# toy report") and report["verdict"] in markdown
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(links) == sorted(report["plots"].values())
    assert all((out / link).is_file() for link in links)
    assert "| dog->frisbee | base | 3 | 5 | 0.200 | 0.300 |" in markdown
    assert "| ODmAP@10 image→text (macro) | 0.200 | 0.290 | +0.090 |" in markdown

    page = paths["html"].read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 3 and all(re.fullmatch(r"data:image/png;base64,[A-Za-z0-9+/]+=*", s) for s in sources)
    # Outside the inlined images (base64 can spell anything), nothing points anywhere.
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/]+=*", "", page).lower()
    assert "http:" not in text and "https:" not in text and "href" not in text and "url(" not in text
    assert "<link" not in text and "<script" not in text
    assert "<table>" in page and "toy report" in page


def test_write_report_single_checkpoint_without_examples(tmp_path):
    evaluation = CheckpointEvaluation(_metrics(), _per_pair(1.0), [])
    paths = write_report({"base": evaluation}, tmp_path / "r")
    assert "example_retrievals" not in paths
    report = json.loads(paths["json"].read_text())
    assert report["verdict"].startswith("base: shortcut visible")
    assert "finetuned − base" not in paths["markdown"].read_text()


def test_write_report_refuses_extra_keys_that_clash(tmp_path):
    with pytest.raises(ValueError, match="verdict"):
        write_report(_evaluations(tmp_path), tmp_path / "r", extra={"verdict": "mine"})


# ----------------------------------------------------------------------------- control checkpoint and gains

PAIR_NAMES = [f"{a}->{b}" for a, b in PAIRS]


def _attribution_evaluations(tmp_path) -> dict[str, CheckpointEvaluation]:
    """base, control (fine-tuned on originals only), finetuned and one more model, with per-query scores.

    Designed gains of finetuned over the control: ODmAP i2t +0.1 on every query (earned), ODmAP t2i
    +0.1 and -0.1 on alternate queries of every pair (gain exactly 0: not earned), HR -0.1 (earned,
    lower is better), b-mention rate -0.2 on images showing b (over-correction).
    """
    from spur_assets.core.metrics.attribution import QueryScores

    rng = np.random.default_rng(7)
    strata = np.repeat(PAIR_NAMES, 40)
    n = strata.size
    draws = {name: rng.uniform(low, high, n) for name, low, high in
             (("odmap_i2t", 0.2, 0.4), ("odmap_t2i", 0.3, 0.5), ("hr", 0.3, 0.5), ("b_mention_rate", 0.5, 0.9))}
    shift = {  # (control - base, finetuned - control) per query
        "odmap_i2t": (0.02, np.full(n, 0.1)),
        "odmap_t2i": (0.05, np.tile([0.1, -0.1], n // 2)),
        "hr": (-0.05, np.full(n, -0.1)),
        "b_mention_rate": (0.0, np.full(n, -0.2)),
    }
    values = {
        "base": draws,
        "control": {m: draws[m] + shift[m][0] for m in draws},
        "finetuned": {m: draws[m] + shift[m][0] + shift[m][1] for m in draws},
        "other": {m: draws[m] + 0.01 for m in draws},
    }
    evaluations = {}
    for name in ("finetuned", "base", "other", "control"):  # out of display order on purpose
        per_query = {m: QueryScores(v, strata, macro=True) for m, v in values[name].items()}
        head = {m: scores.headline() for m, scores in per_query.items()}
        metrics = _metrics(odmap_i2t=head["odmap_i2t"], odmap_t2i=head["odmap_t2i"], hr=head["hr"])
        metrics["overcorrection"] = {"b_mention_rate": head["b_mention_rate"], "recall_i2t_5": 0.9}
        metrics["pairwise"] = {"i2t": 0.6, "t2i": None}
        evaluations[name] = CheckpointEvaluation(metrics, _per_pair(1.0), [], per_query=per_query)
    return evaluations


def test_report_with_a_control_shows_what_the_counterfactuals_earned(tmp_path):
    evaluations = _attribution_evaluations(tmp_path)
    paths = write_report(evaluations, tmp_path / "r", bootstrap_resamples=500)
    assert {"gains", "per_query"} <= set(paths)
    report = json.loads(paths["json"].read_text())
    assert check_report_shape(report) == []
    assert list(report["checkpoints"]) == ["base", "control", "finetuned", "other"]
    assert report["checkpoints"]["base"]["odmap"]["i2t"]["10"] == pytest.approx(
        evaluations["base"].per_query["odmap_i2t"].headline()
    )
    assert "per_query" not in json.dumps(report["checkpoints"])  # the scores go to the parquet file

    gains = report["gains"]
    assert set(gains) == {"odmap_i2t", "odmap_t2i", "hr", "b_mention_rate"}
    i2t = gains["odmap_i2t"]
    assert set(i2t) == {"finetuned-base", "finetuned-control"}
    assert i2t["finetuned-control"]["gain"] == pytest.approx(0.1) and i2t["finetuned-base"]["gain"] == pytest.approx(0.12)
    assert i2t["finetuned-control"]["ci95"] == pytest.approx([0.1, 0.1]) and i2t["finetuned-control"]["n"] == 120
    t2i = gains["odmap_t2i"]["finetuned-control"]
    assert t2i["gain"] == pytest.approx(0.0, abs=1e-12) and t2i["ci95"][0] < 0 < t2i["ci95"][1]
    assert gains["hr"]["finetuned-control"]["ci95"][1] < 0

    markdown = paths["markdown"].read_text()
    assert "| metric | base | control | finetuned | other | finetuned − base |" in markdown
    assert "## What the counterfactuals earned" in markdown
    assert (
        "| metric | base | control | fine-tuned | fine-tuned − base [95% CI] | fine-tuned − control [95% CI] "
        "| attributable? |" in markdown
    )
    rows = {line.split(" | ")[0].lstrip("| "): line for line in markdown.splitlines() if line.startswith("| ")}
    assert rows["ODmAP@10 image→text (macro)"].endswith("| +0.100 [+0.100, +0.100] | yes |")
    assert rows["ODmAP@10 text→image (macro)"].endswith("| no |")
    assert rows["HR@10 on I⁻ᵇ (lower is better)"].endswith("| yes |")
    assert rows["b-mention rate@10 on unedited images showing b"].endswith("| no: worse |")  # over-correction shown
    assert "<h2>What the counterfactuals earned</h2>" in paths["html"].read_text()

    import polars as pl

    scores = pl.read_parquet(paths["per_query"])
    assert scores.height == 4 * 4 * 120
    assert set(scores["checkpoint"].unique()) == {"base", "control", "finetuned", "other"}


def test_verdict_names_what_the_counterfactuals_earned_and_did_not(tmp_path):
    evaluations = _attribution_evaluations(tmp_path)
    report = json.loads(write_report(evaluations, tmp_path / "r", bootstrap_resamples=500)["json"].read_text())
    line = report["verdict"]
    metrics = {name: ev.metrics for name, ev in evaluations.items() if name in ("base", "finetuned")}
    # The first part is the claim as without a control; that line instead says no control was scored.
    without_control = verdict(metrics)
    assert without_control.endswith(" No control checkpoint (the same fine-tuning on originals only) was scored, "
                                    "so no gain can be attributed to the counterfactuals themselves.")
    assert line.startswith(without_control.split(" No control checkpoint")[0])
    assert "No control checkpoint" not in line
    earned, _, rest = line.partition("The counterfactuals earned: ")[2].partition(". Not attributable")
    assert "ODmAP@10 i2t (+0.100 over the control, CI +0.100 to +0.100)" in earned and "HR@10 (-0.100" in earned
    assert "ODmAP@10 t2i" not in earned
    not_earned = rest.split(". Over-correction")[0]
    assert "ODmAP@10 t2i (+0.000, CI -" in not_earned and "HR@10" not in not_earned
    assert "Over-correction: on unedited images that show b, finetuned falls below the control in b-mention rate@10 (-0.200" in line
    assert "\n" not in line

    # Without gains, the control is acknowledged but nothing is attributed.
    with_control = {**metrics, "control": evaluations["control"].metrics}
    assert "no per-query gains given" in verdict(with_control)
    # Nothing earned, nothing over-corrected.
    flat = {"odmap_i2t": {"finetuned-control": {"gain": 0.01, "ci95": [-0.02, 0.04], "sd": 0.01, "n": 50}}}
    text = verdict(with_control, gains=flat)
    assert "earned none of the gains" in text and "Not attributable to them" in text and "Over-correction" not in text
    assert "Standard retrieval below the control" not in text
    # A recall the counterfactual training cost against the control is named; one within noise is not.
    costly = {**flat, "recall_t2i_10": {"finetuned-control": {"gain": -0.047, "ci95": [-0.066, -0.027], "sd": 0.01, "n": 2500}},
              "recall_i2t_5": {"finetuned-control": {"gain": -0.044, "ci95": [-0.096, 0.006], "sd": 0.02, "n": 500}}}
    text = verdict(with_control, gains=costly)
    assert "Standard retrieval below the control: R@10 t2i (-0.047, CI -0.066 to -0.027)" in text, text
    assert "R@5 i2t" not in text.split("Standard retrieval below the control")[1]


def test_shape_check_accepts_new_keys_and_names_bad_gains():
    metrics = _metrics()
    metrics["pairwise"] = {"i2t": 0.7, "t2i": None}
    metrics["overcorrection"] = {"b_mention_rate": 0.4, "recall_i2t_5": float("nan")}
    good = {"odmap_i2t": {"finetuned-control": {"gain": 0.04, "ci95": [0.02, 0.06], "sd": 0.01, "n": 300}}}
    assert check_report_shape({"checkpoints": {"base": metrics}, "gains": good}) == []
    metrics["pairwise"]["i2t"] = 1.3
    bad = {"odmap_i2t": {"finetuned-control": {"gain": 0.04, "ci95": [0.06, 0.02], "sd": 0.01, "n": -1}},
           "hr": {"finetuned-base": {"gain": 0.1}}}
    problems = check_report_shape({"checkpoints": {"base": metrics}, "gains": bad})
    assert "checkpoints.base.pairwise.i2t = 1.3 is outside [0, 1]" in problems
    assert any("gains.odmap_i2t.finetuned-control.ci95 = [0.06, 0.02] has lo > hi" in p for p in problems)
    assert any("gains.odmap_i2t.finetuned-control.n is -1" in p for p in problems)
    assert any("gains.hr.finetuned-base must hold gain, ci95, sd and n" in p for p in problems)
