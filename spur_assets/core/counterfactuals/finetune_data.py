"""The fine-tuning set: originals mixed with train counterfactuals, plus hard-negative links.

docs/definitions.md#fine-tuning-set-and-loss: CLIP's InfoNCE over each batch, where each removal
image I⁻ᵇ brings its original b-caption as an extra hard-negative text, and each
original b-caption brings I⁻ᵇ as a hard-negative image. This module only builds
the index arrays that ``training.train_clip`` takes; it trains nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from spur_assets.core.data.vocabulary import mentioned_categories


@dataclass(frozen=True)
class FinetuneSet:
    """Rows to train on. Images are originals first, then counterfactuals."""

    image_paths: list[str]
    captions: list[str]
    caption_image: np.ndarray  # int64 [n_captions]: row in image_paths
    hard_negative_text: np.ndarray  # int64 [n_images]: caption row, -1 = none
    hard_negative_image: np.ndarray  # int64 [n_captions]: image row, -1 = none
    summary: dict = field(default_factory=dict)


# The share of counterfactual images among the images a fine-tune trains on: 0.34 kept R@5 over 3
# seeds where 0.5 gained more ODmAP but lost R@5 i2t on two seeds (bench/experiments/RESEARCH.md, Background).
COUNTERFACTUAL_RATIO = 0.34


def assemble_finetune_set(
    train_images: pl.DataFrame,
    train_captions: pl.DataFrame,
    cf_images: pl.DataFrame,
    cf_captions: pl.DataFrame,
    counterfactual_ratio: float = COUNTERFACTUAL_RATIO,
    use_removal: bool = True,
    use_paste: bool = True,
    hard_negatives: bool = True,
    seed: int = 0,
) -> FinetuneSet:
    """Mix originals and train counterfactuals so counterfactual images make up ``counterfactual_ratio``.

    ``train_images`` (image_id, path) and ``train_captions`` (caption_id, image_id,
    caption) are the original train split; ``cf_images`` (cf_image_id, kind,
    source_image_id, companion, path) and ``cf_captions`` (cf_caption_id,
    cf_image_id, caption) the train counterfactuals. Originals are subsampled
    (seeded) when there are more than the ratio asks for (with both kinds off,
    every original and no counterfactual: the ablation's control); every original used
    keeps all its captions. With ``hard_negatives``, each removal image I⁻ᵇ is
    linked to the first original caption of I that mentions b (as a negative
    text), and every original b-caption of I to I⁻ᵇ (as a negative image) — when I
    is among the originals used, which is always the case for sources of
    removals.
    """
    if not 0.0 < counterfactual_ratio <= 1.0:
        raise ValueError(f"counterfactual_ratio={counterfactual_ratio} must lie in (0, 1]")
    kinds = [k for k, used in (("removal", use_removal), ("paste", use_paste)) if used]
    if not kinds:
        # The control arm of an ablation: the same fine-tuning on originals alone.
        counterfactual_ratio = 1.0
    cf = cf_images.filter(pl.col("kind").is_in(kinds)).sort("cf_image_id")
    cf_caps = cf_captions.join(cf.select("cf_image_id"), on="cf_image_id", how="semi").sort("cf_caption_id")

    # Originals: the sources of removals always (their b-captions are the hard negatives), then a seeded sample.
    wanted = len(train_images) if counterfactual_ratio >= 1.0 else int(round(cf.height * (1 - counterfactual_ratio) / counterfactual_ratio))
    sources = set(cf.filter(pl.col("kind") == "removal")["source_image_id"].to_list())
    rng = np.random.default_rng(seed)
    others = np.array(sorted(set(train_images["image_id"].to_list()) - sources), dtype=np.int64)
    extra = max(0, min(len(others), wanted - len(sources)))
    chosen = sources | set(rng.choice(others, size=extra, replace=False).tolist()) if extra else set(sources)
    originals = train_images.filter(pl.col("image_id").is_in(sorted(chosen))).sort("image_id")
    orig_caps = train_captions.join(originals.select("image_id"), on="image_id", how="semi").sort("caption_id")

    image_row = {image_id: row for row, image_id in enumerate(originals["image_id"].to_list())}
    cf_row = {cf_id: len(image_row) + row for row, cf_id in enumerate(cf["cf_image_id"].to_list())}
    image_paths = originals["path"].to_list() + cf["path"].to_list()
    captions = orig_caps["caption"].to_list() + cf_caps["caption"].to_list()
    caption_image = np.array(
        [image_row[i] for i in orig_caps["image_id"].to_list()] + [cf_row[i] for i in cf_caps["cf_image_id"].to_list()],
        dtype=np.int64,
    )
    hard_text = np.full(len(image_paths), -1, dtype=np.int64)
    hard_image = np.full(len(captions), -1, dtype=np.int64)
    links = 0
    if hard_negatives:
        caption_rows_of: dict[int, list[int]] = {}
        for row, image_id in enumerate(orig_caps["image_id"].to_list()):
            caption_rows_of.setdefault(image_id, []).append(row)
        for removal in cf.filter(pl.col("kind") == "removal").iter_rows(named=True):
            b_captions = [
                r for r in caption_rows_of.get(removal["source_image_id"], [])
                if removal["companion"] in mentioned_categories(captions[r])
            ]
            if not b_captions:
                continue
            hard_text[cf_row[removal["cf_image_id"]]] = b_captions[0]
            for r in b_captions:
                hard_image[r] = cf_row[removal["cf_image_id"]]
            links += 1
    summary = {
        "original_images": originals.height,
        "original_captions": orig_caps.height,
        "counterfactual_images": cf.height,
        "counterfactual_captions": cf_caps.height,
        "removal_images": cf.filter(pl.col("kind") == "removal").height,
        "paste_images": cf.filter(pl.col("kind") == "paste").height,
        "hard_negative_links": links,
        "counterfactual_share": cf.height / max(1, len(image_paths)),
    }
    return FinetuneSet(image_paths, captions, caption_image, hard_text, hard_image, summary)


def originals_only(train_images: pl.DataFrame, train_captions: pl.DataFrame) -> FinetuneSet:
    """Every original image (by image_id) and caption (by caption_id), no counterfactual, no hard negative.

    The rows of a base trained from scratch and of the control arm, which trains like the
    fine-tune on the originals alone.
    """
    images = train_images.sort("image_id")
    captions = train_captions.sort("caption_id")
    row_of = {image_id: row for row, image_id in enumerate(images["image_id"].to_list())}
    missing = sorted(set(captions["image_id"].to_list()) - set(row_of))
    if missing:
        raise ValueError(f"captions describe image_id(s) {missing[:5]} that are not among the train images")
    caption_image = np.array([row_of[i] for i in captions["image_id"].to_list()], dtype=np.int64)
    summary = {
        "original_images": images.height,
        "original_captions": captions.height,
        "counterfactual_images": 0,
        "counterfactual_captions": 0,
        "hard_negative_links": 0,
        "counterfactual_share": 0.0,
    }
    return FinetuneSet(
        images["path"].to_list(),
        captions["caption"].to_list(),
        caption_image,
        np.full(images.height, -1, dtype=np.int64),
        np.full(captions.height, -1, dtype=np.int64),
        summary,
    )
