"""Where each dataset batch (a dynamic partition of ``raw_pairs``) lives on disk.

A batch id is registered with the path of its ``dataset.yaml`` (by ``spur run
--dataset`` or by the inbox sensor) in ``SPUR_HOME/batches/<batch>.json``, so any
later run, from the CLI or the UI's Materialize button, finds the files again.
The batch ``builtin`` needs no registration: it is generated on demand.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from datetime import datetime, timezone
from pathlib import Path

from spur_assets.core.data.errors import DatasetError

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
    """A batch id derived from a manifest's ``name`` (or its folder name), made safe.

    A name that is already a safe id is used as it is. Any other name is transliterated
    (accents dropped), unsafe characters become '-', and 8 hex digits of the name's sha256
    are appended, so two names never share an id because characters were dropped
    ("Café" -> "Cafe-<hash>", and a name of only non-Latin letters -> "batch-<hash>").
    """
    raw = name or Path(manifest).resolve().parent.name
    try:
        return validate_batch_id(raw)
    except ValueError:
        pass
    ascii_name = unicodedata.normalize("NFKD", raw).encode("ascii", "ignore").decode("ascii")
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", ascii_name).strip("-._")[:110] or "batch"
    digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return validate_batch_id(f"{cleaned}-{digest}")


def register_batch(home: Path, batch: str, manifest: Path, replace: bool = False) -> Path:
    """Record that ``batch`` is read from ``manifest``; returns the registry file.

    An id registered for a different manifest is refused (DatasetError naming the
    ``batch`` field) unless ``replace`` is set: two datasets never share an id silently.
    """
    validate_batch_id(batch)
    manifest = Path(manifest).resolve()
    if not manifest.is_file():
        raise FileNotFoundError(f"batch {batch!r}: manifest {manifest} does not exist")
    refuse_other_manifest(home, batch, manifest, replace)
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


def refuse_other_manifest(home: Path, batch: str, manifest: Path, replace: bool = False) -> None:
    """Raise the batch-taken DatasetError if ``batch`` is registered for another manifest and ``replace`` is off."""
    earlier = registered_manifest(home, batch)
    if earlier is not None and earlier != Path(manifest).resolve() and not replace:
        raise batch_taken_error(Path(manifest).resolve(), batch, f"it is registered for {earlier}")


def batch_taken_error(manifest: Path, batch: str, why: str) -> DatasetError:
    """The refusal for data that would silently replace another batch under the same id."""
    return DatasetError(
        manifest, None, "batch",
        f"batch id {batch!r} is already taken: {why}; refused so that neither is lost",
        "give this data its own id (`spur run --batch NEW_ID`, or a new inbox folder name), or replace "
        "the batch on purpose with `spur run --replace` (raw_pairs config `replace: true`); the earlier "
        "version stays in lineage",
    )


def registered_manifest(home: Path, batch: str) -> Path | None:
    """The manifest registered for ``batch``, or None."""
    entry = Path(home) / "batches" / f"{validate_batch_id(batch)}.json"
    if not entry.is_file():
        return None
    return Path(json.loads(entry.read_text())["manifest"])
