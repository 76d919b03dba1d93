"""Counterfactuals made batch by batch, then combined into the tables of one big run.

Most of the image work of ``synthetic_counterfactuals`` looks at one image at a
time: the eval removal and control images of a test image and its edited
captions (``eval_set.build_eval_counterfactuals``), and the train removal
edits of a train image (``train_counterfactuals.build_train_removal_candidates``).
Every choice in them is drawn from generators seeded by (seed, batch, image id,
pair), where the image id is the one the batch itself gives (COCO's); so one
batch built alone yields exactly the images and rows it contributes to a run
over all batches. :func:`build_batch_counterfactuals` does that work for one
batch, where an executor can run every batch at once.

What needs all batches stays in :func:`combine_batch_counterfactuals`: the draw
of ``removal_per_pair`` among every batch's candidates, the paste edits (targets
and donors from the whole train pool), the lift table, the counterfactual ids,
and the global image / caption / annotation ids of ``batch_union.union_split``
that downstream tables join on. Its result equals
:func:`build_synthetic_counterfactuals`, the one-run path, table for table and
PNG for PNG; the batch PNGs are hard-linked into the combined folder, not copied.

Mutual pairs are oriented on the whole test split (``cooccurrence.orient_mutual_pairs``),
so a batch counterfactualises every flagged pair in both directions and the
combiner keeps the directions it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from spur_assets.core.data.batch_union import SplitTables, union_split
from spur_assets.core.counterfactuals.eval_set import (
    CF_CAPTIONS_SCHEMA,
    CF_IMAGES_SCHEMA,
    CF_SKIPPED_SCHEMA,
    EvalCounterfactuals,
    build_eval_counterfactuals,
    link_or_copy,
    pair_name,
)
from spur_assets.core.counterfactuals.recipe import CounterfactualRecipe  # re-exported: callers import it from here too
from spur_assets.core.counterfactuals.train_counterfactuals import (
    TrainCounterfactuals,
    build_train_counterfactuals,
    build_train_removal_candidates,
    complete_train_counterfactuals,
)

EVAL_DIR = "eval"
TRAIN_DIR = "train"


@dataclass
class BatchCounterfactuals:
    """The counterfactual work of one batch, its ids as the batch has them.

    ``pairs`` (anchor, companion) are the pairs it covers; ``source`` names the
    version of the batch's tables it was built from (the caller's choice: the
    raw_pairs data version in the pipeline); ``recipe`` is the
    ``CounterfactualRecipe.fingerprint()`` it was made with.
    """

    batch: str
    source: str
    recipe: dict
    pairs: pl.DataFrame
    eval: EvalCounterfactuals
    train_removals: TrainCounterfactuals


@dataclass
class SyntheticCounterfactuals:
    """The eval set and train set of every batch, with the global ids of ``union_split``."""

    eval: EvalCounterfactuals
    train: TrainCounterfactuals


def _single_batch(images: pl.DataFrame) -> str:
    batches = images["batch"].unique().to_list()
    if len(batches) != 1:
        raise ValueError(
            f"build_batch_counterfactuals takes the tables of one batch; the images table holds {sorted(batches)}. "
            "Call it once per batch."
        )
    return batches[0]


def build_batch_counterfactuals(
    tables: SplitTables,
    pairs: pl.DataFrame,
    out_dir: Path,
    recipe: CounterfactualRecipe,
    source: str = "",
    progress: Callable[[str], None] | None = None,
) -> BatchCounterfactuals:
    """The eval counterfactuals and train removal candidates of one batch's raw tables; PNGs under ``out_dir``.

    ``tables`` are one batch's ingested tables (all splits, the batch's own
    ids); ``pairs`` the flagged (anchor, companion) pairs, both directions of a
    mutual pair included when either may be kept; ``source`` names the version
    of the tables (stored in the result). Writes ``out_dir/eval``
    (``build_eval_counterfactuals``) and ``out_dir/train``
    (``build_train_removal_candidates``; the recipe's train draw counts apply
    only when parts are combined). ValueError when the tables hold more than
    one batch.
    """
    batch = _single_batch(tables.images)
    out_dir = Path(out_dir)
    eval_set = build_eval_counterfactuals(tables, pairs, out_dir / EVAL_DIR, recipe, progress)
    removals = build_train_removal_candidates(tables, pairs, out_dir / TRAIN_DIR, recipe, progress)
    covered = pairs.select("anchor", "companion").unique(maintain_order=True)
    return BatchCounterfactuals(batch, source, recipe.fingerprint(), covered, eval_set, removals)


def build_synthetic_counterfactuals(
    tables: SplitTables,
    pairs: pl.DataFrame,
    out_dir: Path,
    recipe: CounterfactualRecipe,
    progress: Callable[[str], None] | None = None,
) -> SyntheticCounterfactuals:
    """The eval and train counterfactuals of all batches in one run (the reference the combination must equal).

    ``tables`` are every batch's raw tables stacked (each batch with its own
    ids; rows are keyed by (batch, id)); ``pairs`` the pairs to make, in order
    (oriented already). Writes ``out_dir/eval`` and ``out_dir/train``. Ids in
    the result are ``union_split``'s global ids.
    """
    out_dir = Path(out_dir)
    eval_set = build_eval_counterfactuals(tables, pairs, out_dir / EVAL_DIR, recipe, progress)
    train = build_train_counterfactuals(tables, pairs, out_dir / TRAIN_DIR, recipe, progress)
    return with_global_ids(SyntheticCounterfactuals(eval_set, train), tables)


def stale_batches(
    parts: Mapping[str, BatchCounterfactuals],
    sources: Mapping[str, str],
    pairs: pl.DataFrame,
    recipe: CounterfactualRecipe,
) -> dict[str, str]:
    """{batch: why its part cannot be used} for each batch of ``sources`` ({batch: current source version}).

    A part is usable when it exists, was built from the current source, with
    ``recipe``, and covers every pair of ``pairs``.
    """
    wanted = set(pairs.select("anchor", "companion").iter_rows())
    fingerprint = recipe.fingerprint()
    stale: dict[str, str] = {}
    for batch, source in sorted(sources.items()):
        part = parts.get(batch)
        if part is None:
            stale[batch] = "no counterfactuals of this batch yet"
        elif part.source != source:
            stale[batch] = f"built from {part.source!r}, the batch is now {source!r}"
        elif part.recipe != fingerprint:
            changed = sorted(k for k in fingerprint if part.recipe.get(k) != fingerprint[k])
            stale[batch] = f"made with other settings ({', '.join(changed)})"
        else:
            missing = wanted - set(part.pairs.select("anchor", "companion").iter_rows())
            if missing:
                stale[batch] = f"lacks pair(s) {', '.join(sorted(pair_name(a, b) for a, b in missing))}"
    return stale


def combine_batch_counterfactuals(
    parts: Sequence[BatchCounterfactuals],
    tables: SplitTables,
    pairs: pl.DataFrame,
    out_dir: Path,
    recipe: CounterfactualRecipe,
    progress: Callable[[str], None] | None = None,
) -> SyntheticCounterfactuals:
    """What ``build_synthetic_counterfactuals`` makes of these arguments, from one ``BatchCounterfactuals`` per batch.

    ``parts`` must hold exactly one part per batch of ``tables``, each made
    with ``recipe`` (same ``fingerprint()``) and covering every pair of
    ``pairs`` (``stale_batches`` says which to rebuild); ValueError otherwise.
    Eval rows are taken per pair (in ``pairs`` order), then per batch, and
    renumbered; train removal edits are drawn from the parts' candidates and
    the paste edits made here (``complete_train_counterfactuals``). Part PNGs
    are hard-linked into ``out_dir/eval`` and ``out_dir/train``.
    """
    batches = sorted(tables.images["batch"].unique().to_list())
    by_batch = {part.batch: part for part in parts}
    if len(by_batch) != len(parts) or sorted(by_batch) != batches:
        raise ValueError(
            f"combine_batch_counterfactuals needs one part per batch of the images table {batches}; "
            f"got parts for {sorted(p.batch for p in parts)}"
        )
    stale = stale_batches(by_batch, {b: by_batch[b].source for b in batches}, pairs, recipe)
    if stale:
        raise ValueError(
            "counterfactuals of batch(es) "
            + "; ".join(f"{b}: {why}" for b, why in stale.items())
            + ". Rebuild them with build_batch_counterfactuals (materialize their batch_counterfactuals partitions)"
        )
    ordered = [by_batch[b] for b in batches]
    out_dir = Path(out_dir)
    eval_set = combine_eval_sets([p.eval for p in ordered], pairs, out_dir / EVAL_DIR)
    train = complete_train_counterfactuals(
        [p.train_removals for p in ordered], tables, pairs, out_dir / TRAIN_DIR, recipe, progress
    )
    return with_global_ids(SyntheticCounterfactuals(eval_set, train), tables)


def combine_eval_sets(parts: Sequence[EvalCounterfactuals], pairs: pl.DataFrame, out_dir: Path) -> EvalCounterfactuals:
    """The eval sets of several batches as one, in ``build_eval_counterfactuals``' order; PNGs linked into ``out_dir``.

    ``parts`` are in batch order. Rows of each pair of ``pairs`` (in its order;
    other pairs are dropped) come from each part in turn; cf_image_id and
    cf_caption_id are renumbered from 1 in that order, and each PNG is linked
    to ``out_dir/<pair folder>/<file name>``, the one-run layout.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_rows: list[dict] = []
    caption_rows: list[dict] = []
    skipped_rows: list[dict] = []
    for anchor, companion in dict.fromkeys(pairs.select("anchor", "companion").iter_rows()):
        pair = pair_name(anchor, companion)
        for part in parts:
            new_id: dict[int, int] = {}
            for row in part.images.filter(pl.col("pair") == pair).sort("cf_image_id").iter_rows(named=True):
                new_id[row["cf_image_id"]] = len(image_rows) + 1
                moved = {}
                for column in ("path", "mask_path"):
                    source = Path(row[column])
                    target = out_dir / source.parent.name / source.name
                    link_or_copy(source, target)
                    moved[column] = str(target)
                image_rows.append(row | moved | {"cf_image_id": len(image_rows) + 1})
            for row in part.captions.filter(pl.col("pair") == pair).sort("cf_caption_id").iter_rows(named=True):
                caption_rows.append(
                    row | {"cf_caption_id": len(caption_rows) + 1, "cf_image_id": new_id[row["cf_image_id"]]}
                )
            skipped_rows.extend(part.skipped.filter(pl.col("pair") == pair).iter_rows(named=True))
    return EvalCounterfactuals(
        images=pl.DataFrame(image_rows, schema=CF_IMAGES_SCHEMA),
        captions=pl.DataFrame(caption_rows, schema=CF_CAPTIONS_SCHEMA),
        skipped=pl.DataFrame(skipped_rows, schema=CF_SKIPPED_SCHEMA),
    )


