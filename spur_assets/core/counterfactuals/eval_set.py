"""The counterfactual EVAL set (docs/definitions.md#counterfactual-eval-set): the companion removed, and an equal-area control.

For each flagged pair (a, b) and each test image I showing both a and b, where
b's mask covers at most ``max_companion_fraction`` of I:

- I⁻ᵇ ("removal"): I with every instance of b inpainted, the union of b's masks
  dilated by ``dilation_px`` (an elliptical kernel) so edge pixels go too.
- Iᶜ ("control"): the same mask shape and area translated to a place that touches
  no instance of I (all instance masks, dilated alike), inpainted the same way.
  Captions unchanged. It measures what inpainting alone does to a model.
- Each caption of I that mentions b is edited to drop b's phrase; the edit is
  accepted only if it no longer mentions b and still mentions an object of I.

Everything is deterministic for a seed: the control placement draws from a
generator seeded by (seed, batch, image, pair), and images are inpainted in fixed
chunks whatever the number of worker processes.
"""

from __future__ import annotations

import errno
import functools
import multiprocessing
import os
import re
import shutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import polars as pl
from PIL import Image

from spur_assets.core.data.batch_union import SplitTables
from spur_assets.core.data.errors import require_columns
from spur_assets.core.data import vocabulary
from spur_assets.core.data.coco_ingest import decode_instance_mask
from spur_assets.core.counterfactuals.inpaint import Inpainter, InpainterSpec, spec_of
from spur_assets.core.counterfactuals.recipe import CounterfactualRecipe
from spur_assets.core.runtime.pools import process_pool

EVAL_SPLIT = "test"
TASKS_PER_CHUNK = 4  # (pair, image) tasks per inpainting chunk when the recipe leaves it to the builder

CF_IMAGES_SCHEMA = pl.Schema(
    {
        "cf_image_id": pl.Int64,
        "kind": pl.Utf8,
        "source_image_id": pl.Int64,
        "batch": pl.Utf8,
        "pair": pl.Utf8,
        "anchor": pl.Utf8,
        "companion": pl.Utf8,
        "path": pl.Utf8,
        "mask_path": pl.Utf8,
        "source_path": pl.Utf8,
        "width": pl.Int32,
        "height": pl.Int32,
        "masked_pixels": pl.Int64,
        "mask_fraction": pl.Float64,
    }
)
CF_CAPTIONS_SCHEMA = pl.Schema(
    {
        "cf_caption_id": pl.Int64,
        "cf_image_id": pl.Int64,  # the removal image this caption describes
        "source_caption_id": pl.Int64,
        "source_image_id": pl.Int64,
        "batch": pl.Utf8,
        "pair": pl.Utf8,
        "anchor": pl.Utf8,
        "companion": pl.Utf8,
        "source_caption": pl.Utf8,
        "caption": pl.Utf8,  # the edit; null when no safe edit was found
        "accepted": pl.Boolean,
        "reason": pl.Utf8,
    }
)
CF_SKIPPED_SCHEMA = pl.Schema(
    {"source_image_id": pl.Int64, "batch": pl.Utf8, "pair": pl.Utf8, "reason": pl.Utf8}
)

# Caption-edit acceptance reasons (the `reason` column).
ACCEPTED = "accepted"
NO_SAFE_EDIT = "no safe edit of the companion phrase"
STILL_MENTIONS_COMPANION = "edit still mentions the companion"
NO_OBJECT_LEFT = "edit mentions no object of the image"


def pair_name(anchor: str, companion: str) -> str:
    """The `pair` column value: "dog->frisbee"."""
    return f"{anchor}->{companion}"


# --------------------------------------------------------------------------- masks


def _ellipse(dilation_px: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation_px + 1, 2 * dilation_px + 1))


def removal_mask(companion_masks: Sequence[np.ndarray], dilation_px: int) -> np.ndarray:
    """Union of the companion's instance masks, dilated by ``dilation_px`` with an elliptical kernel.

    All masks must share one HxW shape; ``dilation_px`` 0 means the plain union.
    Returns an HxW bool array. An empty sequence raises ValueError.
    """
    if not companion_masks:
        raise ValueError("removal_mask needs at least one companion mask; got none")
    if dilation_px < 0:
        raise ValueError(f"removal_mask dilation_px must be >= 0, got {dilation_px}")
    shape = np.asarray(companion_masks[0]).shape
    union = np.zeros(shape, dtype=bool)
    for index, mask in enumerate(companion_masks):
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise ValueError(f"removal_mask: mask #{index} has shape {mask.shape}, mask #0 has {shape}")
        union |= mask.astype(bool, copy=False)
    if dilation_px == 0:
        return union
    return cv2.dilate(union.astype(np.uint8), _ellipse(dilation_px)).astype(bool)


