"""Read one COCO-layout dataset batch (a ``dataset.yaml``) into validated Polars tables.

The contract is docs/data-contract.md#dataset-manifest: a manifest names, per split (``train``, ``test``;
either may be absent), an images folder, a COCO captions JSON and a COCO
instances JSON, all relative to the manifest. Real COCO 2017 loads as-is.

Every record is checked (keys and types, duplicate and dangling ids, image files
that are missing, truncated or of the wrong size, segmentations out of bounds,
empty masks, image paths escaping their folder). In ``fail`` mode the first bad
record raises a :class:`DatasetError`; in ``quarantine`` mode it is dropped with
the records that depend on it and reported as one row of ``quarantine``.
Malformed JSON and missing top-level sections always raise: nothing in such a
file can be trusted record by record.

Images are never copied: the tables record each file's resolved path and sha256.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import reprlib
import stat
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import yaml
from PIL import Image
from pycocotools import mask as coco_mask

from spur_assets.core.data.batch_union import SplitTables
from spur_assets.core.data.errors import DatasetError

SPLIT_NAMES = ("train", "test")
_SPLIT_KEYS = ("images", "captions", "instances")

# Exact schemas of the tables load_batch returns (docs/data-contract.md#tables); `batch` and `split` lead every one.
_PARTITION = {"batch": pl.Utf8, "split": pl.Utf8}
IMAGES_SCHEMA = pl.Schema(
    {
        **_PARTITION,
        "image_id": pl.Int64,
        "file_name": pl.Utf8,
        "path": pl.Utf8,
        "width": pl.Int32,
        "height": pl.Int32,
        "mode": pl.Utf8,
        "bytes": pl.Int64,
        "sha256": pl.Utf8,
    }
)
CAPTIONS_SCHEMA = pl.Schema({**_PARTITION, "caption_id": pl.Int64, "image_id": pl.Int64, "caption": pl.Utf8})
INSTANCES_SCHEMA = pl.Schema(
    {
        **_PARTITION,
        "annotation_id": pl.Int64,
        "image_id": pl.Int64,
        "category_id": pl.Int64,
        "category": pl.Utf8,
        "supercategory": pl.Utf8,
        "bbox_x": pl.Float64,
        "bbox_y": pl.Float64,
        "bbox_w": pl.Float64,
        "bbox_h": pl.Float64,
        "area": pl.Float64,
        "iscrowd": pl.Boolean,
        "rle_counts": pl.Utf8,
        "mask_area": pl.Int64,
    }
)
# `split` of a category row lists every split that declares it, comma-joined in
# manifest order ("train,test"): the table is a union over splits.
CATEGORIES_SCHEMA = pl.Schema({**_PARTITION, "category_id": pl.Int64, "category": pl.Utf8, "supercategory": pl.Utf8})
QUARANTINE_SCHEMA = pl.Schema(
    {**_PARTITION, "file": pl.Utf8, "record": pl.Utf8, "field": pl.Utf8, "problem": pl.Utf8}
)

# Largest image accepted by default (width x height). Pillow warns only at 89 MP and refuses at
# 179 MP; a 169 MP PNG can be a 0.5 MB file that decodes into 1.8 GB per thread.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# COCO's JSON nests 5 deep (object > list > record > segmentation > polygon); anything far deeper
# is refused before a parser recurses into it.
MAX_NESTING = 64
# A dataset.yaml is a few lines; a larger one is not a manifest.
MAX_MANIFEST_BYTES = 1 << 20
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
_CONFINE_HINT = (
    "keep a batch's images and annotation files inside its folder, or allow a shared data root "
    "(SPUR_ALLOWED_ROOTS, or `spur run --allow-root DIR`)"
)

# Polygon vertices may sit on the far pixel edge (x == width) and annotation tools
# round a little past it; beyond one pixel the polygon belongs to another image size.
_POLYGON_TOLERANCE_PX = 1.0


@dataclass(frozen=True)
class SplitFiles:
    """Where one split's data lives: absolute, resolved paths."""

    images_dir: Path
    captions: Path
    instances: Path


@dataclass(frozen=True)
class DatasetManifest:
    """A parsed ``dataset.yaml``: its ``name``, its own path and the files of each split present."""

    name: str
    path: Path
    splits: dict[str, SplitFiles]


@dataclass
class BatchTables:
    """The validated tables of one batch, each sorted by its id (schemas: ``*_SCHEMA`` above)."""

    images: pl.DataFrame
    captions: pl.DataFrame
    instances: pl.DataFrame
    categories: pl.DataFrame
    quarantine: pl.DataFrame


