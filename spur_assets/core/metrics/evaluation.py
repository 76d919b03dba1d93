"""One checkpoint scored on the counterfactual eval set: the index, the embeddings, the metrics.

Three steps, each usable on its own:

1. `build_eval_index` is pure bookkeeping, no model: which rows form each gallery, which
   gallery rows are relevant to each query, which are its hard negatives, which images
   serve as the natural and anchor-only references. Everything is a plain list of row
   numbers, so it can be checked by hand.
2. `embed_eval_set` encodes every image and caption the index names with one checkpoint
   (`embed_eval_sets` with several: each image decoded, each caption tokenized, once for all
   checkpoints that prepare them alike).
3. `evaluate_embeddings` hands the embeddings and the index to `retrieval_metrics` (which
   owns every metric definition, docs/definitions.md#metrics) and assembles the report's
   metric dict M (docs/data-contract.md#reportjson), one row per pair, a few example retrievals, and every
   query's score behind each headline metric (`per_query`, which `attribution` resamples).

`evaluate_checkpoint` runs the three in order; `evaluate_checkpoints` for several checkpoints at once.

Row orders (fixed, so results are reproducible): test images by image_id; original
captions by caption_id, then accepted edits by cf_caption_id; removal and control images
by cf_image_id; text->image queries by removal query, then caption row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch
from torch import Tensor

from spur_assets.core.data.errors import require_columns
from spur_assets.core.metrics import retrieval_metrics as rm
from spur_assets.core.records.artifacts import ArtifactRef
from spur_assets.core.metrics.attribution import QueryScores
from spur_assets.core.data.batch_union import SplitTables
from spur_assets.core.counterfactuals.eval_set import pair_name
from spur_assets.core.model.embedding_cache import EmbeddingCache, file_sha256, text_key
from spur_assets.core.metrics.report import check_report_shape, verdict, write_report
from spur_assets.core.data.vocabulary import mentioned_categories

__all__ = [
    "RECALL_KS",
    "CheckpointEvaluation",
    "EvalEmbeddings",
    "EvalIndex",
    "EvalSet",
    "QueryScores",
    "build_eval_index",
    "check_report_shape",
    "embed_eval_set",
    "embed_eval_sets",
    "evaluate_checkpoint",
    "evaluate_checkpoints",
    "evaluate_embeddings",
    "verdict",
    "write_report",
]

RECALL_KS = (1, 5, 10)  # the COCO protocol's K (docs/definitions.md#recallk), whatever k the ODmAP uses
EXAMPLE_TOP = 5  # captions listed per example retrieval

REMOVAL, CONTROL = "removal", "control"


# --------------------------------------------------------------------------- inputs


@dataclass
class EvalSet:
    """The eval inputs, ids globally unique (the pipeline renumbers across batches first).

    images (image_id, path, width, height), captions (caption_id, image_id, caption) and
    instances (image_id, category) are the test split. cf_images (cf_image_id, kind
    "removal"|"control", source_image_id, anchor, companion, path) and cf_captions
    (cf_caption_id, source_image_id, anchor, companion, caption, accepted, and optionally
    source_caption_id: the original caption the edit was made from) are the
    counterfactuals of `counterfactuals.build_eval_counterfactuals`; pairs are the flagged
    (anchor, companion) pairs. Other columns are ignored. Without source_caption_id the
    image->text pairwise accuracy has no comparison (nan).
    """

    images: pl.DataFrame
    captions: pl.DataFrame
    instances: pl.DataFrame
    cf_images: pl.DataFrame
    cf_captions: pl.DataFrame
    pairs: list[tuple[str, str]]

    @classmethod
    def of(cls, test: SplitTables, synthetic_counterfactuals: ArtifactRef) -> EvalSet:
        """The test split with the eval counterfactuals and flagged pairs of a synthetic_counterfactuals output."""
        cf = synthetic_counterfactuals
        return cls(
            images=test.images, captions=test.captions, instances=test.instances,
            cf_images=cf.read_table("cf_eval_images"), cf_captions=cf.read_table("cf_eval_captions"),
            pairs=list(cf.read_table("cf_pairs").select("anchor", "companion").iter_rows()),
        )


@dataclass
class EvalIndex:
    """Galleries, queries and relevance of the eval set, as row numbers.

    Image gallery rows 0..n_images-1 are the test images (`image_ids`). Caption gallery
    rows 0..n_original_captions-1 are the original test captions, the rest the accepted
    edits (`caption_ids` holds caption_id or cf_caption_id, `caption_is_edit` says
    which). The text->image gallery is the test images followed by every removal image:
    removal query q sits at row n_images + q there.
    """

    pairs: list[tuple[str, str]]  # flagged pairs, duplicates dropped, in given order
    pair_names: list[str]  # "anchor->companion", same order
    categories: list[str]  # columns of caption_mentions and image_objects
    # test images (image gallery)
    image_ids: list[int]
    image_paths: list[str]
    # caption gallery: originals then accepted edits
    caption_ids: list[int]
    caption_texts: list[str]
    caption_is_edit: list[bool]
    caption_image_row: list[int]  # the test image a caption (or the edit's source caption) describes
    caption_source_row: list[int]  # an edit's source caption (an original row); -1 for originals and unknown sources
    n_original_captions: int
    caption_mentions: Tensor  # bool [n_captions, n_categories]
    image_objects: Tensor  # bool [n_images, n_categories]
    # removal queries I^-b (image->text) and their hard negatives
    removal_cf_image_ids: list[int]
    removal_paths: list[str]
    removal_pair: list[str]
    removal_image_row: list[int]  # row of I in the image gallery
    removal_relevant: list[list[int]]  # caption rows: I's captions without b + accepted edits for this pair
    removal_hard_negatives: list[list[int]]  # caption rows: I's captions that mention b
    # text->image queries: original captions of I that mention b
    t2i_caption_row: list[int]
    t2i_target: list[int]  # row of I in the text->image gallery
    t2i_hard_negative: list[int]  # row of I^-b in the text->image gallery (n_images + removal query)
    t2i_pair: list[str]
    # controls I^c, scored against I with I's original captions relevant
    control_cf_image_ids: list[int]
    control_paths: list[str]
    control_pair: list[str]
    control_image_row: list[int]
    control_relevant: list[list[int]]
    # reference images for HR@k, per pair name
    natural_rows: dict[str, list[int]]  # show neither anchor nor companion
    anchor_only_rows: dict[str, list[int]]  # show the anchor without the companion

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def n_captions(self) -> int:
        return len(self.caption_ids)

    def pair_of(self, name: str) -> tuple[str, str]:
        """(anchor, companion) of a pair name."""
        return self.pairs[self.pair_names.index(name)]


@dataclass
class EvalEmbeddings:
    """L2-normalised float32 embeddings of one checkpoint, rows in `EvalIndex` order."""

    images: Tensor  # [n_images, D]
    captions: Tensor  # [n_captions, D]
    removals: Tensor  # [n_removal, D]
    controls: Tensor  # [n_control, D]


@dataclass
class CheckpointEvaluation:
    """One checkpoint's scores: M of docs/data-contract.md#reportjson, one row per pair, example retrievals.

    metrics: {"recall": {"i2t"|"t2i": {"1","5","10"}}, "odmap": {"i2t"|"t2i": {str(k): macro}},
    "hr": {str(k), "natural_<k>", "anchor_only_<k>"}, "delta_ctrl": float, "pairwise":
    {"i2t", "t2i"}, "overcorrection": {"b_mention_rate", "recall_i2t_5"}} plus
    "odmap_micro", "hr_micro", "k" and "counts". All values lie in [0, 1] except
    delta_ctrl, a difference of two mAPs, in [-1, 1] (negative: the control image
    retrieves its own captions worse than the original does, which the removal cannot be
    blamed for). A metric with no query behind it is nan.
    per_pair: dicts with pair, anchor, companion, n_removal, n_t2i_queries, n_controls,
    n_with_b, odmap_i2t, odmap_t2i, hr, natural, anchor_only, delta_ctrl, pairwise_i2t,
    pairwise_t2i, b_mention_rate, recall_i2t_5_with_b (nan where undefined).
    examples: removal queries with their top captions (see `evaluate_embeddings`).
    per_query: metric name -> `attribution.QueryScores`, every query's score behind a
    headline value of metrics (`attribution.headline_path` says which), which
    `QueryScores.headline()` reproduces exactly: recall_{i2t,t2i}_{1,5,10}, odmap_i2t,
    odmap_t2i, hr, delta_ctrl, pairwise_i2t, pairwise_t2i, b_mention_rate,
    recall_i2t_5_with_b. Empty for evaluations made before it existed.
    """

    metrics: dict
    per_pair: list[dict]
    examples: list[dict]
    timings: dict[str, float] = field(default_factory=dict)
    per_query: dict[str, QueryScores] = field(default_factory=dict)


# --------------------------------------------------------------------------- index


def _check_columns(frame: pl.DataFrame, name: str, columns: Sequence[str]) -> None:
    require_columns(frame, columns, f"EvalSet.{name}", f"Pass the {name} table the pipeline wrote (see EvalSet's docstring).")


def _require_unique(frame: pl.DataFrame, name: str, column: str) -> None:
    counts = frame.group_by(column).len().filter(pl.col("len") > 1)
    if counts.height:
        raise ValueError(
            f"EvalSet.{name}: {column} {counts[column].sort().head(5).to_list()} occur more than once; "
            "ids must be unique across batches (renumber them before evaluating)."
        )


def _check_eval_set(eval_set: EvalSet) -> None:
    _check_columns(eval_set.images, "images", ("image_id", "path"))
    _check_columns(eval_set.captions, "captions", ("caption_id", "image_id", "caption"))
    _check_columns(eval_set.instances, "instances", ("image_id", "category"))
    _check_columns(eval_set.cf_images, "cf_images", ("cf_image_id", "kind", "source_image_id", "anchor", "companion", "path"))
    _check_columns(
        eval_set.cf_captions, "cf_captions", ("cf_caption_id", "source_image_id", "anchor", "companion", "caption", "accepted")
    )
    _require_unique(eval_set.images, "images", "image_id")
    _require_unique(eval_set.captions, "captions", "caption_id")
    _require_unique(eval_set.cf_images, "cf_images", "cf_image_id")
    _require_unique(eval_set.cf_captions, "cf_captions", "cf_caption_id")
    null_captions = eval_set.captions.filter(pl.col("caption").is_null())["caption_id"].head(5).to_list()
    if null_captions:
        raise ValueError(f"EvalSet.captions: caption_id {null_captions} have a null caption; drop or fill them.")
    bad_kinds = sorted(set(eval_set.cf_images["kind"].to_list()) - {REMOVAL, CONTROL}, key=str)
    if bad_kinds:
        raise ValueError(f"EvalSet.cf_images: kind {bad_kinds} is neither 'removal' nor 'control'; fix the kind column.")


def _image_row_of(image_row: dict[int, int], image_id: int, where: str) -> int:
    row = image_row.get(image_id)
    if row is None:
        raise ValueError(
            f"{where} refers to image_id {image_id}, which is not among the test images; "
            "pass the test images of the same batches as the counterfactuals."
        )
    return row


def _edit_sources(
    edits: pl.DataFrame, captions: pl.DataFrame, caption_image_row: list[int], n_original: int, image_ids: list[int]
) -> list[int]:
    """Caption gallery row of each accepted edit's source caption (-1 when cf_captions has no source_caption_id)."""
    if "source_caption_id" not in edits.columns:
        return [-1] * edits.height
    row_of = {int(c): row for row, c in enumerate(captions["caption_id"].to_list())}
    rows = []
    for offset, (cf_id, source) in enumerate(edits.select("cf_caption_id", "source_caption_id").iter_rows()):
        if source is None:
            rows.append(-1)
            continue
        row = row_of.get(int(source))
        if row is None:
            raise ValueError(
                f"EvalSet.cf_captions cf_caption_id {cf_id}: source_caption_id {source} is not among the test "
                "captions; pass the test captions of the same batches as the counterfactuals."
            )
        edit_image = caption_image_row[n_original + offset]
        if caption_image_row[row] != edit_image:
            raise ValueError(
                f"EvalSet.cf_captions cf_caption_id {cf_id}: source_caption_id {source} describes image_id "
                f"{image_ids[caption_image_row[row]]}, not its source_image_id {image_ids[edit_image]}; "
                "the counterfactual tables are inconsistent (rebuild them)."
            )
        rows.append(row)
    return rows


