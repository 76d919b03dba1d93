"""Asset checks guarding each hand-off (DESIGN.md §6). Blocking where a bad result would poison what follows."""


import dagster as dg
import numpy as np
import polars as pl
from PIL import Image
from safetensors.numpy import load_file

from spur_assets.core.artifacts import ArtifactRef
from spur_assets.core.vocabulary import mentioned_categories
from spur_assets.pipeline.counterfactual_assets import synthetic_counterfactuals
from spur_assets.pipeline.model_assets import base_checkpoint, finetuned_checkpoint
from spur_assets.pipeline.report_assets import metric_report


@dg.asset_check(asset=synthetic_counterfactuals, blocking=True, description="every removal and control mask covers pixels")
def counterfactual_masks_non_empty(synthetic_counterfactuals: ArtifactRef) -> dg.AssetCheckResult:
    images = synthetic_counterfactuals.read_table("cf_eval_images")
    empty = images.filter(pl.col("masked_pixels") <= 0)
    return dg.AssetCheckResult(
        passed=empty.height == 0 and images.height > 0,
        metadata={"images": images.height, "empty_masks": empty.height},
    )


@dg.asset_check(asset=synthetic_counterfactuals, blocking=True, description="accepted caption edits no longer mention the companion")
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


@dg.asset_check(asset=synthetic_counterfactuals, blocking=True, description="counterfactual images keep their source's size")
def counterfactual_sizes_unchanged(synthetic_counterfactuals: ArtifactRef) -> dg.AssetCheckResult:
    images = synthetic_counterfactuals.read_table("cf_eval_images")
    wrong = []
    for row in images.iter_rows(named=True):
        with Image.open(row["path"]) as edited:
            if edited.size != (row["width"], row["height"]):
                wrong.append((row["cf_image_id"], edited.size, (row["width"], row["height"])))
    return dg.AssetCheckResult(passed=not wrong, metadata={"checked": images.height, "wrong_size": len(wrong), "examples": str(wrong[:5])})


@dg.asset_check(asset=base_checkpoint, blocking=True, description="every weight of the checkpoint is finite")
def base_checkpoint_weights_finite(base_checkpoint: ArtifactRef) -> dg.AssetCheckResult:
    return weights_finite(base_checkpoint)


@dg.asset_check(asset=finetuned_checkpoint, blocking=True, description="every weight of the fine-tuned checkpoint is finite")
def finetuned_checkpoint_weights_finite(finetuned_checkpoint: ArtifactRef) -> dg.AssetCheckResult:
    return weights_finite(finetuned_checkpoint)


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


@dg.asset_check(asset=metric_report, description="report.json has DESIGN.md's shape and every metric lies in [0, 1]")
def report_metrics_in_range(metric_report: ArtifactRef) -> dg.AssetCheckResult:
    import json

    from spur_assets.core.report import check_report_shape

    report = json.loads((metric_report.path("report") / "report.json").read_text())
    problems = check_report_shape(report)
    return dg.AssetCheckResult(passed=not problems, metadata={"problems": "\n".join(problems) or "none"})


ALL_CHECKS = [
    counterfactual_masks_non_empty,
    edited_captions_drop_companion,
    counterfactual_sizes_unchanged,
    base_checkpoint_weights_finite,
    finetuned_checkpoint_weights_finite,
    report_metrics_in_range,
]