def content_fingerprint(tables: SplitTables | BatchTables) -> str:
    """sha256 over a batch's content: image bytes (their sha256), captions and instances, ids included.

    ``tables``: a batch's images, captions and instances (a ``BatchTables`` from
    ``load_batch``, or a ``SplitTables`` of the stored raw tables).

    Independent of where the files lie (the ``path`` column) and of the batch id, so two
    ingests of the same data agree and any change to a record or a pixel differs. Row
    hashes are Polars' and only comparable within one Polars version: compare
    fingerprints computed in the same process, not stored ones.
    """
    digest = hashlib.sha256()
    for frame, columns in (
        (tables.images, ["split", "image_id", "file_name", "width", "height", "sha256"]),
        (tables.captions, ["split", "caption_id", "image_id", "caption"]),
        (tables.instances, [c for c in INSTANCES_SCHEMA.names() if c != "batch"]),
    ):
        ordered = frame.select(columns).sort(columns[:2])
        digest.update(f"{ordered.height}:{','.join(columns)}".encode())
        for seed in (0, 1):  # two 64-bit row hashes: 128 bits per row
            digest.update(ordered.hash_rows(seed=seed).to_numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- manifest


def _encodable(text: str) -> bool:
    """True if ``text`` is valid Unicode (no lone surrogates, which JSON and YAML escapes can produce)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_yaml_shape(path: Path, text: str) -> None:
    """Refuse nesting deeper than MAX_NESTING and anchors/aliases before the recursive composer runs.

    PyYAML's scanner and parser are iterative; only composing the document recurses.
    """
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_NESTING:
                line = event.start_mark.line + 1 if event.start_mark is not None else "?"
                raise DatasetError(
                    path, None, None, f"nested more than {MAX_NESTING} levels deep (line {line})",
                    "a dataset.yaml is a flat `name:` and `splits:` mapping",
                )
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise DatasetError(
                path, None, None, "uses YAML anchors or aliases", "write every value out; a dataset.yaml needs no references"
            )


def _load_manifest_document(path: Path) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise DatasetError(
                path, None, None, f"is {size:,} bytes; a manifest has at most {MAX_MANIFEST_BYTES:,}",
                "pass the dataset.yaml, not a data file",
            )
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(path, None, None, f"not UTF-8 text ({error})", "save the manifest as UTF-8") from error
    except OSError as error:
        raise DatasetError(path, None, None, f"cannot be read ({error})", "check the path and its permissions") from error
    try:
        _check_yaml_shape(path, text)
        return yaml.safe_load(text)
    except DatasetError:
        raise
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(filter(None, (getattr(error, "context", None), getattr(error, "problem", None)))) or str(error)
        raise DatasetError(path, None, None, f"malformed YAML{where}: {' '.join(what.split())}", "fix the YAML syntax") from error
    except (RecursionError, ValueError, OverflowError) as error:  # e.g. a timestamp or number out of range
        raise DatasetError(path, None, None, f"cannot be read as YAML ({type(error).__name__}: {error})", "fix the YAML") from error


def _key_label(key: Any) -> str:
    """A manifest key as it can be printed in a field name (non-text keys and long ones shortened)."""
    if isinstance(key, str) and _encodable(key) and len(key) <= 40:
        return key
    return reprlib.repr(key).encode("utf-8", "backslashreplace").decode("ascii")


def _confined(target: Path, roots: Sequence[Path]) -> bool:
    return any(target == root or target.is_relative_to(root) for root in roots)


def read_manifest(path: Path, allowed_roots: Sequence[Path | str] = ()) -> DatasetManifest:
    """Parse and check a ``dataset.yaml``.

    Paths in it are relative to the manifest and come back resolved (symlinks followed).
    Each split present must name an existing images folder and existing captions and
    instances files, all resolving inside the manifest's folder or inside one of
    ``allowed_roots`` (e.g. a shared COCO copy). Raises DatasetError for a missing,
    oversized or malformed file, nesting or YAML references, a missing or mistyped key,
    an unknown split name, a missing path or a path outside those folders.
    """
    path = Path(path)
    try:
        is_file = path.is_file()
    except (OSError, ValueError) as error:
        raise DatasetError(path, None, None, f"cannot be read ({error})", "pass the path of an existing dataset.yaml") from error
    if not is_file:
        found = path.exists()
        raise DatasetError(
            path, None, None, "is not a regular file" if found else "manifest file not found",
            "pass the path of an existing dataset.yaml",
        )
    document = _load_manifest_document(path)
    if not isinstance(document, dict):
        raise DatasetError(path, None, None, "the manifest is not a YAML mapping", "write `name:` and `splits:` keys")
    name = document.get("name")
    if not isinstance(name, str) or not name.strip() or not _encodable(name):
        raise DatasetError(path, None, "name", "missing or not a non-empty string", "add `name: <dataset name>`")
    splits = document.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise DatasetError(
            path, None, "splits", "missing or not a non-empty mapping", f"add `splits:` with one or both of {SPLIT_NAMES}"
        )
    base = path.resolve().parent
    roots = [base, *(Path(root).expanduser().resolve() for root in allowed_roots)]
    parsed: dict[str, SplitFiles] = {}
    for split, entry in splits.items():
        if split not in SPLIT_NAMES:
            raise DatasetError(
                path, None, f"splits.{_key_label(split)}", "unknown split", f"name splits only {' or '.join(SPLIT_NAMES)}"
            )
        if not isinstance(entry, dict):
            raise DatasetError(
                path, None, f"splits.{split}", "not a mapping", "write `{images: DIR, captions: FILE, instances: FILE}`"
            )
        unknown = sorted(_key_label(key) for key in set(entry) - set(_SPLIT_KEYS))
        if unknown:
            raise DatasetError(
                path, None, f"splits.{split}.{unknown[0]}", "unknown key", f"use only the keys {', '.join(_SPLIT_KEYS)}"
            )
        resolved: dict[str, Path] = {}
        for key in _SPLIT_KEYS:
            where = f"splits.{split}.{key}"
            value = entry.get(key)
            if not isinstance(value, str) or not value.strip():
                raise DatasetError(path, None, where, "missing or not a path string", "give a path relative to the manifest")
            if "\x00" in value or not _encodable(value):
                raise DatasetError(path, None, where, "the path contains a NUL or an invalid character", "give a plain path")
            kind = "folder" if key == "images" else "file"
            try:
                target = (base / value).resolve()
                exists = target.is_dir() if key == "images" else target.is_file()
            except (OSError, RuntimeError, ValueError) as error:  # RuntimeError: a symlink loop on Python 3.11
                raise DatasetError(path, None, where, f"{value!r} cannot be resolved ({error})", "fix the path") from None
            if not _confined(target, roots):
                raise DatasetError(
                    path, None, where, f"{value!r} resolves to {target}, outside the batch folder {base}; refused", _CONFINE_HINT
                )
            if not exists:
                what = "is not a " + ("folder" if key == "images" else "regular file") if target.exists() else "does not exist"
                raise DatasetError(path, None, where, f"{kind} {target} {what}", "fix the path or add the data")
            resolved[key] = target
        parsed[split] = SplitFiles(images_dir=resolved["images"], captions=resolved["captions"], instances=resolved["instances"])
    # Manifest order may differ from the canonical one; keep train before test everywhere.
    ordered = {split: parsed[split] for split in SPLIT_NAMES if split in parsed}
    return DatasetManifest(name=name, path=path.resolve(), splits=ordered)


# --------------------------------------------------------------------------- masks


def _compressed_rle_counts(counts: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string; ValueError if the string is malformed.

    Mirrors ``rleFrString`` of the COCO API (6-bit characters '0'..'o', LEB128-like,
    counts after the second stored as deltas) but checks every step, because the
    C code reads past the end of a malformed string.
    """
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value = 0
        shift = 0
        more = True
        while more:
            if position >= len(counts):
                raise ValueError("the string ends in the middle of a run length")
            code = ord(counts[position]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"character {counts[position]!r} at position {position} is not an RLE character ('0'..'o')")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift  # sign-extend: deltas may be negative
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError(f"run {len(runs)} has negative length {value}")
        runs.append(value)
    return runs


def _check_run_total(runs: list[int], height: int, width: int) -> None:
    total = sum(runs)
    if total != height * width:
        raise ValueError(f"run lengths sum to {total} pixels, not height*width = {height}*{width} = {height * width}")


def decode_instance_mask(rle_counts: str, height: int, width: int) -> np.ndarray:
    """Decode a stored compressed COCO RLE (the ``rle_counts`` column) into a bool (height, width) mask.

    Raises ValueError if the string is malformed or does not cover height*width pixels.
    """
    _check_run_total(_compressed_rle_counts(rle_counts), height, width)
    mask = coco_mask.decode({"size": [int(height), int(width)], "counts": rle_counts.encode("ascii")})
    return np.ascontiguousarray(mask, dtype=bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _finite_sum(values: list) -> bool:
    """True if every number converts to a finite float (fsum runs in C: COCO has ~40M polygon coordinates)."""
    try:
        return math.isfinite(math.fsum(values))
    except OverflowError:  # an integer too large for a float, or floats summing past the float range
        return False


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and _encodable(value)


_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlevel = 2


class _BadField(Exception):
    """A field problem found while checking one record; becomes a DatasetError with the file and record."""

    def __init__(self, field: str, problem: str, hint: str) -> None:
        super().__init__(problem)
        self.field = field
        self.problem = problem
        self.hint = hint


def _segmentation_rle(segmentation: Any, height: int, width: int) -> dict:
    """The pycocotools RLE (compressed counts) of one instance segmentation, after checking it fits the image.

    Polygons -> frPyObjects + merge; uncompressed RLE -> frPyObjects; compressed -> as is.
    Raises _BadField naming the sub-field at fault.
    """
    where = "annotations.segmentation"
    if isinstance(segmentation, list):
        if not segmentation:
            raise _BadField(where, "empty polygon list", "give at least one polygon or an RLE")
        polygons = []
        for index, polygon in enumerate(segmentation):
            # set(map(type)) and sum() run in C: COCO train has ~40M polygon coordinates.
            # A NaN, an infinity or an integer beyond the float range anywhere fails the sum.
            numeric = isinstance(polygon, list) and set(map(type, polygon)) <= {int, float}
            if not numeric or not _finite_sum(polygon):
                raise _BadField(
                    f"{where}[{index}]", "a polygon must be a list of finite numbers", "write [x1, y1, x2, y2, ...]"
                )
            if len(polygon) % 2:
                raise _BadField(f"{where}[{index}]", f"odd number of coordinates ({len(polygon)})", "list x, y pairs")
            if len(polygon) < 6:
                # Fewer than 3 vertices encloses no area; COCO has a few such parts, and
                # pycocotools would misread a 4-number polygon as a box, so skip them.
                continue
            xs, ys = polygon[0::2], polygon[1::2]
            low_x, high_x, low_y, high_y = min(xs), max(xs), min(ys), max(ys)
            tolerance = _POLYGON_TOLERANCE_PX
            if low_x < -tolerance or high_x > width + tolerance or low_y < -tolerance or high_y > height + tolerance:
                raise _BadField(
                    f"{where}[{index}]",
                    f"polygon spans x {low_x:g}..{high_x:g}, y {low_y:g}..{high_y:g}, outside the "
                    f"{width}x{height} image (tolerance {tolerance:g} px)",
                    "check that the annotation belongs to this image and that width/height are right",
                )
            polygons.append(polygon)
        if not polygons:
            raise _BadField(where, "no polygon has 3 or more vertices", "give real polygons or an RLE")
        return coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(value) for value in size)):
            raise _BadField(f"{where}.size", "RLE size is missing or malformed", "write `size: [height, width]` as two integers")
        if size != [height, width]:
            raise _BadField(
                f"{where}.size",
                f"RLE size {size} differs from the image's [height, width] = [{height}, {width}]",
                "check that the annotation belongs to this image and that width/height are right",
            )
        if isinstance(counts, list):
            if not set(map(type, counts)) <= {int} or (counts and min(counts) < 0):
                raise _BadField(f"{where}.counts", "uncompressed RLE counts must be non-negative integers", "re-encode the mask")
            try:
                _check_run_total(counts, height, width)
            except ValueError as error:
                raise _BadField(f"{where}.counts", str(error), "re-encode the mask at the image size") from None
            return coco_mask.frPyObjects({"size": size, "counts": counts}, height, width)
        if isinstance(counts, str):
            try:
                _check_run_total(_compressed_rle_counts(counts), height, width)
            except ValueError as error:
                raise _BadField(f"{where}.counts", f"malformed compressed RLE: {error}", "re-encode the mask with pycocotools") from None
            return {"size": size, "counts": counts.encode("ascii")}
        raise _BadField(f"{where}.counts", "RLE counts must be a list of integers or a compressed string", "re-encode the mask")
    raise _BadField(
        where, f"expected a polygon list or an RLE mapping, found {type(segmentation).__name__}",
        "use the COCO segmentation format",
    )


