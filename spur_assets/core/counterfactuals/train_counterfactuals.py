"""The TRAIN counterfactuals (docs/definitions.md#train-counterfactuals): removal and paste edits, and the lift they buy.

For each pair (a, b), over the train split only:

- Removal: a train image I showing a and b becomes I⁻ᵇ, every instance of b
  inpainted under its dilated union mask, exactly as the eval set does
  (``counterfactuals.removal_mask``). I's captions that mention b are edited with
  ``remove_companion_phrase`` and kept only when ``judge_caption_edit`` accepts
  ("removal_edit"); captions that never mentioned b still describe I⁻ᵇ and are
  kept unchanged ("removal_kept"). Its objects: I's instances minus b (their
  masks as annotated; pixels of another object under the dilated ring are
  inpainted from their surroundings, which is mostly that object).
- Paste: a train image T showing neither a nor b gains one instance of b, cut
  with its exact mask from a donor train image, scaled by the ratio of the image
  sizes when they differ, and pasted (alpha = the mask) at a random place inside
  T that touches no instance of T (instances dilated by ``dilation_px``). Each
  of T's captions gains a mention of b ("... with a frisbee."): "paste_added".
  Its objects: T's instances plus the pasted b.

Removal images take b out of a's company; paste images put b into company
without a. Both move the co-occurrence lift of (a, b) toward 1, and
``TrainCounterfactuals.lift`` reports it before and after.

Everything that chooses (which images, which donor, where to paste, which
words) is planned in the calling process from generators seeded by
(seed, pair, image); worker processes only load, inpaint, composite and write
PNGs, in fixed chunks. So the output is identical for a seed whatever ``workers``.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import polars as pl
from pycocotools import mask as coco_mask

from spur_assets.core.data.batch_union import SplitTables
from spur_assets.core.data.errors import require_columns
from spur_assets.core.data import vocabulary
from spur_assets.core.counterfactuals.cooccurrence import pair_statistics
from spur_assets.core.counterfactuals.eval_set import (
    decode_image_instance,
    free_placement,
    judge_caption_edit,
    link_or_copy,
    load_source_rgb,
    pair_name,
    path_slug,
    remove_companion_phrase,
    removal_mask,
    run_inpainting_chunks,
    save_png,
)
from spur_assets.core.counterfactuals.inpaint import Inpainter
from spur_assets.core.counterfactuals.recipe import CounterfactualRecipe

TRAIN_SPLIT = "train"
TASKS_PER_CHUNK = 8  # images per inpainting chunk when the recipe leaves it to the builder
REMOVAL = "removal"
PASTE = "paste"
REMOVAL_EDIT = "removal_edit"
REMOVAL_KEPT = "removal_kept"
PASTE_ADDED = "paste_added"

TRAIN_CF_IMAGES_SCHEMA = pl.Schema(
    {
        "cf_image_id": pl.Int64,
        "kind": pl.Utf8,  # "removal" | "paste"
        "source_image_id": pl.Int64,  # the edited image (removal: I; paste: the target T)
        "donor_image_id": pl.Int64,  # paste: where b was cut from; null for removal
        "donor_annotation_id": pl.Int64,  # paste: the instance of b that was cut; null for removal
        "batch": pl.Utf8,  # of the edited image
        "donor_batch": pl.Utf8,
        "pair": pl.Utf8,
        "anchor": pl.Utf8,
        "companion": pl.Utf8,
        "path": pl.Utf8,  # the PNG written under out_dir
        "source_path": pl.Utf8,
        "width": pl.Int32,
        "height": pl.Int32,
        "edited_pixels": pl.Int64,  # removal: dilated mask inpainted; paste: pixels pasted
    }
)
TRAIN_CF_CAPTIONS_SCHEMA = pl.Schema(
    {
        "cf_caption_id": pl.Int64,
        "cf_image_id": pl.Int64,
        "source_caption_id": pl.Int64,
        "pair": pl.Utf8,
        "caption": pl.Utf8,  # the text to train on
        "original_caption": pl.Utf8,  # the source caption it came from (removal_edit: the b-caption)
        "kind": pl.Utf8,  # "removal_edit" | "removal_kept" | "paste_added"
        "mentions_companion": pl.Boolean,  # by vocabulary.mentioned_categories of `caption`
    }
)
TRAIN_CF_OBJECTS_SCHEMA = pl.Schema(
    {
        "cf_image_id": pl.Int64,
        "category": pl.Utf8,
        "category_id": pl.Int64,  # as in the source instances table
        "supercategory": pl.Utf8,
        "source_annotation_id": pl.Int64,  # the instance it copies (pasted: the donor's instance)
        "pasted": pl.Boolean,
        "iscrowd": pl.Boolean,
        "rle_counts": pl.Utf8,  # compressed COCO RLE at the cf image's height x width
        "bbox_x": pl.Float64,
        "bbox_y": pl.Float64,
        "bbox_w": pl.Float64,
        "bbox_h": pl.Float64,
        "area": pl.Float64,
        "mask_area": pl.Int64,
    }
)
LIFT_SCHEMA = pl.Schema(
    {
        "pair": pl.Utf8,
        "anchor": pl.Utf8,
        "companion": pl.Utf8,
        "n_images_before": pl.Int64,
        "n_anchor_before": pl.Int64,
        "n_both_before": pl.Int64,
        "p_before": pl.Float64,  # P(b|a) over the original train images
        "lift_before": pl.Float64,
        "n_images_after": pl.Int64,
        "n_anchor_after": pl.Int64,
        "n_both_after": pl.Int64,
        "p_after": pl.Float64,  # P(b|a) over originals + every counterfactual image
        "lift_after": pl.Float64,
    }
)
TRAIN_CF_SKIPPED_SCHEMA = pl.Schema(
    {"kind": pl.Utf8, "source_image_id": pl.Int64, "batch": pl.Utf8, "pair": pl.Utf8, "reason": pl.Utf8}
)

# Words that introduce a pasted object at the end of a caption, and the forms it
# is named by when its category name is not what a caption would say.
_MENTION_TEMPLATES = (  # (connector, adjective)
    ("with", ""),
    ("with", "small"),
    ("and", ""),
    ("and", "small"),
    ("next to", ""),
    ("near", ""),
)
_PLAIN_NOUNS = {
    "sports ball": "ball",
    "dining table": "table",
    "potted plant": "plant",
    "cell phone": "phone",
    "wine glass": "wine glass",
}
_CLOSING_PUNCTUATION = ".!?"


# --------------------------------------------------------------------------- captions


def _article(words: str) -> str:
    return "an" if words[:1].lower() in "aeiou" else "a"


def add_companion_mention(caption: str, companion: str, rng: np.random.Generator) -> str | None:
    """``caption`` with a phrase naming one ``companion`` added at its end, before closing punctuation.

    "A cat on the grass." -> "A cat on the grass with a frisbee." The phrase is
    drawn from a few templates ("with a", "and a small", "next to a", ...) by
    ``rng``; the noun is the category name or its plain form ("ball" for sports
    ball). The result mentions ``companion`` by ``vocabulary.mentioned_categories``
    and every category the caption mentioned before, and nothing else; templates
    are tried from the drawn one on until one does. None if none does (or the
    caption is empty).
    """
    body = caption.rstrip()
    closing = ""
    while body and body[-1] in _CLOSING_PUNCTUATION:
        closing = body[-1] + closing
        body = body[:-1].rstrip()
    if not body:
        return None
    before = vocabulary.mentioned_categories(caption)
    wanted = before | {companion}
    nouns = dict.fromkeys((_PLAIN_NOUNS.get(companion, companion), companion))
    first = int(rng.integers(len(_MENTION_TEMPLATES)))
    for shift in range(len(_MENTION_TEMPLATES)):
        connector, adjective = _MENTION_TEMPLATES[(first + shift) % len(_MENTION_TEMPLATES)]
        for noun in nouns:
            words = f"{adjective} {noun}".strip()
            edited = f"{body} {connector} {_article(words)} {words}{closing}"
            if vocabulary.mentioned_categories(edited) == wanted:
                return edited
    return None


# --------------------------------------------------------------------------- paste geometry


def pastes_for_unit_lift(n_images: int, n_anchor: int, n_companion: int, n_both: int, removals: int) -> int:
    """How many paste images (b without a) bring lift(a, b) to 1 once ``removals`` removal images are added.

    Counts are image-level over the original train set. With R removals (a
    without b) and P pastes (b without a): lift = n_ab (N + R + P) /
    ((n_a + R)(n_b + P)); solving lift = 1 for P and rounding up gives
    ceil((n_ab (N + R) - (n_a + R) n_b) / (n_a + R - n_ab)), at least 0. When
    every a-image shows b and there are no removals the denominator is 0 and no
    finite P suffices: returns ``n_images`` (the caller caps it by the targets).
    """
    denominator = n_anchor + removals - n_both
    if denominator <= 0:
        return max(0, n_images)
    numerator = n_both * (n_images + removals) - (n_anchor + removals) * n_companion
    return max(0, math.ceil(numerator / denominator))


def _box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a non-empty mask, bottom/right exclusive."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _paste_scale(donor_hw: tuple[int, int], target_hw: tuple[int, int]) -> float:
    """Scale from donor to target pixels: 1 for equal sizes, else the smaller side ratio (keeps aspect)."""
    if donor_hw == target_hw:
        return 1.0
    return min(target_hw[0] / donor_hw[0], target_hw[1] / donor_hw[1])


def _companion_cutout(
    donor_mask: np.ndarray, donor_rgb: np.ndarray | None, scale: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """(cropped bool shape, its RGB pixels or None) of the donor's instance, resized by ``scale``.

    Planning (mask only) and rendering (mask and pixels) both call this, so the
    shape placed and the shape pasted are the same array.
    """
    top, bottom, left, right = _box_of(donor_mask)
    shape = donor_mask[top:bottom, left:right]
    pixels = None if donor_rgb is None else donor_rgb[top:bottom, left:right]
    if scale == 1.0:
        return shape, pixels
    size = (max(1, round(shape.shape[1] * scale)), max(1, round(shape.shape[0] * scale)))  # cv2: (w, h)
    shape = cv2.resize(shape.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    if pixels is not None:
        pixels = cv2.resize(np.ascontiguousarray(pixels), size, interpolation=cv2.INTER_AREA)
    return shape, pixels


def _encode(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "bbox": [float(v) for v in coco_mask.toBbox(rle)],
            "area": int(coco_mask.area(rle))}


# --------------------------------------------------------------------------- rendering (worker side)


@dataclass(frozen=True)
class _RemovalTask:
    batch: str
    image_id: int
    path: str
    width: int
    height: int
    companion_rles: tuple[str, ...]
    out_path: str


@dataclass(frozen=True)
class _PasteTask:
    batch: str
    image_id: int
    path: str
    width: int
    height: int
    donor_batch: str
    donor_image_id: int
    donor_path: str
    donor_width: int
    donor_height: int
    donor_rle: str
    scale: float
    top: int
    left: int
    out_path: str


def _render_train_chunk(
    tasks: Sequence[_RemovalTask | _PasteTask], inpainter: Inpainter, dilation_px: int
) -> list[int]:
    """Write the PNGs of a few planned tasks; return the pixels each edited (removal mask or pasted shape)."""
    edited: list[int] = [0] * len(tasks)
    removals: list[tuple[int, _RemovalTask, np.ndarray, np.ndarray]] = []
    for index, task in enumerate(tasks):
        if isinstance(task, _RemovalTask):
            masks = [
                decode_image_instance(rle, task.image_id, task.batch, task.height, task.width)
                for rle in task.companion_rles
            ]
            mask = removal_mask(masks, dilation_px)
            rgb = load_source_rgb(task.path, task.image_id, task.batch, task.width, task.height)
            removals.append((index, task, rgb, mask))
            continue
        donor_mask = decode_image_instance(
            task.donor_rle, task.donor_image_id, task.donor_batch, task.donor_height, task.donor_width
        )
        donor_rgb = load_source_rgb(
            task.donor_path, task.donor_image_id, task.donor_batch, task.donor_width, task.donor_height
        )
        shape, pixels = _companion_cutout(donor_mask, donor_rgb, task.scale)
        out = load_source_rgb(task.path, task.image_id, task.batch, task.width, task.height).copy()
        region = out[task.top : task.top + shape.shape[0], task.left : task.left + shape.shape[1]]
        region[shape] = pixels[shape]  # alpha = the mask: b's own pixels, nothing around them
        save_png(out, Path(task.out_path))
        edited[index] = int(shape.sum())
    if removals:
        filled = inpainter.inpaint([rgb for _, _, rgb, _ in removals], [mask for _, _, _, mask in removals])
        for (index, task, _, mask), image in zip(removals, filled, strict=True):
            save_png(image, Path(task.out_path))
            edited[index] = int(mask.sum())
    return edited


# --------------------------------------------------------------------------- planning


@dataclass
class TrainCounterfactuals:
    """The train counterfactual set: images (removal + paste), their captions and objects, lift, what was skipped.

    ``settings`` records how it was made (inpainting backend, seed, thresholds, the
    paste count chosen per pair) for datasheets and lineage.
    """

    images: pl.DataFrame
    captions: pl.DataFrame
    objects: pl.DataFrame
    lift: pl.DataFrame
    skipped: pl.DataFrame
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Instance:
    annotation_id: int
    category: str
    category_id: int
    supercategory: str
    iscrowd: bool
    rle_counts: str
    bbox: tuple[float, float, float, float]
    area: float
    mask_area: int


@dataclass(frozen=True)
class _Image:
    batch: str
    image_id: int
    path: str
    width: int
    height: int


def _check_columns(frame: pl.DataFrame, name: str, columns: Sequence[str]) -> None:
    require_columns(frame, columns, f"build_train_counterfactuals: the {name} frame", f"Pass the ingested {name} table.")


def _rng(seed: int, *parts: str | int) -> np.random.Generator:
    words = [seed] + [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    return np.random.default_rng(words)


def _decoded(instance: _Instance, image: _Image) -> np.ndarray:
    return decode_image_instance(instance.rle_counts, image.image_id, image.batch, image.height, image.width)


def _instance_row(cf_image_id: int, instance: _Instance, pasted: bool) -> dict:
    x, y, w, h = instance.bbox
    return {
        "cf_image_id": cf_image_id,
        "category": instance.category,
        "category_id": instance.category_id,
        "supercategory": instance.supercategory,
        "source_annotation_id": instance.annotation_id,
        "pasted": pasted,
        "iscrowd": instance.iscrowd,
        "rle_counts": instance.rle_counts,
        "bbox_x": x,
        "bbox_y": y,
        "bbox_w": w,
        "bbox_h": h,
        "area": instance.area,
        "mask_area": instance.mask_area,
    }



@dataclass
class _TrainSplit:
    """The train split indexed by (batch, image_id), in (batch, image_id) order."""

    images: dict[tuple[str, int], _Image]
    objects: dict[tuple[str, int], list[_Instance]]
    captions: dict[tuple[str, int], list[tuple[int, str]]]  # (caption_id, caption), by caption_id
    categories: dict[tuple[str, int], frozenset[str]]


def _index_train_split(train: SplitTables) -> _TrainSplit:
    """The train rows of ``train`` (already filtered to the split) indexed by (batch, image_id)."""
    images, captions, instances = train.images, train.captions, train.instances
    image_of = {
        (row["batch"], row["image_id"]): _Image(
            row["batch"], row["image_id"], row["path"], int(row["width"]), int(row["height"])
        )
        for row in images.sort("batch", "image_id").iter_rows(named=True)
    }
    objects_of: dict[tuple[str, int], list[_Instance]] = {key: [] for key in image_of}
    for row in instances.sort("batch", "image_id", "annotation_id").iter_rows(named=True):
        key = (row["batch"], row["image_id"])
        if key not in objects_of:
            continue  # an instance of an image the images table lacks: nothing to edit
        objects_of[key].append(
            _Instance(
                row["annotation_id"], row["category"], int(row["category_id"]), row["supercategory"],
                bool(row["iscrowd"]), row["rle_counts"],
                (row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"]), float(row["area"]), int(row["mask_area"]),
            )
        )
    captions_of: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for row in captions.sort("batch", "image_id", "caption_id").iter_rows(named=True):
        captions_of.setdefault((row["batch"], row["image_id"]), []).append((row["caption_id"], row["caption"]))
    categories_of = {key: frozenset(o.category for o in objects) for key, objects in objects_of.items()}
    return _TrainSplit(image_of, objects_of, captions_of, categories_of)


@dataclass
class _Plan:
    """Rows of the output tables and the rendering tasks, in cf_image_id order."""

    images: list[dict] = field(default_factory=list)
    captions: list[dict] = field(default_factory=list)
    objects: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    tasks: list[_RemovalTask | _PasteTask | None] = field(default_factory=list)  # None: the PNG is already there

    def add_image(self, row: dict, task: _RemovalTask | _PasteTask | None) -> int:
        cf_image_id = len(self.images) + 1
        self.images.append({"cf_image_id": cf_image_id, **row})
        self.tasks.append(task)
        return cf_image_id

    def add_caption(
        self, cf_image_id: int, pair: str, companion: str, source_caption_id: int, caption: str, original: str, kind: str
    ) -> None:
        self.captions.append(
            {
                "cf_caption_id": len(self.captions) + 1,
                "cf_image_id": cf_image_id,
                "source_caption_id": source_caption_id,
                "pair": pair,
                "caption": caption,
                "original_caption": original,
                "kind": kind,
                "mentions_companion": companion in vocabulary.mentioned_categories(caption),
            }
        )

    def skip(self, kind: str, image: _Image | None, pair: str, reason: str) -> None:
        self.skipped.append(
            {"kind": kind, "source_image_id": image.image_id if image else None,
             "batch": image.batch if image else None, "pair": pair, "reason": reason}
        )


def _removal_captions(
    captions: list[tuple[int, str]], companion: str, categories: frozenset[str]
) -> list[tuple[int, str, str, str]]:
    """(caption_id, text, original, kind) of the captions that describe I⁻ᵇ: accepted edits and captions without b."""
    kept = []
    for caption_id, text in captions:
        if companion not in vocabulary.mentioned_categories(text):
            kept.append((caption_id, text, text, REMOVAL_KEPT))
            continue
        edited = remove_companion_phrase(text, companion)
        accepted, _ = judge_caption_edit(edited, companion, categories)
        if accepted:
            kept.append((caption_id, edited, text, REMOVAL_EDIT))
    return kept


@dataclass(frozen=True)
class _Eligible:
    """A train image whose removal edit of one pair is possible: what goes into its rows."""

    image: _Image
    companion_objects: tuple[_Instance, ...]
    kept: tuple[tuple[int, str, str, str], ...]  # _removal_captions
    edited_pixels: int


def _eligible_removals(
    split: _TrainSplit, plan: _Plan, anchor: str, companion: str, max_companion_fraction: float, dilation_px: int
) -> list[_Eligible]:
    """The train images of ``split`` a removal edit of (anchor, companion) can use, in (batch, image_id) order.

    The others are recorded as skipped in ``plan``. Decided per image, so a batch alone
    finds exactly its share of what all batches together find.
    """
    pair = pair_name(anchor, companion)
    eligible = []
    for key, image in split.images.items():
        categories = split.categories[key]
        if anchor not in categories or companion not in categories:
            continue
        companion_objects = [o for o in split.objects[key] if o.category == companion]
        companion_masks = [_decoded(o, image) for o in companion_objects]
        fraction = float(removal_mask(companion_masks, 0).mean())
        if fraction > max_companion_fraction:
            plan.skip(REMOVAL, image, pair, f"companion covers {fraction:.1%} of the image "
                      f"(more than max_companion_fraction {max_companion_fraction:.0%})")
            continue
        kept = _removal_captions(split.captions.get(key, []), companion, categories)
        if not kept:
            plan.skip(
                REMOVAL, image, pair, "no caption survives: every caption mentions the companion and none has a safe edit"
            )
            continue
        eligible.append(
            _Eligible(image, tuple(companion_objects), tuple(kept), int(removal_mask(companion_masks, dilation_px).sum()))
        )
    return eligible


def chosen_removals(n_eligible: int, removal_per_pair: int | None, seed: int, pair: str) -> list[int]:
    """Indices (ascending) of the removal edits kept out of ``n_eligible``: all, or ``removal_per_pair`` drawn.

    The draw is a permutation from a generator seeded by (seed, "removal", pair),
    so it depends on the eligible images' count and order only.
    """
    if removal_per_pair is None or removal_per_pair >= n_eligible:
        return list(range(n_eligible))
    return sorted(int(i) for i in _rng(seed, "removal", pair).permutation(n_eligible)[:removal_per_pair])


def _add_removal(plan: _Plan, split: _TrainSplit, anchor: str, companion: str, pair_dir: Path, chosen: _Eligible) -> None:
    pair = pair_name(anchor, companion)
    image = chosen.image
    out_path = str(pair_dir / f"removal_{path_slug(image.batch)}_{image.image_id}.png")
    cf_image_id = plan.add_image(
        {"kind": REMOVAL, "source_image_id": image.image_id, "donor_image_id": None, "donor_annotation_id": None,
         "batch": image.batch, "donor_batch": None, "pair": pair, "anchor": anchor, "companion": companion,
         "path": out_path, "source_path": image.path, "width": image.width, "height": image.height,
         "edited_pixels": chosen.edited_pixels},
        _RemovalTask(image.batch, image.image_id, image.path, image.width, image.height,
                     tuple(o.rle_counts for o in chosen.companion_objects), out_path),
    )
    for caption_id, text, original, kind in chosen.kept:
        plan.add_caption(cf_image_id, pair, companion, caption_id, text, original, kind)
    plan.objects.extend(
        _instance_row(cf_image_id, o, False)
        for o in split.objects[(image.batch, image.image_id)]
        if o.category != companion
    )


def _plan_removals(
    split: _TrainSplit, plan: _Plan, anchor: str, companion: str, pair_dir: Path, recipe: CounterfactualRecipe
) -> tuple[int, int]:
    """Plan the removal images of one pair; returns (planned, eligible)."""
    eligible = _eligible_removals(split, plan, anchor, companion, recipe.max_companion_fraction, recipe.dilation_px)
    chosen = chosen_removals(len(eligible), recipe.removal_per_pair, recipe.seed, pair_name(anchor, companion))
    for i in chosen:
        _add_removal(plan, split, anchor, companion, pair_dir, eligible[i])
    return len(chosen), len(eligible)


def _plan_pastes(
    split: _TrainSplit, plan: _Plan, anchor: str, companion: str, pair_dir: Path, wanted: int,
    clean: set[tuple[str, int]], max_companion_fraction: float, dilation_px: int, seed: int,
) -> tuple[int, int, int]:
    """Plan up to ``wanted`` paste images of one pair into ``clean`` targets; returns (planned, targets, donors)."""
    pair = pair_name(anchor, companion)
    donors = [
        (split.images[key], o)
        for key, objects in split.objects.items()
        for o in objects
        if o.category == companion and not o.iscrowd
        and o.mask_area <= max_companion_fraction * split.images[key].width * split.images[key].height
    ]
    targets = [
        key for key in split.images
        if key in clean and split.captions.get(key)
        and anchor not in split.categories[key] and companion not in split.categories[key]
    ]
    wanted = min(wanted, len(targets))
    if wanted and not donors:
        plan.skip(PASTE, None, pair, f"no train instance of {companion!r} to cut (non-crowd, covering at most "
                  f"{max_companion_fraction:.0%} of its image)")
        return 0, len(targets), 0
    if not wanted:
        return 0, len(targets), len(donors)
    target_order = _rng(seed, "paste-targets", pair).permutation(len(targets))
    donor_order = _rng(seed, "paste-donors", pair).permutation(len(donors))
    pasted = 0
    for attempt, t in enumerate(target_order):
        if pasted == wanted:
            break
        target = split.images[targets[int(t)]]
        donor_image, donor = donors[int(donor_order[attempt % len(donors)])]
        words = _rng(seed, "paste-words", pair, target.batch, target.image_id)
        captions = [
            (caption_id, text, add_companion_mention(text, companion, words))
            for caption_id, text in split.captions[(target.batch, target.image_id)]
        ]
        captions = [(caption_id, text, edited) for caption_id, text, edited in captions if edited is not None]
        if not captions:
            plan.skip(PASTE, target, pair, f"no caption of the target takes a mention of {companion!r}")
            continue
        scale = _paste_scale((donor_image.height, donor_image.width), (target.height, target.width))
        shape, _ = _companion_cutout(_decoded(donor, donor_image), None, scale)
        target_objects = split.objects[(target.batch, target.image_id)]
        occupied = (
            removal_mask([_decoded(o, target) for o in target_objects], dilation_px)
            if target_objects
            else np.zeros((target.height, target.width), dtype=bool)
        )
        offset = free_placement(shape, occupied, _rng(seed, "paste-place", pair, target.batch, target.image_id))
        if offset is None:
            plan.skip(
                PASTE, target, pair,
                f"no place for the {companion} cut from image {donor_image.image_id} off every instance",
            )
            continue
        top, left = offset
        placed = np.zeros((target.height, target.width), dtype=bool)
        placed[top : top + shape.shape[0], left : left + shape.shape[1]] = shape
        out_path = str(pair_dir / f"paste_{path_slug(target.batch)}_{target.image_id}.png")
        cf_image_id = plan.add_image(
            {"kind": PASTE, "source_image_id": target.image_id, "donor_image_id": donor_image.image_id,
             "donor_annotation_id": donor.annotation_id, "batch": target.batch, "donor_batch": donor_image.batch,
             "pair": pair, "anchor": anchor, "companion": companion, "path": out_path, "source_path": target.path,
             "width": target.width, "height": target.height, "edited_pixels": int(shape.sum())},
            _PasteTask(target.batch, target.image_id, target.path, target.width, target.height,
                       donor_image.batch, donor_image.image_id, donor_image.path, donor_image.width,
                       donor_image.height, donor.rle_counts, scale, top, left, out_path),
        )
        pasted += 1
        for caption_id, text, edited in captions:
            plan.add_caption(cf_image_id, pair, companion, caption_id, edited, text, PASTE_ADDED)
        plan.objects.extend(_instance_row(cf_image_id, o, False) for o in target_objects)
        encoded = _encode(placed)
        pasted_instance = _Instance(
            donor.annotation_id, companion, donor.category_id, donor.supercategory, False,
            encoded["counts"], tuple(encoded["bbox"]), float(encoded["area"]), encoded["area"],
        )
        plan.objects.append(_instance_row(cf_image_id, pasted_instance, True))
    return pasted, len(targets), len(donors)


def build_train_counterfactuals(
    tables: SplitTables,
    pairs: pl.DataFrame,
    out_dir: Path,
    recipe: CounterfactualRecipe,
    progress: Callable[[str], None] | None = None,
) -> TrainCounterfactuals:
    """Build removal and paste counterfactuals of the train split (docs/definitions.md); PNGs under ``out_dir``.

    ``tables`` are the ingested images/captions/instances tables of one or
    several batches (only ``split == "train"`` rows are used; images are keyed
    by (batch, image_id)); ``pairs`` a frame of pairs (``anchor``,
    ``companion``; duplicates ignored); ``recipe`` says how and how many (see
    ``CounterfactualRecipe``).

    Removal, per pair: the train images with instances of both a and b whose b
    union mask covers at most ``max_companion_fraction`` and that keep at least one
    caption (an accepted edit or a caption without b); the others go to
    ``skipped``. ``removal_per_pair`` of them (all when None) are drawn by a
    generator seeded by (seed, pair).

    Paste, per pair: targets are train images with no instance of a or b, none
    showing both sides of any pair in ``pairs`` (a copy of such an image would
    add that pair's co-occurrence), and at least one caption, in an order drawn
    by (seed, pair); donors are the
    non-crowd instances of b covering at most ``max_companion_fraction`` of their
    image, cycled in an order drawn likewise. Targets where the cut fits nowhere
    off every instance are skipped and the next is tried. ``paste_per_pair``
    None means ``pastes_for_unit_lift`` of the pair's counts and kept removals:
    the number that brings the pair's lift to 1 counting its own edits only,
    capped by the targets available. Each paste image also dilutes every other
    pair's P(b), so with several pairs the joint lift in ``lift`` stays above 1
    (on the built-in data, whose three anchors leave few clean targets, it falls
    from about 4.7 to about 2). On COCO, where P(b) is small, the rule can ask for
    thousands of pastes per pair; set a number to bound it.

    Ids: cf_image_id counts images in order (pairs as given; per pair removals,
    then pastes; each in (batch, image_id) / draw order); cf_caption_id counts
    captions in that order. PNGs: ``<pair>/removal_<batch>_<image>.png`` and
    ``<pair>/paste_<batch>_<target>.png``. Output is identical for a seed
    whatever ``workers`` (see ``counterfactuals.run_inpainting_chunks``).
    ``lift`` compares each pair over the original train images and over
    originals + all counterfactual images (their ``objects``), by
    ``cooccurrence.pair_statistics`` on instances.
    """
    train = _TrainInputs.prepare(tables, pairs)
    report = progress or (lambda message: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = _Plan()
    paste_counts: dict[str, int] = {}
    for anchor, companion in train.pair_list:
        pair_dir = out_dir / path_slug(pair_name(anchor, companion))
        removals, eligible = _plan_removals(train.split, plan, anchor, companion, pair_dir, recipe)
        paste_counts[pair_name(anchor, companion)] = _plan_pair_pastes(
            train, plan, anchor, companion, pair_dir, removals, eligible, recipe, report
        )
    return _render_and_finish(train, plan, pairs, recipe, paste_counts, report)


def build_train_removal_candidates(
    tables: SplitTables,
    pairs: pl.DataFrame,
    out_dir: Path,
    recipe: CounterfactualRecipe,
    progress: Callable[[str], None] | None = None,
) -> TrainCounterfactuals:
    """Every removal edit ``build_train_counterfactuals`` could choose, rendered; no draw, no pastes.

    Rows, PNG names and skipped rows are those of ``build_train_counterfactuals``
    with ``removal_per_pair=None, paste_per_pair=0`` on the same tables (``lift``
    is empty); the recipe's seed and draw counts are not used. Eligibility is
    decided image by image, so the candidates of several batches, built one
    batch at a time, are the candidates of all of them together:
    ``complete_train_counterfactuals`` draws from them.
    """
    recipe = replace(recipe, seed=0, removal_per_pair=None, paste_per_pair=0)
    train = _TrainInputs.prepare(tables, pairs)
    report = progress or (lambda message: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = _Plan()
    for anchor, companion in train.pair_list:
        removals, _ = _plan_removals(
            train.split, plan, anchor, companion, out_dir / path_slug(pair_name(anchor, companion)), recipe
        )
        report(f"train removal candidates {pair_name(anchor, companion)}: {removals}")
    finished = _render_and_finish(train, plan, pairs, recipe, {}, report, lift=False)
    finished.settings = {k: v for k, v in finished.settings.items() if k in ("inpainting_backend", "dilation_px",
                                                                         "max_companion_fraction")}
    return finished


def complete_train_counterfactuals(
    candidates: Sequence[TrainCounterfactuals],
    tables: SplitTables,
    pairs: pl.DataFrame,
    out_dir: Path,
    recipe: CounterfactualRecipe,
    progress: Callable[[str], None] | None = None,
) -> TrainCounterfactuals:
    """``build_train_counterfactuals`` of these tables, with its removal edits taken from ``candidates``.

    ``candidates`` are ``build_train_removal_candidates`` results (one per batch,
    say) that together cover every (batch, image) of the train split in
    ``tables`` for every pair in ``pairs``, made with the same
    ``max_companion_fraction``, ``dilation_px`` and inpainter. Their PNGs are
    hard-linked (copied across file systems) into ``out_dir`` under the names
    the one-run function writes; the draw of ``removal_per_pair``, the paste
    edits (which need the whole train pool: targets and donors from every
    batch), the ids and ``lift`` are made here. The result equals
    ``build_train_counterfactuals`` on the same arguments, PNG for PNG. A
    candidate image that the tables do not have raises ValueError (the
    candidates are stale: rebuild them).
    """
    train = _TrainInputs.prepare(tables, pairs)
    report = progress or (lambda message: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pool = _CandidatePool(candidates)
    plan = _Plan()
    paste_counts: dict[str, int] = {}
    for anchor, companion in train.pair_list:
        pair = pair_name(anchor, companion)
        pair_dir = out_dir / path_slug(pair)
        eligible, skipped = pool.of_pair(pair, train.split)
        plan.skipped.extend(skipped)
        chosen = chosen_removals(len(eligible), recipe.removal_per_pair, recipe.seed, pair)
        for i in chosen:
            pool.add_to(plan, eligible[i], pair_dir)
        paste_counts[pair] = _plan_pair_pastes(
            train, plan, anchor, companion, pair_dir, len(chosen), len(eligible), recipe, report
        )
    return _render_and_finish(train, plan, pairs, recipe, paste_counts, report)


@dataclass
class _TrainInputs:
    """The checked train split, indexed, with the pairs and the clean paste targets."""

    train_images: pl.DataFrame
    train_instances: pl.DataFrame
    split: _TrainSplit
    pair_list: list[tuple[str, str]]
    clean: set[tuple[str, int]]

    @classmethod
    def prepare(cls, tables: SplitTables, pairs: pl.DataFrame) -> "_TrainInputs":
        images, captions, instances = tables.images, tables.captions, tables.instances
        _check_columns(images, "images", ("batch", "split", "image_id", "path", "width", "height"))
        _check_columns(captions, "captions", ("batch", "split", "caption_id", "image_id", "caption"))
        _check_columns(
            instances,
            "instances",
            ("batch", "split", "annotation_id", "image_id", "category", "category_id", "supercategory",
             "bbox_x", "bbox_y", "bbox_w", "bbox_h", "area", "iscrowd", "rle_counts", "mask_area"),
        )
        _check_columns(pairs, "pairs", ("anchor", "companion"))
        train_images = images.filter(pl.col("split") == TRAIN_SPLIT)
        train_instances = instances.filter(pl.col("split") == TRAIN_SPLIT)
        split = _index_train_split(
            SplitTables(train_images, captions.filter(pl.col("split") == TRAIN_SPLIT), train_instances)
        )
        pair_list = list(dict.fromkeys(pairs.select("anchor", "companion").iter_rows()))
        # A paste target showing both sides of any pair would copy that pair's co-occurrence.
        clean = {
            key for key, categories in split.categories.items()
            if not any(a in categories and b in categories for a, b in pair_list)
        }
        return cls(train_images, train_instances, split, pair_list, clean)


def _plan_pair_pastes(
    train: _TrainInputs, plan: _Plan, anchor: str, companion: str, pair_dir: Path, removals: int, eligible: int,
    recipe: CounterfactualRecipe, report: Callable[[str], None],
) -> int:
    """Plan the paste images of one pair after its ``removals``; returns how many were planned."""
    if recipe.paste_per_pair is None:
        sets = train.split.categories.values()
        wanted = pastes_for_unit_lift(
            len(train.split.images), sum(anchor in c for c in sets), sum(companion in c for c in sets),
            sum(anchor in c and companion in c for c in sets), removals,
        )
    else:
        wanted = recipe.paste_per_pair
    pasted, targets, donors = _plan_pastes(
        train.split, plan, anchor, companion, pair_dir, wanted, train.clean,
        recipe.max_companion_fraction, recipe.dilation_px, recipe.seed,
    )
    report(
        f"train counterfactuals {pair_name(anchor, companion)}: {removals} removal(s) of {eligible} eligible, "
        f"{pasted} paste(s) of {wanted} wanted ({targets} targets, {donors} donors)"
    )
    return pasted


def _render_and_finish(
    train: _TrainInputs, plan: _Plan, pairs: pl.DataFrame, recipe: CounterfactualRecipe,
    paste_counts: dict[str, int], report: Callable[[str], None], lift: bool = True,
) -> TrainCounterfactuals:
    """Render the planned tasks (rows without one are already on disk), check their pixels, add lift and settings."""
    to_render = [(row, task) for row, task in zip(plan.images, plan.tasks, strict=True) if task is not None]
    tasks = [task for _, task in to_render]
    per_chunk = recipe.chunk_size(TASKS_PER_CHUNK)
    chunks = [tasks[i : i + per_chunk] for i in range(0, len(tasks), per_chunk)]
    report(f"train counterfactuals: rendering {len(tasks)} images in {len(chunks)} chunks")
    render = functools.partial(_render_train_chunk, dilation_px=recipe.dilation_px)
    edited_pixels = run_inpainting_chunks(
        render, chunks, recipe.inpainter, recipe.workers, report, "train counterfactuals"
    )
    for (row, _), pixels in zip(to_render, edited_pixels, strict=True):
        if row["edited_pixels"] != pixels:  # planning and rendering must agree on every mask
            raise RuntimeError(
                f"train counterfactual {row['cf_image_id']} ({row['kind']} of image {row['source_image_id']}): "
                f"planned {row['edited_pixels']} edited pixels, rendered {pixels}"
            )
    images_out = pl.DataFrame(plan.images, schema=TRAIN_CF_IMAGES_SCHEMA)
    objects_out = pl.DataFrame(plan.objects, schema=TRAIN_CF_OBJECTS_SCHEMA)
    lift_table = (
        _lift_table(train.train_images, train.train_instances, images_out, objects_out, pairs)
        if lift
        else pl.DataFrame(schema=LIFT_SCHEMA)
    )
    inpainter = recipe.inpainter
    name = getattr(inpainter, "backend", None) or getattr(inpainter, "name", type(inpainter).__name__)
    settings = {
        "inpainting_backend": name,
        "seed": recipe.seed,
        "dilation_px": recipe.dilation_px,
        "max_companion_fraction": recipe.max_companion_fraction,
        "removal_per_pair": recipe.removal_per_pair,
        "paste_per_pair": recipe.paste_per_pair,
        "paste_rule": "as given" if recipe.paste_per_pair is not None else "pastes_for_unit_lift, capped by targets",
        "pastes_made": paste_counts,
    }
    report(
        f"train counterfactuals: {images_out.height} images ({(images_out['kind'] == REMOVAL).sum()} removal), "
        f"{len(plan.captions)} captions, {len(plan.skipped)} skipped"
    )
    return TrainCounterfactuals(
        images=images_out,
        captions=pl.DataFrame(plan.captions, schema=TRAIN_CF_CAPTIONS_SCHEMA),
        objects=objects_out,
        lift=lift_table,
        skipped=pl.DataFrame(plan.skipped, schema=TRAIN_CF_SKIPPED_SCHEMA),
        settings=settings,
    )


@dataclass(frozen=True)
class _Candidate:
    """One rendered removal edit of a candidate set: its image row, caption rows and object rows."""

    image: dict
    captions: tuple[dict, ...]
    objects: tuple[dict, ...]


class _CandidatePool:
    """The removal candidates of several ``build_train_removal_candidates`` results, by pair."""

    def __init__(self, candidates: Sequence[TrainCounterfactuals]) -> None:
        self.by_pair: dict[str, list[_Candidate]] = {}
        self.skipped: dict[str, list[dict]] = {}
        for part in candidates:
            captions_of: dict[int, list[dict]] = {}
            for row in part.captions.sort("cf_caption_id").iter_rows(named=True):
                captions_of.setdefault(row["cf_image_id"], []).append(row)
            objects_of: dict[int, list[dict]] = {}
            for row in part.objects.iter_rows(named=True):
                objects_of.setdefault(row["cf_image_id"], []).append(row)
            for row in part.images.filter(pl.col("kind") == REMOVAL).sort("cf_image_id").iter_rows(named=True):
                self.by_pair.setdefault(row["pair"], []).append(
                    _Candidate(row, tuple(captions_of.get(row["cf_image_id"], ())),
                               tuple(objects_of.get(row["cf_image_id"], ())))
                )
            for row in part.skipped.filter(pl.col("kind") == REMOVAL).iter_rows(named=True):
                self.skipped.setdefault(row["pair"], []).append(row)

    def of_pair(self, pair: str, split: _TrainSplit) -> tuple[list[_Candidate], list[dict]]:
        """The pair's candidates and skipped rows in (batch, image_id) order, checked against ``split``."""
        eligible = sorted(self.by_pair.get(pair, []), key=lambda c: (c.image["batch"], c.image["source_image_id"]))
        for candidate in eligible:
            key = (candidate.image["batch"], candidate.image["source_image_id"])
            image = split.images.get(key)
            if image is None or image.path != candidate.image["source_path"]:
                raise ValueError(
                    f"removal candidate {candidate.image['path']} (pair {pair}, batch {key[0]!r}, image {key[1]}): "
                    "the train tables have no such image (or it moved); the candidates are stale, rebuild them "
                    "from the current batch"
                )
        skipped = sorted(self.skipped.get(pair, []), key=lambda r: (r["batch"], r["source_image_id"]))
        return eligible, skipped

    @staticmethod
    def add_to(plan: _Plan, candidate: _Candidate, pair_dir: Path) -> None:
        """Add ``candidate``'s rows to ``plan`` with new ids, its PNG linked into ``pair_dir``."""
        source = Path(candidate.image["path"])
        target = pair_dir / source.name
        link_or_copy(source, target)
        cf_image_id = plan.add_image(
            {k: v for k, v in candidate.image.items() if k != "cf_image_id"} | {"path": str(target)}, None
        )
        for row in candidate.captions:
            plan.captions.append(row | {"cf_caption_id": len(plan.captions) + 1, "cf_image_id": cf_image_id})
        plan.objects.extend(row | {"cf_image_id": cf_image_id} for row in candidate.objects)


# --------------------------------------------------------------------------- lift


def _lift_table(
    train_images: pl.DataFrame,
    train_instances: pl.DataFrame,
    cf_images: pl.DataFrame,
    cf_objects: pl.DataFrame,
    pairs: pl.DataFrame,
) -> pl.DataFrame:
    """P(b|a) and lift per pair over the original train images, and over originals + counterfactual images."""
    # One integer key per (batch, image_id), so ids repeated across batches stay apart;
    # counterfactual images get negative keys.
    keys = train_images.select("batch", "image_id").with_row_index("key").with_columns(pl.col("key").cast(pl.Int64))
    originals = (
        train_instances.join(keys, on=["batch", "image_id"], how="inner")
        .select(pl.col("key").alias("image_id"), "category")
        .unique()
    )
    edited = cf_objects.select((-pl.col("cf_image_id")).alias("image_id"), "category").unique()
    n_before = train_images.height
    n_after = n_before + cf_images.height
    stats = {}
    for label, frame, n in (("before", originals, n_before), ("after", pl.concat([originals, edited]), n_after)):
        table = pair_statistics(frame, max(1, n), "instances") if frame.height else None
        stats[label] = (
            {} if table is None else {(r["anchor"], r["companion"]): r for r in table.iter_rows(named=True)}
        )
    rows = []
    for anchor, companion in pairs.select("anchor", "companion").unique(maintain_order=True).iter_rows():
        row = {"pair": pair_name(anchor, companion), "anchor": anchor, "companion": companion}
        for label, n in (("before", n_before), ("after", n_after)):
            found = stats[label].get((anchor, companion))
            row[f"n_images_{label}"] = n
            if found is None:  # never together: P(b|a) = 0, lift 0
                frame = originals if label == "before" else pl.concat([originals, edited])
                row[f"n_anchor_{label}"] = frame.filter(pl.col("category") == anchor).height
                row[f"n_both_{label}"] = 0
                row[f"p_{label}"] = 0.0
                row[f"lift_{label}"] = 0.0
            else:
                row[f"n_anchor_{label}"] = found["n_anchor"]
                row[f"n_both_{label}"] = found["n_both"]
                row[f"p_{label}"] = found["p_companion_given_anchor"]
                row[f"lift_{label}"] = found["lift"]
        rows.append(row)
    return pl.DataFrame(rows, schema=LIFT_SCHEMA)
