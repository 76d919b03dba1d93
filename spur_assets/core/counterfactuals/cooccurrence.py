"""Object co-occurrence statistics and the spurious-pair rule (docs/definitions.md#spurious-pairs).

For an ordered pair (a, b) over a set of images: n_a images contain a, n_ab
contain both; P(b|a) = n_ab / n_a; lift = P(b|a) / P(b). A pair is flagged when
n_ab >= min_support, P(b|a) >= min_conditional and lift >= min_lift.

"Contains" comes from one of two sources, computed separately: object instances
(any instance of the category, crowd regions included) or caption mentions (any
caption of the image names the category).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

PAIR_COLUMNS = (
    "anchor",
    "companion",
    "n_anchor",
    "n_companion",
    "n_both",
    "n_images",
    "p_companion_given_anchor",
    "p_companion",
    "lift",
    "source",
    "flagged",
)


@dataclass(frozen=True)
class PairThresholds:
    """The flagging rule. Defaults flag strong COCO pairs (mouse -> keyboard, baseball bat -> baseball glove)
    and skip ubiquitous companions like person, whose lift cannot reach 2 (P(person) is about 0.5)."""

    min_support: int = 20
    min_conditional: float = 0.5
    min_lift: float = 2.0


def image_categories_from_instances(instances: pl.DataFrame) -> pl.DataFrame:
    """Unique (image_id, category) rows from an instances table."""
    return instances.select("image_id", "category").unique()


def image_categories_from_mentions(captions: pl.DataFrame, mentions: pl.DataFrame) -> pl.DataFrame:
    """Unique (image_id, category) rows: categories named by any caption of the image.

    ``mentions`` has (caption_id, category), as ``vocabulary.mention_table`` returns.
    """
    return (
        mentions.join(captions.select("caption_id", "image_id"), on="caption_id", how="inner")
        .select("image_id", "category")
        .unique()
    )


def pair_statistics(
    image_categories: pl.DataFrame,
    n_images: int,
    source: str,
    thresholds: PairThresholds = PairThresholds(),
) -> pl.DataFrame:
    """Statistics of every ordered pair (a != b) seen together at least once, flagged by ``thresholds``.

    ``image_categories`` holds unique (image_id, category) rows; ``n_images`` counts
    every image of the split, including those with no category (they lower P(b)).
    Sorted flagged first, then by lift and support, descending.
    """
    if n_images <= 0:
        raise ValueError("pair_statistics needs at least one image")
    per_category = image_categories.group_by("category").agg(pl.len().alias("n"))
    both = (
        image_categories.rename({"category": "anchor"})
        .join(image_categories.rename({"category": "companion"}), on="image_id", how="inner")
        .filter(pl.col("anchor") != pl.col("companion"))
        .group_by("anchor", "companion")
        .agg(pl.len().alias("n_both"))
    )
    stats = (
        both.join(per_category.rename({"category": "anchor", "n": "n_anchor"}), on="anchor")
        .join(per_category.rename({"category": "companion", "n": "n_companion"}), on="companion")
        .with_columns(
            pl.lit(n_images, dtype=pl.Int64).alias("n_images"),
            (pl.col("n_both") / pl.col("n_anchor")).alias("p_companion_given_anchor"),
            (pl.col("n_companion") / n_images).alias("p_companion"),
            pl.lit(source).alias("source"),
        )
        .with_columns((pl.col("p_companion_given_anchor") / pl.col("p_companion")).alias("lift"))
        .with_columns(
            (
                (pl.col("n_both") >= thresholds.min_support)
                & (pl.col("p_companion_given_anchor") >= thresholds.min_conditional)
                & (pl.col("lift") >= thresholds.min_lift)
            ).alias("flagged")
        )
        .with_columns(pl.col(c).cast(pl.Int64) for c in ("n_anchor", "n_companion", "n_both"))
    )
    return stats.select(PAIR_COLUMNS).sort(
        ["flagged", "lift", "n_both", "anchor", "companion"], descending=[True, True, True, False, False]
    )


def cooccurrence_matrix(image_categories: pl.DataFrame, categories: list[str]) -> "tuple[list[str], list[list[float]]]":
    """P(column | row) for every category pair in ``categories`` order (diagonal 1), for heatmaps."""
    stats = pair_statistics(image_categories, max(1, image_categories["image_id"].n_unique()), "matrix")
    lookup = {(a, b): p for a, b, p in stats.select("anchor", "companion", "p_companion_given_anchor").iter_rows()}
    matrix = [[1.0 if a == b else lookup.get((a, b), 0.0) for b in categories] for a in categories]
    return categories, matrix


def orient_mutual_pairs(pairs: pl.DataFrame, instances: pl.DataFrame, images: pl.DataFrame) -> pl.DataFrame:
    """Keep one direction of each pair flagged both ways: the one whose companion is smaller.

    When a and b nearly always appear together, the rule flags (a, b) and (b, a).
    A counterfactual removes the companion, and removing the large object of a
    scene leaves little to retrieve by, so the direction kept is the one whose
    companion covers the smaller median share of its image (ties: the first in
    ``pairs`` order). ``instances`` needs image_id, category, mask_area;
    ``images`` image_id, width, height. Pairs flagged one way only pass through.
    """
    share = (
        instances.join(images.select("image_id", "width", "height"), on="image_id")
        .with_columns((pl.col("mask_area") / (pl.col("width") * pl.col("height"))).alias("share"))
        .group_by("category")
        .agg(pl.col("share").median())
    )
    size = dict(share.iter_rows())
    flagged = {(a, b) for a, b in pairs.select("anchor", "companion").iter_rows()}
    keep = []
    for a, b in pairs.select("anchor", "companion").iter_rows():
        if (b, a) in flagged and size.get(b, 0.0) > size.get(a, 0.0):
            keep.append(False)
        elif (b, a) in flagged and size.get(b, 0.0) == size.get(a, 0.0):
            keep.append(a < b)  # deterministic tie-break
        else:
            keep.append(True)
    return pairs.filter(pl.Series(keep, dtype=pl.Boolean))
