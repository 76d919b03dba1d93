"""`synthetic_counterfactuals`: the counterfactual eval set (removal and control images, edited captions)."""

import json
import os
from pathlib import Path
from typing import Literal

import dagster as dg
import polars as pl

from spur_assets.core.artifacts import ArtifactRef
from spur_assets.core.cooccurrence import orient_mutual_pairs
from spur_assets.core.counterfactuals import before_after_grid, build_eval_counterfactuals
from spur_assets.core.devices import resolve_device
from spur_assets.core.inpaint import InpainterSpec
from spur_assets.core.export import export_counterfactual_dataset
from spur_assets.core.train_counterfactuals import TrainCounterfactuals, build_train_counterfactuals
from spur_assets.pipeline.ingest import ALL_BATCHES, batches_split
from spur_assets.pipeline.recording import recorded_materialization, upstream_refs
from spur_assets.pipeline.resources import SpurSettings
from spur_assets.pipeline.ui_metadata import markdown_image, markdown_table


class CounterfactualsConfig(dg.Config):
    """How counterfactual images are made (DESIGN.md §4)."""

    backend: Literal["opencv", "torch", "diffusers"] = "opencv"
    diffusers_model_dir: str = ""  # a local inpainting pipeline folder, for backend=diffusers
    max_companion_fraction: float = 0.25  # skip images where the companion covers more
    dilation_px: int = 2
    pair_source: Literal["instances", "captions"] = "instances"  # which flagged pairs to counterfactualise
    # a pair flagged both ways: keep the direction whose companion is smaller, or both
    mutual_pairs: Literal["smaller_companion", "both"] = "smaller_companion"
    train_removal_per_pair: int = 0  # train removal edits per pair; 0 = every train image showing the pair
    # train paste edits per pair; 0 = as many as bring the pair's lift to 1 (3,126 images on the
    # built-in data, which doubles fine-tuning time); 360 matches the built-in removals per pair
    train_paste_per_pair: int = 360
    seed: int = 0
    workers: int = max(1, min(8, os.cpu_count() or 1))


def flagged_pairs(features: pl.DataFrame, source: str) -> pl.DataFrame:
    """Flagged (anchor, companion) rows of one source, strongest first."""
    return features.filter(pl.col("flagged") & (pl.col("source") == source)).select(
        "anchor", "companion", "p_companion_given_anchor", "lift"
    )


