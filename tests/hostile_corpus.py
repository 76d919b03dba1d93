"""Hostile input for issue #14: case builders, an isolated ingest harness and a snapshot of stored data.

The rule under test: every input ends either *accepted with exact content* or in a
:class:`spur_assets.core.data.errors.DatasetError` naming file, record and field -- never another
exception, never a crash of the process -- and a refused batch changes no stored data
(``SPUR_HOME/batches``, ``artifacts/``, ``refs/``, the lineage rows and the raw_* views).
Every case stays under 2 GB peak RSS.

Pieces:

* :func:`ingest` materializes ``raw_pairs`` for one batch in-process (``dg.materialize``) and
  returns an :class:`Outcome`; :func:`load` calls ``load_batch`` directly.
* :class:`Worker` runs those in a long-lived child process with an address-space limit, so
  that an input which crashes the interpreter (a segfault in pycocotools, a 21 GB allocation)
  or hangs (a FIFO) is reported as a failed case instead of taking pytest -- or this shared
  machine -- down with it. A dead or stuck worker is replaced by a fresh one.
* :func:`snapshot` captures everything stored under a home; :func:`verify` applies the rule.
* ``CASES``: one builder per hostile input. A builder gets a fresh copy of the valid fixture
  batch (tests/coco_fixtures.py), damages one layer and returns an :class:`Expect`.
"""

from __future__ import annotations

import abc

import copy
import hashlib
import json
import multiprocessing
import os
import re
import resource
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tests.coco_fixtures import (
    FIXTURE_CAPTIONS,
    FIXTURE_CATEGORIES,
    FIXTURE_IMAGES,
    FIXTURE_INSTANCES,
    SPLIT_FILES,
    _bbox,
    build_coco_fixture,
    copy_fixture,
    rectangles_mask,
    write_image,
)

PEAK_RSS_LIMIT_MB = 2048.0
WORKER_ADDRESS_SPACE = 8 * 2**30  # virtual memory a worker may map: far above 2 GB RSS, far below 21 GB
CASE_TIMEOUT_S = 30.0
GOOD_BATCH = "good"  # pre-ingested into every home, so "nothing stored changed" means something
CASE_BATCH = "hostile"

Mode = Literal["fail", "quarantine"]
Want = Literal["accept", "refuse", "either"]


# =========================================================================== outcome


@dataclass
class Outcome:
    """How one ingest ended."""

    accepted: bool
    error_cls: str | None = None  # class name of what was raised (None when accepted)
    dataset_error: bool = False  # isinstance(error, DatasetError)
    error_message: str | None = None
    error_file: str | None = None  # DatasetError attributes, as strings
    error_record: str | None = None
    error_field: str | None = None
    peak_rss_mb: float = 0.0
    seconds: float = 0.0
    crashed: str | None = None  # the worker process died or hung: what happened
    tables: dict | None = None  # load(): a summary of the returned tables

    def describe(self) -> str:
        if self.crashed:
            return f"CRASH: {self.crashed}"
        if self.accepted:
            return f"accepted ({self.seconds:.1f} s, peak {self.peak_rss_mb:.0f} MB)"
        return f"{self.error_cls}: {(self.error_message or '')[:400]}"


def _vm_hwm_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    try:
        from spur_assets.pipeline.recording import reset_peak_memory

        reset_peak_memory()
    except Exception:  # noqa: BLE001 -- measuring is best effort
        pass


def _outcome_of_error(error: BaseException) -> Outcome:
    from spur_assets.core.data.errors import DatasetError

    is_dataset_error = isinstance(error, DatasetError)
    try:
        message = str(error)
    except Exception as inner:  # noqa: BLE001 -- str() of a hostile exception may itself fail
        message = f"<str() failed: {type(inner).__name__}>"
    outcome = Outcome(
        accepted=False, error_cls=type(error).__name__, dataset_error=is_dataset_error, error_message=message[:4000]
    )
    if is_dataset_error:
        outcome.error_file = str(error.file)
        outcome.error_record = None if error.record is None else str(error.record)
        outcome.error_field = None if error.field is None else str(error.field)
    else:
        outcome.error_message = (message + "\n" + "".join(traceback.format_exception(error))[-3000:])[:6000]
    return outcome


def ingest(
    home: Path,
    instance,
    manifest: Path | None,
    batch: str,
    *,
    on_bad_record: Mode = "fail",
    workers: int = 1,
    replace: bool | None = None,
    max_image_pixels: int | None = None,
    allowed_roots: list[str] | None = None,
) -> Outcome:
    """Materialize raw_pairs[batch] in this process; options left None are not passed at all.

    ``manifest=None`` runs the registered manifest (``resolve_manifest``'s fallback).
    """
    import dagster as dg

    from spur_assets.pipeline.ingest import batches, raw_pairs
    from spur_assets.pipeline.refs_io_manager import ArtifactRefIOManager
    from spur_assets.pipeline.resources import SpurSettings

    config: dict[str, Any] = {"on_bad_record": on_bad_record, "workers": workers}
    if manifest is not None:
        config["manifest"] = str(manifest)
    if replace is not None:
        config["replace"] = replace
    if max_image_pixels is not None:
        config["max_image_pixels"] = max_image_pixels
    started = time.perf_counter()
    _reset_peak()
    try:
        settings_kwargs: dict[str, Any] = {"home": str(home)}
        if allowed_roots is not None:
            settings_kwargs["allowed_roots"] = os.pathsep.join(allowed_roots)
        settings = SpurSettings(**settings_kwargs)
        if not instance.has_dynamic_partition(batches.name, batch):
            instance.add_dynamic_partitions(batches.name, [batch])
        result = dg.materialize(
            [raw_pairs],
            partition_key=batch,
            instance=instance,
            resources={"settings": settings, "refs": ArtifactRefIOManager(settings=settings)},
            run_config={"ops": {"raw_pairs": {"config": config}}},
            raise_on_error=True,  # in-process: re-raises the asset's own exception object
        )
        outcome = Outcome(accepted=bool(result.success))
        if not result.success:
            outcome.error_cls = "RunFailedWithoutException"
    except Exception as error:  # noqa: BLE001 -- classifying every exception is the point
        outcome = _outcome_of_error(error)
    outcome.seconds = time.perf_counter() - started
    outcome.peak_rss_mb = _vm_hwm_mb()
    return outcome


def summarize_tables(tables) -> dict:
    """What load() hands back: plain Python values of the tables (small batches only)."""
    return {
        "images": {row["image_id"]: (row["split"], row["file_name"], row["width"], row["height"], row["path"])
                   for row in tables.images.iter_rows(named=True)},
        "captions": {row["caption_id"]: (row["image_id"], row["caption"]) for row in tables.captions.iter_rows(named=True)},
        "instances": {row["annotation_id"]: (row["image_id"], row["category_id"], row["mask_area"], row["rle_counts"])
                      for row in tables.instances.iter_rows(named=True)},
        "quarantine": [(row["file"], row["record"], row["field"]) for row in tables.quarantine.iter_rows(named=True)],
    }


def load(
    manifest: Path,
    batch: str,
    *,
    on_bad_record: Mode = "fail",
    allowed_roots: list[str] | None = None,
    max_image_pixels: int | None = None,
) -> Outcome:
    """load_batch in this process, workers=1; the tables come back summarized."""
    from spur_assets.core.data.coco_ingest import load_batch

    kwargs: dict[str, Any] = {}
    if allowed_roots is not None:
        kwargs["allowed_roots"] = [Path(root) for root in allowed_roots]
    if max_image_pixels is not None:
        kwargs["max_image_pixels"] = max_image_pixels
    started = time.perf_counter()
    _reset_peak()
    try:
        tables = load_batch(Path(manifest), batch, on_bad_record=on_bad_record, workers=1, **kwargs)
        outcome = Outcome(accepted=True, tables=summarize_tables(tables))
    except Exception as error:  # noqa: BLE001
        outcome = _outcome_of_error(error)
    outcome.seconds = time.perf_counter() - started
    outcome.peak_rss_mb = _vm_hwm_mb()
    return outcome


# =========================================================================== isolated worker


