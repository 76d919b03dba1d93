"""The whole expose graph on a tiny built-in dataset, through real Dagster materialize, checks included."""

import json
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from spur_assets.core.records.lineage import LineageStore
from spur_assets.core.metrics.report import check_report_shape
from spur_assets.pipeline.checks import ALL_CHECKS
from spur_assets.pipeline.counterfactual_assets import (
    batch_counterfactuals,
    counterfactual_dataset,
    synthetic_counterfactuals,
)
from spur_assets.pipeline.expose import spurious_features
from spur_assets.pipeline.ingest import batches, raw_pairs
from spur_assets.pipeline.model_assets import (
    BUILTIN_BASE_FINETUNE_LR,
    PRETRAINED_FINETUNE_LR,
    FinetunedCheckpointConfig,
    base_checkpoint,
    control_checkpoint,
    finetune_lr,
    finetuned_checkpoint,
)
from spur_assets.pipeline.pipes import PIPES_SUBPROCESS_KEY, pipes_subprocess_client
from spur_assets.pipeline.refs_io_manager import ArtifactRefIOManager
from spur_assets.pipeline.report_assets import metric_report
from spur_assets.pipeline.resources import SpurSettings

ASSETS = [
    raw_pairs, spurious_features, base_checkpoint, batch_counterfactuals, synthetic_counterfactuals,
    finetuned_checkpoint, control_checkpoint, metric_report, counterfactual_dataset,
]
UNPARTITIONED = [a for a in ASSETS if a.partitions_def is None]
TINY = {
    "raw_pairs": {"builtin_n_train": 150, "builtin_n_test": 80, "workers": 1},
    "spurious_features": {"min_support": 5},
    "base_checkpoint": {"epochs": 1, "width": 32, "layers": 1, "heads": 2, "image_size": 32, "vocab_size": 300, "batch_size": 32},
    "batch_counterfactuals": {"workers": 1},
    "synthetic_counterfactuals": {"workers": 1, "train_removal_per_pair": 6, "train_paste_per_pair": 6},
    "finetuned_checkpoint": {"epochs": 1, "batch_size": 32},
}


