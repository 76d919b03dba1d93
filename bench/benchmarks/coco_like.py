"""COCO-like synthetic inputs for the benchmarks: 640x480 photo-like scenes with instance masks.

Nothing here is a dataset the project ships: it only gives benchmarks inputs with COCO's
sizes (640x480 JPEGs, a few instances per image covering 0.4-12% of it each, compressed
RLE masks as `coco_ingest` stores them) without downloading COCO.

`write_coco_batch` goes further: a whole COCO 2017-layout batch (JPEGs, captions and
instances JSON, dataset.yaml) with the built-in dataset's objects, injected pairs and
captions, for real-size runs of the pipeline (see bench/benchmarks/real_size_inputs.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
import polars as pl
from PIL import Image
from pycocotools import mask as coco_mask

from spur_assets.core.data import builtin_dataset as builtin
from spur_assets.core.data.vocabulary import COCO_CATEGORY_IDS, COCO_SUPERCATEGORIES

HEIGHT, WIDTH = 480, 640
# (anchor, companion) pairs named after COCO classes; the companion is the small object.
PAIRS = (("dog", "frisbee"), ("tennis racket", "sports ball"), ("car", "traffic light"))
DISTRACTORS = ("person", "bench", "chair", "potted plant", "bicycle", "umbrella")


@dataclass(frozen=True)
class Instance:
    category: str
    mask: np.ndarray  # bool HxW


def smooth_background(rng: np.random.Generator, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """A photo-like background: a low-frequency colour field plus fine texture noise, uint8 HxWx3."""
    coarse = rng.uniform(40, 215, size=(6, 8, 3)).astype(np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    texture = cv2.GaussianBlur(rng.normal(0, 10, size=(height, width, 3)).astype(np.float32), (0, 0), 1.2)
    return np.clip(field + texture, 0, 255).astype(np.uint8)


def blob_mask(rng: np.random.Generator, area_fraction: float, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """A star-convex polygon covering about `area_fraction` of the image, at a random place (bool HxW)."""
    radius = np.sqrt(area_fraction * height * width / np.pi)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 14))
    radii = radius * rng.uniform(0.7, 1.25, angles.size)
    cy = rng.uniform(radius, height - radius) if height > 2 * radius else height / 2
    cx = rng.uniform(radius, width - radius) if width > 2 * radius else width / 2
    points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1).round().astype(np.int32)
    canvas = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(canvas, [points], 1)
    return canvas.astype(bool)


def coco_like_scene(rng: np.random.Generator, anchor: str, companion: str, height: int = HEIGHT, width: int = WIDTH) -> tuple[np.ndarray, list[Instance]]:
    """One scene showing `anchor` (5-12% of the image), `companion` (0.4-3%) and 1-3 distractors (1-8%)."""
    image = smooth_background(rng, height, width)
    instances = [Instance(anchor, blob_mask(rng, rng.uniform(0.05, 0.12), height, width))]
    instances.append(Instance(companion, blob_mask(rng, np.exp(rng.uniform(np.log(0.004), np.log(0.03))), height, width)))
    for name in rng.choice(DISTRACTORS, size=int(rng.integers(1, 4)), replace=False):
        instances.append(Instance(str(name), blob_mask(rng, rng.uniform(0.01, 0.08), height, width)))
    for instance in instances:
        colour = rng.uniform(0, 255, 3)
        shade = np.linspace(0.75, 1.15, height, dtype=np.float32)[:, None, None]  # top-to-bottom shading
        painted = np.clip(np.broadcast_to(colour[None, None, :] * shade, (height, width, 3)), 0, 255).astype(np.uint8)
        image[instance.mask] = painted[instance.mask]
    return image, instances


def companion_removal_mask(instances: list[Instance], companion: str) -> np.ndarray:
    """Union of the companion's instance masks (what a counterfactual inpaints, before dilation)."""
    union = np.zeros(instances[0].mask.shape, dtype=bool)
    for instance in instances:
        if instance.category == companion:
            union |= instance.mask
    return union


def rle_counts(mask: np.ndarray) -> str:
    """Compressed COCO RLE string of a bool mask, the `rle_counts` column of raw_instances."""
    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return encoded["counts"].decode("ascii")


