"""`spurious_features`: co-occurrence statistics over all train batches, ranked spurious pairs."""


from pathlib import Path

import dagster as dg
import polars as pl

from spur_assets.core.records.artifacts import ArtifactRef
from spur_assets.core.counterfactuals.cooccurrence import (
    PairThresholds,
    cooccurrence_matrix,
    image_categories_from_instances,
    image_categories_from_mentions,
    pair_statistics,
)
from spur_assets.core.metrics.plots import cooccurrence_heatmap
from spur_assets.core.data.vocabulary import mention_table
from spur_assets.pipeline.ingest import ALL_BATCHES, batches_split
from spur_assets.pipeline.recording import recorded_materialization, upstream_refs
from spur_assets.pipeline.resources import SpurSettings
from spur_assets.pipeline.ui_metadata import markdown_image, markdown_table


class SpuriousFeaturesConfig(dg.Config):
    """Thresholds of the spurious-pair rule (docs/definitions.md#spurious-pairs)."""

    min_support: int = PairThresholds.min_support
    min_conditional: float = PairThresholds.min_conditional
    min_lift: float = PairThresholds.min_lift


@dg.asset(
    group_name="expose",
    kinds={"python", "parquet"},
    code_version="1",
    io_manager_key="refs",
    ins=ALL_BATCHES,
    description=(
        "Object co-occurrence over the train split of every batch, from instances and, separately, "
        "from caption mentions; each ordered pair (anchor, companion) with n, P(b|a), lift and whether "
        "the spurious-pair rule flags it. Query it as spurious_features in lineage.duckdb."
    ),
)
def spurious_features(
    context: dg.AssetExecutionContext,
    config: SpuriousFeaturesConfig,
    settings: SpurSettings,
    raw_pairs: dict[str, ArtifactRef],
) -> dg.Output:
    thresholds = PairThresholds(config.min_support, config.min_conditional, config.min_lift)
    train = batches_split(raw_pairs, "train")
    images, instances, captions = train.images, train.instances, train.captions
    context.log.info(f"{images.height} train images, {instances.height} instances, {captions.height} captions")
    mentions = mention_table(captions.select("caption_id", "caption"))
    by_instances = image_categories_from_instances(instances)
    by_captions = image_categories_from_mentions(captions, mentions)
    stats = pl.concat(
        [
            pair_statistics(by_instances, images.height, "instances", thresholds),
            pair_statistics(by_captions, images.height, "captions", thresholds),
        ]
    )
    flagged = stats.filter(pl.col("flagged"))
    with recorded_materialization(context, settings, config, inputs=upstream_refs(raw_pairs)) as session:
        session.writer.write_table("spurious_features", stats)
        categories = sorted(by_instances["category"].unique().to_list())
        _, matrix = cooccurrence_matrix(by_instances, categories)
        cooccurrence_heatmap(
            categories,
            matrix,
            {(a, b) for a, b in flagged.filter(pl.col("source") == "instances").select("anchor", "companion").iter_rows()},
            session.writer.path("cooccurrence.png"),
            "P(companion | anchor), train instances; red = flagged",
        )
        session.writer.add_file("cooccurrence_heatmap", "cooccurrence.png")
    shown = ["anchor", "companion", "n_anchor", "n_both", "p_companion_given_anchor", "lift"]
    return session.output(
        {
            "flagged_pairs_instances": flagged.filter(pl.col("source") == "instances").height,
            "flagged_pairs_captions": flagged.filter(pl.col("source") == "captions").height,
            "top_pairs_instances": markdown_table(stats.filter(pl.col("source") == "instances").select(shown), 15),
            "top_pairs_captions": markdown_table(stats.filter(pl.col("source") == "captions").select(shown), 15),
            "heatmap": markdown_image(Path(session.ref.output("cooccurrence_heatmap").uri), "co-occurrence"),
            "thresholds": dg.MetadataValue.json(config.model_dump()),
        }
    )
