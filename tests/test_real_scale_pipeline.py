"""The real-scale path end to end at test size: a COCO-layout batch of 640x480 JPEGs, a pretrained-style
save_pretrained CLIP at 224 px as SPUR_BASE_MODEL, the pretrained fine-tuning recipe streaming images
from their files, and metric_report reusing its embedding cache on the next report."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from bench.benchmarks.coco_like import write_coco_batch
from bench.benchmarks.pretrained_like import save_vit_b32_like
from spur_assets.core.data.batches import register_batch
from spur_assets.core.model.embedding_cache import stats as cache_stats
from spur_assets.core.model.recipes import PRETRAINED_RECIPE
from spur_assets.pipeline.counterfactual_assets import batch_counterfactuals, synthetic_counterfactuals
from spur_assets.pipeline.expose import spurious_features
from spur_assets.pipeline.ingest import batches, raw_pairs
from spur_assets.pipeline.model_assets import base_checkpoint, control_checkpoint, finetuned_checkpoint
from spur_assets.pipeline.pipes import PIPES_SUBPROCESS_KEY, pipes_subprocess_client
from spur_assets.pipeline.refs_io_manager import ArtifactRefIOManager
from spur_assets.pipeline.report_assets import metric_report
from spur_assets.pipeline.resources import SpurSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ASSETS = [raw_pairs, spurious_features, base_checkpoint, batch_counterfactuals, synthetic_counterfactuals,
          finetuned_checkpoint, control_checkpoint, metric_report]
CONFIG = {
    "raw_pairs": {"workers": 1},
    "spurious_features": {"min_support": 5},
    "batch_counterfactuals": {"workers": 1},
    "synthetic_counterfactuals": {"workers": 1, "train_removal_per_pair": 6, "train_paste_per_pair": 6},
    # The pretrained recipe, cut to 3 steps of 24 pairs computed 8 rows at a time.
    "finetuned_checkpoint": {"max_steps": 3, "batch_size": 24, "micro_batch_size": 8, "workers": 2, "in_memory_mb": 0},  # streamed
    "control_checkpoint": {"workers": 1, "in_memory_mb": 0},  # the fine-tune's 3 steps on originals, streamed
    "metric_report": {"workers": 1},
}


@pytest.mark.slow
def test_pretrained_base_on_coco_layout_jpegs_streams_finetunes_and_caches_embeddings(tmp_path):
    manifest = write_coco_batch(tmp_path / "batch", n_train=120, n_test=60, seed=3)
    captions = [a["caption"] for a in json.loads((manifest.parent / "annotations" / "captions_train2017.json").read_text())["annotations"]]
    model = save_vit_b32_like(tmp_path / "pretrained", captions, shape="tiny")
    home = tmp_path / "home"
    register_batch(home, "coco", manifest)
    settings = SpurSettings(home=str(home), device="cpu", base_model=str(model))
    resources = {"settings": settings, "refs": ArtifactRefIOManager(settings=settings),
                 PIPES_SUBPROCESS_KEY: pipes_subprocess_client()}
    run_config = {"ops": {name: {"config": config} for name, config in CONFIG.items()}}

    def materialize(selection, partition=None):
        names = {a.key.to_user_string() for a in selection}
        config = {"ops": {k: v for k, v in run_config["ops"].items() if k in names}}
        result = dg.materialize(ASSETS, selection=[a.key for a in selection], partition_key=partition,
                                instance=instance, resources=resources, run_config=config)
        assert result.success
        return result

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(batches.name, ["coco"])
        materialize([raw_pairs], "coco")
        materialize([spurious_features, base_checkpoint])
        materialize([batch_counterfactuals], "coco")
        materialize([synthetic_counterfactuals])
        tuned = materialize([finetuned_checkpoint]).asset_materializations_for_node("finetuned_checkpoint")[0].metadata
        control = materialize([control_checkpoint]).asset_materializations_for_node("control_checkpoint")[0].metadata
        assert control["optimizer_steps"].value == tuned["optimizer_steps"].value == 3
        first = materialize([metric_report])
        first_logs = [e.message for e in instance.all_logs(first.run_id) if e.message]
        report_one = json.loads((home / "reports" / "latest" / "report.json").read_text())
        second = materialize([metric_report])
        second_logs = [e.message for e in instance.all_logs(second.run_id) if e.message]
        report_two = json.loads((home / "reports" / "latest" / "report.json").read_text())

    recipe = tuned["recipe"].value
    # The pretrained recipe, with the three fields the config set and nothing else changed.
    assert recipe["name"] == PRETRAINED_RECIPE.name and recipe["base"] == "pretrained"
    assert (recipe["max_steps"], recipe["batch_size"], recipe["micro_batch_size"]) == (3, 24, 8)
    assert (recipe["lr"], recipe["weight_decay"], recipe["warmup_steps"]) == (
        PRETRAINED_RECIPE.lr, PRETRAINED_RECIPE.weight_decay, PRETRAINED_RECIPE.warmup_steps)
    assert tuned["peak_rss_mb"].value > 0 and "peak_rss_largest_child_mb" in tuned  # memory recorded per step
    counts = report_one["checkpoints"]["base"]["counts"]
    assert counts["test_images"] == 60 and counts["removal_queries"] > 0
    # First report: everything embedded, nothing from the cache; second: everything from the cache.
    image_lines = [m for m in first_logs if "images (test, removal, control): 0 from the embedding cache" in m]
    assert len(image_lines) == 3 and all(m.endswith(" embedded") for m in image_lines), image_lines
    cache_lines = [m for m in second_logs if "from the embedding cache" in m]
    assert len(cache_lines) == 6  # images (one pass) and captions, for base, control and fine-tuned
    assert all(m.endswith(", 0 embedded") for m in cache_lines), cache_lines
    assert report_two["checkpoints"] == report_one["checkpoints"]  # cached rows are the computed rows
    sizes = cache_stats(home / "cache" / "embeddings")
    assert len(sizes["checkpoints"]) == 3  # base, control and fine-tuned, each under its own key