def control_mask(
    removal: np.ndarray,
    occupied: np.ndarray,
    rng: np.random.Generator,
    tries: int = 200,
) -> np.ndarray | None:
    """The removal mask's exact shape, translated to a place that touches no occupied pixel.

    ``occupied`` is the union of all instance masks of the image (dilated); the
    removal region itself also counts as occupied. Up to ``tries`` uniformly random
    offsets are tried first; if none fits, every offset is checked (template
    correlation) and one free offset is drawn uniformly. Returns an HxW bool mask
    with the same pixel count and the same cropped bounding-box pattern, or None
    when the shape fits nowhere (or ``removal`` is empty).
    """
    removal = np.asarray(removal, dtype=bool)
    occupied = np.asarray(occupied, dtype=bool) | removal
    if removal.shape != occupied.shape:
        raise ValueError(f"control_mask: removal shape {removal.shape} != occupied shape {occupied.shape}")
    rows = np.flatnonzero(removal.any(axis=1))
    cols = np.flatnonzero(removal.any(axis=0))
    if rows.size == 0:
        return None
    shape = removal[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    offset = free_placement(shape, occupied, rng, tries)
    if offset is None:
        return None
    top, left = offset
    h, w = shape.shape
    placed = np.zeros_like(removal)
    placed[top : top + h, left : left + w] = shape
    return placed


def free_placement(
    shape: np.ndarray, occupied: np.ndarray, rng: np.random.Generator, tries: int = 200
) -> tuple[int, int] | None:
    """(top, left) at which the cropped bool ``shape`` lies inside the image and touches no occupied pixel.

    ``occupied`` is the image's HxW bool map of taken pixels. Up to ``tries``
    uniformly random offsets are tried first; if none fits, every offset is
    checked (template correlation) and one free offset is drawn uniformly.
    None when the shape is larger than the image or fits nowhere.
    """
    shape = np.asarray(shape, dtype=bool)
    occupied = np.asarray(occupied, dtype=bool)
    h, w = shape.shape
    height, width = occupied.shape
    if h > height or w > width:
        return None
    top = left = None
    for _ in range(tries):
        y = int(rng.integers(0, height - h + 1))
        x = int(rng.integers(0, width - w + 1))
        if not (occupied[y : y + h, x : x + w] & shape).any():
            top, left = y, x
            break
    if top is None:
        # overlap[y, x] = number of shape pixels on occupied pixels at offset (y, x).
        overlap = cv2.matchTemplate(occupied.astype(np.float32), shape.astype(np.float32), cv2.TM_CCORR)
        free_y, free_x = np.nonzero(overlap < 0.5)
        if free_y.size == 0:
            return None
        pick = int(rng.integers(0, free_y.size))
        top, left = int(free_y[pick]), int(free_x[pick])
        if (occupied[top : top + h, left : left + w] & shape).any():  # float rounding must not lie
            return None
    return top, left


# --------------------------------------------------------------------------- caption edits

_TOKEN = re.compile(r"\w+(?:['\u2019\-]\w+)*|[^\w\s]")
_DETERMINERS = frozenset(
    """a an the some two three four five six seven eight nine ten eleven twelve several many few multiple
    numerous various his her its their our my your this that these those one another each both""".split()
)
_QUANTITY_NOUNS = frozenset(
    """couple pair bunch group lot lots number set stack pile plate bowl herd flock row line pack
    handful few variety assortment collection bundle box slice piece pairs sets stacks piles plates
    bowls rows boxes slices pieces bunches groups""".split()
)
_VERB_CONNECTOR_TEXT = """
holding|holds|hold|held|catching|catches|catch|caught|playing with|plays with|play with|
carrying|carries|carry|carried|chasing|chases|chase|chased|throwing|throws|throw|threw|
eating|eats|eat|ate|riding|rides|ride|rode|using|uses|use|wearing|wears|wear|wore|
watching|watches|watch|looking at|looks at|look at|pulling|pulls|pull|pushing|pushes|push|
grabbing|grabs|grab|biting|bites|bite|sniffing|sniffs|sniff|
sitting on|sits on|sitting in|sits in|sitting next to|sitting by|sitting near|sitting beside|
standing next to|standing by|standing near|standing beside|standing on|standing in|
lying on|lying in|lying next to|laying on|laying in|laying next to|laying by|
resting on|rests on|jumping over|jumps over|posing with|poses with|playing|plays
"""
_PREPOSITION_CONNECTOR_TEXT = """
with|and|&|plus|or|near|beside|besides|by|behind|next to|close to|on|in|inside|under|underneath|
beneath|on top of|in front of|along with|together with|as well as|alongside|among|
"""
_VERB_CONNECTORS = tuple(tuple(c.split()) for c in _VERB_CONNECTOR_TEXT.replace("\n", "").split("|") if c)
_PREPOSITION_CONNECTORS = tuple(
    tuple(c.split()) for c in _PREPOSITION_CONNECTOR_TEXT.replace("\n", "").split("|") if c
)
# Connectors that may FOLLOW a companion phrase that opens the caption ("A frisbee and a dog").
_FOLLOWING_CONNECTORS = (("and",), (",",), ("&",), ("along", "with"), ("together", "with"), ("as", "well", "as"))
_AUXILIARIES = frozenset({"is", "are", "was", "were", "being", "been"})
# After a removed verb phrase these words would attach to the wrong thing
# ("a man throws a frisbee to his dog" -> "a man to his dog"): refuse the edit.
_VERB_OBJECT_PREPOSITIONS = frozenset(
    "to toward towards at into onto for from over across through off up down back".split()
)
_POSSESSIVES = frozenset({"its", "his", "her", "their", "the"})
_HELD_IN = frozenset({"mouth", "mouths", "hand", "hands", "paw", "paws", "lap", "laps", "arms", "teeth", "jaws"})
_DANGLING_WORDS = frozenset(
    "a an the and with of to is are was were or by near on in at his her its their".split()
)
_MAX_MODIFIERS = 3


@dataclass(frozen=True)
class _Token:
    text: str
    lower: str
    start: int
    end: int


def _tokens(caption: str) -> list[_Token]:
    return [_Token(m.group(), m.group().lower(), m.start(), m.end()) for m in _TOKEN.finditer(caption)]


def _matches_before(tokens: list[_Token], end: int, phrases: Sequence[tuple[str, ...]]) -> int | None:
    """Index where the longest phrase ending just before token ``end`` starts, or None."""
    best = None
    for phrase in phrases:
        start = end - len(phrase)
        if start >= 0 and tuple(t.lower for t in tokens[start:end]) == phrase:
            if best is None or start < best:
                best = start
    return best


def _matches_after(tokens: list[_Token], start: int, phrases: Sequence[tuple[str, ...]]) -> int | None:
    """Index just past the longest phrase starting at token ``start``, or None."""
    best = None
    for phrase in phrases:
        end = start + len(phrase)
        if end <= len(tokens) and tuple(t.lower for t in tokens[start:end]) == phrase:
            if best is None or end > best:
                best = end
    return best


def _is_determiner(token: _Token) -> bool:
    return token.lower in _DETERMINERS or token.lower.isdigit()


def _is_word(token: _Token) -> bool:
    return token.text[0].isalnum()


def _phrase_token_span(tokens: list[_Token], mention: vocabulary.Mention) -> tuple[int, int] | None:
    """Token range [first, last+1) of the companion's noun phrase and its connector; None if unsafe."""
    inside = [i for i, t in enumerate(tokens) if t.start < mention.end and t.end > mention.start]
    if not inside or tokens[inside[0]].start != mention.start or tokens[inside[-1]].end != mention.end:
        return None  # the mention is part of a larger word ("frisbee-catching"): no clean cut
    noun_first, noun_end = inside[0], inside[-1] + 1
    # Possessive "frisbee's": the noun qualifies something else.
    if noun_end < len(tokens) and tokens[noun_end].lower in {"'s", "’s"}:
        return None

    # Walk left over modifiers to a determiner (kept in the cut) or a connector (cut with it).
    first = noun_first
    modifiers = 0
    while first > 0:
        previous = tokens[first - 1]
        if previous.lower == "of" and first >= 2 and tokens[first - 2].lower in _QUANTITY_NOUNS:
            # "a couple of", "a plate of", "two pairs of": a quantity phrase before the noun.
            first -= 2
            if first > 0 and _is_determiner(tokens[first - 1]):
                first -= 1
            break
        if _is_determiner(previous):
            first -= 1
            break
        if (
            _matches_before(tokens, first, _VERB_CONNECTORS + _PREPOSITION_CONNECTORS) is not None
            or not _is_word(previous)
        ):
            break
        modifiers += 1
        if modifiers > _MAX_MODIFIERS:
            return None
        first -= 1
    last = noun_end

    # "... a frisbee in its mouth": the holding clause goes with the object.
    if (
        last + 2 < len(tokens)
        and tokens[last].lower == "in"
        and tokens[last + 1].lower in _POSSESSIVES
        and tokens[last + 2].lower in _HELD_IN
    ):
        last += 3

    verb_start = _matches_before(tokens, first, _VERB_CONNECTORS)
    preposition_start = _matches_before(tokens, first, _PREPOSITION_CONNECTORS)
    if verb_start is not None:
        if last < len(tokens) and tokens[last].lower in _VERB_OBJECT_PREPOSITIONS:
            return None
        start = verb_start
        if start > 0 and tokens[start - 1].lower == "to":  # "jumping to catch a frisbee"
            start -= 1
        if start > 0 and tokens[start - 1].lower in _AUXILIARIES:
            # "A dog is catching a frisbee." -> "A dog."; but "... is catching a frisbee in the air"
            # keeps the auxiliary: "A dog is in the air."
            rest_is_empty = all(not _is_word(t) for t in tokens[last:])
            if rest_is_empty:
                start -= 1
        return start, last
    if preposition_start is not None:
        start = preposition_start
        if tokens[start].lower in {"and", "or", "&", "plus"} and start > 0 and tokens[start - 1].lower == ",":
            start -= 1  # "a dog, a cat, and a frisbee" -> "a dog, a cat"
        return start, last
    # No connector before: only a phrase opening the caption (or a clause) may go, with what follows it.
    if first == 0 or tokens[first - 1].text in {".", ";", ":"}:
        following_end = _matches_after(tokens, last, _FOLLOWING_CONNECTORS)
        if following_end is not None:
            return first, following_end
    return None


def _tidy(text: str, capitalise: bool) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r",(\s*[,.;:!?])", r"\1", text)  # ", ." -> "."
    text = re.sub(r"^[\s,;:]+", "", text)
    text = text.strip()
    if capitalise and text:
        text = text[0].upper() + text[1:]
    return text