# --------------------------------------------------------------------------- global ids


def _id_maps(raw: SplitTables, split: str) -> dict[str, pl.DataFrame]:
    """(batch, source id) -> global id of images, captions and annotations of one split, as ``union_split`` numbers them."""
    tables = union_split([raw.images], [raw.captions], [raw.instances], split)
    return {
        "image": tables.images.select("batch", pl.col("source_image_id").alias("source"), pl.col("image_id").alias("target")),
        "caption": tables.captions.select(
            "batch", pl.col("source_caption_id").alias("source"), pl.col("caption_id").alias("target")
        ),
        "annotation": tables.instances.select(
            "batch", pl.col("source_annotation_id").alias("source"), pl.col("annotation_id").alias("target")
        ),
    }


def _to_global(frame: pl.DataFrame, column: str, batch_column: str, mapping: pl.DataFrame, table: str) -> pl.DataFrame:
    """``frame`` with ``column`` (a batch's own ids, batch in ``batch_column``) replaced by global ids."""
    if frame.height == 0:
        return frame
    lookup = mapping.rename({"batch": batch_column, "source": column, "target": "_global_id"}).with_columns(
        pl.col(column).cast(frame.schema[column])
    )
    joined = frame.join(lookup, on=[batch_column, column], how="left", maintain_order="left")
    lost = joined.filter(pl.col(column).is_not_null() & pl.col("_global_id").is_null())
    if lost.height:
        example = lost.row(0, named=True)
        raise ValueError(
            f"{table}: {column} {example[column]} of batch {example[batch_column]!r} is not in the batch's "
            f"tables (field {column!r}); the counterfactuals are stale, rebuild them"
        )
    return joined.with_columns(pl.col("_global_id").cast(pl.Int64).alias(column)).drop("_global_id")


