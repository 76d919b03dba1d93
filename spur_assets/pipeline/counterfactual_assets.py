"""Counterfactual assets: `batch_counterfactuals` per batch, `synthetic_counterfactuals` over all, and the export.

`batch_counterfactuals` does the image work that depends on one batch only (eval
removal and control images, edited captions, train removal edits), so executors
can fan it out across batches; `synthetic_counterfactuals` combines the
partitions into the tables one run over all batches would write
(``core.counterfactuals.batch_counterfactuals``).
"""

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Literal

import dagster as dg
import polars as pl

from spur_assets.core.records.artifacts import ArtifactRef, ArtifactWriter
from spur_assets.core.counterfactuals.batch_counterfactuals import (
    BatchCounterfactuals,
    CounterfactualRecipe,
    build_batch_counterfactuals,
    combine_batch_counterfactuals,
    stale_batches,
)
from spur_assets.core.counterfactuals.cooccurrence import orient_mutual_pairs
from spur_assets.core.counterfactuals.eval_set import EvalCounterfactuals, before_after_grid
from spur_assets.core.runtime.devices import resolve_device
from spur_assets.core.counterfactuals.inpaint import InpainterSpec
from spur_assets.core.counterfactuals.export import export_counterfactual_dataset
from spur_assets.core.counterfactuals.train_counterfactuals import TrainCounterfactuals
from spur_assets.core.data.batch_union import SplitTables
from spur_assets.pipeline.ingest import ALL_BATCHES, batches, batches_split
from spur_assets.pipeline.recording import recorded_materialization, upstream_refs
from spur_assets.pipeline.resources import SpurSettings
from spur_assets.pipeline.ui_metadata import markdown_image, markdown_table


class BatchCounterfactualsConfig(dg.Config):
    """How counterfactual images are made (docs/definitions.md#counterfactual-eval-set); shared by both counterfactual assets."""

    backend: Literal["opencv", "torch", "diffusers"] = "opencv"
    diffusers_model_dir: str = ""  # a local inpainting pipeline folder, for backend=diffusers
    max_companion_fraction: float = 0.25  # skip images where the companion covers more
    dilation_px: int = 2
    pair_source: Literal["instances", "captions"] = "instances"  # which flagged pairs to counterfactualise
    seed: int = 0
    workers: int = max(1, min(8, os.cpu_count() or 1))


class CounterfactualsConfig(BatchCounterfactualsConfig):
    """How counterfactuals are made and how many train edits each pair gets.

    A batch_counterfactuals partition made with other image settings (backend,
    max_companion_fraction, dilation_px, seed) than these is rebuilt here, not used.
    """

    # a pair flagged both ways: keep the direction whose companion is smaller, or both
    mutual_pairs: Literal["smaller_companion", "both"] = "smaller_companion"
    train_removal_per_pair: int = 0  # train removal edits per pair; 0 = every train image showing the pair
    # train paste edits per pair; 0 = as many as bring the pair's lift to 1 (3,126 images on the
    # built-in data, which doubles fine-tuning time); 360 matches the built-in removals per pair
    train_paste_per_pair: int = 360


def flagged_pairs(features: pl.DataFrame, source: str) -> pl.DataFrame:
    """Flagged (anchor, companion) rows of one source, strongest first."""
    return features.filter(pl.col("flagged") & (pl.col("source") == source)).select(
        "anchor", "companion", "p_companion_given_anchor", "lift"
    )


def _flagged_or_fail(spurious_features: ArtifactRef, source: str) -> pl.DataFrame:
    pairs = flagged_pairs(spurious_features.read_table("spurious_features"), source)
    if pairs.height == 0:
        raise ValueError(
            f"spurious_features flagged no pair from {source}; nothing to counterfactualise. "
            "Lower its thresholds (min_support / min_conditional / min_lift) or add data."
        )
    return pairs


def _recipe(config: BatchCounterfactualsConfig, settings: SpurSettings) -> CounterfactualRecipe:
    """The recipe of ``config``, with its train draw counts when it has them (0 in the config = None, the default rule)."""
    device = str(resolve_device(settings.device)) if config.backend != "opencv" else "cpu"
    options = {"model_dir": config.diffusers_model_dir} if config.backend == "diffusers" else {}
    counts = (
        {"removal_per_pair": config.train_removal_per_pair or None, "paste_per_pair": config.train_paste_per_pair or None}
        if isinstance(config, CounterfactualsConfig)
        else {}
    )
    return CounterfactualRecipe(
        InpainterSpec(config.backend, device, options),
        max_companion_fraction=config.max_companion_fraction,
        dilation_px=config.dilation_px,
        seed=config.seed,
        **counts,
    )