def remove_companion_phrase(caption: str, companion: str) -> str | None:
    """The caption with every phrase naming ``companion`` cut out, or None if no safe cut exists.

    Rule-based on the vocabulary's mention spans. Each companion mention loses its
    determiner/count/quantity phrase and adjectives ("a red", "a couple of") and the
    connector that attaches it (with, and, next to, near, holding, catching,
    playing with, ...), plus a trailing "in its mouth"-style clause:
    "A dog with a frisbee on the grass." -> "A dog on the grass.";
    "A frisbee and a dog." -> "A dog.". Spaces, punctuation and the first letter's
    case are tidied. None when a mention has no recognised attachment (subject of
    its own clause, part of a compound word, possessive), when the cut would leave
    a dangling word, or when the caption does not mention ``companion``.
    """
    mentions = vocabulary.find_mentions(caption)
    targets = [m for m in mentions if m.category == companion]
    if not targets:
        return None
    tokens = _tokens(caption)
    cuts: list[tuple[int, int]] = []  # character ranges
    for mention in targets:
        span = _phrase_token_span(tokens, mention)
        if span is None:
            return None
        first, last = span
        cut = (tokens[first].start, tokens[last - 1].end)
        # The cut may take determiners and adjectives, never another object's mention.
        if any(m.category != companion and m.start < cut[1] and m.end > cut[0] for m in mentions):
            return None
        cuts.append(cut)
    pieces, position = [], 0
    for start, end in sorted(cuts):
        if start < position:  # overlapping cuts ("a frisbee and a frisbee"): merge
            start = position
        pieces.append(caption[position:start])
        position = max(position, end)
    pieces.append(caption[position:])
    starts_capitalised = caption[:1].isupper()
    edited = _tidy(" ".join(p.strip() for p in pieces if p.strip()), capitalise=starts_capitalised)
    words = [t for t in _tokens(edited) if _is_word(t)]
    if not words or words[-1].lower in _DANGLING_WORDS or words[0].lower in {"and", "with", "or"}:
        return None
    return edited


