"""A contact sheet of a COCO-layout dataset: images with their instance outlines and captions.

For a person to check at a glance that a dataset (the built-in one or real COCO) is
what it claims: that masks sit on the objects, labels are right and captions describe
the pictures. Masks are decoded by pycocotools, so polygons and RLE are shown the way
every reader of the annotations will see them.
"""

from __future__ import annotations

import colorsys
import contextlib
import io
import math
from collections.abc import Collection
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools.coco import COCO

from spur_assets.core.coco_ingest import read_manifest
from spur_assets.core.errors import DatasetError

TILE_SIZE = 192  # pixels of the longer image side on the sheet
PADDING = 8
TITLE_HEIGHT = 24
LINE_HEIGHT = 13
CAPTION_LINES = 12  # caption lines per tile (one more for the image id above them); overflow ends in "..."
FONT_SIZE = 11


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ValueError, ImportError):  # Pillow built without FreeType: the bitmap font
        return ImageFont.load_default()


def _category_colour(category_id: int) -> tuple[int, int, int]:
    # Golden-ratio hue steps keep neighbouring ids far apart on the colour wheel.
    r, g, b = colorsys.hsv_to_rgb((category_id * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
        return COCO(str(path))


def _wrap(text: str, font, width: float) -> list[str]:
    """Greedy word wrap to ``width`` pixels."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and font.getlength(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines


def _inner_outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its border (4-neighbour erosion)."""
    eroded = mask.copy()
    for _ in range(width):
        shrunk = eroded.copy()
        shrunk[1:, :] &= eroded[:-1, :]
        shrunk[:-1, :] &= eroded[1:, :]
        shrunk[:, 1:] &= eroded[:, :-1]
        shrunk[:, :-1] &= eroded[:, 1:]
        shrunk[[0, -1], :] = False
        shrunk[:, [0, -1]] = False
        eroded = shrunk
    return mask & ~eroded


def sheet_size(n_images: int, columns: int) -> tuple[int, int]:
    """(width, height) in pixels of a contact sheet showing ``n_images`` in ``columns`` columns."""
    columns = max(1, min(columns, n_images))
    rows = math.ceil(n_images / columns)
    cell_height = TILE_SIZE + (1 + CAPTION_LINES) * LINE_HEIGHT + PADDING
    return columns * TILE_SIZE + (columns + 1) * PADDING, TITLE_HEIGHT + rows * cell_height + PADDING


def _draw_tile(coco_instances: COCO, image_info: dict, image_path: Path, font) -> Image.Image:
    """The image scaled to fit TILE_SIZE (nearest when enlarging), outlines and labels on it."""
    with Image.open(image_path) as opened:
        picture = opened.convert("RGB")
    width, height = picture.size
    scale = TILE_SIZE / max(width, height)
    shown = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = picture.resize(shown, Image.NEAREST if scale >= 1 else Image.BILINEAR)
    pixels = np.asarray(picture).copy()
    annotations = coco_instances.loadAnns(coco_instances.getAnnIds(imgIds=[image_info["id"]]))
    labels = []
    for annotation in annotations:
        mask = coco_instances.annToMask(annotation).astype(bool)
        if mask.shape != (height, width):
            raise DatasetError(
                "instances",
                annotation.get("id"),
                "segmentation",
                f"mask is {mask.shape[1]}x{mask.shape[0]} but image {image_info['id']} is {width}x{height}",
                "fix the segmentation size or the image's width/height",
            )
        scaled = np.asarray(Image.fromarray(mask).resize(shown, Image.NEAREST))
        colour = _category_colour(annotation["category_id"])
        pixels[_inner_outline(scaled)] = colour
        x, y, _, _ = annotation["bbox"]
        labels.append((x * scale, y * scale, coco_instances.cats[annotation["category_id"]]["name"], colour))
    tile = Image.new("RGB", (TILE_SIZE, TILE_SIZE), (255, 255, 255))
    offset = ((TILE_SIZE - shown[0]) // 2, (TILE_SIZE - shown[1]) // 2)
    tile.paste(Image.fromarray(pixels), offset)
    draw = ImageDraw.Draw(tile)
    for x, y, name, colour in labels:
        left = min(max(0, offset[0] + x), TILE_SIZE - font.getlength(name) - 3)
        top = max(0, offset[1] + y - LINE_HEIGHT)
        box = (left, top, left + font.getlength(name) + 3, top + LINE_HEIGHT - 1)
        draw.rectangle(box, fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((left + 1.5, top), name, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)
    return tile


def draw_contact_sheet(
    manifest_path: Path,
    split: str,
    out_png: Path,
    n: int = 12,
    seed: int = 0,
    columns: int = 4,
    image_ids: Collection[int] | None = None,
) -> Path:
    """Draw ``n`` images of one split of a COCO-layout dataset on one PNG; return its path.

    The images are a seeded random sample (sorted by id) of the split's images. Each is
    scaled so its longer side is TILE_SIZE pixels (nearest-neighbour when enlarging),
    every instance mask is outlined in its category's colour with a name label, and the
    image's captions are wrapped underneath. The sheet's size is ``sheet_size(k, columns)``
    with k = min(n, images in the split). Raises DatasetError for an unknown split, an
    empty split or an image path that leaves its images folder. ``image_ids``, when
    given, limits the sample to those images (e.g. the ones that passed validation).
    """
    manifest = read_manifest(Path(manifest_path))
    if split not in manifest.splits:
        raise DatasetError(
            manifest.path, None, "splits", f"no split {split!r} (it has {sorted(manifest.splits)})", "pass one of those splits"
        )
    files = manifest.splits[split]
    instances = _load_coco(files.instances)
    captions = _load_coco(files.captions)
    allowed = None if image_ids is None else set(image_ids)
    image_ids = sorted(i for i in instances.getImgIds() if allowed is None or i in allowed)
    if not image_ids:
        raise DatasetError(files.instances, None, "images", "the split has no images", "add images or pick another split")
    rng = np.random.default_rng(seed)
    chosen = sorted(image_ids[i] for i in rng.choice(len(image_ids), size=min(n, len(image_ids)), replace=False))
    columns = max(1, min(columns, len(chosen)))

    font = _font(FONT_SIZE)
    title_font = _font(FONT_SIZE + 3)
    sheet = Image.new("RGB", sheet_size(len(chosen), columns), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text(
        (PADDING, 5),
        f"{manifest.name} / {split}: {len(chosen)} of {len(image_ids)} images (seed {seed})",
        fill=(0, 0, 0),
        font=title_font,
    )
    cell_height = TILE_SIZE + (1 + CAPTION_LINES) * LINE_HEIGHT + PADDING
    for k, image_id in enumerate(chosen):
        info = instances.imgs[image_id]
        image_path = (files.images_dir / info["file_name"]).resolve()
        if not image_path.is_relative_to(files.images_dir):
            raise DatasetError(
                files.instances, image_id, "images.file_name", f"{info['file_name']!r} resolves outside {files.images_dir}; refused",
                "image file_names must be relative paths inside the split's images folder",
            )
        left = PADDING + (k % columns) * (TILE_SIZE + PADDING)
        top = TITLE_HEIGHT + (k // columns) * cell_height
        sheet.paste(_draw_tile(instances, info, image_path, font), (left, top))
        y = top + TILE_SIZE + 1
        draw.text((left, y), f"#{image_id}  {info['file_name']}", fill=(120, 120, 120), font=font)
        lines = []
        for annotation in captions.loadAnns(captions.getAnnIds(imgIds=[image_id])):
            wrapped = _wrap(annotation["caption"], font, TILE_SIZE - 10)
            lines += [("- " if i == 0 else "  ") + line for i, line in enumerate(wrapped)]
        if len(lines) > CAPTION_LINES:
            lines = lines[: CAPTION_LINES - 1] + ["  ..."]
        for i, line in enumerate(lines):
            draw.text((left, y + (i + 1) * LINE_HEIGHT), line, fill=(20, 20, 20), font=font)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png, format="PNG")
    return out_png
