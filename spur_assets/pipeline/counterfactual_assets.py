"""`synthetic_counterfactuals`: the counterfactual eval set (removal and control images, edited captions)."""

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
from spur_assets.pipeline.model_assets import train_split_tables
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
    ins={"raw_pairs": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())},
    description=(
        "Counterfactual eval set: for each flagged pair (a, b) and test image showing both, the image "
        "with every b inpainted (I^-b), a control with a same-shaped region inpainted off every object "
        "(I^c), and the captions edited to drop b. Tables cf_eval_images, cf_eval_captions, cf_eval_skipped."
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
    test = train_split_tables(raw_pairs, "test")
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
