"""`raw_pairs`: one dataset batch, validated, as images / captions / instances tables."""


import dataclasses
import os
from pathlib import Path
from typing import Literal

import dagster as dg
import polars as pl

from spur_assets.core.records.artifacts import ArtifactRef
from spur_assets.core.data.batch_union import SplitTables, union_split
from spur_assets.core.data.batches import (
    BUILTIN_BATCH,
    batch_taken_error,
    refuse_other_manifest,
    register_batch,
    registered_manifest,
    validate_batch_id,
)
from spur_assets.core.data.builtin_dataset import BuiltinDatasetSpec, generate_builtin_dataset
from spur_assets.core.data.coco_ingest import DEFAULT_MAX_IMAGE_PIXELS, BatchTables, content_fingerprint, load_batch
from spur_assets.core.data.contact_sheet import draw_contact_sheet
from spur_assets.core.data.errors import DatasetError
from spur_assets.pipeline.recording import recorded_materialization
from spur_assets.pipeline.resources import SpurSettings
from spur_assets.pipeline.ui_metadata import markdown_image, markdown_table

batches = dg.DynamicPartitionsDefinition(name="batches")

# Downstream assets read every materialized batch of raw_pairs.
ALL_BATCHES = {"raw_pairs": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())}


def batches_split(raw_pairs: dict[str, ArtifactRef], split: str) -> SplitTables:
    """One split of every batch, ids renumbered globally (images sorted so image_id == row)."""
    return union_split(
        [r.read_table("raw_images") for r in raw_pairs.values()],
        [r.read_table("raw_captions") for r in raw_pairs.values()],
        [r.read_table("raw_instances") for r in raw_pairs.values()],
        split,
    )

_SPEC_DEFAULTS = BuiltinDatasetSpec()


class RawPairsConfig(dg.Config):
    """How a batch is read. The built-in knobs apply only to the batch named 'builtin'."""

    manifest: str = ""  # a dataset.yaml for this batch; empty = the registered one (or SPUR_DATASET)
    on_bad_record: Literal["fail", "quarantine"] = "fail"  # fail the batch, or drop bad records and count them
    workers: int = max(1, min(8, os.cpu_count() or 1))  # threads reading, hashing and decoding image files
    # Replace a batch id that already holds other data (the earlier version stays in lineage).
    replace: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images are refused from their header
    builtin_seed: int = _SPEC_DEFAULTS.seed
    builtin_n_train: int = _SPEC_DEFAULTS.n_train
    builtin_n_test: int = _SPEC_DEFAULTS.n_test
    builtin_image_size: int = _SPEC_DEFAULTS.image_size


def builtin_spec(config: RawPairsConfig) -> BuiltinDatasetSpec:
    """The built-in dataset spec with this run's overrides."""
    return dataclasses.replace(
        _SPEC_DEFAULTS,
        seed=config.builtin_seed,
        n_train=config.builtin_n_train,
        n_test=config.builtin_n_test,
        image_size=config.builtin_image_size,
    )


def resolve_manifest(settings: SpurSettings, batch: str, config: RawPairsConfig, log) -> Path:
    """The dataset.yaml behind ``batch``: run config, then the registry, then SPUR_DATASET, then built-in.

    A manifest in the run config that differs from the one registered for ``batch`` is
    refused unless ``config.replace`` is set.
    """
    if config.manifest:
        manifest = Path(config.manifest).expanduser().resolve()
        refuse_other_manifest(settings.home_path, batch, manifest, config.replace)
        return manifest
    registered = registered_manifest(settings.home_path, batch)
    if registered is not None:
        return registered
    if batch == BUILTIN_BATCH:
        if settings.dataset:
            return Path(settings.dataset).expanduser().resolve()
        spec = builtin_spec(config)
        out_dir = settings.home_path / "datasets" / f"builtin-seed{spec.seed}-{spec.n_train}x{spec.n_test}-{spec.image_size}px"
        log.info(f"generating the built-in dataset into {out_dir} ({spec})")
        return generate_builtin_dataset(out_dir, spec, workers=settings.thread_policy().pool_size(config.workers))
    raise DatasetError(
        settings.home_path / "batches", batch, "manifest", f"batch {batch!r} has no dataset.yaml registered",
        f"register it with `spur run --dataset PATH/dataset.yaml --batch {batch}`, drop it into the inbox, "
        "or set raw_pairs' run config `manifest`",
    )


