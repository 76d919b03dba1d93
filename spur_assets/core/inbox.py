"""The inbox: batch folders dropped into ``SPUR_INBOX``, read only once marked complete.

A batch is a folder ``SPUR_INBOX/<batch id>/`` in COCO layout with a
``dataset.yaml`` (DESIGN.md §2). Copying a folder takes time, so a batch counts
only once its ``READY`` file exists: whoever copies the batch writes that file
last. Folders without it are left alone, however long they sit there.

The scan is pure: it reports what is ready, what is still arriving and what is
wrong, and remembers nothing. The sensor keeps the memory (its cursor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spur_assets.core.batches import validate_batch_id
from spur_assets.core.coco_ingest import read_manifest
from spur_assets.core.errors import DatasetError

READY_MARKER = "READY"
MANIFEST_NAME = "dataset.yaml"


@dataclass(frozen=True)
class ReadyBatch:
    """A complete batch folder: its id (the folder name), manifest and when it was marked ready."""

    batch: str
    folder: Path
    manifest: Path
    ready_mtime_ns: int


@dataclass(frozen=True)
class RejectedBatch:
    """A folder marked ready that cannot become a batch, with what to do about it."""

    folder: Path
    ready_mtime_ns: int
    problem: str


@dataclass(frozen=True)
class InboxScan:
    """What one look at the inbox found."""

    ready: tuple[ReadyBatch, ...]
    rejected: tuple[RejectedBatch, ...]
    arriving: tuple[Path, ...]  # folders without a READY file yet


def scan_inbox(inbox: Path) -> InboxScan:
    """The batch folders of ``inbox``, sorted by name; a missing inbox is an empty one.

    A folder marked ready is rejected (never raised on) when its name is not a safe
    batch id or its dataset.yaml is missing or malformed; the record-level checks
    happen later, when raw_pairs reads the batch.
    """
    inbox = Path(inbox)
    if not inbox.is_dir():
        return InboxScan((), (), ())
    ready: list[ReadyBatch] = []
    rejected: list[RejectedBatch] = []
    arriving: list[Path] = []
    for folder in sorted(p for p in inbox.iterdir() if p.is_dir() and not p.name.startswith(".")):
        marker = folder / READY_MARKER
        if not marker.is_file():
            arriving.append(folder)
            continue
        mtime = marker.stat().st_mtime_ns
        try:
            batch = validate_batch_id(folder.name)
        except ValueError as error:
            rejected.append(RejectedBatch(folder, mtime, f"{folder}: {error}; rename the folder, then touch its {READY_MARKER}"))
            continue
        manifest = folder / MANIFEST_NAME
        try:
            read_manifest(manifest)
        except DatasetError as error:
            rejected.append(RejectedBatch(folder, mtime, f"{error}; fix it, then touch {marker} again"))
            continue
        ready.append(ReadyBatch(batch, folder.resolve(), manifest.resolve(), mtime))
    return InboxScan(tuple(ready), tuple(rejected), tuple(arriving))