def _worker_main(conn, log_path: str, address_space: int) -> None:
    """The child: limits its address space, keeps one ephemeral Dagster instance, serves calls."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = address_space if hard == resource.RLIM_INFINITY else min(address_space, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    import dagster as dg

    import spur_assets.pipeline.ingest  # noqa: F401 -- import before the first timed call
    import spur_assets.core.data.coco_ingest  # noqa: F401

    instance = dg.DagsterInstance.ephemeral()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        op, kwargs = request
        print(f"--- {op} {kwargs}", flush=True)
        try:
            if op == "ingest":
                reply: Any = ingest(instance=instance, **kwargs)
            elif op == "load":
                reply = load(**kwargs)
            elif op == "call":  # a harness helper by name (module-level function of this module)
                reply = globals()[kwargs.pop("function")](**kwargs)
            else:
                raise ValueError(f"unknown op {op!r}")
        except BaseException as error:  # noqa: BLE001 -- a harness bug, reported to the caller
            reply = Outcome(accepted=False, error_cls="HarnessError", error_message="".join(traceback.format_exception(error)))
        sys.stdout.flush()
        conn.send(reply)


class Worker:
    """One child process at a time; crash or timeout -> an Outcome saying so, and a new child next call."""

    def __init__(self, log_dir: Path, address_space: int = WORKER_ADDRESS_SPACE) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.address_space = address_space
        self.process = None
        self.conn = None
        self.generation = 0
        self.log_path: Path | None = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self.generation += 1
        self.log_path = self.log_dir / f"worker-{self.generation}.log"
        self.process = context.Process(
            target=_worker_main, args=(child, str(self.log_path), self.address_space), daemon=True
        )
        self.process.start()
        child.close()
        self.conn = parent
        if not self.conn.poll(300):
            self._kill()
            raise RuntimeError(f"hostile-input worker did not start; see {self.log_path}")
        message = self.conn.recv()
        assert message[0] == "ready", message

    def _kill(self) -> None:
        if self.process is not None and self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)  # our own child, by its id
        if self.process is not None:
            self.process.join(10)
        if self.conn is not None:
            self.conn.close()
        self.process = None
        self.conn = None

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.send(None)
            except OSError:
                pass
            if self.process is not None:
                self.process.join(10)
        self._kill()

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1500:] if self.log_path else ""
        except OSError:
            return ""

    def request(self, op: str, timeout: float = CASE_TIMEOUT_S, **kwargs) -> Any:
        if self.process is None or not self.process.is_alive():
            self._kill()
            self._start()
        started = time.perf_counter()
        try:
            self.conn.send((op, kwargs))
            if not self.conn.poll(timeout):
                self._kill()
                return Outcome(accepted=False, crashed=f"no answer within {timeout:.0f} s (hang); worker killed",
                               seconds=time.perf_counter() - started)
            return self.conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            process = self.process
            if process is not None:
                process.join(10)
            code = process.exitcode if process is not None else None
            how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            tail = self._log_tail()
            self._kill()
            return Outcome(accepted=False, crashed=f"worker process died ({how}); log tail:\n{tail}",
                           seconds=time.perf_counter() - started)

    def ingest(self, home: Path, manifest: Path | None, batch: str, timeout: float = CASE_TIMEOUT_S, **options) -> Outcome:
        return self.request("ingest", timeout=timeout, home=str(home),
                            manifest=None if manifest is None else str(manifest), batch=batch, **options)

    def load(self, manifest: Path, batch: str, timeout: float = CASE_TIMEOUT_S, **options) -> Outcome:
        return self.request("load", timeout=timeout, manifest=str(manifest), batch=batch, **options)


_WORKER: Worker | None = None


def shared_worker(log_dir: Path | None = None) -> Worker:
    """The one worker of this pytest process (both hostile test modules share it)."""
    global _WORKER
    if _WORKER is None:
        import atexit
        import tempfile

        _WORKER = Worker(Path(log_dir or tempfile.mkdtemp(prefix="hostile-worker-")))
        atexit.register(_WORKER.close)
    return _WORKER


# =========================================================================== snapshot of stored data

VIEWS = ("raw_images", "raw_captions", "raw_instances", "raw_categories", "raw_quarantine")


def _files(root: Path, content: bool) -> dict[str, Any]:
    if not root.exists():
        return {}
    found: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() or path.is_symlink():
            rel = path.relative_to(root).as_posix()
            if content:
                found[rel] = path.read_bytes() if path.is_file() else f"symlink->{os.readlink(path)}"
            else:
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "symlink"
        elif path.is_dir() and path.name.startswith("."):
            found[path.relative_to(root).as_posix() + "/"] = "dir"
    return found


@dataclass
class Snapshot:
    registry: dict[str, Any]
    artifacts: dict[str, Any]
    refs: dict[str, Any]
    journal: dict[str, Any]
    materializations: list[tuple] | None
    views: dict[str, tuple[list[str], list[tuple]] | None]
    db_sha256: str | None = None  # bytes of lineage.duckdb: equal bytes -> equal rows (not compared itself)

    def batch_rows(self, view: str, batch: str, *, exclude: bool = False) -> list[dict]:
        data = self.views.get(view)
        if data is None:
            return []
        columns, rows = data
        dicts = [dict(zip(columns, row)) for row in rows]
        return [d for d in dicts if (d.get("batch") != batch) == exclude]


def snapshot(home: Path, reference: Snapshot | None = None) -> Snapshot:
    """Everything stored under ``home`` that a refused batch must leave alone.

    With a ``reference`` whose lineage.duckdb had the same bytes, its rows are reused (no DuckDB open).
    """
    import duckdb

    home = Path(home)
    materializations = None
    views: dict[str, Any] = {}
    db = home / "lineage.duckdb"
    wal = home / "lineage.duckdb.wal"
    db_sha256 = None
    if db.exists():
        digest = hashlib.sha256(db.read_bytes())
        digest.update(wal.read_bytes() if wal.exists() else b"no wal")
        db_sha256 = digest.hexdigest()
    if reference is not None and db_sha256 is not None and reference.db_sha256 == db_sha256:
        materializations, views = reference.materializations, reference.views
    elif db.exists():
        conn = duckdb.connect(str(db), read_only=True)
        try:
            materializations = conn.execute(
                "select materialization_id, asset, partition, data_version from materializations order by all"
            ).fetchall()
            names = {row[0] for row in conn.execute("select table_name from information_schema.tables").fetchall()}
            for view in VIEWS:
                if view not in names:
                    views[view] = None
                    continue
                cursor = conn.execute(f"select * from {view} order by all")
                views[view] = ([d[0] for d in cursor.description], cursor.fetchall())
        finally:
            conn.close()
    return Snapshot(
        registry=_files(home / "batches", content=True),
        artifacts=_files(home / "artifacts", content=False),
        refs=_files(home / "refs", content=True),
        journal={k: v for k, v in _files(home / "lineage-journal", content=False).items() if k.startswith("pending")},
        materializations=materializations,
        views=views,
        db_sha256=db_sha256,
    )


def snapshot_difference(before: Snapshot, after: Snapshot) -> list[str]:
    """Human-readable differences; empty when nothing stored changed."""
    differences = []
    for name in ("registry", "artifacts", "refs", "journal"):
        old, new = getattr(before, name), getattr(after, name)
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                state = "added" if key not in old else "removed" if key not in new else "changed"
                differences.append(f"{name}/{key} {state}")
    if before.materializations != after.materializations:
        differences.append(f"materializations rows {before.materializations} -> {after.materializations}")
    for view in VIEWS:
        if before.views.get(view) != after.views.get(view):
            differences.append(f"view {view} changed")
    return differences


# =========================================================================== expected content


@dataclass(frozen=True)
class InstanceExp:
    image_id: int
    category_id: int
    category: str
    rectangles: tuple | None  # hand-drawn mask; None: not checked
    iscrowd: bool
    bbox: tuple[float, float, float, float]
    area: float


@dataclass
class Content:
    """What an accepted batch must hold, exactly (ids -> values), and where its image files are."""

    images: dict[int, tuple[str, str, int, int]]  # id -> (split, file_name, width, height)
    paths: dict[int, Path]  # id -> resolved path of the file
    captions: dict[int, tuple[int, str]]
    instances: dict[int, InstanceExp]

    def without(self, lost: "Lost") -> "Content":
        return Content(
            images={k: v for k, v in self.images.items() if k not in lost.images},
            paths={k: v for k, v in self.paths.items() if k not in lost.images},
            captions={k: v for k, v in self.captions.items() if k not in lost.captions},
            instances={k: v for k, v in self.instances.items() if k not in lost.instances},
        )


@dataclass(frozen=True)
class Lost:
    images: frozenset = frozenset()
    captions: frozenset = frozenset()
    instances: frozenset = frozenset()

    def __or__(self, other: "Lost") -> "Lost":
        return Lost(self.images | other.images, self.captions | other.captions, self.instances | other.instances)


def lost_image(image_id: int) -> Lost:
    """An image and every record hanging off it."""
    return Lost(
        frozenset({image_id}),
        frozenset(c for c, (i, _) in FIXTURE_CAPTIONS.items() if i == image_id),
        frozenset(a for a, inst in FIXTURE_INSTANCES.items() if inst.image_id == image_id),
    )


def fixture_content(root: Path) -> Content:
    images, paths = {}, {}
    for image in FIXTURE_IMAGES.values():
        images[image.image_id] = (image.split, image.file_name, image.width, image.height)
        paths[image.image_id] = Path(os.path.realpath(root / SPLIT_FILES[image.split][0] / image.file_name))
    instances = {
        a: InstanceExp(inst.image_id, inst.category_id, FIXTURE_CATEGORIES[inst.category_id][0], inst.rectangles,
                       inst.iscrowd, tuple(_bbox(inst.rectangles)), float(inst.mask_area))
        for a, inst in FIXTURE_INSTANCES.items()
    }
    return Content(images, paths, dict(FIXTURE_CAPTIONS), instances)


# =========================================================================== expectations


@dataclass(frozen=True)
class Refusal:
    """Where a DatasetError must point. Each is a tuple of acceptable values; None = not checked."""

    file: tuple[str, ...] | None  # suffixes of error.file
    record: tuple[str, ...] | None  # str(error.record)
    field: tuple[str, ...] | None  # substrings of error.field


def naming_problems(refusal: Refusal | None, file: str | None, record: str | None, field_: str | None) -> list[str]:
    if refusal is None:
        return []
    problems = []
    if refusal.file is not None and not any(str(file or "").endswith(s) for s in refusal.file):
        problems.append(f"file {file!r} is none of {refusal.file}")
    if refusal.record is not None and (record is None or str(record) not in refusal.record):
        problems.append(f"record {record!r} is none of {refusal.record}")
    if refusal.field is not None and not any(s in (field_ or "") for s in refusal.field):
        problems.append(f"field {field_!r} contains none of {refusal.field}")
    return problems


@dataclass
class Expect:
    fail: Want  # outcome in on_bad_record="fail"
    refusal: Refusal | None  # what a refusal (or a quarantine row) must name
    content: Content  # the batch an acceptance must store (fail mode), before removing `lost`
    quarantine: Want | None = None  # outcome in "quarantine" mode; None = the case is not run there
    lost: Lost = field(default_factory=Lost)  # records quarantine mode drops
    options: dict = field(default_factory=dict)  # extra ingest options: replace, max_image_pixels, allowed_roots
    batch: str = CASE_BATCH
    note: str = ""
    timeout: float = CASE_TIMEOUT_S
    quarantine_refusal: Refusal | None = None  # what a quarantine-mode refusal must name, when not `refusal`


@dataclass
class CaseDir:
    """A fresh copy of the valid batch for one case, and the shared surroundings."""

    root: Path
    env: "Env"
    manifest: Path

    def json_path(self, split: str, kind: str) -> Path:
        _, captions, instances = SPLIT_FILES[split]
        return self.root / (captions if kind == "captions" else instances)

    def images_dir(self, split: str) -> Path:
        return self.root / SPLIT_FILES[split][0]

    def image_path(self, image_id: int) -> Path:
        image = FIXTURE_IMAGES[image_id]
        return self.images_dir(image.split) / image.file_name

    def content(self) -> Content:
        return fixture_content(self.root)


@dataclass
class Env:
    """Built once per test module: the valid batch, a home holding it as GOOD_BATCH, things outside."""

    base: Path
    pristine: Path  # dataset.yaml of the valid batch (also GOOD_BATCH's registered manifest)
    template_home: Path
    outside: Path  # a folder outside every case's batch folder
    outside_batch: Path  # dataset.yaml of a full copy of the valid batch out there
    bomb_png: Path  # 13000 x 13000 one-bit PNG: 169 Mpx, tiny on disk
    worker: Worker
    near_limit_png: Path | None = None  # 7000 x 7000 RGB PNG: 49 Mpx, just under the default limit
    template_snapshot: "Snapshot | None" = None


# --------------------------------------------------------------------------- JSON editing

_RAW = "\u0001RAW{}\u0001"


def raw(text: str, registry: dict[str, str]) -> str:
    """A placeholder that save_json replaces by the literal JSON ``text`` (NaN, 1e400, "\\ud800", ...)."""
    key = _RAW.format(len(registry))
    registry[key] = text
    return key


def save_json(path: Path, document: Any, raws: dict[str, str] | None = None) -> None:
    text = json.dumps(document, ensure_ascii=False, indent=1)
    for key, literal in (raws or {}).items():
        quoted = json.dumps(key, ensure_ascii=False)
        assert quoted in text, f"placeholder {key!r} not in the document"
        text = text.replace(quoted, literal)
    path.write_bytes(text.encode("utf-8"))


def edit_json(path: Path, edit: Callable[[Any, dict], Any]) -> None:
    """``edit(document, raws)`` changes the document in place (its return value is ignored)."""
    document = json.loads(path.read_text(encoding="utf-8"))
    raws: dict[str, str] = {}
    edit(document, raws)
    save_json(path, document, raws)


def by_id(records: list, record_id: int) -> dict:
    return next(r for r in records if isinstance(r, dict) and r.get("id") == record_id)


def edit_image_record(c: CaseDir, image_id: int, **values) -> None:
    """Change one image record in both JSON files of its split (they must agree)."""
    split = FIXTURE_IMAGES[image_id].split
    for kind in ("captions", "instances"):
        path = c.json_path(split, kind)

        def change(document, raws):
            record = by_id(document["images"], image_id)
            for key, value in values.items():
                record[key] = raw(value.text, raws) if isinstance(value, Raw) else value
        edit_json(path, change)


@dataclass(frozen=True)
class Raw:
    """A literal JSON text for edit helpers."""

    text: str


def edit_annotation(c: CaseDir, split: str, kind: str, record_id: int, **values) -> None:
    def change(document, raws):
        record = by_id(document["annotations"], record_id)
        for key, value in values.items():
            if value is DELETE:
                record.pop(key, None)
            else:
                record[key] = raw(value.text, raws) if isinstance(value, Raw) else value
    edit_json(c.json_path(split, kind), change)


DELETE = object()


def write_manifest(c: CaseDir, text: str | bytes) -> None:
    if isinstance(text, str):
        text = text.encode("utf-8")
    c.manifest.write_bytes(text)


def manifest_text(train: dict | None = None, test: dict | None = None, name: str = "coco-fixture", extra: str = "") -> str:
    """A dataset.yaml with the fixture's splits, keys overridden per split (None value: key left out)."""
    lines = [f"name: {json.dumps(name, ensure_ascii=False)}", "splits:"]
    for split, override in (("train", train), ("test", test)):
        images, captions, instances = SPLIT_FILES[split]
        entry = {"images": images, "captions": captions, "instances": instances}
        for key, value in (override or {}).items():
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = value
        lines.append(f"  {split}:")
        lines += [f"    {key}: {json.dumps(value, ensure_ascii=False)}" for key, value in entry.items()]
    return "\n".join(lines) + "\n" + extra