# --------------------------------------------------------------------------- findings


class _Findings:
    """Bad records: raised at once in 'fail' mode, collected as quarantine rows otherwise."""

    def __init__(self, batch: str, mode: str) -> None:
        self.batch = batch
        self.mode = mode
        self.rows: list[dict[str, str]] = []
        # Row of each quarantined image / category, so the count of records dropped
        # with it can be added to its problem once known.
        self.image_rows: dict[tuple[str, int], list[int]] = {}
        self.category_rows: dict[int, list[int]] = {}

    def report(self, split: str, error: DatasetError, *, image: int | None = None, category: int | None = None) -> None:
        if self.mode == "fail":
            raise error
        problem = error.problem + (f" -- {error.hint}" if error.hint else "")
        self.rows.append(
            {
                "batch": self.batch,
                "split": split,
                "file": error.file,
                "record": "" if error.record is None else str(error.record),
                "field": error.field or "",
                "problem": problem,
            }
        )
        if image is not None:
            self.image_rows.setdefault((split, image), []).append(len(self.rows) - 1)
        if category is not None:
            self.category_rows.setdefault(category, []).append(len(self.rows) - 1)

    def note_dropped(self, rows: list[int], dropped: Counter) -> None:
        if not dropped:
            return
        listed = ", ".join(f"{kind}: {count}" for kind, count in sorted(dropped.items()))
        for row in rows:
            self.rows[row]["problem"] += f" (dropped with it: {listed})"