def write_eval_tables(out_dir: Path, n_images: int, seed: int = 0, height: int = HEIGHT, width: int = WIDTH) -> dict[str, pl.DataFrame]:
    """JPEG scenes under out_dir plus the images/captions/instances/pairs frames build_eval_counterfactuals reads.

    build_eval_counterfactuals takes the first three as a ``SplitTables``.

    Every image is a test image showing one of PAIRS (round robin) and gets 5 captions,
    two of which name the companion. Returns {"images", "captions", "instances", "pairs"}.
    """
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, captions, instances = [], [], []
    for image_id in range(n_images):
        anchor, companion = PAIRS[image_id % len(PAIRS)]
        pixels, objects = coco_like_scene(rng, anchor, companion, height, width)
        path = out_dir / f"{image_id:06d}.jpg"
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        images.append({"batch": "bench", "split": "test", "image_id": image_id, "path": str(path), "width": width, "height": height})
        texts = [
            f"A {anchor} with a {companion} on the grass.",
            f"A {anchor} next to a {companion}.",
            f"A {anchor} standing outside.",
            f"A picture of a {anchor} near a {objects[-1].category}.",
            f"There is a {anchor} in this photo.",
        ]
        for text in texts:
            captions.append({"batch": "bench", "split": "test", "caption_id": len(captions), "image_id": image_id, "caption": text})
        for instance in objects:
            instances.append({
                "batch": "bench", "split": "test", "annotation_id": len(instances), "image_id": image_id,
                "category": instance.category, "rle_counts": rle_counts(instance.mask),
            })
    pairs = pl.DataFrame({"anchor": [a for a, _ in PAIRS], "companion": [b for _, b in PAIRS]})
    return {"images": pl.DataFrame(images), "captions": pl.DataFrame(captions), "instances": pl.DataFrame(instances), "pairs": pairs}


def write_jpegs(out_dir: Path, n_images: int, seed: int = 0, height: int = HEIGHT, width: int = WIDTH) -> list[str]:
    """n_images COCO-like 640x480 JPEG scenes (quality 90) under out_dir; their paths."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(n_images):
        anchor, companion = PAIRS[index % len(PAIRS)]
        pixels, _ = coco_like_scene(rng, anchor, companion, height, width)
        path = out_dir / f"{index:06d}.jpg"
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        paths.append(str(path))
    return paths


# --------------------------------------------------------------------------- a COCO 2017-layout batch
#
# write_coco_batch draws the built-in dataset's objects (spur_assets.core.data.builtin_dataset:
# the same categories, drawings, scene plan with exact injected rates, and COCO-like
# captions) onto 640x480 photo-like scenes and writes them the way COCO 2017 ships:
# JPEGs named by 12-digit image id, captions/instances JSON with official category ids,
# polygons for most instances, uncompressed RLE for crowd regions.

BATCH_NAME = "coco-like"
BATCH_PORTRAIT_RATE = 0.04  # share of images that are 480x640 (portrait), as in COCO
BATCH_GRAYSCALE_RATE = 0.03  # share of images saved as grayscale JPEGs, as in COCO (~1-2%)
BATCH_CROWD_RATE = 0.3  # share of repeated-distractor groups annotated as one iscrowd=1 region
BATCH_JPEG_QUALITY = 90
# Mask area as a share of the image: (low, high, log-uniform?) per role.
_BATCH_AREA = {"anchor": (0.05, 0.12, False), "companion": (0.004, 0.03, True), "other": (0.01, 0.08, False)}
# A contour polygon that rasterises this far from the drawn mask (thin strokes, holes) is
# stored as RLE instead, so every annotation stays exactly the painted pixels.
_MIN_POLYGON_IOU = 0.85
# Adjectives that would be untrue of a grayscale photo.
_HUE_WORDS = frozenset({"brown", "golden", "ginger", "blue", "red", "yellow", "pink", "purple", "green", "colorful", "silver"})
_BATCH_CHUNK = 25  # images per pool task
_BATCH_MANIFEST = """\
name: {name}
splits:
  train: {{images: train2017, captions: annotations/captions_train2017.json, instances: annotations/instances_train2017.json}}
  test:  {{images: val2017,   captions: annotations/captions_val2017.json,   instances: annotations/instances_val2017.json}}
