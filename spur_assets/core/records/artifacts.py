"""Versioned, atomic artifact folders under SPUR_HOME/artifacts.

Every materialization writes into its own folder
``artifacts/<asset>/<partition or _>/<materialization_id>/``. Files are written
into a hidden staging folder first and renamed into place only when the whole
materialization succeeded, so a failed batch leaves what was stored before
untouched and never shows half-written files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl

UNPARTITIONED = "_"


def sha256_of_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of one file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def sha256_of_tree(root: Path) -> str:
    """Hex sha256 over a folder: every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(sha256_of_file(path).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class OutputFile:
    """One output of a materialization, as recorded in lineage."""

    name: str  # for tables: the DuckDB view name (raw_images, spurious_features, ...)
    kind: str  # "table" (Parquet), "file" or "dir"
    uri: str  # absolute path of the committed file or folder
    sha256: str
    rows: int
    bytes: int


@dataclass(frozen=True)
class ArtifactRef:
    """What an asset hands downstream: where its outputs are and which materialization made them.

    Travels between assets as JSON (never pickled); downstream assets read the
    files themselves and record an edge to ``materialization_id``.
    """

    asset: str
    partition: str
    materialization_id: str
    data_version: str
    outputs: tuple[OutputFile, ...] = field(default_factory=tuple)

    def output(self, name: str) -> OutputFile:
        """The output called ``name``; KeyError listing the names there are."""
        for output in self.outputs:
            if output.name == name:
                return output
        known = ", ".join(o.name for o in self.outputs)
        raise KeyError(f"{self.asset}[{self.partition}] has no output {name!r}; it has: {known}")

    def path(self, name: str) -> Path:
        """Filesystem path of the output called ``name``."""
        return Path(self.output(name).uri)

    def read_table(self, name: str) -> pl.DataFrame:
        """The Parquet table output called ``name``."""
        return pl.read_parquet(self.path(name))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ArtifactRef":
        raw = json.loads(text)
        outputs = tuple(OutputFile(**o) for o in raw.pop("outputs"))
        return cls(outputs=outputs, **raw)


def data_version_of(outputs: list[OutputFile]) -> str:
    """Content version of a materialization: sha256 over its outputs' names and hashes."""
    digest = hashlib.sha256()
    for output in sorted(outputs, key=lambda o: o.name):
        digest.update(f"{output.name}\0{output.sha256}\n".encode())
    return digest.hexdigest()


_STAGING = re.compile(r"^\.staging-[0-9a-f]+(?:\.pid(\d+))?$")


def process_alive(pid: int) -> bool:
    """True if a process with this id exists on this machine (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_staging(home: Path) -> list[Path]:
    """Remove the staging folders under ``home/artifacts`` whose writing process is gone; returns them.

    A killed process (SIGKILL, power loss) cannot clean up after itself; its half-written
    outputs were never committed, so nothing refers to them. Folders of live processes stay.
    A staging folder without a process id (written before ids were recorded) counts as dead.
    """
    removed: list[Path] = []
    root = Path(home) / "artifacts"
    if not root.is_dir():
        return removed
    for folder in root.glob("*/*/.staging-*"):
        match = _STAGING.match(folder.name)
        if match is None or not folder.is_dir():
            continue
        if match.group(1) is not None and process_alive(int(match.group(1))):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


class ArtifactWriter:
    """Stage the outputs of one materialization, then commit them atomically.

    Use as a context manager: on an exception the staging folder is deleted and
    nothing becomes visible; ``commit()`` renames it to its final place.
    """

    def __init__(self, home: Path, asset: str, partition: str, materialization_id: str):
        self.asset = asset
        self.partition = partition
        partition_dir = partition or UNPARTITIONED
        for part in (asset, partition_dir, materialization_id):
            if part in (".", "..") or "/" in part or "\\" in part or "\x00" in part:
                raise ValueError(f"ArtifactWriter: {part!r} cannot name a folder under {home}/artifacts")
        self.final_dir = Path(home) / "artifacts" / asset / partition_dir / materialization_id
        # The staging folder names the process writing it, so a later run can tell the folder
        # of a killed process (remove) from one still being written (leave).
        self.staging_dir = self.final_dir.parent / f".staging-{materialization_id}.pid{os.getpid()}"
        self._outputs: list[OutputFile] = []
        self._committed = False

    def __enter__(self) -> "ArtifactWriter":
        self.staging_dir.mkdir(parents=True, exist_ok=False)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            shutil.rmtree(self.staging_dir, ignore_errors=True)

    def path(self, relative: str) -> Path:
        """A path inside the staging folder for the caller to write to (parents created)."""
        target = self.staging_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def final_paths(self, frame: pl.DataFrame) -> pl.DataFrame:
        """``frame`` with every ``*path`` column pointing where the staged files will be after commit."""
        staging, final = str(self.staging_dir), str(self.final_dir)
        columns = [c for c in frame.columns if c.endswith("path") and frame.schema[c] == pl.Utf8]
        return frame.with_columns(pl.col(c).str.replace(staging, final, literal=True) for c in columns)

    def write_table(self, name: str, frame: pl.DataFrame) -> OutputFile:
        """Write ``frame`` as ``<name>.parquet`` and register it as a table output."""
        staged = self.path(f"{name}.parquet")
        frame.write_parquet(staged, compression="zstd", statistics=True)
        return self._register(name, "table", staged, rows=frame.height)

    def add_file(self, name: str, relative: str, rows: int = 0) -> OutputFile:
        """Register a file the caller wrote at ``self.path(relative)``."""
        return self._register(name, "file", self.staging_dir / relative, rows=rows)

    def add_dir(self, name: str, relative: str, rows: int = 0) -> OutputFile:
        """Register a folder the caller filled under ``self.path(relative)``."""
        return self._register(name, "dir", self.staging_dir / relative, rows=rows)

    def _register(self, name: str, kind: str, staged: Path, rows: int) -> OutputFile:
        if any(o.name == name for o in self._outputs):
            raise ValueError(f"output {name!r} registered twice in {self.asset}")
        if not staged.exists():
            raise FileNotFoundError(f"output {name!r} of {self.asset}: nothing was written at {staged}")
        if kind == "dir":
            digest = sha256_of_tree(staged)
            size = sum(p.stat().st_size for p in staged.rglob("*") if p.is_file())
        else:
            digest = sha256_of_file(staged)
            size = staged.stat().st_size
        final = self.final_dir / staged.relative_to(self.staging_dir)
        output = OutputFile(name=name, kind=kind, uri=str(final), sha256=digest, rows=rows, bytes=size)
        self._outputs.append(output)
        return output

    @property
    def outputs(self) -> list[OutputFile]:
        return list(self._outputs)

    def commit(self) -> list[OutputFile]:
        """Move the staged outputs into place; returns them with their final URIs."""
        self.staging_dir.rename(self.final_dir)
        self._committed = True
        return self.outputs