def refuse_other_data(settings: SpurSettings, batch: str, manifest: Path, tables: BatchTables, config: RawPairsConfig, log) -> None:
    """Raise if ``batch`` already holds different content and ``config.replace`` is not set.

    The built-in batch is generated from its run config, so a new config is a deliberate
    replacement: it is logged, not refused.
    """
    earlier = settings.lineage().latest("raw_pairs", batch)
    if earlier is None:
        return
    outputs = {output["name"]: Path(output["uri"]) for output in earlier["outputs"]}
    try:
        before = content_fingerprint(
            SplitTables(*(pl.read_parquet(outputs[name]) for name in ("raw_images", "raw_captions", "raw_instances")))
        )
    except (KeyError, OSError, pl.exceptions.PolarsError) as error:
        log.warning(f"cannot compare batch {batch!r} with its earlier materialization {earlier['materialization_id']} ({error})")
        return
    if before == content_fingerprint(tables):
        return
    if config.replace or batch == BUILTIN_BATCH:
        log.warning(
            f"batch {batch!r}: replacing the data of materialization {earlier['materialization_id']} "
            "(it stays in lineage and under SPUR_HOME/artifacts)"
        )
        return
    raise batch_taken_error(
        manifest, batch, f"it holds different data (raw_pairs materialization {earlier['materialization_id']}, "
        f"{earlier['ended_at']:%Y-%m-%d %H:%M} UTC)",
    )


def _split_counts(tables) -> pl.DataFrame:
    counts = [
        frame.group_by("split").len().rename({"len": name})
        for name, frame in (("images", tables.images), ("captions", tables.captions), ("instances", tables.instances))
    ]
    summary = counts[0]
    for other in counts[1:]:
        summary = summary.join(other, on="split", how="full", coalesce=True)
    return summary.fill_null(0).sort("split")


@dg.asset(
    partitions_def=batches,
    group_name="ingest",
    kinds={"python", "parquet"},
    code_version="1",
    io_manager_key="refs",
    description=(
        "One dataset batch (a COCO-layout folder with a dataset.yaml), validated: images, captions "
        "and object instances (masks decoded with pycocotools) as Parquet tables, queryable in "
        "lineage.duckdb as raw_images, raw_captions, raw_instances. The batch 'builtin' is generated."
    ),
)
def raw_pairs(context: dg.AssetExecutionContext, config: RawPairsConfig, settings: SpurSettings) -> dg.Output:
    batch = context.partition_key
    try:  # a partition key is input too (the UI adds any string): checked before anything is written
        validate_batch_id(batch)
    except ValueError as error:
        raise DatasetError(settings.home_path / "batches", batch, "batch", str(error), "add the batch under a safe id") from None
    with recorded_materialization(context, settings, config) as session:
        manifest = resolve_manifest(settings, batch, config, context.log)
        context.log.info(f"reading batch {batch!r} from {manifest}")
        tables = load_batch(
            manifest, batch=batch, on_bad_record=config.on_bad_record, workers=session.policy.pool_size(config.workers),
            progress=context.log.info,
            allowed_roots=settings.allowed_root_paths, max_image_pixels=config.max_image_pixels,
        )
        if tables.images.height == 0:
            raise DatasetError(
                manifest, None, "images", f"batch {batch!r}: no valid image left ({tables.quarantine.height} records quarantined)",
                "see raw_pairs' log for the quarantined records; fix them and run again",
            )
        refuse_other_data(settings, batch, manifest, tables, config, context.log)
        session.writer.write_table("raw_images", tables.images)
        session.writer.write_table("raw_captions", tables.captions)
        session.writer.write_table("raw_instances", tables.instances)
        session.writer.write_table("raw_categories", tables.categories)
        session.writer.write_table("raw_quarantine", tables.quarantine)
        sheet_split = "train" if (tables.images["split"] == "train").any() else tables.images["split"][0]
        # Drawn from the validated tables: a quarantined record is never read again.
        sheet = draw_contact_sheet(tables, sheet_split, session.writer.path("contact_sheet.png"), title=batch)
        session.writer.add_file("contact_sheet", sheet.name)
    if config.manifest or batch != BUILTIN_BATCH:
        # Registered only once the batch is stored: a failed ingest leaves the registry as it was.
        register_batch(settings.home_path, batch, manifest, replace=True)
    per_category = (
        tables.instances.group_by("category").agg(
            pl.len().alias("instances"), pl.col("image_id").n_unique().alias("images")
        ).sort("instances", descending=True)
    )
    quarantined = tables.quarantine.height
    if quarantined:
        context.log.warning(f"{quarantined} bad records quarantined; see raw_quarantine in lineage.duckdb")
    return session.output(
        {
            "manifest": dg.MetadataValue.path(str(manifest)),
            "images": tables.images.height,
            "captions": tables.captions.height,
            "instances": tables.instances.height,
            "categories": tables.categories.height,
            "quarantined_records": quarantined,
            "per_split": markdown_table(_split_counts(tables)),
            "per_category": markdown_table(per_category, max_rows=30),
            "quarantine": markdown_table(tables.quarantine, max_rows=10) if quarantined else "none",
            "contact_sheet": markdown_image(Path(session.ref.output("contact_sheet").uri), f"{batch}: sample images"),
        }
    )
