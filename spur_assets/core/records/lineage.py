"""Lineage in DuckDB: one row per materialization, one row per input edge.

DuckDB admits one writer *process* at a time, and a Dagster run executes each
step in its own process, so writes are built to lose nothing under contention:

1. A finished materialization is first written as one JSON file in
   ``SPUR_HOME/lineage-journal/pending/`` (atomic rename, no lock needed).
2. ``sync()`` then opens the database briefly, replays every pending entry in one
   short transaction (``ON CONFLICT DO NOTHING``, so replays are harmless),
   refreshes the table views and moves the entries to ``applied/``. When another
   process holds the lock, it retries with jittered backoff; if the lock stays
   held past the timeout the entry stays pending and the next sync (any process,
   or ``spur lineage sync``) applies it.

No connection is held across slow work: every public method opens and closes
its own.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from contextlib import contextmanager
from importlib import resources
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

import duckdb
import polars as pl

from spur_assets.core.records.artifacts import OutputFile

SQL_DIR = Path(str(resources.files("spur_assets").joinpath("sql")))  # package data: installed with the package

# DuckDB view name -> the raw_pairs output it shows; every other table output
# is shown under its own name.
LOCK_ERROR_MARKERS = ("could not set lock", "conflicting lock", "database is locked")


def sql_text(name: str) -> str:
    """The SQL statement in ``sql/<name>.sql``; FileNotFoundError lists the known names."""
    path = SQL_DIR / f"{name}.sql"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SQL_DIR.glob("*.sql")))
        raise FileNotFoundError(f"no SQL file {path}; known statements: {known}")
    return path.read_text()


@dataclass(frozen=True)
class LineageEdge:
    """One input read by a materialization: which upstream materialization, by data version."""

    upstream_materialization_id: str
    upstream_asset: str
    upstream_partition: str
    upstream_data_version: str


@dataclass(frozen=True)
class MaterializationRecord:
    """One row of ``materializations`` plus the edges of what it read."""

    materialization_id: str
    asset: str
    partition: str
    run_id: str
    code_version: str
    config_hash: str
    data_version: str
    device: str
    started_at: datetime
    ended_at: datetime
    rows: int
    outputs: tuple[OutputFile, ...]
    edges: tuple[LineageEdge, ...] = ()

    def to_json(self) -> str:
        raw = asdict(self)
        raw["started_at"] = self.started_at.isoformat()
        raw["ended_at"] = self.ended_at.isoformat()
        return json.dumps(raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MaterializationRecord":
        raw = json.loads(text)
        raw["started_at"] = datetime.fromisoformat(raw["started_at"])
        raw["ended_at"] = datetime.fromisoformat(raw["ended_at"])
        raw["outputs"] = tuple(OutputFile(**o) for o in raw["outputs"])
        raw["edges"] = tuple(LineageEdge(**e) for e in raw["edges"])
        return cls(**raw)


def new_materialization_id() -> str:
    return uuid.uuid4().hex


class LineageLockTimeout(RuntimeError):
    """The lineage database stayed locked by another process past the timeout."""


class LineageStore:
    """Records and queries lineage in ``<home>/lineage.duckdb``."""

    def __init__(self, home: Path, lock_timeout_s: float = 120.0):
        self.home = Path(home)
        self.db_path = self.home / "lineage.duckdb"
        self.pending_dir = self.home / "lineage-journal" / "pending"
        self.applied_dir = self.home / "lineage-journal" / "applied"
        self.lock_timeout_s = lock_timeout_s

    # -- writing -----------------------------------------------------------
    def record(self, record: MaterializationRecord) -> bool:
        """Journal ``record`` durably, then try to apply it; True once it is in DuckDB.

        False means the database stayed locked: the entry is safe in the journal
        and the next ``sync()`` from any process applies it.
        """
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        name = f"{record.ended_at.strftime('%Y%m%dT%H%M%S%f')}-{record.materialization_id}.json"
        staged = self.pending_dir / f".{name}.tmp"
        staged.write_text(record.to_json())
        os.replace(staged, self.pending_dir / name)
        try:
            self.sync()
        except LineageLockTimeout:
            return False
        return True

    def sync(self) -> int:
        """Apply every pending journal entry and refresh the views; returns how many were applied."""
        with self._write_connection() as conn:
            pending = sorted(self.pending_dir.glob("*.json")) if self.pending_dir.exists() else []
            records = [MaterializationRecord.from_json(p.read_text()) for p in pending]
            conn.execute("BEGIN TRANSACTION")
            for record in records:
                conn.execute(sql_text("insert_materialization"), _materialization_params(record))
                for edge in record.edges:
                    conn.execute(
                        sql_text("insert_lineage_edge"),
                        {"materialization_id": record.materialization_id, **asdict(edge)},
                    )
            _refresh_table_views(conn)
            conn.execute("COMMIT")
        self.applied_dir.mkdir(parents=True, exist_ok=True)
        for path in pending:
            try:
                os.replace(path, self.applied_dir / path.name)
            except FileNotFoundError:  # another process applied and moved it first
                pass
        return len(records)

    @contextmanager
    def _write_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self.home.mkdir(parents=True, exist_ok=True)
        conn = _connect_with_retry(self.db_path, read_only=False, timeout_s=self.lock_timeout_s)
        try:
            conn.execute(sql_text("lineage_schema"))
            yield conn
        except BaseException:
            try:
                conn.execute("ROLLBACK")
            except duckdb.Error:
                pass
            raise
        finally:
            conn.close()

    # -- reading -----------------------------------------------------------
    def query(self, name: str, params: dict | None = None) -> pl.DataFrame:
        """Run ``sql/<name>.sql`` with named parameters; empty frame if nothing was recorded yet."""
        if not self.db_path.exists():
            return pl.DataFrame()
        conn = _connect_with_retry(self.db_path, read_only=True, timeout_s=self.lock_timeout_s)
        try:
            return conn.execute(sql_text(name), params or {}).pl()
        finally:
            conn.close()

    def sql(self, statement: str) -> pl.DataFrame:
        """Run a read-only ad-hoc statement (for audits and tests)."""
        conn = _connect_with_retry(self.db_path, read_only=True, timeout_s=self.lock_timeout_s)
        try:
            return conn.execute(statement).pl()
        finally:
            conn.close()

    def ancestry(self, materialization_id: str) -> pl.DataFrame:
        """The whole upstream chain of one materialization (``sql/ancestry_of_materialization.sql``)."""
        return self.query("ancestry_of_materialization", {"materialization_id": materialization_id})

    def latest(self, asset: str, partition: str | None = None) -> dict | None:
        """The newest materialization row of ``asset`` (optionally of one partition), or None."""
        frame = self.query("latest_materialization", {"asset": asset, "partition": partition})
        return frame.row(0, named=True) if frame.height else None


def _materialization_params(record: MaterializationRecord) -> dict:
    return {
        "materialization_id": record.materialization_id,
        "asset": record.asset,
        "partition": record.partition,
        "run_id": record.run_id,
        "code_version": record.code_version,
        "config_hash": record.config_hash,
        "data_version": record.data_version,
        "device": record.device,
        "started_at": record.started_at,
        "ended_at": record.ended_at,
        "rows": record.rows,
        "outputs": [asdict(o) for o in record.outputs],
    }


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _refresh_table_views(conn: duckdb.DuckDBPyConnection) -> None:
    """One view per table output name over the latest Parquet of each partition.

    DDL takes no bound parameters, so the file list is spliced in as quoted
    literals; the names and paths are the pipeline's own, never user SQL.
    """
    for table_name, uris in conn.execute(sql_text("latest_table_outputs")).fetchall():
        existing = [u for u in uris if Path(u).exists()]
        if not existing:
            continue
        files = "[" + ", ".join(_quote_literal(u) for u in existing) + "]"
        conn.execute(
            f"CREATE OR REPLACE VIEW {_quote_identifier(table_name)} AS "
            f"SELECT * FROM read_parquet({files}, union_by_name = true)"
        )


def _is_lock_error(error: Exception) -> bool:
    text = str(error).lower()
    return any(marker in text for marker in LOCK_ERROR_MARKERS)


def _connect_with_retry(path: Path, read_only: bool, timeout_s: float) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except (duckdb.IOException, duckdb.ConnectionException) as error:
            if not _is_lock_error(error):
                raise
            if time.monotonic() >= deadline:
                raise LineageLockTimeout(
                    f"{path} stayed locked by another process for {timeout_s:.0f} s ({error}). "
                    "Close other DuckDB sessions on it (a DuckDB CLI or notebook); pending "
                    "lineage rows stay journalled and `spur lineage sync` applies them."
                ) from error
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)
