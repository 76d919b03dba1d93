"""Several batches as one split: ids renumbered so they are unique across batches.

COCO ids are unique within a batch only; two inbox batches may both have an
image 1. Every table keeps its original id as ``source_<id>`` beside the new one.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl


@dataclass(frozen=True)
class SplitTables:
    """The images, captions and instances tables of a set of images.

    ``union_split`` gives one split over all batches, with global ids. Raw
    ingested tables of one or several batches (all splits, each batch's own
    ids, rows keyed by (batch, id)) are another use: the counterfactual
    builders take those and keep the split they need.
    """

    images: pl.DataFrame
    captions: pl.DataFrame
    instances: pl.DataFrame


def union_split(
    images: list[pl.DataFrame], captions: list[pl.DataFrame], instances: list[pl.DataFrame], split: str
) -> SplitTables:
    """Concatenate per-batch raw tables, keep ``split``, renumber image/caption/annotation ids densely.

    New ids follow (batch, old id) order, so the result does not depend on the
    order the batches are listed in.
    """

    def concat(frames: list[pl.DataFrame]) -> pl.DataFrame:
        frames = [f.filter(pl.col("split") == split) for f in frames]
        return pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()

    all_images = concat(images)
    if all_images.height == 0:
        raise ValueError(f"no {split!r} images in any batch")
    image_map = (
        all_images.select("batch", "image_id")
        .sort("batch", "image_id")
        .with_row_index("new_image_id")
        .with_columns(pl.col("new_image_id").cast(pl.Int64))
    )

    def remap(frame: pl.DataFrame, own_id: str | None) -> pl.DataFrame:
        frame = (
            frame.join(image_map, on=["batch", "image_id"], how="inner")
            .rename({"image_id": "source_image_id"})
            .rename({"new_image_id": "image_id"})
        )
        if own_id is not None:
            frame = (
                frame.sort("batch", own_id)
                .rename({own_id: f"source_{own_id}"})
                .with_row_index(own_id)
                .with_columns(pl.col(own_id).cast(pl.Int64))
            )
        return frame

    return SplitTables(
        images=remap(all_images, None).sort("image_id"),
        captions=remap(concat(captions), "caption_id"),
        instances=remap(concat(instances), "annotation_id"),
    )
