"""The built-in dataset: deterministic COCO-layout files, exact masks, injected pairs, COCO-like captions."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools.coco import COCO

from spur_assets.core.data import builtin_dataset
from spur_assets.core.data.builtin_dataset import (
    BUILTIN_CATEGORIES,
    INJECTED_PAIRS,
    BuiltinDatasetSpec,
    generate_builtin_dataset,
    intended_mentions,
    render_background,
)
from spur_assets.core.data.vocabulary import find_mentions, mentioned_categories

# pycocotools 2.0.x decodes masks through a numpy-1 idiom that numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SPEC = BuiltinDatasetSpec(seed=3, n_train=60, n_test=20)
SPLIT_FILES = {"train": ("train2017", "train2017"), "test": ("val2017", "val2017")}

# Official COCO-2017 ids, written out by hand from the COCO annotation files.
COCO_IDS_BY_HAND = {"dog": 18, "frisbee": 34, "car": 3, "traffic light": 10, "tennis racket": 43, "sports ball": 37, "cat": 17}


def load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_builtin_dataset(tmp_path_factory.mktemp("builtin") / "data", SPEC)


@pytest.fixture(scope="module")
def instances(dataset) -> dict[str, COCO]:
    return {s: load_coco(dataset.parent / "annotations" / f"instances_{f}.json") for s, (_, f) in SPLIT_FILES.items()}


@pytest.fixture(scope="module")
def captions(dataset) -> dict[str, COCO]:
    return {s: load_coco(dataset.parent / "annotations" / f"captions_{f}.json") for s, (_, f) in SPLIT_FILES.items()}


def category_id(coco: COCO, name: str) -> int:
    (cid,) = coco.getCatIds(catNms=[name])
    return cid


def images_with(coco: COCO, name: str) -> set[int]:
    return set(coco.getImgIds(catIds=[category_id(coco, name)]))


def test_manifest_and_layout_follow_the_design(dataset):
    root = dataset.parent
    assert yaml.safe_load(dataset.read_text()) == {
        "name": "builtin",
        "splits": {
            "train": {"images": "train2017", "captions": "annotations/captions_train2017.json", "instances": "annotations/instances_train2017.json"},
            "test": {"images": "val2017", "captions": "annotations/captions_val2017.json", "instances": "annotations/instances_val2017.json"},
        },
    }
    assert len(list((root / "train2017").glob("*.png"))) == 60
    assert len(list((root / "val2017").glob("*.png"))) == 20
    assert json.loads((root / "spec.json").read_text())["seed"] == 3
    # Nothing but the dataset is left beside it (no staging folders).
    assert [p.name for p in root.parent.iterdir()] == ["data"]


def test_categories_carry_coco_ids_and_supercategories(instances):
    categories = {c["name"]: c for c in instances["train"].loadCats(instances["train"].getCatIds())}
    assert len(BUILTIN_CATEGORIES) >= 12 and set(categories) == set(BUILTIN_CATEGORIES)
    for name, cid in COCO_IDS_BY_HAND.items():
        assert categories[name]["id"] == cid
    assert categories["dog"]["supercategory"] == "animal"
    assert categories["frisbee"]["supercategory"] == "sports"
    assert categories["clock"]["supercategory"] == "indoor"
    # Every category is actually drawn somewhere in the train split.
    assert all(instances["train"].getImgIds(catIds=[c["id"]]) for c in categories.values())


def test_same_seed_gives_identical_files_also_with_a_process_pool(dataset, tmp_path):
    again = generate_builtin_dataset(tmp_path / "again", SPEC, workers=2)
    assert digests(again.parent) == digests(dataset.parent)
    other = generate_builtin_dataset(tmp_path / "other", BuiltinDatasetSpec(seed=4, n_train=60, n_test=20))
    theirs, ours = digests(other.parent), digests(dataset.parent)
    assert theirs.keys() == ours.keys()
    changed = [name for name in ours if theirs[name] != ours[name]]
    assert "annotations/instances_train2017.json" in changed
    assert sum(name.endswith(".png") for name in changed) >= 75  # nearly every image differs


def test_injected_pairs_are_frequent_in_train_and_rarer_in_test(instances):
    assert len(INJECTED_PAIRS) >= 3
    for anchor, companion in INJECTED_PAIRS:
        train, test = instances["train"], instances["test"]
        with_anchor, with_companion = images_with(train, anchor), images_with(train, companion)
        assert len(with_anchor) >= 8
        assert len(with_anchor & with_companion) / len(with_anchor) >= 0.85
        without_anchor = set(train.getImgIds()) - with_anchor
        assert len(with_companion - with_anchor) / len(without_anchor) <= 0.05
        test_anchor, test_companion = images_with(test, anchor), images_with(test, companion)
        assert 0.3 <= len(test_anchor & test_companion) / len(test_anchor) <= 0.75
        assert test_anchor - test_companion, f"{anchor}: test needs anchor-only images for the reference rate"
        assert set(test.getImgIds()) - test_anchor - test_companion, "test needs images with neither"


def test_companions_are_small_next_to_their_anchor(instances):
    for split, coco in instances.items():
        image_area = SPEC.image_size**2
        for anchor, companion in INJECTED_PAIRS:
            for image_id in images_with(coco, anchor) & images_with(coco, companion):
                anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
                anchor_area = sum(coco.annToMask(a).sum() for a in anns if a["category_id"] == category_id(coco, anchor))
                companion_mask = sum(coco.annToMask(a) for a in anns if a["category_id"] == category_id(coco, companion))
                assert companion_mask.sum() <= 0.25 * anchor_area, (split, image_id, anchor)
                assert companion_mask.sum() <= 0.25 * image_area


def test_masks_are_exactly_the_painted_pixels(dataset, instances):
    kinds = set()
    for split, coco in instances.items():
        images_dir = dataset.parent / SPLIT_FILES[split][0]
        for index, image_id in enumerate(sorted(coco.getImgIds())):
            info = coco.imgs[image_id]
            pixels = np.asarray(Image.open(images_dir / info["file_name"]).convert("RGB"))
            assert pixels.shape == (info["height"], info["width"], 3) == (64, 64, 3)
            cover = np.zeros(pixels.shape[:2], dtype=int)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
            assert len(anns) >= 1 and len(anns) <= SPEC.max_objects
            for ann in anns:
                mask = coco.annToMask(ann).astype(bool)
                kinds.add("polygon" if isinstance(ann["segmentation"], list) else "rle")
                rows, cols = np.nonzero(mask)
                assert ann["area"] == mask.sum() > 0
                assert ann["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
                assert ann["iscrowd"] == 0
                cover += mask
            assert cover.max() == 1, f"{split} image {image_id}: masks overlap"
            changed = (pixels != render_background(SPEC, split, index)).any(axis=-1)
            assert np.array_equal(changed, cover == 1), f"{split} image {image_id}: masks differ from painted pixels"
    assert kinds == {"polygon", "rle"}


def test_rle_counts_are_strings_that_pycocotools_decodes(instances):
    rles = [a for a in instances["train"].loadAnns(instances["train"].getAnnIds()) if isinstance(a["segmentation"], dict)]
    assert rles and all(isinstance(a["segmentation"]["counts"], str) for a in rles)
    assert all(a["segmentation"]["size"] == [64, 64] for a in rles)


def test_captions_are_coco_like_and_only_mention_what_is_drawn(instances, captions):
    all_texts = []
    for split, coco in captions.items():
        inst = instances[split]
        anns = coco.loadAnns(coco.getAnnIds())
        assert len({a["id"] for a in anns}) == len(anns)
        for index, image_id in enumerate(sorted(coco.getImgIds())):
            texts = [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))]
            assert len(texts) == 5
            drawn = {inst.cats[a["category_id"]]["name"] for a in inst.loadAnns(inst.getAnnIds(imgIds=[image_id]))}
            mentioned = [mentioned_categories(t) for t in texts]
            assert all(m and m <= drawn for m in mentioned), (split, image_id, texts, drawn)
            assert mentioned == intended_mentions(SPEC, split, index)
            all_texts += texts
    train_caps, train_inst = captions["train"], instances["train"]
    for anchor, companion in INJECTED_PAIRS:
        both = images_with(train_inst, anchor) & images_with(train_inst, companion)
        texts = [a["caption"] for a in train_caps.loadAnns(train_caps.getAnnIds(imgIds=list(both)))]
        anchor_share = np.mean([anchor in mentioned_categories(t) for t in texts])
        companion_share = np.mean([companion in mentioned_categories(t) for t in texts])
        assert anchor_share >= 0.8, anchor
        assert 0.35 <= companion_share <= 0.65, companion
    mentions = [m for t in all_texts for m in find_mentions(t)]
    assert any(m.plural for m in mentions), "some captions count objects in the plural"
    assert {m.text.lower() for m in mentions if m.category == "dog"} - {"dog"}, "dog synonyms are used"
    assert len(set(all_texts)) >= 0.8 * len(all_texts)
    assert all(t[0].isupper() and 3 <= len(t.split()) <= 25 for t in all_texts)


def test_companion_phrases_can_be_dropped_whole(captions):
    # Each companion mention sits in a short attachable phrase right after its anchor:
    # "<anchor words> [participle] <link> a [adjective] <companion>".
    links = ("with", "and", "next to", "near", "beside", "holding", "catching", "playing with", "stopped at", "waiting at")
    for anchor, companion in INJECTED_PAIRS:
        for ann in captions["train"].loadAnns(captions["train"].getAnnIds()):
            text = ann["caption"]
            found = [m for m in find_mentions(text) if m.category == companion]
            if not found or anchor not in mentioned_categories(text):
                continue
            before = text[: found[0].start].rstrip().split()
            article_at = max(i for i, w in enumerate(before) if w in ("a", "an"))
            link = " ".join(before[max(0, article_at - 2) : article_at])
            assert link.endswith(links), text


def test_generation_is_idempotent_and_replaces_a_stale_dataset(tmp_path):
    small = BuiltinDatasetSpec(seed=1, n_train=6, n_test=4)
    manifest = generate_builtin_dataset(tmp_path / "data", small)
    stamp = (tmp_path / "data" / "annotations" / "instances_train2017.json").stat().st_mtime_ns
    assert generate_builtin_dataset(tmp_path / "data", small) == manifest
    assert (tmp_path / "data" / "annotations" / "instances_train2017.json").stat().st_mtime_ns == stamp
    bigger = BuiltinDatasetSpec(seed=1, n_train=8, n_test=4)
    generate_builtin_dataset(tmp_path / "data", bigger)
    assert len(list((tmp_path / "data" / "train2017").iterdir())) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_crash_leaves_nothing_half_written(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(builtin_dataset, "_render_images", broken)
    with pytest.raises(OSError, match="disk full"):
        generate_builtin_dataset(tmp_path / "data", BuiltinDatasetSpec(n_train=4, n_test=2))
    assert list(tmp_path.iterdir()) == []


def test_a_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no spec.json"):
        generate_builtin_dataset(tmp_path / "data", BuiltinDatasetSpec(n_train=4, n_test=2))
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "bad",
    [{"n_train": 0}, {"image_size": 16}, {"pair_rate_train": 1.5}, {"max_objects": 1}, {"companion_opacity": 0.0}, {"anchor_rate": 0.9}],
)
def test_impossible_specs_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        BuiltinDatasetSpec(**bad)


def test_faint_companions_still_differ_from_the_background(tmp_path):
    spec = BuiltinDatasetSpec(seed=5, n_train=12, n_test=4, companion_opacity=0.3)
    manifest = generate_builtin_dataset(tmp_path / "faint", spec)
    coco = load_coco(manifest.parent / "annotations" / "instances_train2017.json")
    for index, image_id in enumerate(sorted(coco.getImgIds())):
        pixels = np.asarray(Image.open(manifest.parent / "train2017" / coco.imgs[image_id]["file_name"]).convert("RGB"))
        cover = sum(coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])))
        changed = (pixels != render_background(spec, "train", index)).any(axis=-1)
        assert np.array_equal(changed, cover == 1)