@pytest.mark.slow
def test_expose_graph_end_to_end(tmp_path):
    home = tmp_path / "home"
    settings = SpurSettings(home=str(home), device="cpu")
    resources = {"settings": settings, "refs": ArtifactRefIOManager(settings=settings),
                 PIPES_SUBPROCESS_KEY: pipes_subprocess_client()}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(batches.name, ["builtin"])
        first = dg.materialize(ASSETS, selection=[raw_pairs.key], partition_key="builtin", instance=instance,
                               resources=resources, run_config={"ops": {"raw_pairs": {"config": TINY["raw_pairs"]}}})
        assert first.success
        # The order `spur run` follows: the batch, the statistics, the batch's counterfactuals, the rest.
        features = dg.materialize([*ASSETS, *ALL_CHECKS], selection=[spurious_features.key], instance=instance,
                                  resources=resources,
                                  run_config={"ops": {"spurious_features": {"config": TINY["spurious_features"]}}})
        assert features.success
        assert [c.passed for c in features.get_asset_check_evaluations()] == [True]
        per_batch = dg.materialize(
            ASSETS, selection=[batch_counterfactuals.key], partition_key="builtin", instance=instance,
            resources=resources, run_config={"ops": {"batch_counterfactuals": {"config": TINY["batch_counterfactuals"]}}},
        )
        assert per_batch.success
        rest = dg.materialize(
            [*ASSETS, *ALL_CHECKS],
            selection=[a.key for a in UNPARTITIONED if a is not spurious_features],
            instance=instance,
            resources=resources,
            run_config={"ops": {k: {"config": v} for k, v in TINY.items()
                                if k not in ("raw_pairs", "spurious_features", "batch_counterfactuals")}},
        )
        assert rest.success
        checks = rest.get_asset_check_evaluations()
        assert {c.check_name for c in checks} == {
            "counterfactual_masks_non_empty", "edited_captions_drop_companion", "counterfactual_sizes_unchanged",
            "base_checkpoint_weights_finite", "finetuned_checkpoint_weights_finite", "report_metrics_in_range",
            "exported_dataset_reloads", "control_checkpoint_weights_finite",
        }
        tuned_meta = rest.asset_materializations_for_node("finetuned_checkpoint")[0].metadata
        assert tuned_meta["learning_rate"].value == BUILTIN_BASE_FINETUNE_LR  # automatic: a base trained here
        # The control repeats the fine-tune's optimizer steps on the original train images only.
        control_meta = rest.asset_materializations_for_node("control_checkpoint")[0].metadata
        assert control_meta["optimizer_steps"].value == tuned_meta["optimizer_steps"].value > 0
        assert control_meta["training_images"].value == TINY["raw_pairs"]["builtin_n_train"]
        control_history = json.loads(json.dumps(control_meta["history"].value))
        assert control_history  # it trained
        combined = rest.asset_materializations_for_node("synthetic_counterfactuals")[0].metadata
        assert combined["batches_from_partitions"].value == 1 and combined["batches_rebuilt_here"].value == "none"
        assert all(c.passed for c in checks), [(c.check_name, c.metadata) for c in checks if not c.passed]
        report_meta = rest.asset_materializations_for_node("metric_report")[0].metadata
        assert {"base_odmap_i2t_10", "finetuned_hr_10", "control_odmap_t2i_10", "gain_odmap_i2t_10"} <= set(report_meta)
        report = json.loads((home / "reports" / "latest" / "report.json").read_text())  # before k=5 replaces it
        # another k: the metadata keys follow it
        at_5 = dg.materialize([*ASSETS, *ALL_CHECKS], selection=[metric_report.key], instance=instance, resources=resources,
                              run_config={"ops": {"metric_report": {"config": {"k": 5}}}})
        keys = set(at_5.asset_materializations_for_node("metric_report")[0].metadata)
        assert {"base_odmap_i2t_5", "base_hr_natural_5", "finetuned_hr_5", "control_odmap_t2i_5", "gain_odmap_t2i_5"} <= keys
        assert not [key for key in keys if key.endswith("_10")]

    assert check_report_shape(report) == []
    assert set(report["checkpoints"]) == {"base", "control", "finetuned"}
    assert set(report["gains"]["odmap_i2t"]) == {"finetuned-base", "finetuned-control"}
    for name in ("base", "control", "finetuned"):
        for key in ("recall", "odmap", "hr", "delta_ctrl"):
            assert key in report["checkpoints"][name]
        assert {"natural_10", "anchor_only_10", "10"} <= set(report["checkpoints"][name]["hr"])
    assert report["checkpoints"]["base"] != report["checkpoints"]["finetuned"]
    assert report["checkpoints"]["control"] != report["checkpoints"]["finetuned"]
    assert report["per_pair"], "per-pair rows"
    assert (home / "reports" / "latest" / "report.html").is_file()

    # the checkpoint loads with plain transformers
    store = LineageStore(home)
    ckpt = store.latest("base_checkpoint")
    ckpt_dir = [o["uri"] for o in ckpt["outputs"] if o["name"] == "checkpoint"][0]
    from transformers import CLIPModel

    assert CLIPModel.from_pretrained(ckpt_dir).config.vision_config.image_size == 32

    # the report's ancestry reaches the raw batch through both branches
    chain = store.ancestry(store.latest("metric_report")["materialization_id"])
    assert {"metric_report", "base_checkpoint", "finetuned_checkpoint", "control_checkpoint", "synthetic_counterfactuals",
            "spurious_features", "raw_pairs", "batch_counterfactuals"} == set(chain["asset"])
    # the fine-tuned checkpoint names the counterfactuals and batches it was trained on
    tuned = store.ancestry(store.latest("finetuned_checkpoint")["materialization_id"])
    assert {"synthetic_counterfactuals", "base_checkpoint", "raw_pairs"} <= set(tuned["asset"])
    # the exported counterfactual set reads back through the same strict ingestion
    from spur_assets.core.data.coco_ingest import load_batch

    export = store.latest("counterfactual_dataset")
    exported = [o["uri"] for o in export["outputs"] if o["name"] == "dataset"][0]
    tables = load_batch(Path(exported) / "dataset.yaml", batch="export")
    assert tables.quarantine.height == 0 and tables.images.height > 0
    conn = duckdb.connect(str(home / "lineage.duckdb"), read_only=True)
    for view in ("raw_images", "spurious_features", "cf_eval_images", "cf_eval_captions", "cf_train_images",
                 "cf_train_lift", "metric_report_per_pair"):
        assert conn.execute(f"select count(*) from {view}").fetchone()[0] > 0, view
    conn.close()