# --------------------------------------------------------------------------- JSON records


@dataclass
class _ImageRecord:
    image_id: int
    file_name: str
    width: int
    height: int
    listed_in: Path


@dataclass
class _InstanceRecord:
    annotation_id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    area: float
    iscrowd: bool
    rle_counts: str
    mask_area: int


@dataclass
class _SplitRecords:
    """One split after the JSON checks; image files not yet looked at."""

    split: str
    files: SplitFiles
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    images: dict[int, _ImageRecord] = field(default_factory=dict)
    dropped_images: set[int] = field(default_factory=set)
    captions: list[tuple[int, int, str]] = field(default_factory=list)  # caption_id, image_id, caption
    instances: list[_InstanceRecord] = field(default_factory=list)
    categories: dict[int, tuple[str, str]] = field(default_factory=dict)
    dropped_categories: set[int] = field(default_factory=set)
    # Records skipped during the JSON checks because their image was already dropped.
    dropped_with_image: dict[int, Counter] = field(default_factory=dict)


def _json_nesting_exceeds(path: Path, limit: int, chunk_bytes: int = 1 << 22) -> int | None:
    """Byte offset where ``path``'s JSON first nests deeper than ``limit``, or None.

    A vectorised pass over the bytes (brackets outside strings; a quote preceded by an odd
    run of backslashes is escaped), carried across chunks, so no parser ever recurses into
    a hostile file. About 0.1 s per 10 MB.
    """
    depth, in_string, backslashes, offset = 0, False, 0, 0
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            data = np.frombuffer(chunk, dtype=np.uint8)
            index = np.arange(data.size, dtype=np.int64)
            is_backslash = data == 0x5C
            # Index of the last byte that is not a backslash, at or before each position.
            last_plain = np.maximum.accumulate(np.where(is_backslash, -1, index))
            quotes = np.flatnonzero(data == 0x22)
            before = quotes - 1
            run = np.where(before >= 0, before - last_plain[np.maximum(before, 0)], backslashes)
            run = np.where((before >= 0) & (last_plain[np.maximum(before, 0)] < 0), quotes + backslashes, run)
            real = np.zeros(data.size, dtype=np.int8)
            real[quotes[run % 2 == 0]] = 1
            parity = (np.cumsum(real, dtype=np.int64) + int(in_string)) % 2
            outside = parity == 0
            step = np.zeros(data.size, dtype=np.int64)
            step[((data == 0x5B) | (data == 0x7B)) & outside] = 1
            step[((data == 0x5D) | (data == 0x7D)) & outside] = -1
            levels = np.cumsum(step) + depth
            deeper = np.flatnonzero(levels > limit)
            if deeper.size:
                return offset + int(deeper[0])
            depth = int(levels[-1])
            in_string = bool(parity[-1])
            tail = data.size - 1 - int(last_plain[-1])
            backslashes = backslashes + tail if tail == data.size else tail
            offset += data.size
    return None


def _read_json(path: Path) -> dict:
    """Load a JSON object; malformed or hostile files raise DatasetError (json's line and column when it has them)."""
    try:
        deep = _json_nesting_exceeds(path, MAX_NESTING)
    except OSError as error:
        raise DatasetError(path, None, None, f"cannot be read ({error})", "check the file and its permissions") from error
    if deep is not None:
        raise DatasetError(
            path, None, None, f"JSON nested more than {MAX_NESTING} levels deep (at byte {deep:,})",
            "COCO files nest 5 levels; repair or re-export the file",
        )
    try:
        with path.open("rb") as handle:
            document = json.load(handle)
    except json.JSONDecodeError as error:
        raise DatasetError(
            path, None, None, f"malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}",
            "repair or re-export the file",
        ) from error
    except UnicodeDecodeError as error:
        raise DatasetError(path, None, None, f"not UTF-8 JSON ({error})", "re-export the file as UTF-8") from error
    except (ValueError, RecursionError) as error:  # e.g. an integer literal of more than 4300 digits
        raise DatasetError(path, None, None, f"cannot be read as JSON ({error})", "repair or re-export the file") from error
    except OSError as error:
        raise DatasetError(path, None, None, f"cannot be read ({error})", "check the file and its permissions") from error
    if not isinstance(document, dict):
        raise DatasetError(path, None, None, "the top level is not a JSON object", "use the COCO layout {images, annotations, ...}")
    return document


def _section(document: dict, key: str, path: Path) -> list:
    section = document.get(key)
    if not isinstance(section, list):
        raise DatasetError(
            path, None, key, "missing top-level list" if section is None else "top-level key is not a list",
            f"a COCO file needs a top-level `{key}` list",
        )
    return section


def _record_label(section: str, index: int, record: Any) -> int | str:
    """The record's id when it has a usable one, else its position, e.g. 'images[12]'."""
    if isinstance(record, dict) and _is_int(record.get("id")):
        return record["id"]
    return f"{section}[{index}]"


