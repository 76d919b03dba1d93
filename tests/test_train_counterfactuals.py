"""Train counterfactuals (removal + paste) on the built-in data: pixels, captions, objects, lift, determinism."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from spur_assets.core.data import vocabulary
from spur_assets.core.data.batch_union import SplitTables
from spur_assets.core.data.builtin_dataset import INJECTED_PAIRS, BuiltinDatasetSpec, generate_builtin_dataset
from spur_assets.core.data.coco_ingest import load_batch
from spur_assets.core.counterfactuals.inpaint import InpainterSpec, OpenCVInpainter
from spur_assets.core.counterfactuals.recipe import CounterfactualRecipe
from spur_assets.core.counterfactuals.train_counterfactuals import (
    PASTE_ADDED,
    REMOVAL_EDIT,
    REMOVAL_KEPT,
    add_companion_mention,
    build_train_counterfactuals,
    pastes_for_unit_lift,
)

PAIRS = pl.DataFrame({"anchor": [a for a, _ in INJECTED_PAIRS], "companion": [b for _, b in INJECTED_PAIRS]})
DILATION = 2


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("builtin")
    manifest = generate_builtin_dataset(root / "data", BuiltinDatasetSpec(seed=5, n_train=150, n_test=60))
    return load_batch(manifest, "b0")


def _raw(tables) -> SplitTables:
    """The images, captions and instances of a loaded batch."""
    return SplitTables(tables.images, tables.captions, tables.instances)


@pytest.fixture(scope="module")
def built(tables, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("train-cf")
    messages: list[str] = []
    result = build_train_counterfactuals(
        _raw(tables), PAIRS, out_dir, CounterfactualRecipe(OpenCVInpainter(), dilation_px=DILATION, seed=3),
        progress=messages.append,
    )
    return result, out_dir, messages


def _rgb(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _mask(rle: str, height: int, width: int) -> np.ndarray:
    return coco_mask.decode({"size": [height, width], "counts": rle.encode()}).astype(bool)


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1,) * 2)
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def _train_instances(tables) -> pl.DataFrame:
    return tables.instances.filter(pl.col("split") == "train")


# --------------------------------------------------------------------------- pieces


def test_pastes_for_unit_lift_hand_computed():
    # N=100 images, a in 20, b in 20, both in 18; 18 removals. After R removals and P pastes,
    # lift = 18 (118 + P) / (38 (20 + P)): P = 68 leaves 3348/3344 > 1, P = 69 gives 3366/3382 <= 1.
    assert pastes_for_unit_lift(100, 20, 20, 18, 18) == 69
    # Already independent (lift 1 without edits): nothing to paste.
    assert pastes_for_unit_lift(100, 20, 50, 10, 0) == 0
    # Every a-image shows b and nothing is removed: no finite count suffices; all images.
    assert pastes_for_unit_lift(100, 20, 20, 20, 0) == 100


@pytest.mark.parametrize(
    "caption, companion",
    [
        ("A cat sitting on the grass.", "frisbee"),
        ("Two horses in a field", "frisbee"),
        ("A picture of a bicycle and a clock!", "sports ball"),
        ("An umbrella on a sunny beach.  ", "traffic light"),
    ],
)
def test_add_companion_mention_adds_exactly_the_companion(caption, companion):
    for seed in range(6):  # every template the generator can start from
        edited = add_companion_mention(caption, companion, np.random.default_rng(seed))
        assert edited is not None
        assert vocabulary.mentioned_categories(edited) == vocabulary.mentioned_categories(caption) | {companion}
        body = caption.rstrip().rstrip(".!")
        assert edited.startswith(body + " ")
        assert edited.endswith(caption.rstrip()[len(body):])  # closing punctuation kept, at the end
    assert add_companion_mention("...", "frisbee", np.random.default_rng(0)) is None


# --------------------------------------------------------------------------- the build


def test_both_kinds_exist_for_every_pair_with_ids_in_order(built):
    result, _, messages = built
    kinds = result.images.group_by("pair", "kind").len().sort("pair", "kind")
    assert set(kinds.filter(pl.col("kind") == "removal")["pair"]) == {f"{a}->{b}" for a, b in INJECTED_PAIRS}
    assert set(kinds.filter(pl.col("kind") == "paste")["pair"]) == {f"{a}->{b}" for a, b in INJECTED_PAIRS}
    assert result.images["cf_image_id"].to_list() == list(range(1, result.images.height + 1))
    assert result.captions["cf_caption_id"].to_list() == list(range(1, result.captions.height + 1))
    assert result.images.filter(pl.col("kind") == "removal")["donor_image_id"].null_count() == result.images.filter(
        pl.col("kind") == "removal"
    ).height
    assert messages and "rendering" in " ".join(messages)
    for path in result.images["path"]:
        assert Path(path).is_file()


def test_removal_images_differ_from_the_source_only_inside_the_dilated_companion_mask(built, tables):
    result, _, _ = built
    instances = _train_instances(tables)
    removals = result.images.filter(pl.col("kind") == "removal")
    assert removals.height > 10
    for row in removals.iter_rows(named=True):
        source = _rgb(row["source_path"])
        edited = _rgb(row["path"])
        companion = instances.filter(
            (pl.col("image_id") == row["source_image_id"]) & (pl.col("category") == row["companion"])
        )
        union = np.logical_or.reduce([_mask(r, row["height"], row["width"]) for r in companion["rle_counts"]])
        allowed = _dilate(union, DILATION)
        changed = (edited != source).any(axis=-1)
        assert not (changed & ~allowed).any(), f"removal {row['cf_image_id']} changed pixels outside the mask"
        assert changed.any()
        assert row["edited_pixels"] == allowed.sum()


def test_paste_images_differ_only_inside_the_pasted_mask_and_carry_the_donors_pixels(built, tables):
    result, _, _ = built
    instances = _train_instances(tables)
    pastes = result.images.filter(pl.col("kind") == "paste")
    assert pastes.height > 10
    for row in pastes.iter_rows(named=True):
        target = _rgb(row["source_path"])
        edited = _rgb(row["path"])
        pasted = result.objects.filter((pl.col("cf_image_id") == row["cf_image_id"]) & pl.col("pasted"))
        assert pasted.height == 1 and pasted["category"][0] == row["companion"]
        placed = _mask(pasted["rle_counts"][0], row["height"], row["width"])
        changed = (edited != target).any(axis=-1)
        assert not (changed & ~placed).any()
        donor = instances.filter(pl.col("annotation_id") == row["donor_annotation_id"])
        assert donor["image_id"][0] == row["donor_image_id"] and donor["category"][0] == row["companion"]
        cut = _mask(donor["rle_counts"][0], row["height"], row["width"])
        # Same size images: the cut is translated, so raster order matches pixel for pixel.
        np.testing.assert_array_equal(placed.sum(), cut.sum())
        np.testing.assert_array_equal(edited[placed], _rgb(tables.images.filter(
            pl.col("image_id") == row["donor_image_id"])["path"][0])[cut])
        # Pasted off every object of the target (dilated), never on one.
        target_objects = instances.filter(pl.col("image_id") == row["source_image_id"])
        for rle in target_objects["rle_counts"]:
            assert not (placed & _dilate(_mask(rle, row["height"], row["width"]), DILATION)).any()
        assert not {row["anchor"], row["companion"]} & set(target_objects["category"])
        assert row["edited_pixels"] == placed.sum()


def test_captions_drop_b_after_removal_and_gain_it_after_paste(built, tables):
    result, _, _ = built
    captions = result.captions.join(
        result.images.select("cf_image_id", pl.col("kind").alias("image_kind"), "companion", "source_image_id"),
        on="cf_image_id",
    )
    source = tables.captions.filter(pl.col("split") == "train")
    for row in captions.iter_rows(named=True):
        mentioned = vocabulary.mentioned_categories(row["caption"])
        original = source.filter(pl.col("caption_id") == row["source_caption_id"])
        assert original["image_id"][0] == row["source_image_id"] and original["caption"][0] == row["original_caption"]
        if row["image_kind"] == "removal":
            assert row["kind"] in (REMOVAL_EDIT, REMOVAL_KEPT)
            assert row["companion"] not in mentioned and not row["mentions_companion"]
        else:
            assert row["kind"] == PASTE_ADDED
            assert row["companion"] in mentioned and row["mentions_companion"]
    kinds = dict(result.captions.group_by("kind").len().rows())
    assert kinds[REMOVAL_EDIT] > 0 and kinds[REMOVAL_KEPT] > 0 and kinds[PASTE_ADDED] > 0
    kept = result.captions.filter(pl.col("kind") == REMOVAL_KEPT)
    assert (kept["caption"] == kept["original_caption"]).all()
    edits = result.captions.filter(pl.col("kind") == REMOVAL_EDIT)
    assert (edits["caption"] != edits["original_caption"]).all()
    # Every removal image keeps every caption of I that never named b, plus its accepted edits.
    for row in result.images.filter(pl.col("kind") == "removal").head(10).iter_rows(named=True):
        own = source.filter(pl.col("image_id") == row["source_image_id"])
        without_b = [c for c in own["caption"] if row["companion"] not in vocabulary.mentioned_categories(c)]
        got = result.captions.filter((pl.col("cf_image_id") == row["cf_image_id"]) & (pl.col("kind") == REMOVAL_KEPT))
        assert got["caption"].to_list() == without_b
    # Every paste image has each of its target's captions, extended.
    for row in result.images.filter(pl.col("kind") == "paste").head(10).iter_rows(named=True):
        own = source.filter(pl.col("image_id") == row["source_image_id"]).sort("caption_id")
        got = result.captions.filter(pl.col("cf_image_id") == row["cf_image_id"]).sort("source_caption_id")
        assert got["source_caption_id"].to_list() == own["caption_id"].to_list()
        for text, original in zip(got["caption"], own["caption"], strict=True):
            assert text.startswith(original.rstrip(".!? "))


def test_objects_are_the_source_minus_b_or_the_target_plus_b(built, tables):
    result, _, _ = built
    instances = _train_instances(tables)
    for row in result.images.iter_rows(named=True):
        objects = result.objects.filter(pl.col("cf_image_id") == row["cf_image_id"])
        source = instances.filter(pl.col("image_id") == row["source_image_id"])
        if row["kind"] == "removal":
            expected = source.filter(pl.col("category") != row["companion"])
            assert sorted(objects["source_annotation_id"]) == sorted(expected["annotation_id"])
            assert not objects["pasted"].any()
        else:
            copied = objects.filter(~pl.col("pasted"))
            assert sorted(copied["source_annotation_id"]) == sorted(source["annotation_id"])
            assert objects["pasted"].sum() == 1


def _image_sets(frame: pl.DataFrame, key: str) -> dict[str, set]:
    sets: dict[str, set] = {}
    for image, category in frame.select(key, "category").iter_rows():
        sets.setdefault(category, set()).add(image)
    return sets


def test_lift_matches_a_hand_count_and_moves_toward_one(built, tables):
    result, _, _ = built
    instances = _train_instances(tables)
    n = tables.images.filter(pl.col("split") == "train").height
    before = _image_sets(instances, "image_id")
    after = {c: set(s) for c, s in before.items()}
    for category, images in _image_sets(result.objects, "cf_image_id").items():
        after.setdefault(category, set()).update(("cf", i) for i in images)
    n_after = n + result.images.height
    for row in result.lift.iter_rows(named=True):
        a, b = row["anchor"], row["companion"]
        for sets, total, label in ((before, n, "before"), (after, n_after, "after")):
            p = len(sets[a] & sets[b]) / len(sets[a])
            lift = p / (len(sets[b]) / total)
            assert row[f"p_{label}"] == pytest.approx(p)
            assert row[f"lift_{label}"] == pytest.approx(lift)
            assert row[f"n_images_{label}"] == total
        assert row["lift_before"] > 2.0  # the injected shortcut
        assert row["lift_after"] < row["lift_before"]
        assert abs(row["lift_after"] - 1) < abs(row["lift_before"] - 1)
    # No paste target shows both sides of any pair: pasting would copy that pair's co-occurrence.
    pastes = result.images.filter(pl.col("kind") == "paste")
    for cf_image_id in pastes["cf_image_id"]:
        categories = set(result.objects.filter(pl.col("cf_image_id") == cf_image_id)["category"])
        assert not any({a, b} <= categories for a, b in INJECTED_PAIRS)


def test_default_paste_count_brings_a_lone_pair_to_lift_one(tables, tmp_path):
    pair = PAIRS.head(1)
    result = build_train_counterfactuals(_raw(tables), pair, tmp_path, CounterfactualRecipe(OpenCVInpainter(), seed=3))
    row = result.lift.row(0, named=True)
    # The smallest paste count with lift <= 1 (see test_pastes_for_unit_lift_hand_computed):
    # one paste fewer would leave it above 1.
    assert 0.97 < row["lift_after"] <= 1.0
    removals = result.images.filter(pl.col("kind") == "removal").height
    pastes = result.images.filter(pl.col("kind") == "paste").height
    n, n_a, n_ab = row["n_images_before"], row["n_anchor_before"], row["n_both_before"]
    n_b = n_ab * n / (n_a * row["lift_before"])
    assert n_ab * (n + removals + pastes - 1) > (n_a + removals) * (n_b + pastes - 1)


def test_limits_are_respected_and_drawn_by_seed(tables, tmp_path):
    def run(seed: int, name: str):
        recipe = CounterfactualRecipe(OpenCVInpainter(), seed=seed, removal_per_pair=4, paste_per_pair=3)
        return build_train_counterfactuals(_raw(tables), PAIRS.head(1), tmp_path / name, recipe)

    first, again, other = run(1, "a"), run(1, "b"), run(2, "c")
    counts = dict(first.images.group_by("kind").len().rows())
    assert counts == {"removal": 4, "paste": 3}
    assert first.images["source_image_id"].to_list() == again.images["source_image_id"].to_list()
    assert first.captions.equals(again.captions)
    assert first.images["source_image_id"].to_list() != other.images["source_image_id"].to_list()
    assert first.settings["paste_per_pair"] == 3 and first.settings["pastes_made"] == {"dog->frisbee": 3}


def test_large_companions_are_skipped_with_a_reason(tables, tmp_path):
    result = build_train_counterfactuals(
        _raw(tables), PAIRS.head(1), tmp_path,
        CounterfactualRecipe(OpenCVInpainter(), max_companion_fraction=0.001, paste_per_pair=0),
    )
    assert result.images.height == 0
    removal_skips = result.skipped.filter(pl.col("kind") == "removal")
    assert removal_skips.height > 0
    assert removal_skips["reason"].str.contains("max_companion_fraction").all()


def test_two_workers_give_the_same_set_as_one(built, tables, tmp_path):
    result, out_dir, _ = built
    two = build_train_counterfactuals(
        _raw(tables), PAIRS, tmp_path,
        CounterfactualRecipe(InpainterSpec("opencv"), dilation_px=DILATION, seed=3, workers=2),
    )

    def relative(frame: pl.DataFrame, root: Path) -> pl.DataFrame:
        return frame.with_columns(pl.col("path").str.replace(str(root), "", literal=True))

    assert relative(two.images, tmp_path).equals(relative(result.images, out_dir))
    assert two.captions.equals(result.captions)
    assert two.objects.equals(result.objects)
    assert two.lift.equals(result.lift)
    for one_path, two_path in zip(result.images["path"], two.images["path"], strict=True):
        np.testing.assert_array_equal(_rgb(one_path), _rgb(two_path))


def test_missing_columns_are_named(tables, tmp_path):
    with pytest.raises(ValueError, match=r"instances frame lacks column\(s\) \['rle_counts'\]"):
        build_train_counterfactuals(
            SplitTables(tables.images, tables.captions, tables.instances.drop("rle_counts")), PAIRS, tmp_path,
            CounterfactualRecipe(OpenCVInpainter()),
        )


def _hand_tables(root: Path) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """A 40x40 donor (dog + an 8x8 red frisbee) and an 80x80 target (a grey cat), as ingested tables."""
    donor = np.full((40, 40, 3), (60, 150, 60), dtype=np.uint8)
    dog = np.zeros((40, 40), dtype=bool)
    dog[20:34, 4:18] = True
    frisbee = np.zeros((40, 40), dtype=bool)
    frisbee[6:14, 26:34] = True
    donor[dog], donor[frisbee] = (140, 90, 40), (230, 20, 20)
    target = np.full((80, 80, 3), (90, 120, 200), dtype=np.uint8)
    cat = np.zeros((80, 80), dtype=bool)
    cat[50:70, 10:30] = True
    target[cat] = (100, 100, 100)
    Image.fromarray(donor).save(root / "donor.png")
    Image.fromarray(target).save(root / "target.png")
    images = pl.DataFrame(
        {"batch": ["b"] * 2, "split": ["train"] * 2, "image_id": [1, 2],
         "path": [str(root / "donor.png"), str(root / "target.png")], "width": [40, 80], "height": [40, 80]}
    )
    captions = pl.DataFrame(
        {"batch": ["b"] * 2, "split": ["train"] * 2, "caption_id": [11, 21], "image_id": [1, 2],
         "caption": ["A dog with a frisbee.", "A cat in the snow."]}
    )
    rows = []
    for annotation_id, image_id, category, category_id, mask in (
        (101, 1, "dog", 18, dog), (102, 1, "frisbee", 34, frisbee), (201, 2, "cat", 17, cat)
    ):
        rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        x, y, w, h = (float(v) for v in coco_mask.toBbox(rle))
        rows.append(
            {"batch": "b", "split": "train", "annotation_id": annotation_id, "image_id": image_id,
             "category": category, "category_id": category_id, "supercategory": "animal",
             "bbox_x": x, "bbox_y": y, "bbox_w": w, "bbox_h": h, "area": float(mask.sum()), "iscrowd": False,
             "rle_counts": rle["counts"].decode(), "mask_area": int(mask.sum())}
        )
    return images, captions, pl.DataFrame(rows)


def test_a_cut_from_a_smaller_image_is_scaled_to_the_target(tmp_path):
    images, captions, instances = _hand_tables(tmp_path)
    result = build_train_counterfactuals(
        SplitTables(images, captions, instances), PAIRS.head(1), tmp_path / "out",
        CounterfactualRecipe(OpenCVInpainter(), paste_per_pair=1),
    )
    paste = result.images.filter(pl.col("kind") == "paste").row(0, named=True)
    assert (paste["source_image_id"], paste["donor_image_id"], paste["donor_annotation_id"]) == (2, 1, 102)
    pasted = result.objects.filter(pl.col("pasted")).row(0, named=True)
    placed = _mask(pasted["rle_counts"], 80, 80)
    # The target is twice the donor's size: the 8x8 frisbee becomes a 16x16 square.
    rows, cols = np.flatnonzero(placed.any(axis=1)), np.flatnonzero(placed.any(axis=0))
    assert placed.sum() == 256 and rows.size == 16 and cols.size == 16
    assert (pasted["bbox_w"], pasted["bbox_h"], pasted["area"]) == (16.0, 16.0, 256.0)
    assert (pasted["category"], pasted["category_id"]) == ("frisbee", 34)
    edited, target = _rgb(paste["path"]), _rgb(paste["source_path"])
    assert (edited[placed] == (230, 20, 20)).all()
    assert not ((edited != target).any(axis=-1) & ~placed).any()
    cat = _mask(instances["rle_counts"][2], 80, 80)
    assert not (placed & _dilate(cat, DILATION)).any()
    caption = result.captions.filter(pl.col("cf_image_id") == paste["cf_image_id"])["caption"][0]
    assert caption.startswith("A cat in the snow ") and caption.endswith("frisbee.")