def build_eval_index(eval_set: EvalSet) -> EvalIndex:
    """Galleries, queries, relevant sets and hard negatives of the eval set (no model involved).

    Contract (docs/definitions.md#metrics): the caption gallery is the original test captions, then
    the accepted edits. Removal query I^-b: relevant = I's original captions that do not
    mention b plus the accepted edits of I's captions for that pair; hard negatives = I's
    captions that mention b. Text->image queries: I's original captions that mention b,
    gallery = test images then every removal image, target I, hard negative I^-b. Control
    I^c: relevant = all of I's original captions. Natural images show neither a nor b,
    anchor-only images a without b (by instances). Mentions come from `vocabulary`. Each
    accepted edit keeps the row of the original caption it was edited from
    (`caption_source_row`, from cf_captions.source_caption_id when that column exists).
    Raises ValueError naming the table, id and field for missing columns, duplicate ids,
    references to unknown images or captions, an edit whose source caption describes
    another image, counterfactuals of pairs not in `pairs`, a removal image given twice
    for one (image, pair), or a null accepted edit.
    """
    _check_eval_set(eval_set)
    pairs = list(dict.fromkeys((str(a), str(b)) for a, b in eval_set.pairs))
    names = [pair_name(a, b) for a, b in pairs]
    known_pairs = set(pairs)

    images = eval_set.images.sort("image_id")
    image_ids = [int(i) for i in images["image_id"].to_list()]
    image_paths = [str(p) for p in images["path"].to_list()]
    image_row = {image_id: row for row, image_id in enumerate(image_ids)}

    captions = eval_set.captions.sort("caption_id")
    edits = eval_set.cf_captions.filter(pl.col("accepted").fill_null(False)).sort("cf_caption_id")
    null_edits = edits.filter(pl.col("caption").is_null())["cf_caption_id"].head(5).to_list()
    if null_edits:
        raise ValueError(
            f"EvalSet.cf_captions: cf_caption_id {null_edits} are accepted but have a null caption; "
            "an accepted edit needs its text (rebuild the counterfactuals)."
        )
    for a, b in edits.select("anchor", "companion").unique().iter_rows():
        if (a, b) not in known_pairs:
            raise ValueError(
                f"EvalSet.cf_captions holds edits for pair {pair_name(a, b)}, which is not in EvalSet.pairs {names}; "
                "build the counterfactuals and the report from the same flagged pairs."
            )
    caption_ids = [int(i) for i in captions["caption_id"].to_list()] + [int(i) for i in edits["cf_caption_id"].to_list()]
    caption_texts = [str(t) for t in captions["caption"].to_list()] + [str(t) for t in edits["caption"].to_list()]
    n_original = captions.height
    caption_image_row = [
        _image_row_of(image_row, int(i), f"EvalSet.captions caption_id {c}")
        for c, i in zip(captions["caption_id"].to_list(), captions["image_id"].to_list(), strict=True)
    ] + [
        _image_row_of(image_row, int(i), f"EvalSet.cf_captions cf_caption_id {c} (source_image_id)")
        for c, i in zip(edits["cf_caption_id"].to_list(), edits["source_image_id"].to_list(), strict=True)
    ]

    caption_source_row = [-1] * n_original + _edit_sources(edits, captions, caption_image_row, n_original, image_ids)

    categories = sorted(
        {str(c) for c in eval_set.instances["category"].drop_nulls().to_list()} | {c for pair in pairs for c in pair}
    )
    column = {category: j for j, category in enumerate(categories)}
    caption_mentions = torch.zeros((len(caption_texts), len(categories)), dtype=torch.bool)
    for row, text in enumerate(caption_texts):
        for category in mentioned_categories(text):
            if category in column:  # a mention of an object no test image has cannot matter here
                caption_mentions[row, column[category]] = True
    image_objects = torch.zeros((len(image_ids), len(categories)), dtype=torch.bool)
    for image_id, category in eval_set.instances.select("image_id", "category").drop_nulls().iter_rows():
        image_objects[_image_row_of(image_row, int(image_id), "EvalSet.instances"), column[str(category)]] = True

    originals_of_image: dict[int, list[int]] = {}
    for row in range(n_original):
        originals_of_image.setdefault(caption_image_row[row], []).append(row)
    edits_of: dict[tuple[int, str], list[int]] = {}
    for offset, (a, b) in enumerate(edits.select("anchor", "companion").iter_rows()):
        row = n_original + offset
        edits_of.setdefault((caption_image_row[row], pair_name(a, b)), []).append(row)

    def cf_rows(kind: str) -> list[tuple[int, str, int, str]]:
        """(cf_image_id, pair name, image row of I, path) of one kind, by cf_image_id."""
        frame = eval_set.cf_images.filter(pl.col("kind") == kind).sort("cf_image_id")
        rows = []
        for cf_id, source, a, b, path in frame.select(
            "cf_image_id", "source_image_id", "anchor", "companion", "path"
        ).iter_rows():
            if (a, b) not in known_pairs:
                raise ValueError(
                    f"EvalSet.cf_images cf_image_id {cf_id}: pair {pair_name(a, b)} is not in EvalSet.pairs {names}; "
                    "build the counterfactuals and the report from the same flagged pairs."
                )
            where = f"EvalSet.cf_images cf_image_id {cf_id} (source_image_id)"
            rows.append((int(cf_id), pair_name(a, b), _image_row_of(image_row, int(source), where), str(path)))
        seen: dict[tuple[int, str], int] = {}
        for cf_id, name, row, _ in rows:
            if (row, name) in seen:
                raise ValueError(
                    f"EvalSet.cf_images: cf_image_id {seen[(row, name)]} and {cf_id} are both {kind} images of "
                    f"image_id {image_ids[row]} for pair {name}; keep one per (image, pair)."
                )
            seen[(row, name)] = cf_id
        return rows

    removal_cf_image_ids, removal_paths, removal_pair, removal_image_row = [], [], [], []
    removal_relevant, removal_hard_negatives = [], []
    t2i_caption_row, t2i_target, t2i_hard_negative, t2i_pair = [], [], [], []
    for query, (cf_id, name, row, path) in enumerate(cf_rows(REMOVAL)):
        companion_column = column[pairs[names.index(name)][1]]
        own = originals_of_image.get(row, [])
        mentions_companion = [r for r in own if bool(caption_mentions[r, companion_column])]
        removal_cf_image_ids.append(cf_id)
        removal_paths.append(path)
        removal_pair.append(name)
        removal_image_row.append(row)
        removal_relevant.append([r for r in own if r not in mentions_companion] + edits_of.get((row, name), []))
        removal_hard_negatives.append(mentions_companion)
        for caption_row in mentions_companion:
            t2i_caption_row.append(caption_row)
            t2i_target.append(row)
            t2i_hard_negative.append(len(image_ids) + query)
            t2i_pair.append(name)

    control_cf_image_ids, control_paths, control_pair, control_image_row, control_relevant = [], [], [], [], []
    for cf_id, name, row, path in cf_rows(CONTROL):
        control_cf_image_ids.append(cf_id)
        control_paths.append(path)
        control_pair.append(name)
        control_image_row.append(row)
        control_relevant.append(list(originals_of_image.get(row, [])))

    natural_rows, anchor_only_rows = {}, {}
    for (a, b), name in zip(pairs, names, strict=True):
        shows_anchor, shows_companion = image_objects[:, column[a]], image_objects[:, column[b]]
        natural_rows[name] = (~shows_anchor & ~shows_companion).nonzero().flatten().tolist()
        anchor_only_rows[name] = (shows_anchor & ~shows_companion).nonzero().flatten().tolist()

    return EvalIndex(
        pairs=pairs,
        pair_names=names,
        categories=categories,
        image_ids=image_ids,
        image_paths=image_paths,
        caption_ids=caption_ids,
        caption_texts=caption_texts,
        caption_is_edit=[False] * n_original + [True] * edits.height,
        caption_image_row=caption_image_row,
        caption_source_row=caption_source_row,
        n_original_captions=n_original,
        caption_mentions=caption_mentions,
        image_objects=image_objects,
        removal_cf_image_ids=removal_cf_image_ids,
        removal_paths=removal_paths,
        removal_pair=removal_pair,
        removal_image_row=removal_image_row,
        removal_relevant=removal_relevant,
        removal_hard_negatives=removal_hard_negatives,
        t2i_caption_row=t2i_caption_row,
        t2i_target=t2i_target,
        t2i_hard_negative=t2i_hard_negative,
        t2i_pair=t2i_pair,
        control_cf_image_ids=control_cf_image_ids,
        control_paths=control_paths,
        control_pair=control_pair,
        control_image_row=control_image_row,
        control_relevant=control_relevant,
        natural_rows=natural_rows,
        anchor_only_rows=anchor_only_rows,
    )