@dg.asset(
    group_name="counterfactuals",
    kinds={"python", "opencv", "parquet"},
    code_version="1",
    io_manager_key="refs",
    ins=ALL_BATCHES,
    description=(
        "Counterfactuals of every flagged pair (a, b). Eval set (test split): each image showing both "
        "with every b inpainted (I^-b), a control with a same-shaped region inpainted off every object "
        "(I^c), and the captions edited to drop b (cf_eval_*). Train set: removal edits of train images "
        "showing both, and paste edits (b cut from another image and pasted into images without a, the "
        "caption gaining its mention), with each pair's lift before and after (cf_train_*)."
    ),
)
def synthetic_counterfactuals(
    context: dg.AssetExecutionContext,
    config: CounterfactualsConfig,
    settings: SpurSettings,
    raw_pairs: dict[str, ArtifactRef],
    spurious_features: ArtifactRef,
) -> dg.Output:
    pairs = flagged_pairs(spurious_features.read_table("spurious_features"), config.pair_source)
    if pairs.height == 0:
        raise ValueError(
            f"spurious_features flagged no pair from {config.pair_source}; nothing to counterfactualise. "
            "Lower its thresholds (min_support / min_conditional / min_lift) or add data."
        )
    test = batches_split(raw_pairs, "test")
    if config.mutual_pairs == "smaller_companion":
        pairs = orient_mutual_pairs(pairs, test.instances, test.images)
    device = str(resolve_device(settings.device)) if config.backend != "opencv" else "cpu"
    options = {"model_dir": config.diffusers_model_dir} if config.backend == "diffusers" else {}
    context.log.info(f"{pairs.height} flagged pairs, {test.images.height} test images, backend {config.backend} on {device}")
    inputs = upstream_refs(raw_pairs, spurious_features)
    with recorded_materialization(context, settings, config, inputs=inputs, device=device) as session:
        built = build_eval_counterfactuals(
            test.images,
            test.captions,
            test.instances,
            pairs,
            session.writer.path("eval"),
            InpainterSpec(config.backend, device, options),
            max_companion_fraction=config.max_companion_fraction,
            dilation_px=config.dilation_px,
            seed=config.seed,
            workers=config.workers,
            progress=context.log.info,
        )
        train = batches_split(raw_pairs, "train")
        train_cf = build_train_counterfactuals(
            train.images,
            train.captions,
            train.instances,
            pairs,
            session.writer.path("train"),
            InpainterSpec(config.backend, device, options),
            removal_per_pair=config.train_removal_per_pair or None,
            paste_per_pair=config.train_paste_per_pair or None,
            max_companion_fraction=config.max_companion_fraction,
            dilation_px=config.dilation_px,
            seed=config.seed,
            workers=config.workers,
            progress=context.log.info,
        )
        session.writer.write_table("cf_train_images", session.writer.final_paths(train_cf.images))
        session.writer.write_table("cf_train_captions", train_cf.captions)
        session.writer.write_table("cf_train_objects", train_cf.objects)
        session.writer.write_table("cf_train_lift", train_cf.lift)
        session.writer.write_table("cf_train_skipped", train_cf.skipped)
        session.writer.path("train_settings.json").write_text(json.dumps(train_cf.settings, indent=1, default=str))
        session.writer.add_file("train_settings", "train_settings.json")
        session.writer.add_dir("train_images", "train", rows=train_cf.images.height)
        grid = before_after_grid(built.images, session.writer.path("before_after.png"))
        session.writer.write_table("cf_eval_images", session.writer.final_paths(built.images))
        session.writer.write_table("cf_eval_captions", built.captions)
        session.writer.write_table("cf_eval_skipped", built.skipped)
        session.writer.write_table("cf_pairs", pairs)
        session.writer.add_dir("eval_images", "eval", rows=built.images.height)
        session.writer.add_file("before_after", grid.name)
    removal = built.images.filter(pl.col("kind") == "removal")
    per_pair = (
        removal.group_by("pair").agg(pl.len().alias("removal_images"), pl.col("mask_fraction").mean().alias("mean_mask_fraction"))
        .join(
            built.captions.group_by("pair").agg(
                pl.len().alias("edited_captions"), pl.col("accepted").sum().alias("accepted_edits")
            ),
            on="pair",
            how="left",
        )
        .sort("pair")
    )
    return session.output(
        {
            "train_removal_images": train_cf.images.filter(pl.col("kind") == "removal").height,
            "train_paste_images": train_cf.images.filter(pl.col("kind") == "paste").height,
            "train_lift": markdown_table(
                train_cf.lift.select("pair", "p_before", "lift_before", "p_after", "lift_after")
            ),
            "pairs": pairs.height,
            "removal_images": removal.height,
            "control_images": built.images.filter(pl.col("kind") == "control").height,
            "accepted_caption_edits": int(built.captions["accepted"].sum()) if built.captions.height else 0,
            "skipped": built.skipped.height,
            "per_pair": markdown_table(per_pair),
            "skipped_reasons": markdown_table(built.skipped.group_by("reason").len().sort("len", descending=True))
            if built.skipped.height
            else "none",
            "before_after": markdown_image(Path(session.ref.output("before_after").uri), "original | mask | b removed | control"),
        }
    )


@dg.asset(
    group_name="mitigate",
    kinds={"python", "coco"},
    code_version="1",
    io_manager_key="refs",
    ins=ALL_BATCHES,
    description=(
        "The synthetic counterfactual set written out as a COCO-layout dataset with dataset.yaml and "
        "DATASHEET.md (train = train counterfactuals, test = eval set), reusable like a released "
        "benchmark; `spur run --dataset <it>/dataset.yaml` reads it back."
    ),
)
def counterfactual_dataset(
    context: dg.AssetExecutionContext,
    settings: SpurSettings,
    raw_pairs: dict[str, ArtifactRef],
    synthetic_counterfactuals: ArtifactRef,
) -> dg.Output:
    cf = synthetic_counterfactuals
    test = batches_split(raw_pairs, "test")
    train_cf = TrainCounterfactuals(
        images=cf.read_table("cf_train_images"),
        captions=cf.read_table("cf_train_captions"),
        objects=cf.read_table("cf_train_objects"),
        lift=cf.read_table("cf_train_lift"),
        skipped=cf.read_table("cf_train_skipped"),
        settings=json.loads(cf.path("train_settings").read_text()),
    )
    inputs = upstream_refs(raw_pairs, synthetic_counterfactuals)
    with recorded_materialization(context, settings, None, inputs=inputs) as session:
        manifest = export_counterfactual_dataset(
            cf.read_table("cf_eval_images"),
            cf.read_table("cf_eval_captions"),
            train_cf,
            test.instances,
            session.writer.path("dataset"),
            source_description={
                "batches": sorted(raw_pairs),
                "synthetic_counterfactuals": cf.materialization_id,
            },
            test_captions=test.captions,
        )
        session.writer.add_dir("dataset", "dataset")
    final = Path(session.ref.output("dataset").uri)
    datasheet = (final / "DATASHEET.md").read_text()
    context.log.info(f"exported to {final / manifest.name}")
    return session.output(
        {
            "dataset_yaml": dg.MetadataValue.path(str(final / manifest.name)),
            "datasheet": dg.MetadataValue.md(datasheet),
        }
    )