"""


def coco_batch_spec(n_train: int, n_test: int, seed: int = 0) -> builtin.BuiltinDatasetSpec:
    """The scene plan and caption rates of `write_coco_batch` (a BuiltinDatasetSpec; image_size unused).

    Each anchor is in 20% of the images; P(companion | anchor) is 0.9 in train and 0.5 in
    test; 5% of the images without the anchor show its companion alone (train lift ~4);
    up to 6 objects per image; 5 captions, about half of them naming a present companion.
    """
    return builtin.BuiltinDatasetSpec(
        seed=seed, n_train=n_train, n_test=n_test, image_size=WIDTH, captions_per_image=5,
        pair_rate_train=0.9, pair_rate_test=0.5, anchor_rate=0.2, lone_companion_rate=0.05, max_objects=6,
    )


def _role(category: str) -> str:
    """Which size range a category is drawn at: companions are small even when alone."""
    if category in builtin._ANCHORS:
        return "anchor"
    return "companion" if category in builtin._COMPANIONS else "other"


_FILL: dict[str, float] = {}


def _fill_ratio(category: str) -> float:
    """Mask area / box area of a category's drawing (measured once per process, seed 0)."""
    if category not in _FILL:
        look = builtin._LOOKS[category]
        w, h = (160.0, 160.0 / look.aspect) if look.aspect >= 1 else (160.0 * look.aspect, 160.0)
        canvas = builtin._Canvas(int(math.ceil(max(w, h))) + 3, builtin._Box(1.0, 1.0, w, h, False))
        drawn = look.draw(canvas, np.random.default_rng(0))
        _FILL[category] = float(drawn.mask.sum()) / (w * h)
    return _FILL[category]


def _place_rect(
    rng: np.random.Generator, height: int, width: int, w: float, h: float, flip: bool, taken: list, near, tries: int = 60
):
    """An integer-offset box w x h inside the image (1 px margin), clear of `taken`; beside `near` first."""
    gap = 3.0
    for attempt in range(tries):
        if near is not None and attempt < tries // 2:
            lo_x, hi_x = near.x0 - w - 4 * gap, near.x0 + near.w + 4 * gap
            lo_y, hi_y = near.y0 + 0.2 * near.h - h, near.y0 + near.h - 0.2 * h
        else:
            lo_x, hi_x, lo_y, hi_y = 0.0, width - w, 0.0, height - h
        x0 = float(np.floor(rng.uniform(max(1.0, lo_x), max(1.0, min(width - w - 1, hi_x)) + 1e-9)))
        y0 = float(np.floor(rng.uniform(max(1.0, lo_y), max(1.0, min(height - h - 1, hi_y)) + 1e-9)))
        box = builtin._Box(x0, y0, w, h, flip)
        if x0 + w > width - 1 or y0 + h > height - 1:
            continue
        if not any(box.overlaps(other, gap) for other in taken):
            return box
    return None


def _contour_polygons(mask: np.ndarray, dx: int, dy: int) -> list[list[float]]:
    """Outer contours of a bool mask (cv2.findContours) as COCO polygons through pixel centres, shifted by (dx, dy)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        if len(contour) < 3:
            continue
        points = contour.reshape(-1, 2).astype(np.float64) + (dx + 0.5, dy + 0.5)
        polygons.append([round(float(v), 2) for v in points.reshape(-1)])
    return polygons


def _polygons_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    rles = coco_mask.frPyObjects(polygons, height, width)
    return coco_mask.decode(coco_mask.merge(rles)).astype(bool)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (as its crowd annotations are stored): column-major run lengths, zeros first."""
    flat = np.asarray(mask, dtype=bool).reshape(-1, order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"counts": [int(r) for r in runs], "size": [int(mask.shape[0]), int(mask.shape[1])]}


@dataclass
class _BatchObject:
    category: str
    mask: np.ndarray  # bool HxW, exactly the painted pixels
    segmentation: list | dict  # polygons, or compressed RLE when polygons cannot follow the mask
    placed: object  # builtin_dataset._Placed, for the captions