def _stacked(refs: list[ArtifactRef]) -> SplitTables:
    """images, captions, instances of these raw_pairs materializations (all splits), each batch with its own ids."""
    return SplitTables(*(
        pl.concat([r.read_table(name) for r in refs], how="vertical_relaxed")
        for name in ("raw_images", "raw_captions", "raw_instances")
    ))


# Table outputs of batch_counterfactuals -> (part attribute, field). Named apart from
# synthetic_counterfactuals' tables: lineage.duckdb shows every table name as one view.
_BATCH_TABLES = {
    "batch_cf_eval_images": ("eval", "images"),
    "batch_cf_eval_captions": ("eval", "captions"),
    "batch_cf_eval_skipped": ("eval", "skipped"),
    "batch_cf_train_images": ("train_removals", "images"),
    "batch_cf_train_captions": ("train_removals", "captions"),
    "batch_cf_train_objects": ("train_removals", "objects"),
    "batch_cf_train_skipped": ("train_removals", "skipped"),
}
_MADE_FROM = "batch_cf_made_from"


def _write_part(writer: ArtifactWriter, part: BatchCounterfactuals) -> None:
    for name, (attribute, field) in _BATCH_TABLES.items():
        writer.write_table(name, writer.final_paths(getattr(getattr(part, attribute), field)))
    writer.write_table("batch_cf_pairs", part.pairs)
    made_from = {"batch": part.batch, "source": part.source, "recipe": part.recipe,
                 "train_settings": part.train_removals.settings}
    writer.path(f"{_MADE_FROM}.json").write_text(json.dumps(made_from, indent=1, sort_keys=True))
    writer.add_file(_MADE_FROM, f"{_MADE_FROM}.json")


def read_batch_counterfactuals(ref: ArtifactRef) -> BatchCounterfactuals:
    """A batch_counterfactuals materialization read back as the core's ``BatchCounterfactuals``."""
    made_from = json.loads(ref.path(_MADE_FROM).read_text())
    tables = {name: ref.read_table(name) for name in _BATCH_TABLES}
    return BatchCounterfactuals(
        batch=made_from["batch"],
        source=made_from["source"],
        recipe=made_from["recipe"],
        pairs=ref.read_table("batch_cf_pairs"),
        eval=EvalCounterfactuals(
            tables["batch_cf_eval_images"], tables["batch_cf_eval_captions"], tables["batch_cf_eval_skipped"]
        ),
        train_removals=TrainCounterfactuals(
            tables["batch_cf_train_images"], tables["batch_cf_train_captions"], tables["batch_cf_train_objects"],
            pl.DataFrame(), tables["batch_cf_train_skipped"], made_from["train_settings"],
        ),
    )


def _stored_batch_refs(settings: SpurSettings, batch_ids: list[str]) -> dict[str, ArtifactRef]:
    """The batch_counterfactuals refs the refs IO manager holds for these batches (absent ones left out).

    Read here rather than as a Dagster input: an input with no materialized
    partition fails before the body runs, and a missing partition is work the
    combiner can do itself.
    """
    found = {}
    for batch in batch_ids:
        pointer = settings.home_path / "refs" / "batch_counterfactuals" / f"{batch}.json"  # ArtifactRefIOManager's layout
        if pointer.is_file():
            found[batch] = ArtifactRef.from_json(pointer.read_text())
    return found


@dg.asset(
    partitions_def=batches,
    group_name="counterfactuals",
    kinds={"python", "opencv", "parquet"},
    code_version="1",
    io_manager_key="refs",
    description=(
        "The counterfactual image work of one batch, for every flagged pair (both directions of a mutual "
        "pair): eval removal images I^-b, controls I^c and edited captions of its test images, and the train "
        "removal edits of every eligible train image, keyed by the batch's own image ids. Partitioned like "
        "raw_pairs so executors fan it out across partitions: a backfill over all partitions runs them in "
        "parallel, and a new batch needs only its own partition. synthetic_counterfactuals combines them."
    ),
)
def batch_counterfactuals(
    context: dg.AssetExecutionContext,
    config: BatchCounterfactualsConfig,
    settings: SpurSettings,
    raw_pairs: dict[str, ArtifactRef],
    spurious_features: ArtifactRef,
) -> dg.Output:
    batch = context.partition_key
    raw = raw_pairs[batch]
    pairs = _flagged_or_fail(spurious_features, config.pair_source)
    recipe = _recipe(config, settings)
    tables = _stacked([raw])
    context.log.info(f"batch {batch!r}: {pairs.height} flagged pairs, {tables.images.height} images, "
                     f"backend {config.backend} on {recipe.inpainter.device}")
    inputs = upstream_refs(raw, spurious_features)
    with recorded_materialization(context, settings, config, inputs=inputs, device=recipe.inpainter.device) as session:
        recipe = replace(recipe, workers=session.policy.pool_size(config.workers))
        part = build_batch_counterfactuals(
            tables, pairs.select("anchor", "companion"), session.writer.staging_dir, recipe,
            source=raw.data_version, progress=context.log.info,
        )
        _write_part(session.writer, part)
        session.writer.add_dir("eval_images", "eval", rows=part.eval.images.height)
        session.writer.add_dir("train_images", "train", rows=part.train_removals.images.height)
    return session.output(
        {
            "pairs": part.pairs.height,
            "eval_images": part.eval.images.height,
            "accepted_caption_edits": int(part.eval.captions["accepted"].sum()) if part.eval.captions.height else 0,
            "train_removal_candidates": part.train_removals.images.height,
            "skipped": part.eval.skipped.height + part.train_removals.skipped.height,
        }
    )


