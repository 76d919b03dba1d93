"""Asset checks guarding each hand-off (docs/architecture.md#asset-checks).

Blocking where a bad result would poison what follows.
"""


import dagster as dg
import numpy as np
import polars as pl
from PIL import Image
from safetensors.numpy import load_file

from spur_assets.core.records.artifacts import ArtifactRef
from spur_assets.core.data.vocabulary import mentioned_categories
from spur_assets.pipeline.automation import CHECK_WITH_ITS_ASSET
from spur_assets.pipeline.counterfactual_assets import counterfactual_dataset, synthetic_counterfactuals
from spur_assets.pipeline.expose import spurious_features
from spur_assets.pipeline.model_assets import base_checkpoint, control_checkpoint, control_enabled, finetuned_checkpoint
from spur_assets.pipeline.report_assets import metric_report


@dg.asset_check(
    asset=spurious_features,
    blocking=True, automation_condition=CHECK_WITH_ITS_ASSET,
    description="pair statistics are consistent: n_both <= n_anchor, P(b|a) = n_both / n_anchor in [0, 1], lift finite",
)
def pair_statistics_consistent(spurious_features: ArtifactRef) -> dg.AssetCheckResult:
    stats = spurious_features.read_table("spurious_features")
    expected_p = pl.col("n_both") / pl.col("n_anchor")
    bad = stats.filter(
        (pl.col("n_both") < 0)
        | (pl.col("n_both") > pl.col("n_anchor"))
        | ~pl.col("p_companion_given_anchor").is_between(0.0, 1.0)
        | ((pl.col("p_companion_given_anchor") - expected_p).abs() > 1e-9)
        | ~pl.col("lift").is_finite()
        | (pl.col("lift") < 0)
    )
    return dg.AssetCheckResult(
        passed=bad.height == 0,
        metadata={
            "pairs": stats.height,
            "flagged": stats.filter(pl.col("flagged")).height,
            "inconsistent": bad.height,
            "examples": str(bad.head(5).to_dicts()),
        },
    )


@dg.asset_check(asset=synthetic_counterfactuals, blocking=True, automation_condition=CHECK_WITH_ITS_ASSET, description="every removal and control mask covers pixels")
def counterfactual_masks_non_empty(synthetic_counterfactuals: ArtifactRef) -> dg.AssetCheckResult:
    images = synthetic_counterfactuals.read_table("cf_eval_images")
    empty = images.filter(pl.col("masked_pixels") <= 0)
    return dg.AssetCheckResult(
        passed=empty.height == 0 and images.height > 0,
        metadata={"images": images.height, "empty_masks": empty.height},
    )


@dg.asset_check(asset=synthetic_counterfactuals, blocking=True, automation_condition=CHECK_WITH_ITS_ASSET, description="accepted caption edits no longer mention the companion")
def edited_captions_drop_companion(synthetic_counterfactuals: ArtifactRef) -> dg.AssetCheckResult:
    captions = synthetic_counterfactuals.read_table("cf_eval_captions").filter(pl.col("accepted"))
    still = [
        (row["cf_caption_id"], row["caption"])
        for row in captions.iter_rows(named=True)
        if row["companion"] in mentioned_categories(row["caption"])
    ]
    return dg.AssetCheckResult(
        passed=not still,
        metadata={"accepted_edits": captions.height, "still_mentioning": len(still), "examples": str(still[:5])},
    )


@dg.asset_check(asset=synthetic_counterfactuals, blocking=True, automation_condition=CHECK_WITH_ITS_ASSET, description="counterfactual images keep their source's size")
def counterfactual_sizes_unchanged(synthetic_counterfactuals: ArtifactRef) -> dg.AssetCheckResult:
    images = synthetic_counterfactuals.read_table("cf_eval_images")
    wrong = []
    for row in images.iter_rows(named=True):
        with Image.open(row["path"]) as edited:
            if edited.size != (row["width"], row["height"]):
                wrong.append((row["cf_image_id"], edited.size, (row["width"], row["height"])))
    return dg.AssetCheckResult(passed=not wrong, metadata={"checked": images.height, "wrong_size": len(wrong), "examples": str(wrong[:5])})