def _draw_object(rng, category: str, role: str, height: int, width: int, taken: list, near, painted: np.ndarray):
    """Draw one object at a free spot: (placed, global mask, segmentation, local rgb, offset) or None."""
    look = builtin._LOOKS[category]
    low, high, log = _BATCH_AREA[role]
    fraction = float(np.exp(rng.uniform(np.log(low), np.log(high)))) if log else float(rng.uniform(low, high))
    flip = bool(rng.random() < 0.5)
    aspect = look.aspect * float(rng.uniform(0.9, 1.1))  # a little stretch for variety
    box_area = fraction * height * width / _fill_ratio(category)
    for _ in range(8):
        h = math.sqrt(box_area / aspect)
        w = aspect * h
        shrink = min(1.0, (width - 4) / w, (height - 4) / h)
        w, h = max(4.0, w * shrink), max(4.0, h * shrink)
        box = _place_rect(rng, height, width, w, h, flip, taken, near)
        if box is not None:
            break
        box_area *= 0.8
    else:
        return None
    size = int(math.ceil(max(box.w, box.h))) + 3
    ox, oy = int(box.x0) - 1, int(box.y0) - 1
    drawn = look.draw(builtin._Canvas(size, builtin._Box(1.0, 1.0, box.w, box.h, box.flip)), rng)
    rows, cols = min(size, height - oy), min(size, width - ox)
    local = np.zeros((height, width), dtype=bool)
    local[oy:oy + rows, ox:ox + cols] = drawn.mask[:rows, :cols]
    segmentation: list | dict
    if drawn.polygons is not None:
        polygons = [[round(v + (ox if k % 2 == 0 else oy), 2) for k, v in enumerate(p)] for p in drawn.polygons]
    else:
        polygons = _contour_polygons(drawn.mask[:rows, :cols], ox, oy)
    mask = _polygons_mask(polygons, height, width) if polygons else np.zeros_like(local)
    union = (mask | local).sum()
    # The polygon must follow the drawing and stay on its canvas (the only pixels with a colour).
    on_canvas = mask.sum() == mask[oy:oy + rows, ox:ox + cols].sum()
    if polygons and union and (mask & local).sum() / union >= _MIN_POLYGON_IOU and on_canvas:
        segmentation = polygons
    else:
        mask = local
        rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    if not mask.any() or (mask & painted).any():
        return None
    return builtin._Placed(category, box, drawn), mask, segmentation, drawn.rgb, (ox, oy, rows, cols)