def judge_caption_edit(edited: str | None, companion: str, image_categories: frozenset[str]) -> tuple[bool, str]:
    """(accepted, reason) for an edit of a caption of an image showing ``image_categories``.

    Accepted only if there is an edit, it no longer mentions ``companion`` and it
    still mentions an object of the image other than the companion.
    """
    if edited is None:
        return False, NO_SAFE_EDIT
    mentioned = vocabulary.mentioned_categories(edited)
    if companion in mentioned:
        return False, STILL_MENTIONS_COMPANION
    if not mentioned & (image_categories - {companion}):
        return False, NO_OBJECT_LEFT
    return True, ACCEPTED


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Task:
    """One (pair, test image): everything a worker needs, picklable."""

    index: int
    batch: str
    image_id: int
    anchor: str
    companion: str
    path: str
    width: int
    height: int
    companion_rles: tuple[str, ...]
    all_rles: tuple[str, ...]
    categories: frozenset[str]  # every category with an instance in the image
    out_stem: str  # path prefix for the PNGs this task writes


@dataclass(frozen=True)
class _Rendered:
    index: int
    skipped: str | None = None
    removal_pixels: int = 0
    control_pixels: int = 0


def path_slug(text: str) -> str:
    """``text`` made safe as one path component: runs of other characters become "_"."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "_"



def _task_rng(seed: int, task: _Task) -> np.random.Generator:
    pair = pair_name(task.anchor, task.companion)
    return np.random.default_rng([seed, zlib.crc32(task.batch.encode()), task.image_id, zlib.crc32(pair.encode())])


def load_source_rgb(path: str | Path, image_id: int, batch: str, width: int, height: int) -> np.ndarray:
    """The HxWx3 uint8 RGB pixels of an ingested image, checked against its table row.

    FileNotFoundError when the file is gone, ValueError when its size differs
    from the table's ``width``/``height``; both name the file, image and batch.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: image file of image_id {image_id} (batch {batch!r}, field 'path') is missing; "
            "re-ingest the batch or restore the file"
        )
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    if rgb.shape[:2] != (height, width):
        raise ValueError(
            f"{path}: image_id {image_id} is {rgb.shape[1]}x{rgb.shape[0]} on disk but the images table "
            f"says width={width}, height={height}; re-ingest the batch"
        )
    return rgb


