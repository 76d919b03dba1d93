"""Where each dataset batch (a dynamic partition of ``raw_pairs``) lives on disk.

A batch id is registered with the path of its ``dataset.yaml`` (by ``spur run
--dataset`` or by the inbox sensor) in ``SPUR_HOME/batches/<batch>.json``, so any
later run, from the CLI or the UI's Materialize button, finds the files again.
The batch ``builtin`` needs no registration: it is generated on demand.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

BUILTIN_BATCH = "builtin"
_BATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_batch_id(batch: str) -> str:
    """Return ``batch`` if it is a safe partition key (letters, digits, . _ -), else ValueError."""
    if not _BATCH_ID.match(batch):
        raise ValueError(
            f"batch id {batch!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return batch


def batch_id_for_manifest(manifest: Path, name: str) -> str:
    """A batch id derived from a manifest's ``name`` (or its folder name), made safe."""
    raw = name or manifest.resolve().parent.name
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-._") or "batch"
    return validate_batch_id(cleaned[:128])


def register_batch(home: Path, batch: str, manifest: Path) -> Path:
    """Record that ``batch`` is read from ``manifest``; returns the registry file."""
    validate_batch_id(batch)
    manifest = Path(manifest).resolve()
    if not manifest.is_file():
        raise FileNotFoundError(f"batch {batch!r}: manifest {manifest} does not exist")
    registry = Path(home) / "batches"
    registry.mkdir(parents=True, exist_ok=True)
    entry = registry / f"{batch}.json"
    staged = registry / f".{batch}.json.tmp"
    staged.write_text(
        json.dumps(
            {"batch": batch, "manifest": str(manifest), "registered_at": datetime.now(timezone.utc).isoformat()},
            indent=1,
        )
    )
    os.replace(staged, entry)
    return entry


def registered_manifest(home: Path, batch: str) -> Path | None:
    """The manifest registered for ``batch``, or None."""
    entry = Path(home) / "batches" / f"{validate_batch_id(batch)}.json"
    if not entry.is_file():
        return None
    return Path(json.loads(entry.read_text())["manifest"])