def test_finetune_lr_follows_the_kind_of_base():
    auto = FinetunedCheckpointConfig()
    assert finetune_lr(auto, base_model="") == BUILTIN_BASE_FINETUNE_LR
    assert finetune_lr(auto, base_model="openai/clip-vit-base-patch32") == PRETRAINED_FINETUNE_LR
    assert PRETRAINED_FINETUNE_LR < BUILTIN_BASE_FINETUNE_LR
    assert finetune_lr(FinetunedCheckpointConfig(lr=2e-4), base_model="some/model") == 2e-4
    with pytest.raises(ValueError, match="lr=-0.1"):
        finetune_lr(FinetunedCheckpointConfig(lr=-0.1), base_model="")


@pytest.mark.slow
def test_base_model_from_a_local_save_pretrained_folder(tmp_path):
    from spur_assets.core.model.clip_model import load_checkpoint, new_small_clip, save_checkpoint

    source = save_checkpoint(
        new_small_clip(["a dog", "a cat with a frisbee"], image_size=32, vocab_size=300, width=32, layers=1, heads=2),
        tmp_path / "pretrained",
    )
    home = tmp_path / "home"
    settings = SpurSettings(home=str(home), device="cpu", base_model=str(source))
    resources = {"settings": settings, "refs": ArtifactRefIOManager(settings=settings),
                 PIPES_SUBPROCESS_KEY: pipes_subprocess_client()}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(batches.name, ["builtin"])
        assert dg.materialize(ASSETS, selection=[raw_pairs.key], partition_key="builtin", instance=instance,
                              resources=resources, run_config={"ops": {"raw_pairs": {"config": TINY["raw_pairs"]}}}).success
        result = dg.materialize([*ASSETS, *ALL_CHECKS], selection=[base_checkpoint.key], instance=instance, resources=resources)
        assert result.success
        meta = result.asset_materializations_for_node("base_checkpoint")[0].metadata
    assert meta["source"].value == str(source)
    copied = LineageStore(home).latest("base_checkpoint")
    ckpt_dir = [o["uri"] for o in copied["outputs"] if o["name"] == "checkpoint"][0]
    original, loaded = load_checkpoint(source), load_checkpoint(ckpt_dir)
    for (name, a), (_, b) in zip(original.model.state_dict().items(), loaded.model.state_dict().items()):
        assert (a == b).all(), name
    assert copied["device"] == "cpu"


@pytest.mark.slow
def test_control_switched_off_gives_a_report_without_attribution(tmp_path):
    """enabled: false trains no control; the report scores base and fine-tuned and says nothing is attributable."""
    home = tmp_path / "home"
    settings = SpurSettings(home=str(home), device="cpu")
    resources = {"settings": settings, "refs": ArtifactRefIOManager(settings=settings),
                 PIPES_SUBPROCESS_KEY: pipes_subprocess_client()}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(batches.name, ["builtin"])
        for selection, partition in (([raw_pairs.key], "builtin"), ([spurious_features.key], None),
                                     ([batch_counterfactuals.key], "builtin")):
            name = selection[0].to_user_string()
            assert dg.materialize(ASSETS, selection=selection, partition_key=partition, instance=instance, resources=resources,
                                  run_config={"ops": {name: {"config": TINY[name]}}}).success
        config = {k: {"config": v} for k, v in TINY.items() if k not in ("raw_pairs", "spurious_features", "batch_counterfactuals")}
        config["control_checkpoint"] = {"config": {"enabled": False}}
        result = dg.materialize(
            [*ASSETS, *ALL_CHECKS],
            selection=[a.key for a in (base_checkpoint, synthetic_counterfactuals, finetuned_checkpoint, control_checkpoint, metric_report)],
            instance=instance, resources=resources, run_config={"ops": config},
        )
        assert result.success
        assert result.asset_materializations_for_node("control_checkpoint")[0].metadata["enabled"].value is False
    report = json.loads((home / "reports" / "latest" / "report.json").read_text())
    assert set(report["checkpoints"]) == {"base", "finetuned"}
    assert check_report_shape(report) == []
    assert "control" in report["verdict"]  # says no control was trained, so nothing is attributed
