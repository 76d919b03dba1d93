"""A small COCO-layout dataset for tests, and ways to break it.

``build_coco_fixture(root)`` writes a train and a test split laid out like COCO 2017
(``train2017/``, ``val2017/``, ``annotations/*.json``) and returns its dataset.yaml.
Its content is spelled out below (``FIXTURE_*``), so tests check loaders against
these hand-written values, not against a loader's output. Every mask is a set of
axis-aligned rectangles whose pixel count is written next to it.

``corrupt(manifest, kind)`` damages a built fixture in one way (``CORRUPTIONS``)
and returns a :class:`Corruption` saying which file, record and field an error
must name and which good records a quarantining loader must drop.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

MANIFEST_YAML = """\
name: coco-fixture
splits:
  train: {images: train2017, captions: annotations/captions_train2017.json, instances: annotations/instances_train2017.json}
  test:  {images: val2017,   captions: annotations/captions_val2017.json,   instances: annotations/instances_val2017.json}
"""
SPLIT_FILES = {
    "train": ("train2017", "annotations/captions_train2017.json", "annotations/instances_train2017.json"),
    "test": ("val2017", "annotations/captions_val2017.json", "annotations/instances_val2017.json"),
}


@dataclass(frozen=True)
class FixtureImage:
    image_id: int
    split: str
    file_name: str  # relative to the split's images folder
    width: int
    height: int
    mode: str  # PIL mode the file is written (and reads back) in
    format: str  # "PNG" or "JPEG"


FIXTURE_IMAGES = {
    image.image_id: image
    for image in (
        FixtureImage(9, "train", "000000000009.png", 32, 32, "RGB", "PNG"),
        FixtureImage(25, "train", "000000000025.jpg", 40, 24, "L", "JPEG"),  # grayscale, not square
        FixtureImage(30, "train", "000000000030.png", 20, 16, "RGBA", "PNG"),
        FixtureImage(139, "test", "000000000139.jpg", 48, 32, "RGB", "JPEG"),
        FixtureImage(285, "test", "nested/000000000285.png", 24, 24, "RGB", "PNG"),  # in a subfolder
    )
}

# caption_id -> (image_id, caption). Unicode, quotes, emoji, trailing spaces: kept verbatim.
FIXTURE_CAPTIONS = {
    1001: (9, "A dog catching a frisbee."),
    1002: (9, 'A "happy" dog — with a red frisbee!!'),
    1003: (25, "Un café — près d'une tasse ☕!!"),
    1004: (25, "a black-and-white photo of a dog; (grainy)…  "),
    1005: (30, "🐶 + 🥏 = ❤️"),
    1006: (30, "A cup (half-full?) on a table: 'espresso' \\ backslash\ttab"),
    2001: (139, "Two dogs play with a frisbee in the park."),
    2002: (139, "Ein Hund fängt eine Frisbee – „schön“!"),
    2003: (285, "An empty room with nothing in it."),
    2004: (285, "日本語のキャプション、句読点。"),
}

# category_id -> (name, supercategory); both splits list all four.
FIXTURE_CATEGORIES = {1: ("person", "person"), 18: ("dog", "animal"), 34: ("frisbee", "sports"), 47: ("cup", "kitchen")}


@dataclass(frozen=True)
class FixtureInstance:
    annotation_id: int
    image_id: int
    category_id: int
    encoding: str  # "polygon", "rle_list" (uncompressed) or "rle_string" (compressed)
    rectangles: tuple[tuple[int, int, int, int], ...]  # (x0, y0, x1, y1), pixels x0..x1-1, y0..y1-1
    mask_area: int  # pixel count, by hand: sum of (x1 - x0) * (y1 - y0)
    iscrowd: bool = False


FIXTURE_INSTANCES = {
    instance.annotation_id: instance
    for instance in (
        FixtureInstance(101, 9, 18, "polygon", ((4, 6, 12, 16),), 8 * 10),
        FixtureInstance(102, 9, 34, "polygon", ((20, 20, 24, 24), (26, 2, 30, 5)), 4 * 4 + 4 * 3),  # two parts
        FixtureInstance(103, 25, 18, "rle_list", ((5, 2, 15, 10),), 10 * 8),
        FixtureInstance(104, 25, 1, "rle_string", ((20, 12, 36, 20), (0, 0, 3, 2)), 16 * 8 + 3 * 2, iscrowd=True),
        FixtureInstance(105, 30, 47, "rle_string", ((2, 3, 6, 8),), 4 * 5),
        FixtureInstance(201, 139, 18, "polygon", ((40, 0, 48, 8),), 8 * 8),  # touches the right edge, x == width
        FixtureInstance(202, 139, 34, "polygon", ((2, 2, 6, 4),), 4 * 2),
    )
}


def fixture_ids(split: str) -> tuple[set[int], set[int], set[int]]:
    """Image, caption and annotation ids of one split of the unbroken fixture."""
    images = {i for i, image in FIXTURE_IMAGES.items() if image.split == split}
    captions = {c for c, (image_id, _) in FIXTURE_CAPTIONS.items() if image_id in images}
    instances = {a for a, instance in FIXTURE_INSTANCES.items() if instance.image_id in images}
    return images, captions, instances


def rectangles_mask(rectangles, height: int, width: int) -> np.ndarray:
    """The bool mask of a union of (x0, y0, x1, y1) pixel rectangles."""
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in rectangles:
        mask[y0:y1, x0:x1] = True
    return mask


def column_major_runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts of a mask, by hand: alternating 0/1 runs in column-major order."""
    flat = mask.T.reshape(-1)
    runs, current, length = [], False, 0
    for value in flat:
        if bool(value) == current:
            length += 1
        else:
            runs.append(length)
            current, length = bool(value), 1
    runs.append(length)
    return runs