# =========================================================================== cases


@dataclass(frozen=True)
class Case:
    layer: str
    name: str
    build: Callable[[CaseDir], Expect]
    quarantine: bool = False  # also run in quarantine mode (the builder's Expect.quarantine says how it must end)

    @property
    def id(self) -> str:
        return f"{self.layer}-{self.name}"


CASES: list[Case] = []


def case(layer: str, name: str, quarantine: bool = False):
    def register(build: Callable[[CaseDir], Expect]) -> Callable[[CaseDir], Expect]:
        CASES.append(Case(layer, name, build, quarantine))
        return build
    return register


def _caption_file(split: str) -> str:
    return SPLIT_FILES[split][1].split("/")[-1]


def _instances_file(split: str) -> str:
    return SPLIT_FILES[split][2].split("/")[-1]


def _both_files(split: str) -> tuple[str, str]:
    return (_caption_file(split), _instances_file(split))


MANIFEST = ("dataset.yaml",)


def refuse_manifest(c: CaseDir, field_: tuple[str, ...] | None, quarantine: Want | None = None, **kw) -> Expect:
    return Expect("refuse", Refusal(MANIFEST, None, field_), c.content(), quarantine=quarantine, **kw)


# --------------------------------------------------------------------------- manifest layer


@case("manifest", "yaml_syntax_error")
def _(c):
    write_manifest(c, "name: [unclosed\nsplits: {\n")
    return refuse_manifest(c, None, quarantine="refuse")


@case("manifest", "top_level_list")
def _(c):
    write_manifest(c, "- name\n- splits\n")
    return refuse_manifest(c, None)


@case("manifest", "empty_file")
def _(c):
    write_manifest(c, "")
    return refuse_manifest(c, None)


@case("manifest", "not_utf8")
def _(c):
    write_manifest(c, b"name: caf\xe9\xff\nsplits: {}\n")
    return refuse_manifest(c, None)


@case("manifest", "name_is_a_number")
def _(c):
    write_manifest(c, manifest_text().replace('name: "coco-fixture"', "name: 42"))
    return refuse_manifest(c, ("name",))


@case("manifest", "splits_is_a_list")
def _(c):
    write_manifest(c, 'name: x\nsplits: [train, test]\n')
    return refuse_manifest(c, ("splits",))


@case("manifest", "unknown_split")
def _(c):
    write_manifest(c, manifest_text().replace("  test:", "  validation:"))
    return refuse_manifest(c, ("splits.validation",))


@case("manifest", "unknown_key_in_split")
def _(c):
    write_manifest(c, manifest_text(train={"masks": "annotations/masks.json"}))
    return refuse_manifest(c, ("splits.train.masks",))


@case("manifest", "split_entry_null")
def _(c):
    write_manifest(c, 'name: x\nsplits:\n  train:\n  test: {images: val2017, captions: annotations/captions_val2017.json, '
                      'instances: annotations/instances_val2017.json}\n')
    return refuse_manifest(c, ("splits.train",))


@case("manifest", "images_is_a_number")
def _(c):
    write_manifest(c, manifest_text(train={"images": 5}))
    return refuse_manifest(c, ("splits.train.images",))


@case("manifest", "captions_key_missing")
def _(c):
    write_manifest(c, manifest_text(test={"captions": None}))
    return refuse_manifest(c, ("splits.test.captions",))


@case("manifest", "nul_in_images_path", quarantine=True)
def _(c):
    write_manifest(c, manifest_text(train={"images": "a\u0000b"}))  # json.dumps writes "a\u0000b": YAML reads a NUL
    return refuse_manifest(c, ("splits.train.images",), quarantine="refuse")


@case("manifest", "nul_in_instances_path")
def _(c):
    write_manifest(c, manifest_text(test={"instances": "annotations/\u0000instances_val2017.json"}))
    return refuse_manifest(c, ("splits.test.instances",))


@case("manifest", "deep_nesting_100k")
def _(c):
    depth = 100_000
    write_manifest(c, "name: " + "[" * depth + "]" * depth + "\n" + manifest_text().split("\n", 1)[1])
    return refuse_manifest(c, None)


@case("manifest", "deep_nesting_mappings")
def _(c):
    depth = 20_000
    write_manifest(c, manifest_text() + "extra: " + "{a: " * depth + "1" + "}" * depth + "\n")
    return refuse_manifest(c, None)


@case("manifest", "alias_recursive")
def _(c):
    write_manifest(c, "name: x\nsplits: &s\n  train: *s\n")
    return refuse_manifest(c, None)


@case("manifest", "alias_shares_train_entry_with_test")
def _(c):
    # test: *t makes the test split the very same files as train: every image in both splits.
    text = (
        "name: x\nsplits:\n  train: &t {images: train2017, captions: annotations/captions_train2017.json, "
        "instances: annotations/instances_train2017.json}\n  test: *t\n"
    )
    write_manifest(c, text)
    # Refused either as a manifest using aliases (file-level) or as every image in both splits.
    files = MANIFEST + _both_files("train")
    return Expect("refuse", Refusal(files, None, None), c.content(), note="aliases or cross-split duplicate")