def with_global_ids(result: SyntheticCounterfactuals, tables: SplitTables) -> SyntheticCounterfactuals:
    """``result`` (ids as each batch has them) with ``union_split``'s global ids, the ids downstream joins on.

    ``tables`` are the raw tables of every batch ``result`` was made from (all splits, each batch's own ids).

    Eval ids map through the test split, train ids through the train split:
    ``source_image_id``, ``source_caption_id``, ``donor_image_id``,
    ``donor_annotation_id`` and the objects' ``source_annotation_id`` (a pasted
    object's through its donor's batch). Counterfactual ids stay as they are.
    """
    test, train = _id_maps(tables, "test"), _id_maps(tables, "train")
    ev, tr = result.eval, result.train
    eval_images = _to_global(ev.images, "source_image_id", "batch", test["image"], "cf_eval_images")
    eval_captions = _to_global(
        _to_global(ev.captions, "source_image_id", "batch", test["image"], "cf_eval_captions"),
        "source_caption_id", "batch", test["caption"], "cf_eval_captions",
    )
    eval_skipped = _to_global(ev.skipped, "source_image_id", "batch", test["image"], "cf_eval_skipped")
    train_images = _to_global(tr.images, "source_image_id", "batch", train["image"], "cf_train_images")
    train_images = _to_global(train_images, "donor_image_id", "donor_batch", train["image"], "cf_train_images")
    train_images = _to_global(train_images, "donor_annotation_id", "donor_batch", train["annotation"], "cf_train_images")
    batch_of = tr.images.select(
        "cf_image_id", pl.col("batch").alias("_batch"), pl.col("donor_batch").alias("_donor_batch")
    )
    train_captions = _to_global(
        tr.captions.join(batch_of, on="cf_image_id", how="left", maintain_order="left"),
        "source_caption_id", "_batch", train["caption"], "cf_train_captions",
    ).select(tr.captions.columns)
    train_objects = _to_global(
        tr.objects.join(batch_of, on="cf_image_id", how="left", maintain_order="left").with_columns(
            pl.when(pl.col("pasted")).then(pl.col("_donor_batch")).otherwise(pl.col("_batch")).alias("_batch")
        ),
        "source_annotation_id", "_batch", train["annotation"], "cf_train_objects",
    ).select(tr.objects.columns)
    train_skipped = _to_global(tr.skipped, "source_image_id", "batch", train["image"], "cf_train_skipped")
    return SyntheticCounterfactuals(
        EvalCounterfactuals(eval_images, eval_captions, eval_skipped),
        TrainCounterfactuals(train_images, train_captions, train_objects, tr.lift, train_skipped, tr.settings),
    )