def _render_batch_image(spec, split: str, index: int, categories: tuple[str, ...]):
    """One 640x480 (or 480x640) scene: (uint8 pixels HxWx3 or HxW, objects, captions)."""
    rng = np.random.default_rng([spec.seed, builtin._SPLITS[split][1], index, 640])
    portrait = bool(rng.random() < BATCH_PORTRAIT_RATE)
    grayscale = bool(rng.random() < BATCH_GRAYSCALE_RATE)
    height, width = (WIDTH, HEIGHT) if portrait else (HEIGHT, WIDTH)
    # Backgrounds are drawn at half size and upsampled: a quarter of the work, and their
    # grain comes out 2 px wide, which reads like photo noise after JPEG.
    if rng.random() < 0.25:
        background, kind = smooth_background(rng, height // 2, width // 2), "plain"
    else:
        background, kind = builtin._draw_background(rng, max(height, width) // 2)
        background = background[: height // 2, : width // 2]
    image = cv2.resize(background.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    painted = np.zeros((height, width), dtype=bool)
    objects: list[_BatchObject] = []
    for category in categories:
        role = _role(category)
        near = next((o.placed.box for o in objects if builtin._COMPANION_OF.get(o.category) == category), None)
        drawn = _draw_object(rng, category, role, height, width, [o.placed.box for o in objects], near, painted)
        if drawn is None:
            if role != "other":
                raise RuntimeError(f"write_coco_batch: could not place {category!r} among {categories} ({split} image {index})")
            continue  # a distractor that does not fit is left out; captions follow what was drawn
        placed, mask, segmentation, rgb, (ox, oy, rows, cols) = drawn
        region = image[oy:oy + rows, ox:ox + cols]
        colour = rgb[:rows, :cols] + rng.normal(0.0, 5.0, (rows, cols, 1))  # photo grain
        inside = mask[oy:oy + rows, ox:ox + cols]
        region[inside] = colour[inside]
        painted |= mask
        if grayscale:
            hue_free = tuple(a for a in placed.drawn.adjectives if a not in _HUE_WORDS)
            placed = builtin._Placed(placed.category, placed.box, builtin._Drawn(None, None, None, hue_free))
        objects.append(_BatchObject(category, mask, segmentation, placed))
    # Exposure and contrast of the whole photo, and sometimes a little lens softness.
    contrast, brightness = rng.uniform(0.85, 1.15), rng.uniform(-15.0, 15.0)
    image *= contrast
    image += 128.0 * (1.0 - contrast) + brightness + 0.5  # + 0.5: the cast below rounds
    pixels = np.clip(image, 0, 255, out=image).astype(np.uint8)
    if rng.random() < 0.5:
        pixels = cv2.GaussianBlur(pixels, (0, 0), float(rng.uniform(0.4, 0.9)))
    if grayscale:
        pixels = np.asarray(Image.fromarray(pixels).convert("L"))
    captions = [text for text, _ in builtin._write_captions(rng, spec, [o.placed for o in objects], kind)]
    return pixels, objects, captions, rng


def _annotations(objects: list[_BatchObject], rng: np.random.Generator) -> list[dict]:
    """Instance records of one image; some groups of one repeated distractor become one iscrowd=1 region."""
    counts: dict[str, int] = {}
    for o in objects:
        counts[o.category] = counts.get(o.category, 0) + 1
    pair_categories = builtin._ANCHORS + builtin._COMPANIONS
    crowds = {c for c in sorted(counts) if counts[c] > 1 and c not in pair_categories and rng.random() < BATCH_CROWD_RATE}
    records = []
    for o in objects:
        if o.category in crowds:
            continue
        rle = coco_mask.encode(np.asfortranarray(o.mask.astype(np.uint8)))
        records.append({
            "category": o.category, "segmentation": o.segmentation, "iscrowd": 0,
            "area": float(coco_mask.area(rle)), "bbox": [float(v) for v in coco_mask.toBbox(rle)],
        })
    for category in sorted(crowds):
        union = np.zeros_like(objects[0].mask)
        for o in objects:
            if o.category == category:
                union |= o.mask
        rle = coco_mask.encode(np.asfortranarray(union.astype(np.uint8)))
        records.append({
            "category": category, "segmentation": _uncompressed_rle(union), "iscrowd": 1,
            "area": float(coco_mask.area(rle)), "bbox": [float(v) for v in coco_mask.toBbox(rle)],
        })
    return records


def _render_batch_chunk(spec, split: str, start: int, stop: int, images_dir: str) -> list[dict]:
    """Draw and save images [start, stop) of a split (a pool task); their records for the JSON files."""
    plan = builtin._split_plan(spec, split)
    records = []
    for index in range(start, stop):
        pixels, objects, captions, rng = _render_batch_image(spec, split, index, plan[index])
        file_name = f"{builtin._image_id(split, index):012d}.jpg"
        Image.fromarray(pixels).save(os.path.join(images_dir, file_name), format="JPEG", quality=BATCH_JPEG_QUALITY)
        records.append({
            "file_name": file_name, "width": int(pixels.shape[1]), "height": int(pixels.shape[0]),
            "instances": _annotations(objects, rng), "captions": captions,
        })
    return records


def _batch_documents(spec, split: str, records: list[dict]) -> tuple[dict, dict]:
    """(instances JSON, captions JSON) of one split in COCO 2017's layout, ids in image order."""
    id_offset = builtin._TEST_IMAGE_ID_OFFSET if split == "test" else 0
    info = {
        "description": "COCO-like synthetic batch (bench/benchmarks/coco_like.py write_coco_batch)", "version": "1.0",
        "year": 2017, "contributor": "spur-assets bench", "date_created": "2017/09/01", "seed": spec.seed,
    }
    licenses = [{"id": 1, "name": "synthetic, no license needed", "url": ""}]
    categories = [
        {"supercategory": COCO_SUPERCATEGORIES[c], "id": COCO_CATEGORY_IDS[c], "name": c}
        for c in sorted(builtin.BUILTIN_CATEGORIES, key=COCO_CATEGORY_IDS.__getitem__)
    ]
    images, instances, captions = [], [], []
    for index, record in enumerate(records):
        image_id = builtin._image_id(split, index)
        images.append({
            "license": 1, "file_name": record["file_name"], "coco_url": "", "height": record["height"],
            "width": record["width"], "date_captured": "2013-11-14 11:18:45", "flickr_url": "", "id": image_id,
        })
        for instance in record["instances"]:
            instances.append({
                "segmentation": instance["segmentation"], "area": instance["area"], "iscrowd": instance["iscrowd"],
                "image_id": image_id, "bbox": instance["bbox"], "category_id": COCO_CATEGORY_IDS[instance["category"]],
                "id": id_offset + len(instances) + 1,
            })
        for caption in record["captions"]:
            captions.append({"image_id": image_id, "id": id_offset + len(captions) + 1, "caption": caption})
    return (
        {"info": info, "licenses": licenses, "images": images, "annotations": instances, "categories": categories},
        {"info": info, "licenses": licenses, "images": images, "annotations": captions},
    )


def write_coco_batch(root: Path, n_train: int, n_test: int, seed: int = 0, workers: int = 1) -> Path:
    """Write a COCO 2017-layout batch under `root`; return its dataset.yaml.

    Layout: train2017/ and val2017/ (640x480 JPEGs, quality 90; ~4% 480x640 portrait, ~3%
    grayscale), annotations/{captions,instances}_{train,val}2017.json (official COCO
    category ids and supercategories, polygons for most instances, compressed RLE where a
    polygon cannot follow the mask, uncompressed RLE for iscrowd=1 groups) and
    dataset.yaml (train -> train2017, test -> val2017). Content: `coco_batch_spec` --
    the three PAIRS injected (P(companion | anchor) 0.9 in train, 0.5 in test, companions
    0.4-3% of the image beside their anchor and sometimes alone), distractors, scenes with
    no pair, 5 COCO-like captions per image. Masks are exactly the painted pixels (before
    the whole-image blur some images get).

    Deterministic: every image is a function of (seed, split, index), so any `workers`
    gives byte-identical files. `workers` > 1 draws images in a spawn process pool.
    Files are written to a sibling temporary folder and renamed to `root`, which must
    not exist or be empty (FileExistsError otherwise).
    """
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root}: exists and is not an empty folder; pass a new or empty folder for the batch")
    spec = coco_batch_spec(n_train, n_test, seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex}"
    try:
        (staging / "annotations").mkdir(parents=True)
        jobs = []
        for split, folder, n in (("train", "train2017", n_train), ("test", "val2017", n_test)):
            (staging / folder).mkdir()
            jobs += [(split, start, min(start + _BATCH_CHUNK, n), str(staging / folder)) for start in range(0, n, _BATCH_CHUNK)]
        if workers > 1 and len(jobs) > 1:
            # spawn, not fork: callers may be threaded (Dagster, pytest plugins).
            # One OpenCV thread per worker: the workers already fill the cores.
            with ProcessPoolExecutor(
                max_workers=min(workers, len(jobs)), mp_context=get_context("spawn"),
                initializer=cv2.setNumThreads, initargs=(1,),
            ) as pool:
                results = list(pool.map(_render_batch_chunk, *zip(*[(spec, *job) for job in jobs])))
        else:
            results = [_render_batch_chunk(spec, *job) for job in jobs]
        for split, folder in (("train", "train2017"), ("test", "val2017")):
            records = [record for job, chunk in zip(jobs, results) if job[0] == split for record in chunk]
            instances, captions = _batch_documents(spec, split, records)
            for kind, document in (("instances", instances), ("captions", captions)):
                (staging / "annotations" / f"{kind}_{folder}.json").write_text(
                    json.dumps(document, separators=(",", ":")), encoding="utf-8"
                )
        (staging / "dataset.yaml").write_text(_BATCH_MANIFEST.format(name=BATCH_NAME), encoding="utf-8")
        if root.exists():
            root.rmdir()
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root / "dataset.yaml"
