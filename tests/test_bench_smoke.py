"""Smoke test of bench/benchmarks/: every benchmark runs at its tiny size, so the code cannot rot.

No timing is asserted (timing belongs to bench/benchmarks/run). What is asserted are the checks
the benchmarks make against independent references: the metric engine's AP@10 equals a
full-sort implementation and torchmetrics (its definition converted), the co-occurrence
counts equal an indicator-matrix product, and the demo probe sees the core calls of a
process named `spur`. Measurements run in this process (BENCH_IN_PROCESS=1) to stay fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.benchmarks import bench_cooccurrence, bench_counterfactuals, bench_demo, bench_embedding, bench_metrics, bench_training
from bench.benchmarks.harness import REPO_ROOT, Figure, Section, figures_table, peak_memory, render_results, render_section


def quiet(message: str) -> None:
    pass


@pytest.fixture(autouse=True)
def measure_in_this_process(monkeypatch):
    monkeypatch.setenv("BENCH_IN_PROCESS", "1")


def assert_rendered(section: Section) -> None:
    assert section.figures, f"section {section.number} produced no figure"
    for figure in section.figures:
        assert figure.what and figure.value, figure
    text = render_section(section)
    assert text.startswith(f"## {section.number}. ") and "| figure | measured |" in text


def test_metric_engine_agrees_with_full_sort_and_torchmetrics(one_torch_thread):
    section = bench_metrics.run(scale="tiny", reps=1, log=quiet)
    assert_rendered(section)
    assert section.raw["diff_full_sort"] < 1e-12
    assert section.raw["diff_torchmetrics"] < 1e-6
    agreement = next(f for f in section.figures if f.what.startswith("AP@10 i2t: agreement"))
    assert agreement.met is True


def test_peak_memory_sees_an_allocation_inside_the_block():
    import numpy as np

    with peak_memory() as memory:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        block.sum()
    assert memory["peak_extra_mb"] >= 60, memory


def test_embedding_benchmark_runs(one_torch_thread):
    section = bench_embedding.run(scale="tiny", reps=1, log=quiet)
    assert_rendered(section)
    assert {"builtin", "coco"} <= set(section.raw["seconds"])


def test_training_benchmark_trains_the_same_pairs_both_ways(one_torch_thread):
    section = bench_training.run(scale="tiny", reps=1, log=quiet)
    assert_rendered(section)
    pipeline, minimal = section.raw["results"]["pipeline"][0], section.raw["results"]["minimal"][0]
    assert pipeline["pairs"] == minimal["pairs"] > 0


def test_counterfactual_benchmark_runs_with_one_and_two_workers(one_torch_thread):
    section = bench_counterfactuals.run(scale="tiny", reps=1, log=quiet, backends=("opencv",))
    assert_rendered(section)
    raw = section.raw["opencv"]
    # a removal and a control per task, none skipped on these scenes, with 1 and with 2 workers
    assert raw["images_written"] == [2 * raw["tasks"]] * 2


def test_every_inpainting_backend_builds_and_fills_a_coco_like_mask(tmp_path, one_torch_thread):
    import numpy as np

    images, masks = bench_counterfactuals.in_memory_inputs(1)
    specs = bench_counterfactuals.backend_specs(tmp_path, "cpu")
    assert {"opencv", "torch"} <= set(specs)
    for name, spec in specs.items():
        (filled,) = spec.build().inpaint(images, masks)
        np.testing.assert_array_equal(filled[~masks[0]], images[0][~masks[0]], err_msg=name)


def test_cooccurrence_matches_the_indicator_matrix_reference():
    section = bench_cooccurrence.run(scale="tiny", reps=1, log=quiet)
    assert_rendered(section)
    assert section.raw["mismatches"] == 0


def test_demo_probe_times_core_calls_in_a_process_named_spur(tmp_path):
    script = tmp_path / "spur"
    script.write_text(
        "import polars as pl\n"
        "import spur_assets.pipeline.expose as expose\n"
        "frame = pl.DataFrame({'image_id': [1, 1, 2], 'category': ['dog', 'frisbee', 'dog']})\n"
        "expose.pair_statistics(expose.image_categories_from_instances(frame), 2, 'instances')\n"
    )
    out = tmp_path / "probe.json"
    env = {**os.environ, "SPUR_BENCH_PROBE_OUT": str(out), "PYTHONPATH": str(bench_demo.PROBE_DIR)}
    subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, env=env, check=True, timeout=120)
    probe = json.loads(out.read_text())
    names = [call["name"] for call in probe["calls"]]
    assert names == [
        "spur_assets.core.counterfactuals.cooccurrence.image_categories_from_instances",
        "spur_assets.core.counterfactuals.cooccurrence.pair_statistics",
    ]
    assert {call["category"] for call in probe["calls"]} == {"core: science"}


def test_demo_breakdown_adds_up_to_the_wall_time():
    probe = {
        "process_start": 101.0,
        "process_end": 160.0,
        "calls": [
            {"category": "core: science", "name": "x.train", "start": 120.0, "seconds": 20.0},
            {"category": "lineage", "name": "LineageStore.record", "start": 141.0, "seconds": 1.0},
        ],
    }
    intervals = [{"asset": "a", "partition": "", "start": 119.0, "end": 142.0, "seconds": 23.0}]
    parts = bench_demo.breakdown(wall_s=60.0, launched=100.0, probe=probe, intervals=intervals)
    assert parts["core_s"] == 20.0
    assert parts["parts"]["shell + setup.sh stamp check + interpreter start"] == 1.0
    assert sum(parts["parts"].values()) == pytest.approx(60.0)
    assert parts["per_asset"][0]["core_s"] == 20.0


@pytest.mark.slow
def test_demo_benchmark_runs_the_readme_command_on_a_tiny_dataset():
    section = bench_demo.run(scale="tiny", log=quiet)
    assert_rendered(section)
    assert section.raw["parts"]["core_s"] > 0
    assert {row["asset"] for row in section.raw["parts"]["per_asset"]} == {"raw_pairs", "spurious_features"}


def test_results_markdown_has_machine_summary_and_sections():
    section = Section(1, "A benchmark", [Figure("speed", "2 s", "ref 4 s", "0.5", ">= 0.9", False, "why")], ["A note."])
    text = render_results([section], {"cpu": "test cpu"}, {"date": "today"}, ["Preamble."], ["## Appendix"])
    assert "| cpu | test cpu |" in text and "## Summary" in text and "**missed**" in text
    assert "## 1. A benchmark" in text and "A note." in text and text.rstrip().endswith("## Appendix")
    assert figures_table(section.figures).count("\n") == 2


def test_pipeline_seeds_bootstrap_is_the_macro_gain_with_a_paired_interval():
    import numpy as np

    from bench.experiments.pipeline_seeds import bootstrap_macro_gain

    # Two pairs of unequal size: the gain is the mean of the per-pair mean gains (macro), nan queries skipped.
    base = np.array([0.1, 0.2, 0.3, 0.4, np.nan, 0.0])
    tuned = np.array([0.3, 0.4, 0.5, 0.6, 0.9, 0.0])
    pairs = ["a->b"] * 5 + ["c->d"]
    out = bootstrap_macro_gain(base, tuned, pairs, resamples=200)
    assert out["gain"] == pytest.approx((0.2 + 0.0) / 2)
    # Every query of a->b gains exactly 0.2 and c->d has one query: no resample can move the gain.
    assert out["sd"] == pytest.approx(0.0, abs=1e-12)
    assert out["ci95"] == pytest.approx([0.1, 0.1])
    # Uneven gains give an interval that contains the estimate and has width.
    noisy = bootstrap_macro_gain(np.zeros(40), np.linspace(-0.2, 0.4, 40), ["a->b"] * 40, resamples=500)
    assert noisy["ci95"][0] < noisy["gain"] < noisy["ci95"][1] and noisy["sd"] > 0.01