# --------------------------------------------------------------------------- embeddings


def embed_eval_set(
    bundle,
    index: EvalIndex,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: Callable[[str], None] | None = None,
    workers: int = 0,
    cache: EmbeddingCache | None = None,
) -> EvalEmbeddings:
    """Encode every image and caption of the index with one checkpoint (a `clip_model.ClipBundle`).

    Contract: rows follow the index; float32, L2-normalised, on CPU. Images stream from their
    files `batch_size` at a time, prepared as the checkpoint's own image processor prepares
    them, decoded by `workers` processes (0 = on this thread), so memory stays bounded on
    COCO-sized sets. With `cache` (the checkpoint's `EmbeddingCache`), an image (by file
    sha256) or caption (by text) embedded before under the same checkpoint key is read back,
    not computed again; only the rest is embedded and then stored.
    """
    return embed_eval_sets({"": bundle}, index, device, batch_size, progress, workers, {"": cache})[""]


def embed_eval_sets(
    bundles: dict[str, object],
    index: EvalIndex,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: Callable[[str], None] | None = None,
    workers: int = 0,
    caches: dict[str, EmbeddingCache | None] | None = None,
) -> dict[str, EvalEmbeddings]:
    """`embed_eval_set` for several checkpoints (name -> bundle), each input prepared once for all.

    Checkpoints that decode images alike (`ImagePreprocessing.decoding`: a fine-tune and its
    control keep the base's processor) share one pass over the image files, and checkpoints
    that tokenize alike (`clip_model.tokenization_identity`) one tokenization of the captions:
    each decoded or tokenized batch goes through every such checkpoint's forward, for the rows
    its cache (`caches[name]`, None = no cache) does not hold. Each checkpoint's embeddings
    equal what `embed_eval_set` gives it alone. A checkpoint that prepares its inputs
    differently gets passes of its own.
    """
    from spur_assets.core.model.clip_model import embed_images_many, embed_texts_many, tokenization_identity
    from spur_assets.core.data.image_stream import ImageFiles
    from spur_assets.core.data.preprocessing import ImagePreprocessing

    report = progress or (lambda message: None)
    caches = caches or {}
    cached = any(caches.get(name) is not None for name in bundles)
    # One pass over the test, removal and control images: one set of decoding workers and one
    # pipeline head per group of checkpoints instead of three per checkpoint.
    paths = list(index.image_paths) + list(index.removal_paths) + list(index.control_paths)
    texts = list(index.caption_texts)

    def images_of(group: list, needed: list[Tensor], tell) -> list[Tensor]:
        files = ImageFiles.of(paths, ImagePreprocessing.of(group[0].image_processor))
        return embed_images_many(group, files, needed, batch_size=batch_size, device=device, progress=tell, workers=workers)

    def texts_of(group: list, needed: list[Tensor], tell) -> list[Tensor]:
        return embed_texts_many(group, texts, needed, batch_size=batch_size, device=device, progress=tell)

    every = _embed_shared(
        bundles, caches, "image", [file_sha256(path) for path in paths] if cached else [""] * len(paths),
        lambda bundle: ImagePreprocessing.of(bundle.image_processor).decoding, images_of,
        "images (test, removal, control)", report,
    )
    captions = _embed_shared(
        bundles, caches, "text", [text_key(text) for text in texts] if cached else [""] * len(texts),
        tokenization_identity, texts_of, "captions (originals and accepted edits)", report,
    )
    n_test, n_removal = len(index.image_paths), len(index.removal_paths)
    return {
        name: EvalEmbeddings(
            images=every[name][:n_test], captions=captions[name], removals=every[name][n_test : n_test + n_removal],
            controls=every[name][n_test + n_removal :],
        )
        for name in bundles
    }


