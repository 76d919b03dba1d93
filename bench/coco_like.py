"""COCO-like synthetic inputs for the benchmarks: 640x480 photo-like scenes with instance masks.

Nothing here is a dataset the project ships: it only gives benchmarks inputs with COCO's
sizes (640x480 JPEGs, a few instances per image covering 0.4-12% of it each, compressed
RLE masks as `coco_ingest` stores them) without downloading COCO.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import polars as pl
from PIL import Image
from pycocotools import mask as coco_mask

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