@dg.asset(
    group_name="counterfactuals",
    kinds={"python", "opencv", "parquet"},
    code_version="2",
    io_manager_key="refs",
    ins=ALL_BATCHES,
    deps=[dg.AssetDep("batch_counterfactuals", partition_mapping=dg.AllPartitionMapping())],
    description=(
        "Counterfactuals of every flagged pair (a, b). Eval set (test split): each image showing both "
        "with every b inpainted (I^-b), a control with a same-shaped region inpainted off every object "
        "(I^c), and the captions edited to drop b (cf_eval_*). Train set: removal edits of train images "
        "showing both, and paste edits (b cut from another image and pasted into images without a, the "
        "caption gaining its mention), with each pair's lift before and after (cf_train_*). Combines the "
        "batch_counterfactuals partitions (the per-batch image work, which executors fan out) and makes "
        "what needs every batch here: the per-pair draws, the paste edits and the global ids. A batch "
        "whose partition is missing or stale (other settings, pairs or batch data) is rebuilt here."
    ),
)
def synthetic_counterfactuals(
    context: dg.AssetExecutionContext,
    config: CounterfactualsConfig,
    settings: SpurSettings,
    raw_pairs: dict[str, ArtifactRef],
    spurious_features: ArtifactRef,
) -> dg.Output:
    pairs = _flagged_or_fail(spurious_features, config.pair_source)
    flagged = pairs.select("anchor", "companion")
    test = batches_split(raw_pairs, "test")
    if config.mutual_pairs == "smaller_companion":
        pairs = orient_mutual_pairs(pairs, test.instances, test.images)
    recipe = _recipe(config, settings)
    stored = _stored_batch_refs(settings, sorted(raw_pairs))
    parts = {batch: read_batch_counterfactuals(ref) for batch, ref in stored.items()}
    # A part must cover the pairs kept; one rebuilt here covers every flagged pair, like a partition.
    stale = stale_batches(parts, {b: r.data_version for b, r in raw_pairs.items()}, pairs, recipe)
    for batch, why in stale.items():
        context.log.warning(f"batch_counterfactuals[{batch}] not used ({why}); rebuilding it here")
    used = {batch: ref for batch, ref in stored.items() if batch not in stale}
    context.log.info(f"{pairs.height} pairs, {len(raw_pairs)} batches ({len(stale)} rebuilt here)")
    inputs = upstream_refs(raw_pairs, spurious_features, used)
    with (
        recorded_materialization(context, settings, config, inputs=inputs, device=recipe.inpainter.device) as session,
        tempfile.TemporaryDirectory(prefix=".rebuild-", dir=settings.home_path) as scratch,
    ):
        recipe = replace(recipe, workers=session.policy.pool_size(config.workers))
        for batch in stale:
            parts[batch] = build_batch_counterfactuals(
                _stacked([raw_pairs[batch]]), flagged, Path(scratch) / batch, recipe,
                source=raw_pairs[batch].data_version, progress=context.log.info,
            )
        combined = combine_batch_counterfactuals(
            [parts[b] for b in sorted(raw_pairs)], _stacked([raw_pairs[b] for b in sorted(raw_pairs)]),
            pairs.select("anchor", "companion"), session.writer.staging_dir, recipe, progress=context.log.info,
        )
        built, train_cf = combined.eval, combined.train
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
            "batches_from_partitions": len(used),
            "batches_rebuilt_here": markdown_table(
                pl.DataFrame({"batch": list(stale), "why": list(stale.values())}, schema={"batch": pl.Utf8, "why": pl.Utf8})
            ) if stale else "none",
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