@case("manifest", "billion_laughs_alias_expansion")
def _(c):
    levels = ["lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, 10):
        previous = f"*l{level - 1}"
        levels.append(f"lol{level}: &l{level} [{', '.join([previous] * 10)}]")
    write_manifest(c, manifest_text() + "extra:\n" + "".join(f"  {line}\n" for line in levels))
    return Expect("either", Refusal(MANIFEST, None, None), c.content())


@case("manifest", "huge_file_2mb")
def _(c):
    write_manifest(c, manifest_text() + ("# " + "x" * 78 + "\n") * 25_000)
    return Expect("either", Refusal(MANIFEST, None, None), c.content())


@case("manifest", "unknown_top_level_key")
def _(c):
    write_manifest(c, manifest_text() + "description: a batch with a note\n")
    return Expect("either", Refusal(MANIFEST, None, None), c.content())


def _set_all_file_names(c: CaseDir, image_id: int, file_name: str) -> None:
    edit_image_record(c, image_id, file_name=file_name)


@case("manifest", "images_is_filesystem_root", quarantine=True)
def _(c):
    # images: "/" and file_names relative to "/": any file on the machine could be listed.
    for image_id, image in FIXTURE_IMAGES.items():
        if image.split == "train":
            _set_all_file_names(c, image_id, str(c.image_path(image_id).resolve().relative_to("/")))
    write_manifest(c, manifest_text(train={"images": "/"}))
    return refuse_manifest(c, ("splits.train.images",), quarantine="refuse")


@case("manifest", "images_absolute_path_elsewhere")
def _(c):
    write_manifest(c, manifest_text(train={"images": str(c.env.outside_batch.parent / "train2017")}))
    return refuse_manifest(c, ("splits.train.images",))


@case("manifest", "captions_absolute_path_elsewhere")
def _(c):
    write_manifest(c, manifest_text(test={"captions": str(c.env.outside_batch.parent / SPLIT_FILES["test"][1])}))
    return refuse_manifest(c, ("splits.test.captions",))


@case("manifest", "images_dotdot_escape")
def _(c):
    write_manifest(c, manifest_text(train={"images": os.path.relpath(c.env.outside_batch.parent / "train2017", c.root)}))
    return refuse_manifest(c, ("splits.train.images",))


@case("manifest", "images_folder_symlinked_outside", quarantine=True)
def _(c):
    shutil.rmtree(c.images_dir("train"))
    c.images_dir("train").symlink_to(c.env.outside_batch.parent / "train2017", target_is_directory=True)
    return refuse_manifest(c, ("splits.train.images",), quarantine="refuse")


@case("manifest", "instances_file_symlinked_outside")
def _(c):
    path = c.json_path("test", "instances")
    path.unlink()
    path.symlink_to(c.env.outside_batch.parent / SPLIT_FILES["test"][2])
    return refuse_manifest(c, ("splits.test.instances",))


@case("manifest", "images_folder_symlinked_outside_but_allowed")
def _(c):
    shutil.rmtree(c.images_dir("train"))
    outside_images = c.env.outside_batch.parent / "train2017"
    c.images_dir("train").symlink_to(outside_images, target_is_directory=True)
    content = c.content()
    for image_id, image in FIXTURE_IMAGES.items():
        if image.split == "train":
            content.paths[image_id] = (outside_images / image.file_name).resolve()
    return Expect("accept", None, content, options={"allowed_roots": [str(c.env.outside_batch.parent)]})


@case("manifest", "images_folder_symlinked_inside")
def _(c):
    # A link that stays inside the batch folder is fine.
    real = c.root / "store" / "train-images"
    real.parent.mkdir()
    c.images_dir("train").rename(real)
    c.images_dir("train").symlink_to(real, target_is_directory=True)
    return Expect("accept", None, c.content())


@case("manifest", "manifest_missing")
def _(c):
    c.manifest.unlink()
    return refuse_manifest(c, None)


@case("manifest", "manifest_is_a_fifo")
def _(c):
    # Opening a FIFO for reading blocks until a writer comes: it must be refused, not read.
    c.manifest.unlink()
    os.mkfifo(c.manifest)
    expect = refuse_manifest(c, None)
    expect.timeout = 10.0
    return expect


@case("manifest", "captions_is_a_fifo")
def _(c):
    path = c.json_path("test", "captions")
    path.unlink()
    os.mkfifo(path)
    expect = refuse_manifest(c, ("splits.test.captions",))
    expect.refusal = Refusal(MANIFEST + (_caption_file("test"),), None, None)  # refused at the manifest or the file
    expect.timeout = 10.0
    return expect


@case("manifest", "images_folder_missing")
def _(c):
    shutil.rmtree(c.images_dir("test"))
    return refuse_manifest(c, ("splits.test.images",))


@case("manifest", "images_folder_is_a_file")
def _(c):
    shutil.rmtree(c.images_dir("test"))
    c.images_dir("test").write_text("not a folder")
    return refuse_manifest(c, ("splits.test.images",))


@case("manifest", "captions_is_a_folder")
def _(c):
    path = c.json_path("train", "captions")
    path.unlink()
    path.mkdir()
    return refuse_manifest(c, ("splits.train.captions",))


# --------------------------------------------------------------------------- JSON layer


def refuse_file(c: CaseDir, file: tuple[str, ...], quarantine: Want | None = "refuse", field_=None) -> Expect:
    return Expect("refuse", Refusal(file, None, field_), c.content(), quarantine=quarantine)


@case("json", "malformed", quarantine=True)
def _(c):
    path = c.json_path("train", "captions")
    path.write_text(path.read_text(encoding="utf-8").replace('"annotations": [', '"annotations": [,', 1), encoding="utf-8")
    return refuse_file(c, (_caption_file("train"),))


@case("json", "top_level_is_a_list")
def _(c):
    c.json_path("test", "instances").write_text("[]")
    return refuse_file(c, (_instances_file("test"),))


@case("json", "images_section_is_an_object")
def _(c):
    edit_json(c.json_path("train", "instances"), lambda d, r: d.update(images={"9": d["images"][0]}))
    return refuse_file(c, (_instances_file("train"),), field_=("images",))


@case("json", "annotations_section_missing")
def _(c):
    edit_json(c.json_path("test", "captions"), lambda d, r: d.pop("annotations"))
    return refuse_file(c, (_caption_file("test"),), field_=("annotations",))


@case("json", "truncated_file")
def _(c):
    path = c.json_path("train", "instances")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return refuse_file(c, (_instances_file("train"),))


@case("json", "invalid_utf8_bytes")
def _(c):
    path = c.json_path("train", "captions")
    path.write_bytes(path.read_bytes().replace("frisbee.".encode(), b"frisbee\xff\xfe.", 1))
    return refuse_file(c, (_caption_file("train"),))


@case("json", "deep_nesting_100k_in_caption", quarantine=True)
def _(c):
    depth = 100_000
    edit_annotation(c, "train", "captions", 1001, caption=Raw("[" * depth + "]" * depth))
    expect = refuse_file(c, (_caption_file("train"),), quarantine="either")
    expect.lost = Lost(captions=frozenset({1001}))
    return expect


@case("json", "integer_of_5000_digits")
def _(c):
    edit_annotation(c, "train", "instances", 101, area=Raw("9" * 5000))
    expect = refuse_file(c, (_instances_file("train"),), quarantine="either")
    expect.lost = Lost(instances=frozenset({101}))
    return expect


@case("json", "utf8_bom")
def _(c):
    path = c.json_path("test", "captions")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    return Expect("either", Refusal((_caption_file("test"),), None, None), c.content())


@case("json", "extra_keys_everywhere")
def _(c):
    def add(document, raws):
        document["extra_top"] = {"nested": [1, 2, {"deep": None}]}
        for section in ("images", "annotations", "categories"):
            for record in document.get(section, []):
                record["unexpected"] = ["x", 1.5, None]
    for split in ("train", "test"):
        for kind in ("captions", "instances"):
            edit_json(c.json_path(split, kind), add)
    return Expect("accept", None, c.content())


def refuse_record(c, split, kind, record, field_, lost: Lost, quarantine: Want = "accept", files=None) -> Expect:
    file = files or ((_caption_file(split),) if kind == "captions" else (_instances_file(split),))
    records = tuple(str(r) for r in (record if isinstance(record, tuple) else (record,)))
    return Expect("refuse", Refusal(file, records, field_), c.content(), quarantine=quarantine, lost=lost)


@case("json", "nan_literal_in_bbox")
def _(c):
    edit_annotation(c, "train", "instances", 101, bbox=Raw("[4.0, NaN, 8.0, 10.0]"))
    return refuse_record(c, "train", "instances", 101, ("bbox",), Lost(instances=frozenset({101})))


@case("json", "infinity_literal_in_area")
def _(c):
    edit_annotation(c, "test", "instances", 202, area=Raw("Infinity"))
    return refuse_record(c, "test", "instances", 202, ("area",), Lost(instances=frozenset({202})))


@case("json", "minus_infinity_in_bbox_width")
def _(c):
    edit_annotation(c, "train", "instances", 105, bbox=Raw("[2.0, 3.0, -Infinity, 5.0]"))
    return refuse_record(c, "train", "instances", 105, ("bbox",), Lost(instances=frozenset({105})))


@case("json", "nan_literal_as_image_width")
def _(c):
    edit_image_record(c, 30, width=Raw("NaN"))
    return refuse_record(c, "train", "captions", 30, ("width",), lost_image(30), files=_both_files("train"))


@case("json", "float_too_large_1e400_literal_in_bbox")
def _(c):
    edit_annotation(c, "train", "instances", 102, bbox=Raw("[20.0, 2.0, 1e400, 22.0]"))
    return refuse_record(c, "train", "instances", 102, ("bbox",), Lost(instances=frozenset({102})))


@case("json", "int_10e400_in_bbox", quarantine=True)
def _(c):
    edit_annotation(c, "train", "instances", 101, bbox=Raw("[4, 6, " + "1" + "0" * 400 + ", 10]"))
    return refuse_record(c, "train", "instances", 101, ("bbox",), Lost(instances=frozenset({101})))


@case("json", "int_10e400_as_area")
def _(c):
    edit_annotation(c, "test", "instances", 201, area=Raw("1" + "0" * 400))
    return refuse_record(c, "test", "instances", 201, ("area",), Lost(instances=frozenset({201})))


@case("json", "int_10e400_in_polygon")
def _(c):
    edit_annotation(c, "train", "instances", 101, segmentation=Raw("[[4, 6, 12, 6, 12, " + "1" + "0" * 400 + ", 4, 16]]"))
    return refuse_record(c, "train", "instances", 101, ("segmentation",), Lost(instances=frozenset({101})))


@case("json", "caption_is_a_number")
def _(c):
    edit_annotation(c, "train", "captions", 1003, caption=5)
    return refuse_record(c, "train", "captions", 1003, ("caption",), Lost(captions=frozenset({1003})))


@case("json", "caption_is_a_list", quarantine=True)
def _(c):
    # quarantined; the old contact sheet wrapped it anyway: AttributeError 'list' has no 'split'
    edit_annotation(c, "train", "captions", 1001, caption=["A dog."])
    return refuse_record(c, "train", "captions", 1001, ("caption",), Lost(captions=frozenset({1001})))


@case("json", "caption_key_missing", quarantine=True)
def _(c):
    edit_annotation(c, "train", "captions", 1005, caption=DELETE)
    return refuse_record(c, "train", "captions", 1005, ("caption",), Lost(captions=frozenset({1005})))


@case("json", "image_record_is_a_string", quarantine=True)
def _(c):
    edit_json(c.json_path("train", "captions"), lambda d, r: d["images"].append("000000000009.png"))
    return refuse_record(c, "train", "captions", ("images[3]",), ("images",), Lost())


@case("json", "annotation_is_null")
def _(c):
    edit_json(c.json_path("test", "instances"), lambda d, r: d["annotations"].insert(0, None))
    return refuse_record(c, "test", "instances", ("annotations[0]",), ("annotations",), Lost())


@case("json", "bbox_is_a_string", quarantine=True)
def _(c):
    # quarantined; the old contact sheet unpacked it: ValueError
    edit_annotation(c, "train", "instances", 101, bbox="4,6,8,10")
    return refuse_record(c, "train", "instances", 101, ("bbox",), Lost(instances=frozenset({101})))


@case("json", "category_id_missing", quarantine=True)
def _(c):
    # quarantined; the old contact sheet indexed pycocotools' cats by it: KeyError
    edit_annotation(c, "train", "instances", 102, category_id=DELETE)
    return refuse_record(c, "train", "instances", 102, ("category_id",), Lost(instances=frozenset({102})))


@case("json", "image_id_missing_in_instance", quarantine=True)
def _(c):
    # quarantined; pycocotools' COCO() index of the raw JSON raised KeyError on it
    edit_annotation(c, "train", "instances", 103, image_id=DELETE)
    return refuse_record(c, "train", "instances", 103, ("image_id",), Lost(instances=frozenset({103})))


@case("json", "segmentation_is_a_string", quarantine=True)
def _(c):
    edit_annotation(c, "train", "instances", 101, segmentation="polygon")
    return refuse_record(c, "train", "instances", 101, ("segmentation",), Lost(instances=frozenset({101})))


@case("json", "iscrowd_is_2")
def _(c):
    edit_annotation(c, "test", "instances", 201, iscrowd=2)
    return refuse_record(c, "test", "instances", 201, ("iscrowd",), Lost(instances=frozenset({201})))


@case("json", "category_name_empty", quarantine=True)
def _(c):
    def change(document, raws):
        by_id(document["categories"], 47)["name"] = ""
    edit_json(c.json_path("train", "instances"), change)
    return refuse_record(c, "train", "instances", 47, ("name",), Lost(instances=frozenset({105})))


# --------------------------------------------------------------------------- caption text


@case("caption", "lone_high_surrogate", quarantine=True)
def _(c):
    edit_annotation(c, "train", "captions", 1001, caption=Raw('"A dog \\ud800 catching a frisbee."'))
    return refuse_record(c, "train", "captions", 1001, ("caption",), Lost(captions=frozenset({1001})))


@case("caption", "lone_low_surrogate_alone")
def _(c):
    edit_annotation(c, "test", "captions", 2001, caption=Raw('"\\udc00"'))
    return refuse_record(c, "test", "captions", 2001, ("caption",), Lost(captions=frozenset({2001})))


@case("caption", "reversed_surrogate_pair")
def _(c):
    edit_annotation(c, "train", "captions", 1005, caption=Raw('"\\ude00\\ud83d"'))
    return refuse_record(c, "train", "captions", 1005, ("caption",), Lost(captions=frozenset({1005})))


@case("caption", "valid_surrogate_pair_escape")
def _(c):
    # "\ud83d\ude00" is a correctly paired escape of U+1F600: a valid caption, kept as that one character.
    edit_annotation(c, "train", "captions", 1005, caption=Raw('"smile \\ud83d\\ude00"'))
    content = c.content()
    content.captions[1005] = (30, "smile \U0001F600")
    return Expect("accept", None, content)


@case("caption", "nul_characters", quarantine=True)
def _(c):
    edit_annotation(c, "train", "captions", 1002, caption="a\u0000b\u0000")
    content = c.content()
    content.captions[1002] = (9, "a\u0000b\u0000")
    expect = Expect("either", Refusal((_caption_file("train"),), ("1002",), ("caption",)), content,
                    quarantine="either", lost=Lost(captions=frozenset({1002})))
    return expect


@case("caption", "empty_string")
def _(c):
    edit_annotation(c, "test", "captions", 2003, caption="")
    content = c.content()
    content.captions[2003] = (285, "")
    return Expect("either", Refusal((_caption_file("test"),), ("2003",), ("caption",)), content)


@case("caption", "very_long_30k_chars", quarantine=True)
def _(c):
    text = ("a dog with a frisbee " * 2_000)[:30_000]
    edit_annotation(c, "train", "captions", 1003, caption=text)
    content = c.content()
    content.captions[1003] = (25, text)
    return Expect("either", Refusal((_caption_file("train"),), ("1003",), ("caption",)), content,
                  quarantine="either", lost=Lost(captions=frozenset({1003})))


@case("caption", "one_word_of_30k_chars")
def _(c):
    text = "x" * 30_000
    edit_annotation(c, "train", "captions", 1006, caption=text)
    content = c.content()
    content.captions[1006] = (30, text)
    return Expect("either", Refusal((_caption_file("train"),), ("1006",), ("caption",)), content)


@case("caption", "bidi_controls_bom_noncharacters")
def _(c):
    text = "\u202eevil\u202c \ufeff\uffff\U0010ffff \u0301combining \r\n\t"
    edit_annotation(c, "test", "captions", 2004, caption=text)
    content = c.content()
    content.captions[2004] = (285, text)
    return Expect("accept", None, content)


# --------------------------------------------------------------------------- ids


@case("ids", "negative_caption_id")
def _(c):
    edit_annotation(c, "train", "captions", 1002, id=-5)
    return refuse_record(c, "train", "captions", ("-5", "annotations[1]"), ("id",), Lost(captions=frozenset({1002})))


@case("ids", "caption_id_2_pow_64", quarantine=True)
def _(c):
    edit_annotation(c, "train", "captions", 1001, id=2**64)
    return refuse_record(c, "train", "captions", (str(2**64), "annotations[0]"), ("id",), Lost(captions=frozenset({1001})))


@case("ids", "annotation_id_2_pow_63")
def _(c):
    edit_annotation(c, "test", "instances", 202, id=2**63)
    return refuse_record(c, "test", "instances", (str(2**63), "annotations[1]"), ("id",), Lost(instances=frozenset({202})))


@case("ids", "image_id_2_pow_64", quarantine=True)
def _(c):
    huge = 2**64
    for kind in ("captions", "instances"):
        def change(document, raws):
            by_id(document["images"], 9)["id"] = huge
            for record in document["annotations"]:
                if record.get("image_id") == 9:
                    record["image_id"] = huge
        edit_json(c.json_path("train", kind), change)
    return refuse_record(c, "train", "captions", (str(huge), "images[0]"), ("id",), lost_image(9),
                         files=_both_files("train"))


@case("ids", "caption_image_id_2_pow_64")
def _(c):
    edit_annotation(c, "test", "captions", 2002, image_id=2**64)
    return refuse_record(c, "test", "captions", 2002, ("image_id",), Lost(captions=frozenset({2002})))


@case("ids", "width_2_pow_40", quarantine=True)
def _(c):
    edit_image_record(c, 9, width=2**40)
    return refuse_record(c, "train", "captions", 9, ("width",), lost_image(9), files=_both_files("train"))


@case("ids", "height_2_pow_31", quarantine=True)
def _(c):
    edit_image_record(c, 139, height=2**31)
    return refuse_record(c, "test", "captions", 139, ("height",), lost_image(139), files=_both_files("test"))


@case("ids", "bool_caption_id")
def _(c):
    edit_annotation(c, "test", "captions", 2003, id=True)
    return refuse_record(c, "test", "captions", ("annotations[2]", "True"), ("id",), Lost(captions=frozenset({2003})))


@case("ids", "float_image_id_in_caption")
def _(c):
    edit_annotation(c, "train", "captions", 1004, image_id=25.0)
    return refuse_record(c, "train", "captions", 1004, ("image_id",), Lost(captions=frozenset({1004})))


@case("ids", "string_image_id")
def _(c):
    edit_image_record(c, 285, id="285")
    return refuse_record(c, "test", "captions", ("images[1]", "285"), ("id",), lost_image(285),
                         files=_both_files("test"))


@case("ids", "duplicate_caption_id")
def _(c):
    edit_annotation(c, "train", "captions", 1004, id=1003)
    return refuse_record(c, "train", "captions", 1003, ("id",), Lost(captions=frozenset({1003, 1004})))


@case("ids", "duplicate_image_id_in_one_file")
def _(c):
    edit_json(c.json_path("train", "instances"), lambda d, r: d["images"].append(dict(by_id(d["images"], 25))))
    return refuse_record(c, "train", "instances", 25, ("id",), lost_image(25))


@case("ids", "dangling_caption_image_id")
def _(c):
    edit_json(c.json_path("train", "captions"),
              lambda d, r: d["annotations"].append({"id": 1099, "image_id": 999, "caption": "A ghost."}))
    return refuse_record(c, "train", "captions", 1099, ("image_id",), Lost())


@case("ids", "dangling_category_id", quarantine=True)
def _(c):
    edit_annotation(c, "train", "instances", 105, category_id=77)
    return refuse_record(c, "train", "instances", 105, ("category_id",), Lost(instances=frozenset({105})))


# --------------------------------------------------------------------------- segmentations


def refuse_segmentation(c, split, annotation_id, sub=("segmentation",)) -> Expect:
    return refuse_record(c, split, "instances", annotation_id, sub, Lost(instances=frozenset({annotation_id})))


@case("segmentation", "nan_in_polygon", quarantine=True)
def _(c):
    # quarantined, the old contact sheet drew it from the raw JSON: pycocotools asked for 21 GB
    edit_annotation(c, "train", "instances", 101, segmentation=Raw("[[4, 6, 12, 6, NaN, 16, 4, 16]]"))
    return refuse_segmentation(c, "train", 101)


@case("segmentation", "infinity_in_polygon")
def _(c):
    edit_annotation(c, "test", "instances", 201, segmentation=Raw("[[40, 0, 48, 0, 48, Infinity, 40, 8]]"))
    return refuse_segmentation(c, "test", 201)


@case("segmentation", "short_first_part_then_valid_part", quarantine=True)
def _(c):
    # 4 numbers (2 vertices) first: skipped by validation; pycocotools' frPyObjects read the list as boxes.
    edit_annotation(c, "train", "instances", 102, segmentation=[[20, 20, 24, 20], [26, 2, 30, 2, 30, 5, 26, 5]],
                    bbox=[26.0, 2.0, 4.0, 3.0], area=12.0)
    content = c.content()
    old = content.instances[102]
    content.instances[102] = replace(old, rectangles=((26, 2, 30, 5),), bbox=(26.0, 2.0, 4.0, 3.0), area=12.0)
    return Expect("accept", None, content, quarantine="accept")


@case("segmentation", "odd_number_of_coordinates")
def _(c):
    edit_annotation(c, "train", "instances", 101, segmentation=[[4, 6, 12, 6, 12, 16, 4]])
    return refuse_segmentation(c, "train", 101)


@case("segmentation", "polygon_far_out_of_bounds")
def _(c):
    edit_annotation(c, "test", "instances", 202, segmentation=[[2, 2, 1e300, 2, 1e300, 4, 2, 4]])
    return refuse_segmentation(c, "test", 202)


@case("segmentation", "polygon_negative_huge", quarantine=True)
def _(c):
    edit_annotation(c, "train", "instances", 101, segmentation=[[-1e9, 6, 12, 6, 12, 16, -1e9, 16]])
    return refuse_segmentation(c, "train", 101)


@case("segmentation", "empty_polygon_list", quarantine=True)
def _(c):
    edit_annotation(c, "train", "instances", 102, segmentation=[])
    return refuse_segmentation(c, "train", 102)


@case("segmentation", "polygon_of_lists", quarantine=True)
def _(c):
    edit_annotation(c, "train", "instances", 101, segmentation=[[[4, 6], [12, 6], [12, 16]]])
    return refuse_segmentation(c, "train", 101)


@case("segmentation", "polygon_of_booleans")
def _(c):
    edit_annotation(c, "train", "instances", 101, segmentation=[[True, False, True, True, False, True]])
    return refuse_segmentation(c, "train", 101)


@case("segmentation", "only_short_parts")
def _(c):
    edit_annotation(c, "test", "instances", 201, segmentation=[[40, 0, 48, 0], [41, 1]])
    return refuse_segmentation(c, "test", 201)


@case("segmentation", "rle_string_malformed")
def _(c):
    def change(document, raws):
        by_id(document["annotations"], 105)["segmentation"]["counts"] = "\x7f~~"
    edit_json(c.json_path("train", "instances"), change)
    return refuse_segmentation(c, "train", 105)


@case("segmentation", "rle_string_not_ascii", quarantine=True)
def _(c):
    def change(document, raws):
        by_id(document["annotations"], 104)["segmentation"]["counts"] = "é€😀"
    edit_json(c.json_path("train", "instances"), change)
    return refuse_segmentation(c, "train", 104)


@case("segmentation", "rle_oversized_size", quarantine=True)
def _(c):
    edit_annotation(c, "train", "instances", 103, segmentation={"size": [100_000, 100_000], "counts": [10**10]})
    return refuse_segmentation(c, "train", 103)


@case("segmentation", "rle_counts_int_10e400")
def _(c):
    edit_annotation(c, "train", "instances", 103, segmentation=Raw('{"size": [24, 40], "counts": [1' + "0" * 400 + "]}"))
    return refuse_segmentation(c, "train", 103)


@case("segmentation", "rle_counts_negative_sum_matches", quarantine=True)
def _(c):
    # -10 and 970 sum to 24*40 = 960 pixels: the sum alone does not catch it
    edit_annotation(c, "train", "instances", 103, segmentation={"size": [24, 40], "counts": [-10, 970]})
    return refuse_segmentation(c, "train", 103)


@case("segmentation", "rle_size_booleans")
def _(c):
    edit_annotation(c, "train", "instances", 103, segmentation={"size": [True, 40], "counts": [960]})
    return refuse_segmentation(c, "train", 103)


@case("segmentation", "rle_counts_missing", quarantine=True)
def _(c):
    edit_annotation(c, "train", "instances", 104, segmentation={"size": [24, 40]})
    return refuse_segmentation(c, "train", 104)


@case("segmentation", "rle_counts_float")
def _(c):
    edit_annotation(c, "train", "instances", 103, segmentation={"size": [24, 40], "counts": [959.5, 0.5]})
    return refuse_segmentation(c, "train", 103)


# --------------------------------------------------------------------------- bboxes


@case("bbox", "negative_width")
def _(c):
    edit_annotation(c, "train", "instances", 101, bbox=[4.0, 6.0, -8.0, 10.0])
    return refuse_record(c, "train", "instances", 101, ("bbox",), Lost(instances=frozenset({101})))


@case("bbox", "three_numbers")
def _(c):
    edit_annotation(c, "test", "instances", 201, bbox=[40.0, 0.0, 8.0])
    return refuse_record(c, "test", "instances", 201, ("bbox",), Lost(instances=frozenset({201})))


@case("bbox", "null", quarantine=True)
def _(c):
    edit_annotation(c, "train", "instances", 104, bbox=None)
    return refuse_record(c, "train", "instances", 104, ("bbox",), Lost(instances=frozenset({104})))


@case("bbox", "booleans")
def _(c):
    edit_annotation(c, "train", "instances", 105, bbox=[True, 3, 4, 5])
    return refuse_record(c, "train", "instances", 105, ("bbox",), Lost(instances=frozenset({105})))


# --------------------------------------------------------------------------- image files


def refuse_image(c, image_id, field_, at_file: bool, quarantine: Want = "accept") -> Expect:
    split = FIXTURE_IMAGES[image_id].split
    files = (c.image_path(image_id).name,) if at_file else _both_files(split)
    return Expect("refuse", Refusal(files, (str(image_id),), field_), c.content(), quarantine=quarantine,
                  lost=lost_image(image_id))


@case("image", "missing_file")
def _(c):
    c.image_path(30).unlink()
    return refuse_image(c, 30, ("file_name",), at_file=False)


@case("image", "truncated_file", quarantine=True)
def _(c):
    data = c.image_path(9).read_bytes()
    c.image_path(9).write_bytes(data[: len(data) // 2])
    return refuse_image(c, 9, ("pixels",), at_file=True)


@case("image", "zero_bytes")
def _(c):
    c.image_path(139).write_bytes(b"")
    return refuse_image(c, 139, ("pixels",), at_file=True)


@case("image", "not_an_image")
def _(c):
    c.image_path(285).write_text("#!/bin/sh\necho this is not a picture\n")
    return refuse_image(c, 285, ("pixels",), at_file=True)


@case("image", "wrong_size")
def _(c):
    image = FIXTURE_IMAGES[25]
    write_image(c.image_path(25), image.width + 1, image.height, image.mode, image.format)
    return refuse_image(c, 25, ("width",), at_file=True)


@case("image", "bomb_169mpx_declared_in_json", quarantine=True)
def _(c):
    # 13000 x 13000 one-bit PNG (a few KB); the JSON states that size, so no size mismatch saves us.
    shutil.copyfile(c.env.bomb_png, c.image_path(9))
    edit_image_record(c, 9, width=13000, height=13000)
    return refuse_record(c, "train", "captions", 9, ("images.width",), lost_image(9), files=_both_files("train"))


@case("image", "bomb_169mpx_behind_small_json_size", quarantine=True)
def _(c):
    # The JSON says 32x32; only the file's header tells: refused before decoding, field "pixels".
    shutil.copyfile(c.env.bomb_png, c.image_path(9))
    return refuse_image(c, 9, ("pixels",), at_file=True)


@case("image", "max_image_pixels_config", quarantine=True)
def _(c):
    # max_image_pixels=500: every fixture image but 30 (20x16 = 320 px) is larger, judged by the JSON's width*height.
    over = (9, 25, 139, 285)
    lost = Lost()
    for image_id in over:
        lost = lost | lost_image(image_id)
    files = _both_files("train") + _both_files("test")
    return Expect("refuse", Refusal(files, tuple(str(i) for i in over), ("images.width",)), c.content(),
                  quarantine="accept", lost=lost, options={"max_image_pixels": 500})


@case("image", "max_image_pixels_boundary", quarantine=True)
def _(c):
    # max_image_pixels=1024: image 9 (32x32 = 1024 px) is at the limit and stays; only 139 (48x32) is over it.
    files = _both_files("test")
    return Expect("refuse", Refusal(files, ("139",), ("images.width",)), c.content(), quarantine="accept",
                  lost=lost_image(139), options={"max_image_pixels": 1024})


@case("image", "just_under_the_pixel_limit_stays_under_2gb")
def _(c):
    # 7000 x 7000 RGB = 49 Mpx, under the default 50 Mpx: accepted, decoded, drawn -- within the 2 GB budget.
    shutil.copyfile(c.env.near_limit_png, c.image_path(9))
    edit_image_record(c, 9, width=7000, height=7000)
    content = c.content()
    content.images[9] = ("train", FIXTURE_IMAGES[9].file_name, 7000, 7000)
    return Expect("accept", None, content, timeout=90.0)


@case("image", "directory_instead_of_file")
def _(c):
    c.image_path(30).unlink()
    c.image_path(30).mkdir()
    return Expect("refuse", Refusal(_both_files("train") + (c.image_path(30).name,), ("30",), ("file_name", "pixels")),
                  c.content(), quarantine="accept", lost=lost_image(30))


@case("image", "fifo_instead_of_file")
def _(c):
    # Reading a FIFO blocks until a writer appears: a hostile batch must not hang the ingest.
    c.image_path(25).unlink()
    os.mkfifo(c.image_path(25))
    return Expect("refuse", Refusal(_both_files("train") + (c.image_path(25).name,), ("25",), ("file_name", "pixels")),
                  c.content(), quarantine="accept", lost=lost_image(25), timeout=10.0)


@case("image", "symlink_to_file_outside")
def _(c):
    c.image_path(30).unlink()
    c.image_path(30).symlink_to(c.env.outside_batch.parent / "train2017" / FIXTURE_IMAGES[30].file_name)
    return refuse_image(c, 30, ("file_name",), at_file=False)


@case("image", "symlink_loop")
def _(c):
    c.image_path(285).unlink()
    c.image_path(285).symlink_to(c.image_path(285))
    return Expect("refuse", Refusal(_both_files("test") + (c.image_path(285).name,), ("285",), ("file_name", "pixels")),
                  c.content(), quarantine="accept", lost=lost_image(285))


@case("image", "file_name_dotdot")
def _(c):
    outside_file = c.env.outside_batch.parent / "train2017" / FIXTURE_IMAGES[30].file_name
    _set_all_file_names(c, 30, os.path.relpath(outside_file, c.images_dir("train")))
    return refuse_image(c, 30, ("file_name",), at_file=False)


@case("image", "file_name_absolute")
def _(c):
    _set_all_file_names(c, 30, str(c.env.outside_batch.parent / "train2017" / FIXTURE_IMAGES[30].file_name))
    return refuse_image(c, 30, ("file_name",), at_file=False)


@case("image", "file_name_with_nul")
def _(c):
    _set_all_file_names(c, 139, "a\u0000b")
    return refuse_image(c, 139, ("file_name",), at_file=False)


@case("image", "file_name_empty")
def _(c):
    _set_all_file_names(c, 139, "")
    return refuse_image(c, 139, ("file_name",), at_file=False)


# --------------------------------------------------------------------------- cross-split


@case("cross_split", "same_file_in_train_and_test", quarantine=True)
def _(c):
    # Both splits read train2017; test image 285 is train image 9's file under another id.
    shutil.copyfile(c.image_path(139), c.images_dir("train") / FIXTURE_IMAGES[139].file_name)
    edit_image_record(c, 285, file_name=FIXTURE_IMAGES[9].file_name, width=32, height=32)
    write_manifest(c, manifest_text(test={"images": "train2017"}))
    files = _both_files("train") + _both_files("test")
    content = c.content()
    content.paths[139] = (c.images_dir("train") / FIXTURE_IMAGES[139].file_name).resolve()
    return Expect("refuse", Refusal(files, ("9", "285"), ("images.file_name",)), content, quarantine="accept",
                  lost=lost_image(9) | lost_image(285))


@case("cross_split", "same_image_id_in_train_and_test", quarantine=True)
def _(c):
    def relabel(document, raws):
        by_id(document["images"], 285)["id"] = 30
        for record in document["annotations"]:
            if record.get("image_id") == 285:
                record["image_id"] = 30
    edit_json(c.json_path("test", "captions"), relabel)
    edit_json(c.json_path("test", "instances"), relabel)
    files = _both_files("train") + _both_files("test")
    return Expect("refuse", Refusal(files, ("30",), ("images.id",)), c.content(), quarantine="accept",
                  lost=lost_image(30) | lost_image(285))


@case("cross_split", "every_image_missing", quarantine=True)
def _(c):
    for image_id in FIXTURE_IMAGES:
        c.image_path(image_id).unlink()
    # quarantine mode drops all: an empty batch must be refused clearly too (was a bare ValueError);
    # that refusal is about the whole batch, so it may name the manifest and no record.
    every_file = MANIFEST + _both_files("train") + _both_files("test")
    return Expect("refuse", Refusal(_both_files("train"), ("9", "25", "30"), ("file_name",)), c.content(),
                  quarantine="refuse", quarantine_refusal=Refusal(every_file, None, None))


INGEST_CASES = list(CASES)


# =========================================================================== verification


def verify(
    expect: Expect, mode: Mode, outcome: Outcome, before: Snapshot, after: Snapshot, manifest: Path | None,
) -> list[str]:
    """Every way the rule is broken by this run; empty when it holds."""
    problems: list[str] = []
    if outcome.crashed:
        return [f"the process crashed: {outcome.crashed}"]
    if outcome.peak_rss_mb > PEAK_RSS_LIMIT_MB:
        problems.append(f"peak RSS {outcome.peak_rss_mb:.0f} MB > {PEAK_RSS_LIMIT_MB:.0f} MB")
    want = expect.fail if mode == "fail" else expect.quarantine
    if not outcome.accepted:
        if not outcome.dataset_error:
            problems.append(f"not a DatasetError: {outcome.error_cls}: {outcome.error_message}")
        elif want == "accept":
            problems.append(f"refused, but must be accepted: {outcome.error_message}")
        else:
            refusal = expect.refusal
            if mode == "quarantine" and expect.quarantine_refusal is not None:
                refusal = expect.quarantine_refusal
            problems += [f"the error {p} ({outcome.error_message})" for p in
                         naming_problems(refusal, outcome.error_file, outcome.error_record, outcome.error_field)]
        problems += [f"a refused batch changed stored data: {d}" for d in snapshot_difference(before, after)]
        return problems
    if want == "refuse":
        problems.append("accepted, but must be refused")
    quarantined = after.batch_rows("raw_quarantine", expect.batch)
    rows = [(q["file"], q["record"], q["field"]) for q in quarantined]
    named = any(not naming_problems(expect.refusal, *row) for row in rows) if expect.refusal else bool(rows)
    lost = Lost()
    if mode == "fail" and rows:
        problems.append(f"fail mode accepted with quarantine rows {rows}")
    if mode == "quarantine":
        if expect.fail == "refuse" and not named:
            problems.append(f"no quarantine row names {expect.refusal}; rows: {rows}")
        if named or expect.fail == "refuse":
            lost = expect.lost  # an "either" record counts as dropped only when a row says so
    problems += content_problems(after, expect.batch, expect.content.without(lost))
    problems += kept_problems(before, after, expect.batch, manifest)
    return problems


def kept_problems(before: Snapshot, after: Snapshot, batch: str, manifest: Path | None) -> list[str]:
    """An accepted batch may add data; what other batches had stays as it was."""
    problems = []
    for key, value in before.registry.items():
        if key != f"{batch}.json" and after.registry.get(key) != value:
            problems.append(f"registry entry {key} of another batch changed")
    entry = after.registry.get(f"{batch}.json")
    if entry is None:
        problems.append(f"accepted, but batches/{batch}.json was not written (raw_pairs registers what it read)")
    elif manifest is not None:
        registered = json.loads(entry)["manifest"]
        if Path(registered).resolve() != Path(manifest).resolve():
            problems.append(f"registry names {registered}, not the accepted {manifest}")
    for key, value in before.artifacts.items():
        if after.artifacts.get(key) != value:
            problems.append(f"stored artifact {key} changed or vanished")
    missing = set(before.materializations or ()) - set(after.materializations or ())
    if missing:
        problems.append(f"lineage rows vanished: {missing}")
    for view in ("raw_images", "raw_captions", "raw_instances"):
        if before.batch_rows(view, batch, exclude=True) != after.batch_rows(view, batch, exclude=True):
            problems.append(f"{view}: rows of other batches changed")
    return problems


def content_problems(after: Snapshot, batch: str, content: Content) -> list[str]:
    """The views hold exactly ``content`` for ``batch``: ids, values, file hashes and mask pixels."""
    import numpy as np
    from pycocotools import mask as coco_mask

    problems = []
    images = {r["image_id"]: r for r in after.batch_rows("raw_images", batch)}
    got = {i: (r["split"], r["file_name"], r["width"], r["height"]) for i, r in images.items()}
    if got != content.images:
        problems.append(f"raw_images {got} != expected {content.images}")
    for image_id, row in images.items():
        expected_path = content.paths.get(image_id)
        if expected_path is not None and Path(row["path"]) != expected_path:
            problems.append(f"image {image_id}: path {row['path']} != {expected_path}")
        if expected_path is not None and expected_path.is_file():
            digest = hashlib.sha256(expected_path.read_bytes()).hexdigest()
            if row["sha256"] != digest:
                problems.append(f"image {image_id}: sha256 {row['sha256']} is not the file's {digest}")
    captions = {r["caption_id"]: (r["image_id"], r["caption"]) for r in after.batch_rows("raw_captions", batch)}
    if captions != content.captions:
        wrong = {k: (captions.get(k), content.captions.get(k)) for k in set(captions) | set(content.captions)
                 if captions.get(k) != content.captions.get(k)}
        problems.append(f"raw_captions differ (got, expected): { {k: tuple(str(x)[:80] for x in v) for k, v in wrong.items()} }")
    instances = {r["annotation_id"]: r for r in after.batch_rows("raw_instances", batch)}
    if set(instances) != set(content.instances):
        problems.append(f"raw_instances ids {sorted(instances)} != expected {sorted(content.instances)}")
    for annotation_id, expected in content.instances.items():
        row = instances.get(annotation_id)
        if row is None:
            continue
        got_values = (row["image_id"], row["category_id"], row["category"], bool(row["iscrowd"]),
                      (row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"]), row["area"])
        want_values = (expected.image_id, expected.category_id, expected.category, expected.iscrowd,
                       expected.bbox, expected.area)
        if got_values != want_values:
            problems.append(f"instance {annotation_id}: {got_values} != {want_values}")
        if expected.rectangles is not None and expected.image_id in content.images:
            _, _, width, height = content.images[expected.image_id]
            try:
                mask = coco_mask.decode({"size": [height, width], "counts": row["rle_counts"].encode("ascii")}).astype(bool)
            except Exception as error:  # noqa: BLE001
                problems.append(f"instance {annotation_id}: stored RLE does not decode at {width}x{height}: {error}")
                continue
            if not np.array_equal(mask, rectangles_mask(expected.rectangles, height, width)):
                problems.append(f"instance {annotation_id}: stored mask differs from the hand-drawn one")
            if row["mask_area"] != int(mask.sum()):
                problems.append(f"instance {annotation_id}: mask_area {row['mask_area']} != {int(mask.sum())}")
    return problems


# =========================================================================== environment


def build_env(base: Path, worker: Worker) -> Env:
    """The valid batch, a copy of it outside, a bomb PNG, and a home holding GOOD_BATCH."""
    from PIL import Image

    base = Path(base)
    pristine = build_coco_fixture(base / "pristine")
    outside = base / "outside"
    outside_batch = copy_fixture(pristine, outside / "batch")
    bomb = base / "bomb.png"
    Image.new("1", (13000, 13000)).save(bomb, format="PNG")
    template_home = base / "template-home"
    outcome = worker.ingest(template_home, pristine, GOOD_BATCH)
    if not outcome.accepted:
        raise RuntimeError(f"the valid batch itself was not accepted: {outcome.describe()}")
    if not (template_home / "batches" / f"{GOOD_BATCH}.json").exists():
        # Before issue #14, raw_pairs did not register what it read (the CLI did, first).
        from spur_assets.core.data.batches import register_batch

        register_batch(template_home, GOOD_BATCH, pristine)
    near_limit = base / "near-limit.png"
    Image.new("RGB", (7000, 7000), (90, 140, 200)).save(near_limit, format="PNG")
    env = Env(base, pristine, template_home, outside, outside_batch, bomb, worker, near_limit_png=near_limit)
    env.template_snapshot = snapshot(template_home)
    return env


def new_home(env: Env, where: Path) -> Path:
    home = Path(where)
    shutil.copytree(env.template_home, home, symlinks=True)
    return home


def prepare_case(case_: Case, env: Env, tmp: Path) -> tuple[CaseDir, Expect, Path]:
    root = Path(tmp) / "batch"
    manifest = copy_fixture(env.pristine, root)
    case_dir = CaseDir(root=root, env=env, manifest=manifest)
    expect = case_.build(case_dir)
    home = new_home(env, Path(tmp) / "home")
    return case_dir, expect, home


def run_ingest_case(case_: Case, mode: Mode, env: Env, tmp: Path) -> tuple[Outcome, list[str]]:
    case_dir, expect, home = prepare_case(case_, env, tmp)
    if mode == "quarantine" and expect.quarantine is None:
        raise ValueError(f"{case_.id}: its Expect says nothing about quarantine mode")
    before = env.template_snapshot  # the home is a copy of the template
    outcome = env.worker.ingest(home, case_dir.manifest, expect.batch, on_bad_record=mode, timeout=expect.timeout,
                                **expect.options)
    after = snapshot(home, reference=before)
    return outcome, verify(expect, mode, outcome, before, after, case_dir.manifest)


def ingest_params() -> list[tuple[Case, Mode]]:
    """(case, mode) pairs: every case in fail mode; those marked quarantine=True in quarantine mode too."""
    pairs: list[tuple[Case, Mode]] = []
    for case_ in INGEST_CASES:
        pairs.append((case_, "fail"))
        if case_.quarantine:
            pairs.append((case_, "quarantine"))
    return pairs


# =========================================================================== the fuzzer's mutation engine


class Chooser(abc.ABC):
    """What a mutation draws from: backed by hypothesis' ``data.draw`` or by a ``random.Random``."""

    @abc.abstractmethod
    def integer(self, low: int, high: int) -> int:
        """A whole number from ``low`` to ``high``, both included."""

    def choice(self, options):
        options = list(options)
        return options[self.integer(0, len(options) - 1)]

    def json_value(self, depth: int = 0) -> Any:
        kind = self.choice(["int", "bigint", "float", "special", "string", "weird_string", "bool", "null", "list", "dict"]
                           if depth < 3 else ["int", "float", "string", "null"])
        if kind == "int":
            return self.choice([0, 1, -1, 9, 25, 30, 139, 285, 1001, 18, 47, 32, 2**31 - 1, 2**31, 2**32, 2**53 + 1])
        if kind == "bigint":
            return self.choice([2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30, Raw("1" + "0" * 400), Raw("-" + "9" * 500)])
        if kind == "float":
            return self.choice([0.5, -0.0, 1e-320, 1e308, -1e308, 3.0, 31.999, 1e16])
        if kind == "special":
            return Raw(self.choice(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9" * 5000,
                                    "[" * 3000 + "]" * 3000, '{"a": ' * 3000 + "1" + "}" * 3000]))
        if kind == "string":
            return self.choice(["", "x", "000000000009.png", "../outside.png", "/etc/passwd", "nested/000000000285.png",
                                "train2017", "a b", "dog", "person", " "])
        if kind == "weird_string":
            return self.choice([Raw('"\\ud800"'), Raw('"a\\udfff"'), "a\u0000b", "\u202e", "\U0010ffff", "é" * 50,
                                Raw('"\\u0000"'), "x" * 5000])
        if kind == "bool":
            return self.choice([True, False])
        if kind == "null":
            return None
        if kind == "list":
            return [self.json_value(depth + 1) for _ in range(self.integer(0, 3))]
        return {self.choice(["id", "size", "counts", "x", "image_id"]): self.json_value(depth + 1)
                for _ in range(self.integer(0, 2))}


class RandomChooser(Chooser):
    def __init__(self, rng) -> None:
        self.rng = rng

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)


@dataclass(repr=False)
class MemoryBatch:
    """A batch held in memory: the manifest text, parsed JSON documents, image bytes."""

    def __repr__(self) -> str:
        return f"MemoryBatch({len(self.documents)} JSON files, {len(self.files)} images, mutations {self.touched})"

    manifest: str
    documents: dict[str, Any]  # relative path -> parsed JSON
    files: dict[str, bytes]  # relative path -> bytes (images)
    symlinks: dict[str, str] = field(default_factory=dict)
    touched: list[str] = field(default_factory=list)  # what the mutations did (for reports)
    manifest_changed: bool = False

    @classmethod
    def read(cls, manifest: Path) -> "MemoryBatch":
        root = Path(manifest).parent
        documents, files = {}, {}
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.name != "dataset.yaml":
                rel = path.relative_to(root).as_posix()
                if path.suffix == ".json":
                    documents[rel] = json.loads(path.read_text(encoding="utf-8"))
                else:
                    files[rel] = path.read_bytes()
        return cls(Path(manifest).read_text(encoding="utf-8"), documents, files)

    def copy(self) -> "MemoryBatch":
        return MemoryBatch(self.manifest, copy.deepcopy(self.documents), dict(self.files), dict(self.symlinks))

    def write(self, root: Path) -> Path:
        root = Path(root)
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        for rel, document in self.documents.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            raws: dict[str, str] = {}
            save_json(root / rel, _materialize_raws(document, raws), raws)
        for rel, data in self.files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        for rel, target in self.symlinks.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            if (root / rel).exists() or (root / rel).is_symlink():
                (root / rel).unlink()
            (root / rel).symlink_to(target)
        (root / "dataset.yaml").write_bytes(self.manifest.encode("utf-8", errors="surrogatepass"))
        return root / "dataset.yaml"


def _materialize_raws(value: Any, raws: dict[str, str]) -> Any:
    """Raw(...) leaves become placeholders for save_json; everything else is copied."""
    if isinstance(value, Raw):
        return raw(value.text, raws)
    if isinstance(value, list):
        return [_materialize_raws(v, raws) for v in value]
    if isinstance(value, dict):
        return {k: _materialize_raws(v, raws) for k, v in value.items()}
    return value


def _json_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys/indices) into a JSON document, the root excluded."""
    paths = []
    if isinstance(value, dict):
        for key, child in value.items():
            paths.append(prefix + (key,))
            paths += _json_paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            paths.append(prefix + (index,))
            paths += _json_paths(child, prefix + (index,))
    return paths


def _parent_of(document: Any, path: tuple) -> Any:
    for key in path[:-1]:
        document = document[key]
    return document


MUTATIONS = ("json_value", "json_value", "json_value", "json_delete", "json_duplicate", "image_bytes", "manifest")
RECORD_FIELDS = {"id", "image_id", "category_id", "caption", "bbox", "area", "segmentation", "iscrowd", "width", "height",
                 "file_name", "name", "supercategory", "size", "counts"}


def mutate(batch: MemoryBatch, chooser: Chooser) -> None:
    """One mutation of one layer, in place; appends what it did to ``batch.touched``."""
    kind = chooser.choice(MUTATIONS)
    if kind.startswith("json"):
        rel = chooser.choice(sorted(batch.documents))
        document = batch.documents[rel]
        paths = _json_paths(document)
        if kind == "json_value":
            # Two times in three, a field the loader reads (ids, sizes, captions, masks, boxes...).
            fields = [p for p in paths if any(key in RECORD_FIELDS for key in p if isinstance(key, str))]
            path = chooser.choice(fields if fields and chooser.integer(0, 2) else paths)
            value = chooser.json_value()
            _parent_of(document, path)[path[-1]] = value
            batch.touched.append(f"{rel}:{path} = {value!r:.60}")
        elif kind == "json_delete":
            path = chooser.choice(paths)
            parent = _parent_of(document, path)
            del parent[path[-1]]
            batch.touched.append(f"{rel}: delete {path}")
        else:
            lists = [p for p in paths if isinstance(_parent_of(document, p), list)]
            if not lists:
                return
            path = chooser.choice(lists)
            parent = _parent_of(document, path)
            parent.insert(path[-1], copy.deepcopy(parent[path[-1]]))
            batch.touched.append(f"{rel}: duplicate {path}")
    elif kind == "image_bytes":
        rel = chooser.choice(sorted(batch.files))
        data = bytearray(batch.files[rel])
        how = chooser.choice(["truncate", "flip", "flip_header", "zero", "swap"])
        if how == "truncate":
            data = data[: chooser.integer(0, max(0, len(data) - 1))]
        elif how in ("flip", "flip_header"):
            position = chooser.integer(0, min(len(data) - 1, 40) if how == "flip_header" else len(data) - 1)
            data[position] ^= 1 << chooser.integer(0, 7)
        elif how == "zero":
            data = bytearray()
        else:
            other = chooser.choice(sorted(batch.files))
            data = bytearray(batch.files[other])
        batch.files[rel] = bytes(data)
        batch.touched.append(f"{rel}: {how}")
    else:
        batch.manifest_changed = True
        lines = batch.manifest.splitlines()
        index = chooser.integer(0, len(lines) - 1)
        how = chooser.choice(["value", "delete_line", "duplicate_line", "garbage"])
        if how == "value" and ":" in lines[index]:
            key = lines[index].split(":", 1)[0]
            replacement = chooser.choice(['"/"', '"/etc"', '".."', '"a\\0b"', "[]", "{}", "null", "42", '"train2017"',
                                          '"val2017"', '"annotations/captions_val2017.json"', "*x", "&x 1", '"~"'])
            lines[index] = f"{key}: {replacement}"
        elif how == "delete_line":
            del lines[index]
        elif how == "duplicate_line":
            lines.insert(index, lines[index])
        else:
            lines[index] = chooser.choice(["{", "- - -", "\t\t", "name: \"\\ud800\"", "splits: !!python/object:os.system x",
                                           "? [a, b]\n: c"])
        batch.manifest = "\n".join(lines) + "\n"
        batch.touched.append(f"manifest line {index}: {how}")


def expected_from_memory(batch: MemoryBatch) -> dict | None:
    """For a fail-mode acceptance of an unchanged manifest: the captions every JSON file lists."""
    if batch.manifest_changed:
        return None
    captions: dict = {}
    image_ids: set = set()
    for rel, document in batch.documents.items():
        if not isinstance(document, dict):
            return None
        for record in document.get("images", []) if isinstance(document.get("images"), list) else []:
            if isinstance(record, dict):
                try:
                    image_ids.add(record.get("id"))
                except TypeError:
                    return None
        if "captions" in rel and isinstance(document.get("annotations"), list):
            for record in document["annotations"]:
                if isinstance(record, dict):
                    captions[record.get("id")] = (record.get("image_id"), record.get("caption"))
    return {"captions": captions, "images": image_ids}


def fuzz_tables_problems(batch: MemoryBatch, mode: Mode, outcome: Outcome) -> list[str]:
    """The rule for one load_batch outcome of a mutated batch."""
    if outcome.crashed:
        return [f"crash: {outcome.crashed}"]
    problems = []
    if outcome.peak_rss_mb > PEAK_RSS_LIMIT_MB:
        problems.append(f"peak RSS {outcome.peak_rss_mb:.0f} MB")
    if not outcome.accepted:
        if not outcome.dataset_error:
            problems.append(f"not a DatasetError: {outcome.error_cls}: {first_line(outcome.error_message)}")
        elif not outcome.error_file:
            problems.append(f"DatasetError names no file: {outcome.error_message}")
        return problems
    tables = outcome.tables or {}
    for caption_id, (image_id, text) in tables.get("captions", {}).items():
        if image_id not in tables.get("images", {}):
            problems.append(f"caption {caption_id} kept for image {image_id}, which is not kept")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            problems.append(f"caption {caption_id} is not encodable text: {text!r:.60}")
    for annotation_id, (image_id, *_rest) in tables.get("instances", {}).items():
        if image_id not in tables.get("images", {}):
            problems.append(f"instance {annotation_id} kept for image {image_id}, which is not kept")
    for image_id, (_split, _name, width, height, _path) in tables.get("images", {}).items():
        if not (0 < width < 2**31 and 0 < height < 2**31) or not (-(2**63) <= image_id < 2**63):
            problems.append(f"image {image_id} kept with width {width}, height {height}")
    if mode == "fail":
        if tables.get("quarantine"):
            problems.append("fail mode accepted with quarantine rows")
        expected = expected_from_memory(batch)
        if expected is not None:
            if tables.get("captions") != expected["captions"]:
                problems.append("fail mode accepted, but the captions table is not exactly the JSON's captions")
            if set(tables.get("images", {})) != expected["images"]:
                problems.append("fail mode accepted, but the image ids are not exactly the JSON's images")
    return problems


def first_line(text: str | None, limit: int = 300) -> str:
    return (text or "").strip().split("\n")[0][:limit]


def outcome_key(outcome: Outcome) -> str:
    """A short label for statistics: accepted / DatasetError:<field head> / other class."""
    if outcome.crashed:
        return "crash"
    if outcome.accepted:
        return "accepted"
    if outcome.dataset_error:
        head = re.sub(r"\[\d+\]", "[]", outcome.error_field or "-")
        return f"DatasetError:{head}"
    return f"other:{outcome.error_cls}"