def _check_fields(record: Any, section: str, spec: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    """Raise _BadField for the first key of ``spec`` missing from ``record`` or of the wrong type."""
    if not isinstance(record, dict):
        raise _BadField(section, f"a record must be a JSON object, found {type(record).__name__}", "remove or repair the entry")
    for key, (accepts, expected) in spec.items():
        if key not in record:
            raise _BadField(f"{section}.{key}", "required key is missing", f"add `{key}` ({expected})")
        if not accepts(record[key]):
            raise _BadField(f"{section}.{key}", f"expected {expected}, found {_short.repr(record[key])}", f"make `{key}` {expected}")


_ID = (lambda v: _is_int(v) and 0 <= v <= INT64_MAX, "an integer from 0 to 2**63-1")
_SIDE = (lambda v: _is_int(v) and 0 < v <= INT32_MAX, "a positive integer below 2**31")
_IMAGE_FIELDS = {
    "id": _ID,
    "file_name": (lambda v: _is_text(v) and v != "", "a non-empty string of valid Unicode"),
    "width": _SIDE,
    "height": _SIDE,
}
_CAPTION_FIELDS = {"id": _ID, "image_id": _ID, "caption": (_is_text, "a string of valid Unicode")}
_INSTANCE_FIELDS = {
    "id": _ID,
    "image_id": _ID,
    "category_id": _ID,
    "segmentation": (lambda v: isinstance(v, (list, dict)), "a polygon list or an RLE mapping"),
    "area": (_is_number, "a finite number"),
    "bbox": (
        lambda v: isinstance(v, list) and len(v) == 4 and all(map(_is_number, v)) and v[2] >= 0 and v[3] >= 0,
        "[x, y, width, height] with width, height >= 0",
    ),
    "iscrowd": (lambda v: v in (0, 1) and (isinstance(v, bool) or _is_int(v)), "0 or 1"),
}
_CATEGORY_FIELDS = {
    "id": _ID,
    "name": (lambda v: _is_text(v) and v.strip() != "", "a non-empty string of valid Unicode"),
    "supercategory": (_is_text, "a string of valid Unicode"),
}


def _duplicate_ids(section: list) -> dict[int, int]:
    counts = Counter(record["id"] for record in section if isinstance(record, dict) and _is_int(record.get("id")))
    return {record_id: count for record_id, count in counts.items() if count > 1}


def _read_categories(state: _SplitRecords, document: dict, findings: _Findings) -> None:
    path = state.files.instances
    section = _section(document, "categories", path)
    for index, record in enumerate(section):
        label = _record_label("categories", index, record)
        try:
            _check_fields(record, "categories", _CATEGORY_FIELDS)
        except _BadField as bad:
            category = label if isinstance(label, int) else None
            if category is not None:
                state.dropped_categories.add(category)
                state.categories.pop(category, None)
            findings.report(state.split, DatasetError(path, label, bad.field, bad.problem, bad.hint), category=category)
            continue
        category_id, named = record["id"], (record["name"], record["supercategory"])
        if category_id in state.dropped_categories:
            continue
        known = state.categories.get(category_id)
        if known is not None and known != named:
            state.categories.pop(category_id)
            state.dropped_categories.add(category_id)
            findings.report(
                state.split,
                DatasetError(
                    path, category_id, "categories.name",
                    f"category id {category_id} is listed as {known} and as {named}", "give each category id one name",
                ),
                category=category_id,
            )
            continue
        state.categories[category_id] = named


def _read_images(state: _SplitRecords, documents: dict[Path, dict], findings: _Findings) -> None:
    """Image records of the captions and instances JSON; one image listed in both must agree."""
    for path, document in documents.items():
        section = _section(document, "images", path)
        duplicates = _duplicate_ids(section)
        for image_id, count in duplicates.items():
            state.dropped_images.add(image_id)
            state.images.pop(image_id, None)  # it may have come in cleanly from the other file
            findings.report(
                state.split,
                DatasetError(path, image_id, "images.id", f"image id {image_id} is listed {count} times", "give each image one record"),
                image=image_id,
            )
        for index, record in enumerate(section):
            label = _record_label("images", index, record)
            if label in duplicates:
                continue
            try:
                _check_fields(record, "images", _IMAGE_FIELDS)
                _check_image_size(record["width"], record["height"], state.max_image_pixels)
            except _BadField as bad:
                image = label if isinstance(label, int) else None
                if image is not None:
                    state.dropped_images.add(image)
                    state.images.pop(image, None)
                findings.report(state.split, DatasetError(path, label, bad.field, bad.problem, bad.hint), image=image)
                continue
            image_id = record["id"]
            if image_id in state.dropped_images:
                continue
            seen = state.images.get(image_id)
            if seen is None:
                state.images[image_id] = _ImageRecord(image_id, record["file_name"], record["width"], record["height"], path)
                continue
            for key, ours in (("file_name", seen.file_name), ("width", seen.width), ("height", seen.height)):
                if record[key] != ours:
                    state.images.pop(image_id)
                    state.dropped_images.add(image_id)
                    findings.report(
                        state.split,
                        DatasetError(
                            path, image_id, f"images.{key}",
                            f"{key} is {record[key]!r} here but {ours!r} in {seen.listed_in}",
                            "the captions and instances files must describe each image the same way",
                        ),
                        image=image_id,
                    )
                    break


def _check_image_size(width: int, height: int, max_pixels: int, field: str = "images.width") -> None:
    if width * height > max_pixels:
        raise _BadField(
            field,
            f"the image is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} (max_image_pixels)",
            "downscale the image, or raise raw_pairs' max_image_pixels if such images are expected",
        )


def _known_image(state: _SplitRecords, image_id: int) -> bool:
    # An image dropped for its own fault takes its records with it (no extra row for them).
    return image_id in state.images or image_id in state.dropped_images


def _read_captions(state: _SplitRecords, document: dict, findings: _Findings) -> None:
    path = state.files.captions
    section = _section(document, "annotations", path)
    duplicates = _duplicate_ids(section)
    for caption_id, count in duplicates.items():
        findings.report(
            state.split,
            DatasetError(path, caption_id, "annotations.id", f"caption id {caption_id} is listed {count} times", "give each caption its own id"),
        )
    for index, record in enumerate(section):
        label = _record_label("annotations", index, record)
        if label in duplicates:
            continue
        try:
            _check_fields(record, "annotations", _CAPTION_FIELDS)
            if not _known_image(state, record["image_id"]):
                raise _BadField(
                    "annotations.image_id", f"refers to image id {record['image_id']}, which no `images` record lists",
                    "add the image record or remove the caption",
                )
        except _BadField as bad:
            findings.report(state.split, DatasetError(path, label, bad.field, bad.problem, bad.hint))
            continue
        state.captions.append((record["id"], record["image_id"], record["caption"]))


def _read_instances(state: _SplitRecords, document: dict, findings: _Findings) -> None:
    path = state.files.instances
    section = _section(document, "annotations", path)
    duplicates = _duplicate_ids(section)
    for annotation_id, count in duplicates.items():
        findings.report(
            state.split,
            DatasetError(
                path, annotation_id, "annotations.id", f"annotation id {annotation_id} is listed {count} times",
                "give each instance its own id",
            ),
        )
    for index, record in enumerate(section):
        label = _record_label("annotations", index, record)
        if label in duplicates:
            continue
        try:
            _check_fields(record, "annotations", _INSTANCE_FIELDS)
            image_id, category_id = record["image_id"], record["category_id"]
            if not _known_image(state, image_id):
                raise _BadField(
                    "annotations.image_id", f"refers to image id {image_id}, which no `images` record lists",
                    "add the image record or remove the instance",
                )
            if category_id not in state.categories and category_id not in state.dropped_categories:
                raise _BadField(
                    "annotations.category_id", f"refers to category id {category_id}, which `categories` does not list",
                    "add the category or fix the id",
                )
            image = state.images.get(image_id)
            if image is None:  # the image is quarantined; this instance goes with it
                state.dropped_with_image.setdefault(image_id, Counter())["instances"] += 1
                continue
            rle = _segmentation_rle(record["segmentation"], image.height, image.width)
            mask_area = int(coco_mask.area(rle))
            iscrowd = bool(record["iscrowd"])
            if mask_area == 0 and not iscrowd:
                raise _BadField(
                    "annotations.segmentation", "the mask covers no pixel", "remove the instance or fix its segmentation"
                )
        except _BadField as bad:
            findings.report(state.split, DatasetError(path, label, bad.field, bad.problem, bad.hint))
            continue
        x, y, w, h = (float(value) for value in record["bbox"])
        state.instances.append(
            _InstanceRecord(
                annotation_id=record["id"],
                image_id=image_id,
                category_id=category_id,
                bbox=(x, y, w, h),
                area=float(record["area"]),
                iscrowd=iscrowd,
                rle_counts=rle["counts"].decode("ascii"),
                mask_area=mask_area,
            )
        )


def _read_split_json(
    split: str, files: SplitFiles, findings: _Findings, progress: Callable[[str], None], max_image_pixels: int
) -> _SplitRecords:
    state = _SplitRecords(split=split, files=files, max_image_pixels=max_image_pixels)
    captions_doc = _read_json(files.captions)
    instances_doc = _read_json(files.instances) if files.instances != files.captions else captions_doc
    # Check every top-level section before any record, so a wrong file fails before any per-record work.
    for path, document, keys in (
        (files.captions, captions_doc, ("images", "annotations")),
        (files.instances, instances_doc, ("images", "annotations", "categories")),
    ):
        for key in keys:
            _section(document, key, path)
    _read_categories(state, instances_doc, findings)
    _read_images(state, {files.captions: captions_doc, files.instances: instances_doc}, findings)
    _read_captions(state, captions_doc, findings)
    del captions_doc  # COCO's JSON is large; free it before the masks are built
    _read_instances(state, instances_doc, findings)
    progress(
        f"{split}: read {files.captions.name} and {files.instances.name}: {len(state.images):,} images, "
        f"{len(state.captions):,} captions, {len(state.instances):,} instances, {len(state.categories)} categories"
    )
    return state


def _reconcile_splits(states: list[_SplitRecords], findings: _Findings) -> None:
    """One category id means one category across splits; one image id belongs to one split."""
    names: dict[int, tuple[tuple[str, str], str]] = {}
    for state in states:
        for category_id, named in list(state.categories.items()):
            earlier = names.get(category_id)
            if earlier is None:
                names[category_id] = (named, state.split)
            elif earlier[0] != named:
                for other in states:
                    other.categories.pop(category_id, None)
                    other.dropped_categories.add(category_id)
                findings.report(
                    state.split,
                    DatasetError(
                        state.files.instances, category_id, "categories.name",
                        f"category id {category_id} is {named} here but {earlier[0]} in the {earlier[1]} split",
                        "use one category list for every split",
                    ),
                    category=category_id,
                )
    owner: dict[int, _SplitRecords] = {}
    for state in states:
        for image_id in list(state.images):
            first = owner.get(image_id)
            if first is None:
                owner[image_id] = state
                continue
            # The same id in train and test is ambiguous and would leak test images into
            # training statistics: drop it from both.
            for holder in (first, state):
                record = holder.images.pop(image_id, None)
                holder.dropped_images.add(image_id)
                other = state if holder is first else first
                findings.report(
                    holder.split,
                    DatasetError(
                        record.listed_in if record else holder.files.captions, image_id, "images.id",
                        f"image id {image_id} is listed in both the {first.split} and the {state.split} split",
                        f"keep each image in one split (see {other.files.captions})",
                    ),
                    image=image_id,
                )


# --------------------------------------------------------------------------- image files


@dataclass(frozen=True)
class _ImageFacts:
    width: int
    height: int
    mode: str
    size_bytes: int
    sha256: str


def _resolve_image_path(images_dir: Path, file_name: str) -> Path:
    """The resolved path of ``file_name`` inside ``images_dir``; _BadField if it would leave the folder."""
    hint = "image file_names must be relative paths inside the split's images folder"
    if "\x00" in file_name:
        raise _BadField("images.file_name", "contains a NUL character", hint)
    if Path(file_name).is_absolute():
        raise _BadField("images.file_name", f"{file_name!r} is an absolute path; refused", hint)
    try:
        resolved = (images_dir / file_name).resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop on Python 3.11
        raise _BadField("images.file_name", f"{file_name!r} cannot be resolved ({error})", hint) from None
    if not resolved.is_relative_to(images_dir):
        raise _BadField("images.file_name", f"{file_name!r} resolves to {resolved}, outside {images_dir}; refused", hint)
    return resolved


class _PixelBudget:
    """Caps the pixels being decoded at once across worker threads.

    Each decode takes its image's pixel count from the budget and waits while others hold
    it; an image larger than the whole budget waits until it is alone. Many small images
    decode in parallel, but N threads never hold N near-limit images at once.
    """

    def __init__(self, pixels: int) -> None:
        self.total = max(1, pixels)
        self.used = 0
        self.condition = threading.Condition()

    def take(self, pixels: int) -> None:
        with self.condition:
            while self.used and self.used + pixels > self.total:
                self.condition.wait()
            self.used += pixels

    def give(self, pixels: int) -> None:
        with self.condition:
            self.used -= pixels
            self.condition.notify_all()


def _sha256_of(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _inspect_image_file(path: Path, max_pixels: int, budget: _PixelBudget) -> _ImageFacts | _BadField:
    """Hash and fully decode one image file; a fault is returned (not raised) so workers report in order.

    The header is read first: an image above ``max_pixels`` is refused before any pixel is decoded.
    """
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a folder, FIFO or device would hang or mislead the reader
            return _BadField("images.file_name", f"{path} is not a regular file", "point file_name at an image file")
        digest, size = _sha256_of(path)
    except FileNotFoundError:
        return _BadField("images.file_name", f"image file {path} does not exist", "add the file or remove the image record")
    except OSError as error:
        return _BadField("images.file_name", f"image file {path} cannot be read ({error})", "fix its permissions or remove it")
    try:
        with Image.open(path) as image:
            pixels = image.width * image.height
            if pixels > max_pixels:
                try:
                    _check_image_size(image.width, image.height, max_pixels, field="pixels")
                except _BadField as bad:
                    return bad
            budget.take(pixels)
            try:
                image.load()  # decode every pixel: open() alone reads only the header
            finally:
                budget.give(pixels)
            return _ImageFacts(image.width, image.height, image.mode, size, digest)
    except Image.DecompressionBombError as error:
        return _BadField("pixels", f"the image is too large to decode ({error})", "downscale the image")
    except Exception as error:  # noqa: BLE001 -- PIL raises many types (OSError, SyntaxError, struct.error...) on bad files
        return _BadField(
            "pixels", f"image file cannot be decoded ({type(error).__name__}: {error})",
            "replace the file with an intact copy or remove the image record",
        )


def _map_in_order(function: Callable, items: list, workers: int) -> Iterator:
    """``map(function, items)`` over a thread pool, in order, with a bounded queue so a stop cancels quickly."""
    if workers <= 1:
        yield from map(function, items)
        return
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="coco-image-check")
    pending: deque[Future] = deque()
    try:
        source = iter(items)
        for item in source:
            pending.append(executor.submit(function, item))
            if len(pending) >= workers * 4:
                break
        while pending:
            yield pending.popleft().result()
            for item in source:
                pending.append(executor.submit(function, item))
                break
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


@dataclass
class _CheckedImage:
    record: _ImageRecord
    path: Path
    facts: _ImageFacts


def _resolve_image_files(state: _SplitRecords, findings: _Findings) -> list[tuple[_ImageRecord, Path]]:
    """Each kept image record with its resolved file path; records whose path leaves the folder are reported."""
    to_read: list[tuple[_ImageRecord, Path]] = []
    for image_id in sorted(state.images):
        record = state.images[image_id]
        try:
            to_read.append((record, _resolve_image_path(state.files.images_dir, record.file_name)))
        except _BadField as bad:
            state.dropped_images.add(image_id)
            findings.report(state.split, DatasetError(record.listed_in, image_id, bad.field, bad.problem, bad.hint), image=image_id)
    return to_read


def _refuse_shared_files(
    states: list[_SplitRecords], to_read: dict[str, list[tuple[_ImageRecord, Path]]], findings: _Findings
) -> None:
    """One image file listed in two splits would put test pixels into training: drop it from both."""
    first_owner: dict[Path, tuple[str, _ImageRecord]] = {}
    shared: dict[Path, list[tuple[str, _ImageRecord]]] = {}
    for state in states:
        for record, path in to_read[state.split]:
            owner = first_owner.setdefault(path, (state.split, record))
            if owner[0] != state.split:
                shared.setdefault(path, [owner]).append((state.split, record))
    if not shared:
        return
    by_split = {state.split: state for state in states}
    for path, holders in shared.items():
        splits = " and ".join(dict.fromkeys(split for split, _ in holders))
        for split, record in holders:
            by_split[split].dropped_images.add(record.image_id)
            findings.report(
                split,
                DatasetError(
                    record.listed_in, record.image_id, "images.file_name",
                    f"the file {path} is listed in the {splits} splits", "keep each image file in one split",
                ),
                image=record.image_id,
            )
    for state in states:
        to_read[state.split] = [(r, p) for r, p in to_read[state.split] if r.image_id not in state.dropped_images]


def _check_image_files(
    state: _SplitRecords, to_read: list[tuple[_ImageRecord, Path]], findings: _Findings, workers: int,
    progress: Callable[[str], None],
) -> list[_CheckedImage]:
    checked: list[_CheckedImage] = []
    total = len(to_read)
    step = max(1, math.ceil(total / 10))
    started = time.perf_counter()
    budget = _PixelBudget(state.max_image_pixels)
    inspect = lambda path: _inspect_image_file(path, state.max_image_pixels, budget)  # noqa: E731
    # closing(): a strict-mode raise below must stop the worker threads now, not when
    # the traceback (which holds this frame) is collected.
    with closing(_map_in_order(inspect, [path for _, path in to_read], workers)) as results:
        for done, ((record, path), outcome) in enumerate(zip(to_read, results), start=1):
            _judge_image(state, findings, record, path, outcome, checked)
            if done % step == 0 or done == total:
                elapsed = time.perf_counter() - started
                progress(
                    f"{state.split}: checked {done:,}/{total:,} image files ({100 * done // total}%), "
                    f"{done / elapsed if elapsed > 0 else float('inf'):,.0f} images/s"
                )
    return checked


def _judge_image(
    state: _SplitRecords, findings: _Findings, record: _ImageRecord, path: Path,
    outcome: _ImageFacts | _BadField, checked: list[_CheckedImage],
) -> None:
    """Keep an image whose file decoded at the size its record states; report it otherwise."""
    if isinstance(outcome, _ImageFacts) and (outcome.width, outcome.height) != (record.width, record.height):
        key = "width" if outcome.width != record.width else "height"
        outcome = _BadField(
            f"images.{key}",
            f"the file is {outcome.width}x{outcome.height} (width x height) but {record.listed_in.name} "
            f"says {record.width}x{record.height}",
            "fix width/height in the JSON or replace the file",
        )
    if isinstance(outcome, _BadField):
        state.dropped_images.add(record.image_id)
        # The JSON's record is at fault when the file is missing; the file itself otherwise.
        at_fault = record.listed_in if outcome.field == "images.file_name" else path
        findings.report(
            state.split, DatasetError(at_fault, record.image_id, outcome.field, outcome.problem, outcome.hint),
            image=record.image_id,
        )
    else:
        checked.append(_CheckedImage(record, path, outcome))


# --------------------------------------------------------------------------- tables


def _frame(rows: list[tuple], schema: pl.Schema, sort_by: str | None) -> pl.DataFrame:
    frame = pl.DataFrame(rows, schema=schema, orient="row")
    return frame.sort(sort_by, maintain_order=True) if sort_by else frame


def _assemble(batch: str, states: list[_SplitRecords], checked: dict[str, list[_CheckedImage]], findings: _Findings) -> BatchTables:
    """The output tables: kept images and what hangs off them; counts what each quarantined record took along."""
    images, captions, instances = [], [], []
    categories: dict[int, tuple[str, str]] = {}
    category_splits: dict[int, list[str]] = {}
    dropped_with_image: dict[tuple[str, int], Counter] = {}
    dropped_with_category: dict[int, Counter] = {}
    for state in states:
        split = state.split
        for image_id, dropped in state.dropped_with_image.items():
            dropped_with_image.setdefault((split, image_id), Counter()).update(dropped)
        kept_images = set()
        for item in checked[split]:
            record, facts = item.record, item.facts
            kept_images.add(record.image_id)
            images.append(
                (batch, split, record.image_id, record.file_name, str(item.path), facts.width, facts.height,
                 facts.mode, facts.size_bytes, facts.sha256)
            )
        for caption_id, image_id, text in state.captions:
            if image_id not in kept_images:
                dropped_with_image.setdefault((split, image_id), Counter())["captions"] += 1
                continue
            captions.append((batch, split, caption_id, image_id, text))
        for instance in state.instances:
            if instance.image_id not in kept_images:
                dropped_with_image.setdefault((split, instance.image_id), Counter())["instances"] += 1
                continue
            if instance.category_id not in state.categories:  # its category was quarantined
                dropped_with_category.setdefault(instance.category_id, Counter())["instances"] += 1
                continue
            name, supercategory = state.categories[instance.category_id]
            instances.append(
                (batch, split, instance.annotation_id, instance.image_id, instance.category_id, name, supercategory,
                 *instance.bbox, instance.area, instance.iscrowd, instance.rle_counts, instance.mask_area)
            )
        for category_id, named in state.categories.items():
            categories[category_id] = named
            category_splits.setdefault(category_id, []).append(split)
    for key, rows in findings.image_rows.items():
        findings.note_dropped(rows, dropped_with_image.get(key, Counter()))
    for category_id, rows in findings.category_rows.items():
        findings.note_dropped(rows, dropped_with_category.get(category_id, Counter()))
    category_rows = [
        (batch, ",".join(category_splits[category_id]), category_id, *categories[category_id])
        for category_id in sorted(categories)
    ]
    quarantine_rows = [tuple(row[name] for name in QUARANTINE_SCHEMA) for row in findings.rows]
    return BatchTables(
        images=_frame(images, IMAGES_SCHEMA, "image_id"),
        captions=_frame(captions, CAPTIONS_SCHEMA, "caption_id"),
        instances=_frame(instances, INSTANCES_SCHEMA, "annotation_id"),
        categories=_frame(category_rows, CATEGORIES_SCHEMA, None),
        quarantine=_frame(quarantine_rows, QUARANTINE_SCHEMA, None),
    )


def load_batch(
    manifest_path: Path,
    batch: str,
    on_bad_record: Literal["fail", "quarantine"] = "fail",
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
    *,
    allowed_roots: Sequence[Path | str] = (),
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> BatchTables:
    """Read and validate every split of one dataset batch.

    ``batch`` fills the ``batch`` column. ``on_bad_record="fail"`` raises DatasetError
    at the first bad record (JSON checks of every split run before any image file is
    read, so a broken file fails fast); ``"quarantine"`` drops each bad record together
    with what depends on it (an image takes its captions and instances; a category its
    instances) and lists it in ``quarantine``. Malformed or hostile files (bad JSON,
    nesting deeper than MAX_NESTING, paths outside the batch folder and ``allowed_roots``)
    always raise. Images above ``max_image_pixels`` are refused from their header, before
    decoding. Image files are fully decoded and hashed on ``workers`` threads, with the
    pixels being decoded at once capped at ``max_image_pixels``; ``progress`` receives
    short lines (each ~10% of image files). Tables are sorted by id; images are not copied.
    Any other input problem is a DatasetError too: nothing else is raised for bad data.
    """
    if on_bad_record not in ("fail", "quarantine"):
        raise ValueError(f"on_bad_record must be 'fail' or 'quarantine', not {on_bad_record!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, not {workers}")
    if max_image_pixels < 1:
        raise ValueError(f"max_image_pixels must be >= 1, not {max_image_pixels}")
    say = progress or (lambda line: None)
    manifest = read_manifest(Path(manifest_path), allowed_roots)
    findings = _Findings(batch, on_bad_record)
    states = [
        _read_split_json(split, files, findings, say, max_image_pixels) for split, files in manifest.splits.items()
    ]
    _reconcile_splits(states, findings)
    to_read = {state.split: _resolve_image_files(state, findings) for state in states}
    _refuse_shared_files(states, to_read, findings)
    checked = {state.split: _check_image_files(state, to_read[state.split], findings, workers, say) for state in states}
    tables = _assemble(batch, states, checked, findings)
    say(
        f"batch {batch}: kept {tables.images.height:,} images, {tables.captions.height:,} captions, "
        f"{tables.instances.height:,} instances; quarantined {tables.quarantine.height:,} bad records"
    )
    return tables