def decode_image_instance(rle_counts: str, image_id: int, batch: str, height: int, width: int) -> np.ndarray:
    """``coco_ingest.decode_instance_mask`` with an error that names the image and batch at fault."""
    try:
        return decode_instance_mask(rle_counts, height, width)
    except ValueError as error:
        raise ValueError(
            f"instances of image_id {image_id} (batch {batch!r}), field 'rle_counts': {error}; "
            "re-ingest the batch"
        ) from error


def save_png(array: np.ndarray, path: Path) -> None:
    """Write an RGB uint8 image or a bool mask (as 0/255) as PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    # zlib level 1: 6.4x faster than Pillow's default 6 on a 640x480 result for files 16% larger
    # (bench/benchmarks/RESULTS.md section 4); at COCO size the PNG write was most of a counterfactual's cost.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` hold ``source``'s bytes: a hard link (no second copy), a copy across file systems.

    Creates ``target``'s folder; an existing ``target`` is an error (FileExistsError).
    FileNotFoundError names ``source`` when it is gone.
    """
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise FileNotFoundError(
            f"{source}: counterfactual image to reuse is missing; rematerialize the batch that made it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError as error:
        if target.exists() or error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(source, target)


def _load_rgb(task: _Task) -> np.ndarray:
    return load_source_rgb(task.path, task.image_id, task.batch, task.width, task.height)


def _decode(rle: str, task: _Task) -> np.ndarray:
    return decode_image_instance(rle, task.image_id, task.batch, task.height, task.width)



def _render_chunk(
    tasks: Sequence[_Task],
    inpainter: Inpainter,
    max_companion_fraction: float,
    dilation_px: int,
    seed: int,
) -> list[_Rendered]:
    """Masks, placement and inpainting for a few tasks; writes their PNGs, returns their sizes."""
    results: dict[int, _Rendered] = {}
    jobs: list[tuple[_Task, np.ndarray, np.ndarray, np.ndarray]] = []
    for task in tasks:
        companion_masks = [_decode(rle, task) for rle in task.companion_rles]
        companion_union = removal_mask(companion_masks, 0)
        fraction = float(companion_union.mean())
        if fraction > max_companion_fraction:
            reason = (
                f"companion covers {fraction:.1%} of the image "
                f"(more than max_companion_fraction {max_companion_fraction:.0%})"
            )
            results[task.index] = _Rendered(task.index, skipped=reason)
            continue
        removal = removal_mask(companion_masks, dilation_px)
        occupied = removal_mask([_decode(rle, task) for rle in task.all_rles], dilation_px)
        control = control_mask(removal, occupied, _task_rng(seed, task))
        if control is None:
            results[task.index] = _Rendered(task.index, skipped="no place for a control region off every instance")
            continue
        jobs.append((task, _load_rgb(task), removal, control))
    if jobs:
        images = [rgb for _, rgb, _, _ in jobs for _ in (0, 1)]
        masks = [mask for _, _, removal, control in jobs for mask in (removal, control)]
        filled = inpainter.inpaint(images, masks)
        for j, (task, _, removal, control) in enumerate(jobs):
            stem = Path(task.out_stem)
            save_png(filled[2 * j], stem.with_name(stem.name + "_removal.png"))
            save_png(removal, stem.with_name(stem.name + "_removal_mask.png"))
            save_png(filled[2 * j + 1], stem.with_name(stem.name + "_control.png"))
            save_png(control, stem.with_name(stem.name + "_control_mask.png"))
            results[task.index] = _Rendered(task.index, None, int(removal.sum()), int(control.sum()))
    return [results[task.index] for task in tasks]


_WORKER_INPAINTER: Inpainter | None = None


def _init_worker(spec: InpainterSpec) -> None:
    global _WORKER_INPAINTER
    # Each process gets one thread: the pool, not the libraries, spreads the work.
    cv2.setNumThreads(1)
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)
    _WORKER_INPAINTER = spec.build()


