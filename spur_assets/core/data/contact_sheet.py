"""A contact sheet of a validated dataset batch: images with their instance outlines and captions.

For a person to check at a glance that a dataset (the built-in one or real COCO) is
what it claims: that masks sit on the objects, labels are right and captions describe
the pictures. It draws from the tables ``coco_ingest.load_batch`` returns, never from
the raw JSON, so a record quarantined there is never read again; masks are the stored
RLE, decoded by pycocotools the way every later reader sees them.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageDraw, ImageFont

from spur_assets.core.data.coco_ingest import BatchTables, decode_instance_mask
from spur_assets.core.data.errors import DatasetError

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


def _draw_tile(image: dict, instances: list[dict], font) -> Image.Image:
    """The image scaled to fit TILE_SIZE (nearest when enlarging), outlines and labels on it."""
    with Image.open(image["path"]) as opened:
        picture = opened.convert("RGB")
    width, height = picture.size
    scale = TILE_SIZE / max(width, height)
    shown = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = picture.resize(shown, Image.NEAREST if scale >= 1 else Image.BILINEAR)
    pixels = np.asarray(picture).copy()
    labels = []
    for instance in instances:
        mask = decode_instance_mask(instance["rle_counts"], image["height"], image["width"])
        scaled = np.asarray(Image.fromarray(mask).resize(shown, Image.NEAREST))
        colour = _category_colour(instance["category_id"])
        pixels[_inner_outline(scaled)] = colour
        labels.append((instance["bbox_x"] * scale, instance["bbox_y"] * scale, instance["category"], colour))
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
    tables: BatchTables,
    split: str,
    out_png: Path,
    n: int = 12,
    seed: int = 0,
    columns: int = 4,
    title: str = "",
) -> Path:
    """Draw ``n`` images of one split of a validated batch on one PNG; return its path.

    The images are a seeded random sample (sorted by id) of the split's images in
    ``tables`` (what ``load_batch`` kept). Each is scaled so its longer side is TILE_SIZE
    pixels (nearest-neighbour when enlarging), every instance mask is outlined in its
    category's colour with a name label, and the image's captions are wrapped underneath.
    The sheet's size is ``sheet_size(k, columns)`` with k = min(n, images in the split).
    Raises DatasetError for a split without images.
    """
    images = tables.images.filter(pl.col("split") == split).sort("image_id")
    if images.height == 0:
        present = sorted(set(tables.images["split"].to_list()))
        raise DatasetError(
            title or "batch", None, "split", f"no image in split {split!r} (splits with images: {present})",
            "pass one of those splits",
        )
    rng = np.random.default_rng(seed)
    rows = sorted(rng.choice(images.height, size=min(n, images.height), replace=False).tolist())
    chosen = images[rows]
    chosen_ids = chosen["image_id"].to_list()
    instances = tables.instances.filter((pl.col("split") == split) & pl.col("image_id").is_in(chosen_ids))
    captions = tables.captions.filter((pl.col("split") == split) & pl.col("image_id").is_in(chosen_ids))
    by_image: dict[int, list[dict]] = {}
    for row in instances.sort("annotation_id").iter_rows(named=True):
        by_image.setdefault(row["image_id"], []).append(row)
    texts: dict[int, list[str]] = {}
    for row in captions.sort("caption_id").iter_rows(named=True):
        texts.setdefault(row["image_id"], []).append(row["caption"])
    columns = max(1, min(columns, chosen.height))

    font = _font(FONT_SIZE)
    title_font = _font(FONT_SIZE + 3)
    sheet = Image.new("RGB", sheet_size(chosen.height, columns), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    heading = f"{title} / {split}" if title else split
    draw.text(
        (PADDING, 5), f"{heading}: {chosen.height} of {images.height} images (seed {seed})", fill=(0, 0, 0), font=title_font
    )
    cell_height = TILE_SIZE + (1 + CAPTION_LINES) * LINE_HEIGHT + PADDING
    for k, image in enumerate(chosen.iter_rows(named=True)):
        image_id = image["image_id"]
        left = PADDING + (k % columns) * (TILE_SIZE + PADDING)
        top = TITLE_HEIGHT + (k // columns) * cell_height
        sheet.paste(_draw_tile(image, by_image.get(image_id, []), font), (left, top))
        y = top + TILE_SIZE + 1
        draw.text((left, y), f"#{image_id}  {image['file_name']}", fill=(120, 120, 120), font=font)
        lines = []
        for caption in texts.get(image_id, []):
            wrapped = _wrap(caption, font, TILE_SIZE - 10)
            lines += [("- " if i == 0 else "  ") + line for i, line in enumerate(wrapped)]
        if len(lines) > CAPTION_LINES:
            lines = lines[: CAPTION_LINES - 1] + ["  ..."]
        for i, line in enumerate(lines):
            draw.text((left, y + (i + 1) * LINE_HEIGHT), line, fill=(20, 20, 20), font=font)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png, format="PNG")
    return out_png
