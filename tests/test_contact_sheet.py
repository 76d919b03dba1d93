"""Contact sheet: size, letterboxing, mask outlines where pycocotools puts the masks, captions drawn, only validated records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from spur_assets.core.data.builtin_dataset import BuiltinDatasetSpec, generate_builtin_dataset
from spur_assets.core.data.coco_ingest import load_batch
from spur_assets.core.data.contact_sheet import draw_contact_sheet, sheet_size
from spur_assets.core.data.errors import DatasetError

# pycocotools 2.0.x decodes masks through a numpy-1 idiom that numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

GREY = (128, 128, 128)


def write_dataset(root: Path, first_file_name: str = "wide.png") -> Path:
    """A 40x20 grey image with a polygon square (dog) and an RLE bar (frisbee), plus a bare 20x20 image."""
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (40, 20), GREY).save(root / "images" / "wide.png")
    Image.new("RGB", (20, 20), GREY).save(root / "images" / "bare.png")
    bar = np.zeros((20, 40), dtype=np.uint8)
    bar[6:10, 24:32] = 1  # rows 6..9, columns 24..31
    rle = mask_utils.encode(np.asfortranarray(bar))
    images = [
        {"id": 1, "file_name": first_file_name, "width": 40, "height": 20},
        {"id": 2, "file_name": "bare.png", "width": 20, "height": 20},
    ]
    instances = {
        "images": images,
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 18, "segmentation": [[8, 4, 16, 4, 16, 12, 8, 12]], "area": 64.0, "bbox": [8, 4, 8, 8], "iscrowd": 0},
            {
                "id": 2, "image_id": 1, "category_id": 34, "iscrowd": 0, "area": 32.0, "bbox": [24, 6, 8, 4],
                "segmentation": {"size": [20, 40], "counts": rle["counts"].decode("ascii")},
            },
        ],
        "categories": [{"id": 18, "name": "dog", "supercategory": "animal"}, {"id": 34, "name": "frisbee", "supercategory": "sports"}],
    }
    captions = {
        "images": images,
        "annotations": [
            {"id": 1, "image_id": 1, "caption": "A dog next to a frisbee on a plain grey background, drawn by hand for a test."},
            {"id": 2, "image_id": 1, "caption": "A dog."},
        ],
    }
    (root / "instances.json").write_text(json.dumps(instances))
    (root / "captions.json").write_text(json.dumps(captions))
    manifest = root / "dataset.yaml"
    manifest.write_text("name: handmade\nsplits:\n  test: {images: images, captions: captions.json, instances: instances.json}\n")
    return manifest


def saturated(pixel) -> bool:
    return max(pixel) == 255 and tuple(pixel) != (255, 255, 255)


def test_sheet_size_is_the_documented_grid():
    # 4 columns of 192 px with 8 px gaps; each row: 192 px image + 13 lines of 13 px + 8 px; 24 px title.
    assert sheet_size(6, 4) == (4 * 192 + 5 * 8, 24 + 2 * (192 + 13 * 13 + 8) + 8) == (808, 770)
    assert sheet_size(2, 4) == (408, 401)


def test_outlines_sit_on_the_masks_and_captions_are_written(tmp_path):
    manifest = write_dataset(tmp_path / "data")
    out = draw_contact_sheet(load_batch(manifest, "t"), "test", tmp_path / "sheet.png", n=12, columns=4)
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape == (401, 408, 3)  # two images -> two columns, one row
    # First tile: 40x20 shown as 192x96, centred vertically (48 px white above and below).
    tile = sheet[24 : 24 + 192, 8 : 8 + 192]
    assert tuple(tile[10, 100]) == (255, 255, 255) and tuple(tile[185, 100]) == (255, 255, 255)
    column = tile[:, 68]  # through the square (image columns 8..15 -> tile x 38..76), clear of its label
    assert tuple(column[48 + 38]) == GREY  # inside the square, away from its border
    assert tuple(column[48 + 8]) == GREY and tuple(column[48 + 70]) == GREY  # above and below it
    assert any(saturated(column[y]) for y in range(48 + 18, 48 + 22))  # top edge, image row 4
    assert any(saturated(column[y]) for y in range(48 + 55, 48 + 59))  # bottom edge, image row 11
    bar = tile[:, 140]  # through the RLE bar (image rows 6..9 -> tile y 77..95)
    assert tuple(bar[48 + 38]) == GREY
    assert any(saturated(bar[y]) for y in range(48 + 45, 48 + 49))
    assert tuple(bar[48 + 60]) == GREY
    assert tuple(column[48 + 20]) != tuple(bar[48 + 47])  # one colour per category
    # Captions under the first tile are drawn dark; the second image has none.
    first_text = sheet[24 + 192 + 14 : 24 + 192 + 14 * 5, 8 : 8 + 192]
    second_text = sheet[24 + 192 + 14 : 24 + 192 + 14 * 5, 208 : 208 + 192]
    assert (first_text.max(axis=-1) < 100).sum() > 100
    assert (second_text.max(axis=-1) < 100).sum() == 0


def test_builtin_dataset_sheet_has_the_expected_size(tmp_path):
    manifest = generate_builtin_dataset(tmp_path / "builtin", BuiltinDatasetSpec(n_train=10, n_test=5))
    out = draw_contact_sheet(load_batch(manifest, "b"), "train", tmp_path / "sheet.png", n=6, seed=1)
    assert Image.open(out).size == (808, 770)


def test_a_split_without_images_is_refused(tmp_path):
    tables = load_batch(write_dataset(tmp_path / "data"), "t")
    with pytest.raises(DatasetError, match="no image in split 'train'"):
        draw_contact_sheet(tables, "train", tmp_path / "sheet.png")


@pytest.mark.parametrize("segmentation", [[[8, 4, float("nan"), 4, 16, 12, 8, 12]], [[8, 4, 16, 4], [8, 4, 16, 4, 16, 12, 8, 12]]])
def test_only_validated_records_are_drawn(tmp_path, segmentation):
    # A quarantined polygon with a NaN once drove pycocotools to 21 GB through the raw JSON; a
    # first polygon part of 2 vertices passed validation (skipped there) but was misread as a box.
    manifest = write_dataset(tmp_path / "data")
    instances = json.loads((manifest.parent / "instances.json").read_text())
    instances["annotations"][0]["segmentation"] = segmentation
    (manifest.parent / "instances.json").write_text(json.dumps(instances))
    tables = load_batch(manifest, "t", on_bad_record="quarantine")
    kept = set(tables.instances["annotation_id"].to_list())
    out = draw_contact_sheet(tables, "test", tmp_path / "sheet.png")
    tile = np.asarray(Image.open(out).convert("RGB"))[24 : 24 + 192, 8 : 8 + 192]
    square_edge = [tuple(tile[y, 68]) for y in range(48 + 18, 48 + 22)]
    if 1 in kept:  # the short first part is skipped: the square is drawn from the valid part
        assert tables.quarantine.height == 0 and any(saturated(p) for p in square_edge)
    else:  # the NaN polygon is quarantined and never drawn
        assert tables.quarantine["record"].to_list() == ["1"] and not any(saturated(p) for p in square_edge)