@dg.asset_check(asset=base_checkpoint, blocking=True, automation_condition=CHECK_WITH_ITS_ASSET, description="every weight of the checkpoint is finite")
def base_checkpoint_weights_finite(base_checkpoint: ArtifactRef) -> dg.AssetCheckResult:
    return weights_finite(base_checkpoint)


@dg.asset_check(asset=finetuned_checkpoint, blocking=True, automation_condition=CHECK_WITH_ITS_ASSET, description="every weight of the fine-tuned checkpoint is finite")
def finetuned_checkpoint_weights_finite(finetuned_checkpoint: ArtifactRef) -> dg.AssetCheckResult:
    return weights_finite(finetuned_checkpoint)


@dg.asset_check(asset=control_checkpoint, blocking=True, automation_condition=CHECK_WITH_ITS_ASSET, description="every weight of the control checkpoint is finite (when one was trained)")
def control_checkpoint_weights_finite(control_checkpoint: ArtifactRef) -> dg.AssetCheckResult:
    if not control_enabled(control_checkpoint):
        return dg.AssetCheckResult(passed=True, metadata={"control": "switched off (enabled: false); nothing to check"})
    return weights_finite(control_checkpoint)


def weights_finite(checkpoint: ArtifactRef) -> dg.AssetCheckResult:
    """Pass when no tensor in the checkpoint's safetensors files holds NaN or Inf."""
    files = sorted(checkpoint.path("checkpoint").glob("*.safetensors"))
    bad = []
    total = 0
    for file in files:
        for name, tensor in load_file(str(file)).items():
            total += tensor.size
            if np.issubdtype(tensor.dtype, np.floating) and not np.isfinite(tensor).all():
                bad.append(name)
    return dg.AssetCheckResult(
        passed=bool(files) and not bad,
        metadata={"safetensors_files": len(files), "values": total, "non_finite_tensors": str(bad[:10])},
    )


@dg.asset_check(
    asset=metric_report,
    description="report.json has the shape of docs/data-contract.md#reportjson; metrics in [0, 1] (Δ_ctrl in [-1, 1])",
)
def report_metrics_in_range(metric_report: ArtifactRef) -> dg.AssetCheckResult:
    import json

    from spur_assets.core.metrics.report import check_report_shape

    report = json.loads((metric_report.path("report") / "report.json").read_text())
    problems = check_report_shape(report)
    return dg.AssetCheckResult(passed=not problems, metadata={"problems": "\n".join(problems) or "none"})


@dg.asset_check(
    asset=counterfactual_dataset,
    description="the exported dataset reads back strictly (every file and record valid) with the counts it claims",
)
def exported_dataset_reloads(counterfactual_dataset: ArtifactRef) -> dg.AssetCheckResult:
    from spur_assets.core.data.coco_ingest import load_batch
    from spur_assets.core.data.errors import DatasetError

    manifest = counterfactual_dataset.path("dataset") / "dataset.yaml"
    try:
        tables = load_batch(manifest, batch="export-check", on_bad_record="fail")
    except DatasetError as error:
        return dg.AssetCheckResult(passed=False, metadata={"error": str(error)})
    return dg.AssetCheckResult(
        passed=tables.images.height > 0 and tables.captions.height > 0,
        metadata={"images": tables.images.height, "captions": tables.captions.height, "instances": tables.instances.height},
    )


ALL_CHECKS = [
    pair_statistics_consistent,
    counterfactual_masks_non_empty,
    edited_captions_drop_companion,
    counterfactual_sizes_unchanged,
    base_checkpoint_weights_finite,
    finetuned_checkpoint_weights_finite,
    control_checkpoint_weights_finite,
    report_metrics_in_range,
    exported_dataset_reloads,
]