def _segmentation(instance: FixtureInstance, image: FixtureImage) -> Any:
    if instance.encoding == "polygon":
        # A pixel rectangle x0..x1-1 is the polygon with corners on the pixel edges x0 and x1.
        return [[x0, y0, x1, y0, x1, y1, x0, y1] for x0, y0, x1, y1 in instance.rectangles]
    mask = rectangles_mask(instance.rectangles, image.height, image.width)
    if instance.encoding == "rle_list":
        return {"size": [image.height, image.width], "counts": column_major_runs(mask)}
    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [image.height, image.width], "counts": encoded["counts"].decode("ascii")}


def _bbox(rectangles) -> list[float]:
    x0 = min(r[0] for r in rectangles)
    y0 = min(r[1] for r in rectangles)
    x1 = max(r[2] for r in rectangles)
    y1 = max(r[3] for r in rectangles)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def write_image(path: Path, width: int, height: int, mode: str, image_format: str, seed: int = 0) -> None:
    """A textured image (smooth gradient plus noise) of the given size, mode and format."""
    rng = np.random.default_rng(seed)
    bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    ys, xs = np.mgrid[0:height, 0:width]
    base = (xs * 255 // max(1, width - 1) + ys * 128 // max(1, height - 1)) % 256
    pixels = np.stack([(base + 70 * band) % 256 for band in range(bands)], axis=-1)
    pixels = np.clip(pixels + rng.integers(-12, 13, size=pixels.shape), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        pixels[..., 3] = 128 + (xs % 2) * 127  # a non-trivial alpha channel
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels[..., 0] if bands == 1 else pixels, mode=mode)
    image.save(path, format=image_format, **({"quality": 92} if image_format == "JPEG" else {}))


def _image_record(image: FixtureImage) -> dict:
    # Extra keys as in real COCO; the loader ignores them.
    return {
        "license": 1, "file_name": image.file_name, "coco_url": f"http://example.invalid/{image.file_name}",
        "height": image.height, "width": image.width, "date_captured": "2013-11-14 17:02:52", "id": image.image_id,
    }


def build_coco_fixture(root: Path) -> Path:
    """Write the fixture dataset under ``root`` and return the path of its dataset.yaml."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    categories = [{"supercategory": s, "id": i, "name": n} for i, (n, s) in FIXTURE_CATEGORIES.items()]
    for split, (images_dir, captions_file, instances_file) in SPLIT_FILES.items():
        images = [image for image in FIXTURE_IMAGES.values() if image.split == split]
        for image in images:
            write_image(root / images_dir / image.file_name, image.width, image.height, image.mode, image.format, image.image_id)
        image_ids = {image.image_id for image in images}
        records = [_image_record(image) for image in images]
        captions = [
            {"image_id": image_id, "id": caption_id, "caption": text}
            for caption_id, (image_id, text) in FIXTURE_CAPTIONS.items()
            if image_id in image_ids
        ]
        instances = []
        for instance in FIXTURE_INSTANCES.values():
            if instance.image_id not in image_ids:
                continue
            image = FIXTURE_IMAGES[instance.image_id]
            instances.append(
                {
                    "segmentation": _segmentation(instance, image),
                    "area": float(instance.mask_area),
                    "iscrowd": int(instance.iscrowd),
                    "image_id": instance.image_id,
                    "bbox": _bbox(instance.rectangles),
                    "category_id": instance.category_id,
                    "id": instance.annotation_id,
                }
            )
        info = {"description": "spur-assets test fixture", "version": "1.0"}
        _write_json(root / captions_file, {"info": info, "images": records, "annotations": captions})
        _write_json(root / instances_file, {"info": info, "images": records, "annotations": instances, "categories": categories})
    manifest = root / "dataset.yaml"
    manifest.write_text(MANIFEST_YAML, encoding="utf-8")
    return manifest


def build_bulk_coco_fixture(root: Path, n_images: int, width: int = 640, height: int = 480) -> Path:
    """A train-only batch of ``n_images`` COCO-sized JPEGs (one caption and one box-shaped mask each), for timing."""
    root = Path(root)
    records, captions, instances = [], [], []
    for image_id in range(1, n_images + 1):
        file_name = f"{image_id:012d}.jpg"
        write_image(root / "train2017" / file_name, width, height, "RGB", "JPEG", seed=image_id)
        records.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        captions.append({"id": image_id, "image_id": image_id, "caption": f"A dog and a frisbee, picture {image_id}."})
        x0, y0 = image_id % (width // 2), image_id % (height // 2)
        instances.append(
            {
                "id": image_id, "image_id": image_id, "category_id": 18, "iscrowd": 0, "area": 100.0 * 80.0,
                "bbox": [x0, y0, 100.0, 80.0], "segmentation": [[x0, y0, x0 + 100, y0, x0 + 100, y0 + 80, x0, y0 + 80]],
            }
        )
    _write_json(root / "annotations/captions_train2017.json", {"images": records, "annotations": captions})
    _write_json(
        root / "annotations/instances_train2017.json",
        {"images": records, "annotations": instances, "categories": [{"id": 18, "name": "dog", "supercategory": "animal"}]},
    )
    manifest = root / "dataset.yaml"
    manifest.write_text(
        "name: bulk\nsplits:\n  train: {images: train2017, captions: annotations/captions_train2017.json, "
        "instances: annotations/instances_train2017.json}\n",
        encoding="utf-8",
    )
    return manifest


# --------------------------------------------------------------------------- corruptions


@dataclass(frozen=True)
class Corruption:
    """What one corruption broke: where an error must point, and what quarantine mode must drop."""

    kind: str
    split: str
    file: Path  # the file a DatasetError must name (absolute, resolved)
    record: int | str | None  # the record id it must name (None: file-level)
    field: str | None  # a substring of the field it must name
    lost_images: frozenset[int] = frozenset()  # good fixture records a quarantining loader drops
    lost_captions: frozenset[int] = frozenset()
    lost_instances: frozenset[int] = frozenset()
    quarantine_rows: int = 1  # rows quarantine mode reports; 0 for file-level faults (which always raise)


def _write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, ensure_ascii=False, indent=1), encoding="utf-8")


def _edit_json(path: Path, edit) -> None:
    document = json.loads(path.read_text(encoding="utf-8"))
    edit(document)
    _write_json(path, document)


def _by_id(records: list[dict], record_id: int) -> dict:
    return next(record for record in records if record["id"] == record_id)


def _dependents(image_id: int) -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
    captions = frozenset(c for c, (i, _) in FIXTURE_CAPTIONS.items() if i == image_id)
    instances = frozenset(a for a, instance in FIXTURE_INSTANCES.items() if instance.image_id == image_id)
    return frozenset({image_id}), captions, instances


def _image_lost(kind: str, image_id: int, file: Path, field: str) -> Corruption:
    images, captions, instances = _dependents(image_id)
    split = FIXTURE_IMAGES[image_id].split
    return Corruption(kind, split, file, image_id, field, images, captions, instances)


def _outside_image(root: Path, like: FixtureImage) -> Path:
    """A valid image file beside (outside) the images folders: reading it would succeed."""
    outside = root / "outside.png"
    write_image(outside, like.width, like.height, like.mode, "PNG", seed=7)
    return outside


def corrupt(manifest: Path, kind: str) -> Corruption:
    """Damage the fixture behind ``manifest`` (built by build_coco_fixture) in the way ``kind`` names."""
    root = Path(manifest).resolve().parent
    paths = {
        split: (root / images_dir, root / captions, root / instances)
        for split, (images_dir, captions, instances) in SPLIT_FILES.items()
    }
    train_images, train_captions, train_instances = paths["train"]
    test_images, test_captions, test_instances = paths["test"]

    def image_path(image_id: int) -> Path:
        image = FIXTURE_IMAGES[image_id]
        return paths[image.split][0] / image.file_name

    def set_file_name(image_id: int, file_name: str) -> None:
        _, captions_json, instances_json = paths[FIXTURE_IMAGES[image_id].split]
        for path in (captions_json, instances_json):  # both files must agree, or that is the fault found
            _edit_json(path, lambda d: _by_id(d["images"], image_id).update(file_name=file_name))

    if kind == "malformed_json":
        text = train_captions.read_text(encoding="utf-8")
        train_captions.write_text(text.replace('"annotations": [', '"annotations": [,', 1), encoding="utf-8")
        return Corruption(kind, "train", train_captions, None, None, quarantine_rows=0)
    if kind == "missing_image":
        image_path(30).unlink()
        return _image_lost(kind, 30, train_captions, "file_name")
    if kind == "truncated_image":
        data = image_path(9).read_bytes()
        image_path(9).write_bytes(data[: len(data) // 2])
        return _image_lost(kind, 9, image_path(9), "pixels")
    if kind == "undecodable_image":
        image_path(285).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
        return _image_lost(kind, 285, image_path(285), "pixels")
    if kind == "size_mismatch":
        image = FIXTURE_IMAGES[25]
        write_image(image_path(25), image.width + 1, image.height, image.mode, image.format)
        return _image_lost(kind, 25, image_path(25), "width")
    if kind == "duplicate_image_id":
        _edit_json(train_instances, lambda d: d["images"].append(dict(_by_id(d["images"], 25))))
        return _image_lost(kind, 25, train_instances, "id")
    if kind == "wrong_type":
        _edit_json(test_instances, lambda d: _by_id(d["images"], 139).update(width="48"))
        return _image_lost(kind, 139, test_instances, "width")
    if kind == "images_disagree":
        _edit_json(test_instances, lambda d: _by_id(d["images"], 139).update(file_name="000000000140.jpg"))
        return _image_lost(kind, 139, test_instances, "file_name")
    if kind == "path_traversal":
        _outside_image(root, FIXTURE_IMAGES[30])
        set_file_name(30, "../outside.png")
        return _image_lost(kind, 30, train_captions, "file_name")
    if kind == "absolute_path":
        outside = _outside_image(root, FIXTURE_IMAGES[30])
        set_file_name(30, str(outside))
        return _image_lost(kind, 30, train_captions, "file_name")
    if kind == "symlink_out":
        outside = _outside_image(root, FIXTURE_IMAGES[30])
        image_path(30).unlink()
        image_path(30).symlink_to(outside)
        return _image_lost(kind, 30, train_captions, "file_name")
    if kind == "caption_unknown_image":
        _edit_json(train_captions, lambda d: d["annotations"].append({"id": 1099, "image_id": 999, "caption": "A ghost."}))
        return Corruption(kind, "train", train_captions, 1099, "image_id")
    if kind == "duplicate_caption_id":
        _edit_json(train_captions, lambda d: _by_id(d["annotations"], 1004).update(id=1003))
        return Corruption(kind, "train", train_captions, 1003, "id", lost_captions=frozenset({1003, 1004}))
    if kind == "missing_key":
        _edit_json(test_captions, lambda d: _by_id(d["annotations"], 2001).pop("caption"))
        return Corruption(kind, "test", test_captions, 2001, "caption", lost_captions=frozenset({2001}))
    if kind == "instance_unknown_image":
        def add(document: dict) -> None:
            ghost = dict(_by_id(document["annotations"], 101), id=199, image_id=999)
            document["annotations"].append(ghost)
        _edit_json(train_instances, add)
        return Corruption(kind, "train", train_instances, 199, "image_id")
    if kind == "instance_unknown_category":
        _edit_json(train_instances, lambda d: _by_id(d["annotations"], 105).update(category_id=77))
        return Corruption(kind, "train", train_instances, 105, "category_id", lost_instances=frozenset({105}))
    if kind == "duplicate_annotation_id":
        _edit_json(train_instances, lambda d: _by_id(d["annotations"], 102).update(id=101))
        return Corruption(kind, "train", train_instances, 101, "id", lost_instances=frozenset({101, 102}))
    if kind == "segmentation_out_of_bounds":
        # Image 9 is 32 px wide; x = 40 lies 8 px past its right edge (tolerance: 1 px).
        _edit_json(
            train_instances,
            lambda d: _by_id(d["annotations"], 101).update(segmentation=[[4, 6, 40, 6, 40, 16, 4, 16]]),
        )
        return Corruption(kind, "train", train_instances, 101, "segmentation", lost_instances=frozenset({101}))
    if kind == "rle_size_mismatch":
        _edit_json(train_instances, lambda d: _by_id(d["annotations"], 104)["segmentation"].update(size=[24, 41]))
        return Corruption(kind, "train", train_instances, 104, "segmentation.size", lost_instances=frozenset({104}))
    if kind == "malformed_rle":
        _edit_json(train_instances, lambda d: _by_id(d["annotations"], 105)["segmentation"].update(counts="\x7f~~"))
        return Corruption(kind, "train", train_instances, 105, "segmentation.counts", lost_instances=frozenset({105}))
    if kind == "empty_mask":
        image = FIXTURE_IMAGES[30]
        empty = {"size": [image.height, image.width], "counts": [image.height * image.width]}
        _edit_json(train_instances, lambda d: _by_id(d["annotations"], 105).update(segmentation=empty))
        return Corruption(kind, "train", train_instances, 105, "segmentation", lost_instances=frozenset({105}))
    if kind == "image_in_both_splits":
        # Test image 285 relabelled as 30, an id the train split already uses.
        def relabel(document: dict) -> None:
            _by_id(document["images"], 285)["id"] = 30
            for record in document["annotations"]:
                if record["image_id"] == 285:
                    record["image_id"] = 30
        _edit_json(test_captions, relabel)
        _edit_json(test_instances, relabel)
        images, captions, instances = _dependents(30)
        _, test_captions_lost, _ = _dependents(285)
        return Corruption(
            kind, "train", train_captions, 30, "images.id", images | {285}, captions | test_captions_lost, instances,
            quarantine_rows=2,  # one per split: the id is ambiguous in both
        )
    if kind == "category_conflict":
        _edit_json(test_instances, lambda d: _by_id(d["categories"], 47).update(name="mug"))
        return Corruption(kind, "test", test_instances, 47, "categories.name", lost_instances=frozenset({105}))
    raise ValueError(f"unknown corruption {kind!r}; choose one of {CORRUPTIONS}")


CORRUPTIONS = (
    "malformed_json",
    "missing_image",
    "truncated_image",
    "undecodable_image",
    "size_mismatch",
    "duplicate_image_id",
    "images_disagree",
    "wrong_type",
    "path_traversal",
    "absolute_path",
    "symlink_out",
    "caption_unknown_image",
    "duplicate_caption_id",
    "missing_key",
    "instance_unknown_image",
    "instance_unknown_category",
    "duplicate_annotation_id",
    "segmentation_out_of_bounds",
    "rle_size_mismatch",
    "malformed_rle",
    "empty_mask",
    "image_in_both_splits",
    "category_conflict",
)


def copy_fixture(source_manifest: Path, target_root: Path) -> Path:
    """Copy a built fixture (symlinks as links) and return the copy's dataset.yaml; cheaper than rebuilding."""
    shutil.copytree(Path(source_manifest).parent, target_root, symlinks=True)
    return Path(target_root) / "dataset.yaml"
