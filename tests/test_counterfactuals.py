"""Counterfactual eval set: masks, control placement, caption edits, and the whole build on drawn images."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from spur_assets.core.data import vocabulary
from spur_assets.core.counterfactuals.eval_set import (
    ACCEPTED,
    NO_OBJECT_LEFT,
    NO_SAFE_EDIT,
    STILL_MENTIONS_COMPANION,
    before_after_grid,
    build_eval_counterfactuals,
    control_mask,
    judge_caption_edit,
    remove_companion_phrase,
    removal_mask,
)
from spur_assets.core.counterfactuals.inpaint import InpainterSpec, OpenCVInpainter, TorchInpainter
from spur_assets.core.counterfactuals.recipe import CounterfactualRecipe
from spur_assets.core.data.batch_union import SplitTables

# --------------------------------------------------------------------------- masks


def disc(height: int, width: int, cy: int, cx: int, radius: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


@pytest.mark.parametrize("dilation_px", [0, 1, 2, 5])
def test_removal_mask_is_the_union_dilated_like_cv2(dilation_px):
    a = disc(40, 50, 12, 12, 5)
    b = np.zeros((40, 50), dtype=bool)
    b[25:31, 30:44] = True
    union = (a | b).astype(np.uint8)
    if dilation_px:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation_px + 1,) * 2)
        expected = cv2.dilate(union, kernel).astype(bool)
    else:
        expected = union.astype(bool)
    np.testing.assert_array_equal(removal_mask([a, b], dilation_px), expected)


def test_removal_mask_dilation_by_one_adds_the_four_neighbours():
    # Hand-computed: the 3x3 ellipse is a plus sign, so one pixel grows into a plus.
    single = np.zeros((5, 5), dtype=bool)
    single[2, 2] = True
    expected = np.zeros((5, 5), dtype=bool)
    expected[2, 1:4] = True
    expected[1:4, 2] = True
    np.testing.assert_array_equal(removal_mask([single], 1), expected)


def _bbox_crop(mask: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_control_mask_has_the_same_shape_and_area_and_avoids_occupied(seed):
    removal = disc(60, 80, 20, 20, 6)
    removal[20:24, 26:34] = True  # a tail makes the shape asymmetric
    occupied = removal | disc(60, 80, 40, 55, 12)
    control = control_mask(removal, occupied, np.random.default_rng(seed))
    assert control is not None
    assert control.sum() == removal.sum()
    np.testing.assert_array_equal(_bbox_crop(control), _bbox_crop(removal))
    assert not (control & occupied).any()


def test_control_mask_finds_the_single_free_place_by_exhaustive_search():
    removal = np.zeros((30, 30), dtype=bool)
    removal[2:7, 2:7] = True
    # Everything is occupied except one 5x5 hole at (20..24, 11..15): random tries
    # (only 1 allowed) almost surely miss it, the exhaustive search must not.
    occupied = np.ones((30, 30), dtype=bool)
    occupied[20:25, 11:16] = False
    occupied |= removal
    control = control_mask(removal, occupied, np.random.default_rng(0), tries=1)
    expected = np.zeros((30, 30), dtype=bool)
    expected[20:25, 11:16] = True
    np.testing.assert_array_equal(control, expected)


def test_control_mask_is_none_when_nothing_fits():
    removal = np.zeros((20, 20), dtype=bool)
    removal[5:15, 5:15] = True
    occupied = removal.copy()
    occupied[:, 9:11] = True  # a wall through the middle: no 10x10 square fits anywhere else
    occupied[9:11, :] = True
    assert control_mask(removal, occupied, np.random.default_rng(0)) is None
    assert control_mask(np.zeros((20, 20), bool), occupied, np.random.default_rng(0)) is None


# --------------------------------------------------------------------------- caption edits

EDITS = [
    # (caption, companion, expected edit or None)
    ("A dog with a frisbee on the grass.", "frisbee", "A dog on the grass."),
    ("A dog and a frisbee.", "frisbee", "A dog."),
    ("A dog catching a red frisbee.", "frisbee", "A dog."),
    ("A frisbee and a dog.", "frisbee", "A dog."),
    ("Two dogs playing with frisbees in a park", "frisbee", "Two dogs in a park"),
    ("A dog is catching a frisbee.", "frisbee", "A dog."),
    ("A dog is catching a frisbee in the air.", "frisbee", "A dog is in the air."),
    ("A dog with a frisbee in its mouth.", "frisbee", "A dog."),
    ("A dog jumping to catch a frisbee", "frisbee", "A dog jumping"),
    ("A dog with a couple of frisbees.", "frisbee", "A dog."),
    ("a dog, a cat, and a frisbee", "frisbee", "a dog, a cat"),
    ("A dog next to a frisbee and another frisbee.", "frisbee", "A dog."),
    ("A man holding a tennis racket on a court.", "tennis racket", "A man on a court."),
    ("A man on a skateboard does a trick.", "skateboard", "A man does a trick."),
    ("A cat sitting next to a laptop computer.", "laptop", "A cat."),
    ("A teddy bear next to a hot dog.", "hot dog", "A teddy bear."),
    # No safe edit: the companion is a subject, part of a compound word, a possessor,
    # or its verb phrase would leave a dangling object.
    ("A frisbee flies over the dog.", "frisbee", None),
    ("A frisbee-catching dog.", "frisbee", None),
    ("A dog's frisbee on the grass.", "frisbee", None),
    ("A man throws a frisbee to his dog.", "frisbee", None),
    ("A dog.", "frisbee", None),  # nothing to remove
    ("A hot dog on a plate.", "dog", None),  # "hot dog" is food, never a dog
]


@pytest.mark.parametrize(("caption", "companion", "expected"), EDITS)
def test_remove_companion_phrase_on_hand_written_cases(caption, companion, expected):
    edited = remove_companion_phrase(caption, companion)
    assert edited == expected
    if edited is not None:
        assert companion not in vocabulary.mentioned_categories(edited)


@pytest.mark.parametrize(
    ("edited", "image_categories", "accepted", "reason"),
    [
        ("A dog on the grass.", {"dog", "frisbee"}, True, ACCEPTED),
        (None, {"dog", "frisbee"}, False, NO_SAFE_EDIT),
        ("A dog and a frisbee.", {"dog", "frisbee"}, False, STILL_MENTIONS_COMPANION),
        ("A picture.", {"dog", "frisbee"}, False, NO_OBJECT_LEFT),
        ("A cat on the grass.", {"dog", "frisbee"}, False, NO_OBJECT_LEFT),  # cat is not in the image
    ],
)
def test_judge_caption_edit(edited, image_categories, accepted, reason):
    assert judge_caption_edit(edited, "frisbee", frozenset(image_categories)) == (accepted, reason)


# --------------------------------------------------------------------------- the whole build

HEIGHT, WIDTH = 60, 80


def _rle(mask: np.ndarray) -> str:
    return coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()


def _scene(rng: np.random.Generator, objects: dict[str, list[np.ndarray]]) -> np.ndarray:
    """A greenish noisy lawn with each object's masks painted in its own colour."""
    image = (np.array([70, 140, 60]) + rng.normal(0, 4, (HEIGHT, WIDTH, 3))).clip(0, 255)
    colours = {"dog": (150, 100, 50), "frisbee": (230, 20, 20), "cat": (90, 90, 90)}
    for category, masks in objects.items():
        for mask in masks:
            image[mask] = colours[category]
    return image.round().astype(np.uint8)