def _render_with_worker_inpainter(render_chunk: Callable[[Sequence, Inpainter], list], chunk: Sequence) -> list:
    assert _WORKER_INPAINTER is not None, "worker started without _init_worker"
    return render_chunk(chunk, _WORKER_INPAINTER)


def run_inpainting_chunks(
    render_chunk: Callable[[Sequence, Inpainter], list],
    chunks: Sequence[Sequence],
    inpainter: Inpainter | InpainterSpec,
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
    label: str = "counterfactuals",
) -> list:
    """``render_chunk(chunk, inpainter)`` over ``chunks`` in order, here or in a spawned process pool; results joined.

    ``render_chunk`` must be a module-level function (or a ``functools.partial`` of
    one) so it pickles. With ``workers == 1`` (or one chunk) it runs here with
    ``inpainter`` (a spec is built once); otherwise each of ``min(workers, chunks)``
    spawned workers builds its own inpainter from ``spec_of(inpainter)``, one
    thread each. Results come back in chunk order whatever ``workers``, so output
    is identical when each chunk's rendering is deterministic. ``progress`` hears
    "<label>: chunk i/n done" about every tenth of the chunks.
    """
    report = progress or (lambda message: None)
    step = max(1, len(chunks) // 10)
    results: list = []

    def done(number: int) -> None:
        if number % step == 0 or number == len(chunks):
            report(f"{label}: chunk {number}/{len(chunks)} done")

    if workers == 1 or len(chunks) <= 1:
        local = inpainter.build() if isinstance(inpainter, InpainterSpec) else inpainter
        for number, chunk in enumerate(chunks, start=1):
            results.extend(render_chunk(chunk, local))
            done(number)
        return results
    spec = spec_of(inpainter)
    # spawn, not fork: a forked child inherits torch's thread pools mid-state and can hang.
    # process_pool: a stopped run ends the workers now instead of rendering every queued chunk.
    with process_pool(
        min(workers, len(chunks)), mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(spec,)
    ) as pool:
        futures = [pool.submit(_render_with_worker_inpainter, render_chunk, chunk) for chunk in chunks]
        for number, future in enumerate(futures, start=1):
            results.extend(future.result())
            done(number)
    return results


# --------------------------------------------------------------------------- the eval set


@dataclass
class EvalCounterfactuals:
    """The counterfactual eval set: images (removal + control), edited captions, and what was skipped."""

    images: pl.DataFrame
    captions: pl.DataFrame
    skipped: pl.DataFrame


def _check_columns(frame: pl.DataFrame, name: str, columns: Sequence[str]) -> None:
    require_columns(frame, columns, f"build_eval_counterfactuals: the {name} frame", f"Pass the ingested {name} table.")


def _plan_tasks(
    images: pl.DataFrame, instances: pl.DataFrame, pairs: pl.DataFrame, out_dir: Path
) -> tuple[list[_Task], list[dict]]:
    """Tasks in a fixed order (pairs as given, then batch, image_id), plus rows skipped before rendering."""
    image_rows = {
        (row["batch"], row["image_id"]): row
        for row in images.select("batch", "image_id", "path", "width", "height").iter_rows(named=True)
    }
    by_image: dict[tuple[str, int], list[tuple[str, str]]] = {}
    for row in instances.sort("batch", "image_id", "annotation_id").iter_rows(named=True):
        by_image.setdefault((row["batch"], row["image_id"]), []).append((row["category"], row["rle_counts"]))
    tasks: list[_Task] = []
    skipped: list[dict] = []
    seen_pairs: set[tuple[str, str]] = set()
    for anchor, companion in pairs.select("anchor", "companion").iter_rows():
        if (anchor, companion) in seen_pairs:
            continue
        seen_pairs.add((anchor, companion))
        pair = pair_name(anchor, companion)
        for key in sorted(by_image):
            objects = by_image[key]
            categories = {category for category, _ in objects}
            if anchor not in categories or companion not in categories:
                continue
            batch, image_id = key
            row = image_rows.get(key)
            if row is None:
                skipped.append(
                    {"source_image_id": image_id, "batch": batch, "pair": pair, "reason": "no row in the images table"}
                )
                continue
            tasks.append(
                _Task(
                    index=len(tasks),
                    batch=batch,
                    image_id=image_id,
                    anchor=anchor,
                    companion=companion,
                    path=row["path"],
                    width=int(row["width"]),
                    height=int(row["height"]),
                    companion_rles=tuple(rle for category, rle in objects if category == companion),
                    all_rles=tuple(rle for _, rle in objects),
                    categories=frozenset(categories),
                    out_stem=str(out_dir / path_slug(pair) / f"{path_slug(batch)}_{image_id}"),
                )
            )
    return tasks, skipped


def build_eval_counterfactuals(
    tables: SplitTables,
    pairs: pl.DataFrame,
    out_dir: Path,
    recipe: CounterfactualRecipe,
    progress: Callable[[str], None] | None = None,
) -> EvalCounterfactuals:
    """Build the counterfactual eval set of the test split (docs/definitions.md); PNGs go under ``out_dir``.

    ``tables`` are the ingested images/captions/instances tables of one or
    several batches (only ``split == "test"`` rows are used; rows are keyed by
    (batch, id)); ``pairs`` a frame of flagged pairs (``anchor``,
    ``companion``); ``recipe`` says how (see ``CounterfactualRecipe``; the
    train draw counts are not used). For each pair and each test image with
    instances of both: skip it when the companion's union mask covers more
    than ``max_companion_fraction`` of the image or no control region fits;
    else write ``<pair>/<batch>_<image_id>_{removal,control}[_mask].png`` and
    edit the captions that mention the companion. Ids: cf_image_id counts
    removal then control per kept (pair, image) in order (pairs as given, then
    batch, image_id); cf_caption_id counts the edited captions in the same
    order; ``skipped`` lists skipped (pair, image) rows in that order too. The
    control placement of a (pair, image) draws from (seed, batch, image_id,
    pair), so a batch built alone gives the same images as inside several
    batches. (pair, image) tasks go to the inpainter in fixed chunks
    (``tasks_per_chunk``, default 4, of 2 images each), so output is identical
    for a seed whatever ``workers``. Caption edits run in the calling process,
    so categories added with ``vocabulary.register_categories`` apply.
    """
    images, captions, instances = tables.images, tables.captions, tables.instances
    _check_columns(images, "images", ("batch", "split", "image_id", "path", "width", "height"))
    _check_columns(captions, "captions", ("batch", "split", "caption_id", "image_id", "caption"))
    _check_columns(instances, "instances", ("batch", "split", "annotation_id", "image_id", "category", "rle_counts"))
    _check_columns(pairs, "pairs", ("anchor", "companion"))
    report = progress or (lambda message: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # exists even when nothing qualifies, for callers that register it
    test_images = images.filter(pl.col("split") == EVAL_SPLIT)
    test_captions = captions.filter(pl.col("split") == EVAL_SPLIT)
    test_instances = instances.filter(pl.col("split") == EVAL_SPLIT)

    tasks, skipped_rows = _plan_tasks(test_images, test_instances, pairs, out_dir)
    # Fixed chunks, whatever the worker count: a batched backend then sees the same batches.
    per_chunk = recipe.chunk_size(TASKS_PER_CHUNK)
    chunks = [tasks[i : i + per_chunk] for i in range(0, len(tasks), per_chunk)]
    report(f"counterfactuals: {len(tasks)} (pair, test image) candidates in {len(chunks)} chunks")
    render = functools.partial(
        _render_chunk, max_companion_fraction=recipe.max_companion_fraction, dilation_px=recipe.dilation_px,
        seed=recipe.seed,
    )
    rendered: list[_Rendered] = run_inpainting_chunks(
        render, chunks, recipe.inpainter, recipe.workers, report, "counterfactuals"
    )

    captions_by_image: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for row in test_captions.sort("batch", "image_id", "caption_id").iter_rows(named=True):
        captions_by_image.setdefault((row["batch"], row["image_id"]), []).append((row["caption_id"], row["caption"]))
    image_out: list[dict] = []
    caption_out: list[dict] = []
    for task, result in zip(tasks, rendered, strict=True):
        pair = pair_name(task.anchor, task.companion)
        if result.skipped is not None:
            skipped_rows.append(
                {"source_image_id": task.image_id, "batch": task.batch, "pair": pair, "reason": result.skipped}
            )
            continue
        common = {
            "source_image_id": task.image_id,
            "batch": task.batch,
            "pair": pair,
            "anchor": task.anchor,
            "companion": task.companion,
        }
        removal_id = len(image_out) + 1
        stem = Path(task.out_stem)
        for kind, pixels in (("removal", result.removal_pixels), ("control", result.control_pixels)):
            image_out.append(
                {
                    "cf_image_id": len(image_out) + 1,
                    "kind": kind,
                    **common,
                    "path": str(stem.with_name(f"{stem.name}_{kind}.png")),
                    "mask_path": str(stem.with_name(f"{stem.name}_{kind}_mask.png")),
                    "source_path": task.path,
                    "width": task.width,
                    "height": task.height,
                    "masked_pixels": pixels,
                    "mask_fraction": pixels / (task.width * task.height),
                }
            )
        image_categories = task.categories
        for caption_id, caption in captions_by_image.get((task.batch, task.image_id), []):
            if task.companion not in vocabulary.mentioned_categories(caption):
                continue
            edited = remove_companion_phrase(caption, task.companion)
            accepted, reason = judge_caption_edit(edited, task.companion, image_categories)
            caption_out.append(
                {
                    "cf_caption_id": len(caption_out) + 1,
                    "cf_image_id": removal_id,
                    "source_caption_id": caption_id,
                    **common,
                    "source_caption": caption,
                    "caption": edited,
                    "accepted": accepted,
                    "reason": reason,
                }
            )
    # One row per skipped (pair, image), in task order whether it was skipped while planning or
    # rendering: a batch's rows then sit in the same order inside the rows of several batches.
    unique_pairs = dict.fromkeys(pairs.select("anchor", "companion").iter_rows())
    pair_order = {pair_name(anchor, companion): i for i, (anchor, companion) in enumerate(unique_pairs)}
    skipped_rows.sort(key=lambda row: (pair_order[row["pair"]], row["batch"], row["source_image_id"]))
    kept = len(image_out) // 2
    accepted_count = sum(row["accepted"] for row in caption_out)
    report(
        f"counterfactuals: {kept} kept, {len(skipped_rows)} skipped; "
        f"{accepted_count}/{len(caption_out)} caption edits accepted"
    )
    return EvalCounterfactuals(
        images=pl.DataFrame(image_out, schema=CF_IMAGES_SCHEMA),
        captions=pl.DataFrame(caption_out, schema=CF_CAPTIONS_SCHEMA),
        skipped=pl.DataFrame(skipped_rows, schema=CF_SKIPPED_SCHEMA),
    )


# --------------------------------------------------------------------------- the UI grid


def _outlined(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    out = image.copy()
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    thickness = max(1, round(max(image.shape[:2]) / 200))
    cv2.drawContours(out, contours, -1, colour, thickness)
    return out


def _read_rgb(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _read_mask(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 127


def before_after_grid(rows: pl.DataFrame, out_png: Path, n: int = 8) -> Path:
    """A PNG grid for the UI: per (pair, image), original | removal mask outline | I⁻ᵇ | control.

    ``rows`` is (a subset of) ``EvalCounterfactuals.images``; the first ``n``
    removal rows by cf_image_id are shown, each beside its control (outlined in
    cyan, so the eye can find it). Returns ``out_png``.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    removals = rows.filter(pl.col("kind") == "removal").sort("cf_image_id").head(n)
    controls = {
        (row["batch"], row["source_image_id"], row["pair"]): row
        for row in rows.filter(pl.col("kind") == "control").iter_rows(named=True)
    }
    if removals.height == 0:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.text(0.5, 0.5, "no counterfactual images", ha="center", va="center")
        ax.axis("off")
        fig.savefig(out_png, dpi=100)
        plt.close(fig)
        return out_png
    titles = ("original", "removal mask", "companion removed", "control")
    fig, axes = plt.subplots(removals.height, 4, figsize=(12, 3 * removals.height), squeeze=False)
    for r, row in enumerate(removals.iter_rows(named=True)):
        original = _read_rgb(row["source_path"])
        removal_mask_image = _read_mask(row["mask_path"])
        control = controls.get((row["batch"], row["source_image_id"], row["pair"]))
        panels = [
            original,
            _outlined(original, removal_mask_image, (255, 0, 0)),
            _read_rgb(row["path"]),
            _outlined(_read_rgb(control["path"]), _read_mask(control["mask_path"]), (0, 255, 255))
            if control is not None
            else np.full_like(original, 255),
        ]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
        axes[r, 0].set_ylabel(f"{row['pair']}\nimage {row['source_image_id']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png