def _embed_shared(
    bundles: dict[str, object],
    caches: dict[str, EmbeddingCache | None],
    namespace: str,
    keys: list[str],
    group_of: Callable[[object], object],
    embed_many: Callable[[list, list[Tensor], Callable[[int, int], None]], list[Tensor]],
    what: str,
    report: Callable[[str], None],
) -> dict[str, Tensor]:
    """Every checkpoint's embeddings of `keys`' rows: one `embed_many` pass per group of alike checkpoints,
    each checkpoint computing only the rows its cache lacks (then storing them)."""
    from spur_assets.core.model.embedding_cache import CachedRows

    groups: dict[object, list[str]] = {}
    for name, bundle in bundles.items():
        groups.setdefault(group_of(bundle), []).append(name)
    out: dict[str, Tensor] = {}
    for names in groups.values():
        lookups = {n: CachedRows(caches[n], namespace, keys) for n in names if caches.get(n) is not None}
        needed = []
        for name in names:
            mask = torch.ones(len(keys), dtype=torch.bool)
            if name in lookups:
                mask = torch.zeros(len(keys), dtype=torch.bool)
                mask[lookups[name].to_compute] = True
            needed.append(mask)
        step = max(1, int(torch.stack(needed).any(dim=0).sum()) // 10)  # about ten progress lines per pass
        last = [0]
        together = f" for {', '.join(n or 'the checkpoint' for n in names)}" if len(names) > 1 else ""

        def tell(done: int, total: int) -> None:
            if done == total or done // step != last[0] // step:
                report(f"evaluation: embedded {done}/{total} {what}{together}")
            last[0] = done

        embedded = embed_many([bundles[n] for n in names], needed, tell)
        for name, rows in zip(names, embedded, strict=True):
            if name not in lookups:
                out[name] = rows
                continue
            out[name] = lookups[name].complete(rows if lookups[name].missing else None)
            stats = lookups[name].stats
            report(f"evaluation: {_of(name)}{what}: {stats['hits']} from the embedding cache, {stats['computed']} embedded")
    return out


def _of(name: str) -> str:
    return f"{name}: " if name else ""


# --------------------------------------------------------------------------- metrics


def _check_rows(name: str, emb: Tensor, expected: int, index_field: str) -> None:
    if not isinstance(emb, Tensor) or emb.ndim != 2 or emb.shape[0] != expected:
        raise ValueError(
            f"evaluate_embeddings: {name} must have one row per entry of EvalIndex.{index_field} "
            f"({expected}), got {tuple(getattr(emb, 'shape', ()))}; embed the index's rows in its order."
        )


def _pick_examples(index: EvalIndex, n_examples: int) -> list[int]:
    """Removal queries to show: per pair the first with a hard negative, pairs taken in turn.

    Depends only on the index, so every checkpoint shows the same queries.
    """
    with_negative: dict[str, list[int]] = {name: [] for name in index.pair_names}
    without: dict[str, list[int]] = {name: [] for name in index.pair_names}
    for query, (name, negatives) in enumerate(zip(index.removal_pair, index.removal_hard_negatives, strict=True)):
        (with_negative if negatives else without)[name].append(query)
    # Queries without a b-caption come last: they cannot show the shortcut.
    candidates = {name: with_negative[name] + without[name] for name in index.pair_names}
    picked: list[int] = []
    depth = 0
    while len(picked) < n_examples and any(depth < len(c) for c in candidates.values()):
        for queries in candidates.values():
            if depth < len(queries) and len(picked) < n_examples:
                picked.append(queries[depth])
        depth += 1
    return picked


def _example(
    index: EvalIndex, query: int, ranked: list[int], ap: float, hr: float
) -> dict:
    name = index.removal_pair[query]
    anchor, companion = index.pair_of(name)
    companion_column = index.categories.index(companion)
    relevant = set(index.removal_relevant[query])
    row = index.removal_image_row[query]
    return {
        "pair": name,
        "anchor": anchor,
        "companion": companion,
        "source_image_id": index.image_ids[row],
        "cf_image_id": index.removal_cf_image_ids[query],
        "original_path": index.image_paths[row],
        "removal_path": index.removal_paths[query],
        "ap": ap,
        "hr": hr,
        "top": [
            {
                "rank": rank,
                "caption": index.caption_texts[r],
                "caption_id": index.caption_ids[r],
                "is_edit": index.caption_is_edit[r],
                "relevant": r in relevant,
                "offending": bool(index.caption_mentions[r, companion_column]),
            }
            for rank, r in enumerate(ranked, start=1)
        ],
    }


def _pair_means(scores: QueryScores) -> dict[str, float]:
    """Mean score per pair (nan skipped), the per-pair value behind a macro headline."""
    summary = rm.grouped_mean(scores.values, scores.strata.tolist())
    return {pair: mean for pair, (mean, _) in summary["per_group"].items()}


def _pairwise_scores(
    index: EvalIndex, image_emb: Tensor, caption_emb: Tensor, removal_emb: Tensor, t2i_gallery: Tensor
) -> dict[str, QueryScores]:
    """Pairwise counterfactual accuracy per comparison, by pair: "pairwise_i2t" and "pairwise_t2i".

    i2t: per removal query I^-b and each accepted edit among its relevant captions (an
    edit of one of I's captions for this pair) whose source caption is known: does I^-b
    score the edit strictly above the original caption it was edited from? t2i: per
    text query (an original b-caption of I): does it score I strictly above I^-b?
    """
    query, edit, source, pair = [], [], [], []
    for q, relevant in enumerate(index.removal_relevant):
        for row in relevant:
            if index.caption_is_edit[row] and index.caption_source_row[row] >= 0:
                query.append(q)
                edit.append(row)
                source.append(index.caption_source_row[row])
                pair.append(index.removal_pair[q])
    i2t = rm.pairwise_accuracy(
        removal_emb,
        caption_emb,
        torch.tensor(query, dtype=torch.long),
        torch.tensor(edit, dtype=torch.long),
        torch.tensor(source, dtype=torch.long),
    )
    t2i = rm.pairwise_accuracy(
        caption_emb,
        t2i_gallery,
        torch.tensor(index.t2i_caption_row, dtype=torch.long),
        torch.tensor(index.t2i_target, dtype=torch.long),
        torch.tensor(index.t2i_hard_negative, dtype=torch.long),
    )
    return {
        "pairwise_i2t": QueryScores(i2t.numpy(), np.array(pair, dtype=str), macro=True),
        "pairwise_t2i": QueryScores(t2i.numpy(), np.array(index.t2i_pair, dtype=str), macro=True),
    }


def _overcorrection_scores(
    index: EvalIndex,
    image_emb: Tensor,
    caption_emb: Tensor,
    captioned: Tensor,
    renumber: Tensor,
    recall_hits: dict[str, dict[str, Tensor]],
    k: int,
    chunk_size: int,
) -> dict[str, QueryScores]:
    """The over-correction check on the test images that show b, by pair.

    "b_mention_rate": share of each such image's top-k original captions (the COCO
    gallery, no edits) that mention b; b is in the image, so higher is right here and a
    fine-tune that stops retrieving b-captions shows up as a drop. "recall_i2t_5_with_b":
    the image's Recall@5 image->text hit from `recall_hits` (nan for an image without a
    caption, which Recall skips). One entry per (pair, image showing b), pairs in index
    order, images by row.
    """
    columns = {name: index.categories.index(b) for (_, b), name in zip(index.pairs, index.pair_names, strict=True)}
    rows_of = {name: index.image_objects[:, column].nonzero().flatten().tolist() for name, column in columns.items()}
    shown = sorted({row for rows in rows_of.values() for row in rows})
    position = {row: i for i, row in enumerate(shown)}
    device = image_emb.device
    originals = caption_emb[: index.n_original_captions]
    shown_rows = torch.tensor(shown, dtype=torch.long, device=device)
    topk = rm.topk_gallery(image_emb[shown_rows], originals, k, chunk_size) if shown else None
    hit5 = recall_hits["i2t"]["5"]
    captioned, renumber = captioned.cpu(), renumber.cpu()
    mention, recall, pair = [], [], []
    for name, rows in rows_of.items():
        if not rows or topk is None:
            continue
        picked = topk[torch.tensor([position[r] for r in rows], dtype=torch.long, device=topk.device)]
        companion = torch.full((len(rows),), columns[name], dtype=torch.long)
        mentions = index.caption_mentions[: index.n_original_captions]
        mention.append(rm.hallucination_rate(picked, mentions, companion, k).cpu())
        own = [float(hit5[renumber[r]]) if captioned[r] else float("nan") for r in rows]
        recall.append(torch.tensor(own, dtype=torch.float64))
        pair += [name] * len(rows)
    empty = torch.empty(0, dtype=torch.float64)
    strata = np.array(pair, dtype=str)
    return {
        "b_mention_rate": QueryScores(torch.cat(mention).numpy() if mention else empty.numpy(), strata, macro=True),
        "recall_i2t_5_with_b": QueryScores(torch.cat(recall).numpy() if recall else empty.numpy(), strata, macro=True),
    }


def evaluate_embeddings(
    index: EvalIndex,
    image_emb: Tensor,
    caption_emb: Tensor,
    removal_emb: Tensor,
    control_emb: Tensor,
    k: int = 10,
    chunk_size: int = 1024,
    n_examples: int = 3,
    example_queries: Sequence[int] | None = None,
) -> CheckpointEvaluation:
    """Score one checkpoint's embeddings of the eval set (docs/definitions.md#metrics, docs/data-contract.md#reportjson).

    Contract: embeddings are L2-normalised, rows in index order (`EvalIndex`), all on one
    device (ranking runs there). Recall@{1,5,10} uses the test images and original captions
    only (COCO protocol; images without a caption are left out of both directions). ODmAP,
    HR and Delta_ctrl use `k`; their keys are str(k). Macro means average the pairs that
    have queries; micro means go under "odmap_micro" / "hr_micro". HR's reference rates
    average over the same pairs as HR. Delta_ctrl ranks I and I^c against the ODmAP
    image->text caption gallery (originals + edits), so the control faces what the
    removal faced. Examples: `example_queries` (removal query rows), else `n_examples`
    chosen from the index alone (per pair the first query with a b-caption, pairs in turn),
    each with its top 5 captions flagged relevant / offending (mentions b). Pairwise
    accuracy (macro over pairs): image->text, does I^-b score each accepted edit strictly
    above the original caption it was edited from; text->image, does each b-caption of I
    score I strictly above I^-b. Over-correction (macro over pairs, every pair whose b
    some test image shows): on those unedited images, the share of their top-k original
    captions that mention b, and their Recall@5 image->text. `per_query` holds every
    query's score behind each headline (see `CheckpointEvaluation`). `chunk_size`
    caps the query rows per similarity chunk; fewer are used when the galleries are large
    (`retrieval_metrics.chunk_rows_for`), which bounds memory and changes no result.
    Raises ValueError when a gallery is smaller than the largest rank asked for.
    """
    _check_rows("image_emb", image_emb, index.n_images, "image_ids")
    _check_rows("caption_emb", caption_emb, index.n_captions, "caption_ids")
    _check_rows("removal_emb", removal_emb, len(index.removal_paths), "removal_paths")
    _check_rows("control_emb", control_emb, len(index.control_paths), "control_paths")
    if k < 1:
        raise ValueError(f"evaluate_embeddings: k={k} must be a positive rank")
    device = image_emb.device
    n_captioned = len(set(index.caption_image_row[: index.n_original_captions]))
    smallest = min(n_captioned, index.n_original_captions)
    if smallest < max(max(RECALL_KS), k):
        raise ValueError(
            f"evaluate_embeddings: the test split has {n_captioned} captioned images and "
            f"{index.n_original_captions} captions, fewer than the largest rank asked for "
            f"(Recall@{max(RECALL_KS)}, k={k}); evaluate on a larger test split."
        )
    started = time.perf_counter()
    # Fewer query rows per chunk as the galleries grow, so the similarity buffer stays bounded.
    chunk_size = rm.chunk_rows_for(max(index.n_captions, index.n_images + len(index.removal_paths)), chunk_size)
    per_query: dict[str, QueryScores] = {}

    # Standard retrieval on originals only; images without captions cannot be scored.
    text_image = torch.tensor(index.caption_image_row[: index.n_original_captions], dtype=torch.long, device=device)
    captioned = torch.zeros(index.n_images, dtype=torch.bool, device=device)
    captioned[text_image] = True
    renumber = torch.cumsum(captioned.to(torch.long), 0) - 1
    hits = rm.recall_hits(
        image_emb[captioned], caption_emb[: index.n_original_captions], renumber[text_image], RECALL_KS, chunk_size
    )
    for direction, by_k in hits.items():
        for r, hit in by_k.items():
            per_query[f"recall_{direction}_{r}"] = QueryScores(hit.numpy(), None, macro=False)
    recall = {d: {r: per_query[f"recall_{d}_{r}"].headline() for r in by_k} for d, by_k in hits.items()}

    i2t = rm.odmap_i2t(
        removal_emb, caption_emb, index.removal_relevant, index.removal_pair, k, chunk_size, per_query=True
    )
    per_query["odmap_i2t"] = QueryScores(i2t["per_query"].numpy(), np.array(index.removal_pair, dtype=str), macro=True)
    t2i_gallery = torch.cat([image_emb, removal_emb.to(device)])
    t2i_rows = torch.tensor(index.t2i_caption_row, dtype=torch.long, device=device)
    t2i = rm.odmap_t2i(
        caption_emb[t2i_rows],
        t2i_gallery,
        torch.tensor(index.t2i_target, dtype=torch.long, device=device),
        index.t2i_pair,
        k,
        chunk_size,
        per_query=True,
    )
    per_query["odmap_t2i"] = QueryScores(t2i["per_query"].numpy(), np.array(index.t2i_pair, dtype=str), macro=True)
    # Only pairs with removal queries, so HR and its reference rates average the same pairs.
    with_queries = set(index.removal_pair)
    queried_pairs = {
        name: (index.categories.index(a), index.categories.index(b))
        for (a, b), name in zip(index.pairs, index.pair_names, strict=True)
        if name in with_queries
    }
    rates = rm.hallucination_rates(
        removal_emb,
        index.removal_pair,
        image_emb,
        index.image_objects,
        caption_emb,
        index.caption_mentions,
        queried_pairs,
        k,
        chunk_size,
        per_query=True,
    )
    per_query["hr"] = QueryScores(rates["hr"]["per_query"].numpy(), np.array(index.removal_pair, dtype=str), macro=True)

    # Delta_ctrl is micro over controls: one term per control, averaged plainly.
    if index.control_paths:
        rows = torch.tensor(index.control_image_row, dtype=torch.long, device=device)
        terms = rm.delta_ctrl_terms(image_emb[rows], control_emb, caption_emb, index.control_relevant, k, chunk_size)
    else:
        terms = torch.empty(0, dtype=torch.float64)
    per_query["delta_ctrl"] = QueryScores(terms.numpy(), np.array(index.control_pair, dtype=str), macro=False)

    per_query.update(_pairwise_scores(index, image_emb, caption_emb, removal_emb, t2i_gallery))
    per_query.update(_overcorrection_scores(index, image_emb, caption_emb, captioned, renumber, hits, k, chunk_size))

    key = str(k)
    metrics = {
        "recall": recall,
        "odmap": {"i2t": {key: i2t["macro"]}, "t2i": {key: t2i["macro"]}},
        "hr": {
            key: rates["hr"]["macro"],
            f"natural_{key}": rates["natural"]["macro"],
            f"anchor_only_{key}": rates["anchor_only"]["macro"],
        },
        "delta_ctrl": per_query["delta_ctrl"].headline(),
        "pairwise": {"i2t": per_query["pairwise_i2t"].headline(), "t2i": per_query["pairwise_t2i"].headline()},
        "overcorrection": {
            "b_mention_rate": per_query["b_mention_rate"].headline(),
            "recall_i2t_5": per_query["recall_i2t_5_with_b"].headline(),
        },
        "odmap_micro": {"i2t": {key: i2t["micro"]}, "t2i": {key: t2i["micro"]}},
        "hr_micro": {
            key: rates["hr"]["micro"],
            f"natural_{key}": rates["natural"]["micro"],
            f"anchor_only_{key}": rates["anchor_only"]["micro"],
        },
        "k": k,
        "counts": {
            "test_images": index.n_images,
            "test_captions": index.n_original_captions,
            "accepted_edits": index.n_captions - index.n_original_captions,
            "removal_queries": len(index.removal_paths),
            "removal_queries_scored": sum(i2t["n_queries"].values()),
            "t2i_queries": len(index.t2i_caption_row),
            "controls": len(index.control_paths),
            "pairs": len(index.pairs),
            "pairs_with_queries": len(queried_pairs),
            "edit_comparisons": len(per_query["pairwise_i2t"].values),
            "overcorrection_queries": len(per_query["b_mention_rate"].values),  # (pair, image showing b)
        },
    }

    nan = float("nan")
    by_pair = {
        name: _pair_means(per_query[name])
        for name in ("delta_ctrl", "pairwise_i2t", "pairwise_t2i", "b_mention_rate", "recall_i2t_5_with_b")
    }
    with_b = per_query["b_mention_rate"].strata.tolist()
    per_pair = []
    for (anchor, companion), name in zip(index.pairs, index.pair_names, strict=True):
        per_pair.append(
            {
                "pair": name,
                "anchor": anchor,
                "companion": companion,
                "n_removal": index.removal_pair.count(name),
                "n_t2i_queries": index.t2i_pair.count(name),
                "n_controls": index.control_pair.count(name),
                "n_with_b": with_b.count(name),
                "odmap_i2t": i2t["per_pair"].get(name, nan),
                "odmap_t2i": t2i["per_pair"].get(name, nan),
                "hr": rates["hr"]["per_pair"].get(name, nan),
                "natural": rates["natural"]["per_pair"].get(name, nan),
                "anchor_only": rates["anchor_only"]["per_pair"].get(name, nan),
                "delta_ctrl": by_pair["delta_ctrl"].get(name, nan),
                "pairwise_i2t": by_pair["pairwise_i2t"].get(name, nan),
                "pairwise_t2i": by_pair["pairwise_t2i"].get(name, nan),
                "b_mention_rate": by_pair["b_mention_rate"].get(name, nan),
                "recall_i2t_5_with_b": by_pair["recall_i2t_5_with_b"].get(name, nan),
            }
        )

    queries = list(example_queries) if example_queries is not None else _pick_examples(index, n_examples)
    examples = []
    if queries:
        bad = [q for q in queries if not 0 <= q < len(index.removal_paths)]
        if bad:
            raise ValueError(
                f"evaluate_embeddings: example_queries {bad} are not removal query rows (0..{len(index.removal_paths) - 1})"
            )
        chosen = torch.tensor(queries, dtype=torch.long, device=device)
        top = rm.topk_gallery(removal_emb[chosen], caption_emb, max(k, EXAMPLE_TOP), chunk_size)
        ap = rm.average_precision_at_k(top, [index.removal_relevant[q] for q in queries], k)
        companions = torch.tensor(
            [index.categories.index(index.pair_of(index.removal_pair[q])[1]) for q in queries], dtype=torch.long
        )
        hr = rm.hallucination_rate(top.cpu(), index.caption_mentions, companions, k)
        for i, q in enumerate(queries):
            examples.append(_example(index, q, top[i, :EXAMPLE_TOP].tolist(), float(ap[i]), float(hr[i])))

    return CheckpointEvaluation(
        metrics=metrics,
        per_pair=per_pair,
        examples=examples,
        timings={"rank_s": time.perf_counter() - started},
        per_query=per_query,
    )


def evaluate_checkpoint(
    bundle,
    eval_set: EvalSet,
    k: int = 10,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: Callable[[str], None] | None = None,
    n_examples: int = 3,
    workers: int = 0,
    chunk_size: int = 1024,
    example_queries: Sequence[int] | None = None,
    cache: EmbeddingCache | None = None,
) -> CheckpointEvaluation:
    """Score one checkpoint (a `clip_model.ClipBundle`) on the counterfactual eval set.

    Contract: `build_eval_index`, then `embed_eval_set` on `device` ("auto" allowed), then
    `evaluate_embeddings` with the embeddings on that device. `progress(message)` hears
    about each stage. `workers` decoding processes and the embedding `cache` as
    `embed_eval_set` documents. Timings (seconds) land in `.timings`.
    """
    return evaluate_checkpoints(
        {"": bundle}, eval_set, k, device, batch_size, progress, n_examples, workers, chunk_size, example_queries,
        {"": cache},
    )[""]


def evaluate_checkpoints(
    bundles: dict[str, object],
    eval_set: EvalSet,
    k: int = 10,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: Callable[[str], None] | None = None,
    n_examples: int = 3,
    workers: int = 0,
    chunk_size: int = 1024,
    example_queries: Sequence[int] | None = None,
    caches: dict[str, EmbeddingCache | None] | None = None,
) -> dict[str, CheckpointEvaluation]:
    """`evaluate_checkpoint` for several checkpoints (name -> bundle) on one index and one image pass.

    The index is built once, and checkpoints that decode images alike share the decoding
    (`embed_eval_sets`); each result equals `evaluate_checkpoint` on that checkpoint alone.
    `.timings["embed_s"]` is the shared embedding pass's time, the same for every checkpoint.
    """
    from spur_assets.core.runtime.devices import resolve_device

    report = progress or (lambda message: None)
    target = resolve_device(device)
    started = time.perf_counter()
    index = build_eval_index(eval_set)
    report(
        f"evaluation: {index.n_images} test images, {index.n_captions} gallery captions, "
        f"{len(index.removal_paths)} removal queries, {len(index.t2i_caption_row)} text queries, "
        f"{len(index.control_paths)} controls over {len(index.pairs)} pairs"
    )
    indexed = time.perf_counter()
    embeddings = embed_eval_sets(bundles, index, target, batch_size, report, workers, caches)
    embedded = time.perf_counter()
    results = {}
    for name, emb in embeddings.items():
        result = evaluate_embeddings(
            index,
            emb.images.to(target),
            emb.captions.to(target),
            emb.removals.to(target),
            emb.controls.to(target),
            k=k,
            chunk_size=chunk_size,
            n_examples=n_examples,
            example_queries=example_queries,
        )
        result.timings = {
            "index_s": indexed - started,
            "embed_s": embedded - indexed,
            "rank_s": result.timings["rank_s"],
        }
        results[name] = result
    report(f"evaluation: done in {time.perf_counter() - started:.1f} s")
    return results