def _synthetic_dataset(root: Path) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, dict]:
    """Four images (3 test, 1 train) with dogs, frisbees and a cat, as the ingested tables."""
    rng = np.random.default_rng(11)
    big_frisbee = np.zeros((HEIGHT, WIDTH), dtype=bool)
    big_frisbee[5:45, 40:78] = True  # 31.7% of the image
    scenes = {
        # image_id: (split, mode, {category: [masks]}, captions)
        1: (
            "test",
            "RGB",
            {"dog": [disc(HEIGHT, WIDTH, 35, 25, 12)], "frisbee": [disc(HEIGHT, WIDTH, 15, 60, 5)]},
            [
                "A dog with a frisbee on the grass.",
                "A brown dog on the lawn.",
                "A frisbee flies over the dog.",
                "A picture with a frisbee.",
            ],
        ),
        2: (
            "test",
            "L",
            {
                "dog": [disc(HEIGHT, WIDTH, 30, 20, 10)],
                "frisbee": [disc(HEIGHT, WIDTH, 10, 50, 4), disc(HEIGHT, WIDTH, 45, 65, 4)],
                "cat": [disc(HEIGHT, WIDTH, 40, 45, 6)],
            },
            ["Two frisbees and a dog.", "A dog and a cat playing with frisbees.", "A cat next to a dog."],
        ),
        3: (
            "test",
            "RGBA",
            {"dog": [disc(HEIGHT, WIDTH, 30, 15, 8)], "frisbee": [big_frisbee]},
            ["A dog with a frisbee."],
        ),
        4: (
            "train",
            "RGB",
            {"dog": [disc(HEIGHT, WIDTH, 30, 30, 10)], "frisbee": [disc(HEIGHT, WIDTH, 10, 60, 5)]},
            ["A dog and a frisbee."],
        ),
    }
    images, captions, instances, drawn = [], [], [], {}
    caption_id, annotation_id = 100, 500
    for image_id, (split, mode, objects, texts) in scenes.items():
        rgb = _scene(rng, objects)
        path = root / f"{image_id:04d}.png"
        Image.fromarray(rgb).convert(mode).save(path)
        # What the pipeline sees after its own .convert("RGB") of the saved file.
        drawn[image_id] = np.asarray(Image.open(path).convert("RGB"))
        images.append(
            {"batch": "b0", "split": split, "image_id": image_id, "file_name": path.name, "path": str(path),
             "width": WIDTH, "height": HEIGHT, "mode": mode}
        )
        for text in texts:
            caption_id += 1
            captions.append(
                {"batch": "b0", "split": split, "caption_id": caption_id, "image_id": image_id, "caption": text}
            )
        for category, masks in objects.items():
            for mask in masks:
                annotation_id += 1
                instances.append(
                    {"batch": "b0", "split": split, "annotation_id": annotation_id, "image_id": image_id,
                     "category_id": {"dog": 18, "frisbee": 34, "cat": 17}[category], "category": category,
                     "iscrowd": False, "rle_counts": _rle(mask), "mask_area": int(mask.sum()), "_mask": mask}
                )
    masks_by_image: dict[int, dict[str, list[np.ndarray]]] = {}
    for row in instances:
        masks_by_image.setdefault(row["image_id"], {}).setdefault(row["category"], []).append(row.pop("_mask"))
    truth = {"drawn": drawn, "masks": masks_by_image}
    return pl.DataFrame(images), pl.DataFrame(captions), pl.DataFrame(instances), truth


