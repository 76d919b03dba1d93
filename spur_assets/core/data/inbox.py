"""The inbox: batch folders dropped into ``SPUR_INBOX``, read only once marked complete.

A batch is a folder ``SPUR_INBOX/<batch id>/`` in COCO layout with a
``dataset.yaml`` (docs/data-contract.md#batches). Copying a folder takes time, so a batch counts
only once its ``READY`` file exists: whoever copies the batch writes that file
last. Folders without it are left alone, however long they sit there.

The scan is pure: it reports what is ready, what is still arriving and what is
wrong, and remembers nothing. The sensor keeps the memory (its cursor).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from spur_assets.core.data.batches import validate_batch_id
from spur_assets.core.data.coco_ingest import read_manifest
from spur_assets.core.data.errors import DatasetError

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


def scan_inbox(inbox: Path, allowed_roots: Sequence[Path | str] = ()) -> InboxScan:
    """The batch folders of ``inbox``, sorted by name; a missing inbox is an empty one.

    Each entry is judged on its own and nothing raises: a folder marked ready is rejected
    when its name is not a safe batch id, its READY is not a regular file, or its
    dataset.yaml is missing, malformed or points outside the folder (and ``allowed_roots``).
    Hidden entries and symlinks are rejected too, whatever they hold: a link could make
    any folder on the machine a batch. Record-level checks happen later, in raw_pairs.
    """
    inbox = Path(inbox)
    if not inbox.is_dir():
        return InboxScan((), (), ())
    ready: list[ReadyBatch] = []
    rejected: list[RejectedBatch] = []
    arriving: list[Path] = []
    try:
        entries = sorted(inbox.iterdir())
    except OSError:
        return InboxScan((), (), ())
    for entry in entries:
        try:
            verdict = _judge_entry(entry, allowed_roots)
        except Exception as error:  # noqa: BLE001 -- one unreadable folder must not stop the others
            verdict = RejectedBatch(entry, _entry_mtime(entry), f"{entry}: cannot be read ({type(error).__name__}: {error})")
        if isinstance(verdict, ReadyBatch):
            ready.append(verdict)
        elif isinstance(verdict, RejectedBatch):
            rejected.append(verdict)
        elif verdict is not None:
            arriving.append(verdict)
    return InboxScan(tuple(ready), tuple(rejected), tuple(arriving))


def _entry_mtime(path: Path) -> int:
    try:
        return path.lstat().st_mtime_ns
    except OSError:
        return 0


def _judge_entry(entry: Path, allowed_roots: Sequence[Path | str]) -> ReadyBatch | RejectedBatch | Path | None:
    """Ready, rejected, still arriving (the folder), or None for a plain file at the top of the inbox."""
    if entry.is_symlink():
        return RejectedBatch(
            entry, _entry_mtime(entry),
            f"{entry}: is a symbolic link; refused (a link can point anywhere on the machine) -- copy or move the "
            f"batch folder into the inbox, then write its {READY_MARKER}",
        )
    if not entry.is_dir():
        return None
    if entry.name.startswith("."):
        return RejectedBatch(
            entry, _entry_mtime(entry),
            f"{entry}: hidden folder, not taken -- rename it without the leading '.' if it is a batch",
        )
    marker = entry / READY_MARKER
    if not marker.exists() and not marker.is_symlink():
        return entry
    mtime = marker.lstat().st_mtime_ns
    if marker.is_symlink() or not marker.is_file():
        return RejectedBatch(
            entry, mtime, f"{marker}: must be a regular file (it is a link or a folder) -- replace it with an empty file"
        )
    try:
        batch = validate_batch_id(entry.name)
    except ValueError as error:
        return RejectedBatch(entry, mtime, f"{entry}: {error}; rename the folder, then touch its {READY_MARKER}")
    manifest = entry / MANIFEST_NAME
    if manifest.is_symlink():  # it would move the batch's folder (paths are relative to the manifest's target)
        return RejectedBatch(entry, mtime, f"{manifest}: is a symbolic link; refused -- copy the file into the folder")
    try:
        read_manifest(manifest, allowed_roots)
    except DatasetError as error:
        return RejectedBatch(entry, mtime, f"{error}; fix it, then touch {marker} again")
    return ReadyBatch(batch, entry.resolve(), manifest.resolve(), mtime)