PAIRS = pl.DataFrame({"anchor": ["dog", "dog"], "companion": ["frisbee", "cat"]})


def _dilated_union(masks: list[np.ndarray], dilation_px: int) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation_px + 1,) * 2)
    union = np.logical_or.reduce(masks).astype(np.uint8)
    return cv2.dilate(union, kernel).astype(bool)


def _read(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return _synthetic_dataset(root)


@pytest.fixture(scope="module")
def built(dataset, tmp_path_factory):
    images, captions, instances, _ = dataset
    out_dir = tmp_path_factory.mktemp("cf-one-worker")
    messages: list[str] = []
    result = build_eval_counterfactuals(
        SplitTables(images, captions, instances), PAIRS, out_dir,
        CounterfactualRecipe(OpenCVInpainter(), dilation_px=2, seed=7, tasks_per_chunk=1), progress=messages.append,
    )
    return result, out_dir, messages


def test_build_keeps_test_images_with_small_companions_and_skips_the_rest(built):
    result, _, messages = built
    kept = result.images.select("source_image_id", "pair", "kind").sort("pair", "source_image_id", "kind")
    assert kept.rows() == [
        (2, "dog->cat", "control"),
        (2, "dog->cat", "removal"),
        (1, "dog->frisbee", "control"),
        (1, "dog->frisbee", "removal"),
        (2, "dog->frisbee", "control"),
        (2, "dog->frisbee", "removal"),
    ]
    # Image 3's frisbee covers 31.7% > 25%; image 4 is train and never considered.
    assert result.skipped.rows() == [(3, "b0", "dog->frisbee", result.skipped["reason"][0])]
    assert "31.7%" in result.skipped["reason"][0]
    assert result.images["cf_image_id"].to_list() == [1, 2, 3, 4, 5, 6]
    assert messages and "skipped" in messages[-1]


def test_removal_and_control_change_pixels_only_inside_their_masks(built, dataset):
    result, _, _ = built
    truth = dataset[3]
    for row in result.images.iter_rows(named=True):
        original = truth["drawn"][row["source_image_id"]]
        edited = _read(row["path"])
        mask = _read(row["mask_path"]) > 0
        assert edited.shape == original.shape and edited.dtype == np.uint8
        changed = (edited != original).any(axis=-1)
        assert not (changed & ~mask).any(), f"{row['kind']} of image {row['source_image_id']} changed outside its mask"
        objects = truth["masks"][row["source_image_id"]]
        removal = _dilated_union(objects[row["companion"]], 2)
        if row["kind"] == "removal":
            np.testing.assert_array_equal(mask, removal)
            # The companion's colour is gone: no pixel inside the mask keeps the painted object colour.
            painted = {"frisbee": (230, 20, 20), "cat": (90, 90, 90)}[row["companion"]]
            assert not (edited[mask] == painted).all(axis=-1).any()
        else:
            occupied = _dilated_union([m for masks in objects.values() for m in masks], 2)
            assert not (mask & occupied).any()
            assert mask.sum() == removal.sum()
            np.testing.assert_array_equal(_bbox_crop(mask), _bbox_crop(removal))
        assert row["masked_pixels"] == mask.sum()
        assert row["mask_fraction"] == pytest.approx(mask.sum() / (HEIGHT * WIDTH))


def test_edited_captions_drop_the_companion_and_are_judged(built):
    result, _, _ = built
    captions = result.captions.sort("cf_caption_id")
    by_source = {row["source_caption"]: row for row in captions.iter_rows(named=True) if row["pair"] == "dog->frisbee"}
    # "A brown dog on the lawn." and "A cat next to a dog." (for dog->frisbee) do not mention the companion.
    assert set(by_source) == {
        "A dog with a frisbee on the grass.",
        "A frisbee flies over the dog.",
        "A picture with a frisbee.",
        "Two frisbees and a dog.",
        "A dog and a cat playing with frisbees.",
    }
    on_grass = by_source["A dog with a frisbee on the grass."]
    assert (on_grass["caption"], on_grass["accepted"], on_grass["reason"]) == ("A dog on the grass.", True, ACCEPTED)
    flies = by_source["A frisbee flies over the dog."]
    assert (flies["caption"], flies["accepted"], flies["reason"]) == (None, False, NO_SAFE_EDIT)
    picture = by_source["A picture with a frisbee."]
    assert (picture["caption"], picture["accepted"], picture["reason"]) == ("A picture.", False, NO_OBJECT_LEFT)
    assert by_source["Two frisbees and a dog."]["caption"] == "A dog."
    assert by_source["A dog and a cat playing with frisbees."]["caption"] == "A dog and a cat."
    for row in captions.filter(pl.col("accepted")).iter_rows(named=True):
        assert row["companion"] not in vocabulary.mentioned_categories(row["caption"])
    # Each caption points at the removal image of its own (pair, image).
    removal_ids = {
        (row["pair"], row["source_image_id"]): row["cf_image_id"]
        for row in result.images.filter(pl.col("kind") == "removal").iter_rows(named=True)
    }
    for row in captions.iter_rows(named=True):
        assert row["cf_image_id"] == removal_ids[(row["pair"], row["source_image_id"])]
    cat_edit = captions.filter((pl.col("pair") == "dog->cat") & (pl.col("source_caption") == "A cat next to a dog."))
    assert cat_edit["reason"].to_list() == [NO_SAFE_EDIT]  # the cat is the subject


def _relative(frame: pl.DataFrame, out_dir: Path) -> pl.DataFrame:
    return frame.with_columns(
        pl.col("path").str.replace(str(out_dir), "", literal=True),
        pl.col("mask_path").str.replace(str(out_dir), "", literal=True),
    )


def test_two_workers_give_the_same_set_as_one(built, dataset, tmp_path):
    result, out_dir, _ = built
    images, captions, instances, _ = dataset
    two = build_eval_counterfactuals(
        SplitTables(images, captions, instances), PAIRS, tmp_path,
        CounterfactualRecipe(InpainterSpec("opencv"), dilation_px=2, seed=7, workers=2, tasks_per_chunk=1),
    )
    assert _relative(two.images, tmp_path).equals(_relative(result.images, out_dir))
    assert two.captions.equals(result.captions)
    assert two.skipped.equals(result.skipped)
    for one_path, two_path in zip(result.images["path"], two.images["path"], strict=True):
        np.testing.assert_array_equal(_read(one_path), _read(two_path))


def test_same_seed_same_controls_other_seed_other_place(dataset, tmp_path):
    images, captions, instances, _ = dataset
    pairs = PAIRS.head(1)
    runs = [
        build_eval_counterfactuals(
            SplitTables(images, captions, instances), pairs, tmp_path / str(i),
            CounterfactualRecipe(TorchInpainter(), seed=seed),
        )
        for i, seed in enumerate([3, 3, 4])
    ]
    masks = [
        [_read(p) for p in run.images.filter(pl.col("kind") == "control")["mask_path"]] for run in runs
    ]
    assert all(np.array_equal(a, b) for a, b in zip(masks[0], masks[1], strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(masks[0], masks[2], strict=True))


def test_missing_columns_and_files_are_named(dataset, tmp_path):
    images, captions, instances, _ = dataset
    with pytest.raises(ValueError, match=r"pairs frame lacks column\(s\) \['companion'\]"):
        build_eval_counterfactuals(
            SplitTables(images, captions, instances), PAIRS.select("anchor"), tmp_path,
            CounterfactualRecipe(OpenCVInpainter()),
        )
    moved = images.with_columns(pl.col("path") + ".gone")
    with pytest.raises(FileNotFoundError, match=r"0001\.png\.gone: image file of image_id 1"):
        build_eval_counterfactuals(
            SplitTables(moved, captions, instances), PAIRS, tmp_path, CounterfactualRecipe(OpenCVInpainter())
        )


def test_before_after_grid_writes_a_png(built, tmp_path):
    result, _, _ = built
    out = before_after_grid(result.images, tmp_path / "grid.png", n=2)
    with Image.open(out) as grid:
        width, height = grid.size
    assert width > height > 0  # 2 rows of 4 panels
    empty = before_after_grid(result.images.clear(), tmp_path / "empty.png")
    assert empty.is_file()
