"""Issue #14: every hostile batch is accepted with exact content or refused with a DatasetError naming
file, record and field; a refused batch changes nothing stored; no case passes 2 GB of memory.

Each ingest case (tests/hostile_corpus.py, ``CASES``) takes a fresh copy of the valid fixture batch,
damages one layer, and materializes ``raw_pairs`` into a home that already holds the valid batch
as ``good`` -- in a worker process with a memory cap, so that a crash or a hang is a failed case.
Record-level cases run in quarantine mode too. Re-ingestion, registry, inbox and CLI cases follow.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import hostile_corpus as hc
from tests.coco_fixtures import copy_fixture


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    return hc.build_env(base, hc.shared_worker(base / "worker-logs"))


def _case_id(param) -> str:
    case, mode = param
    return f"{case.id}[{mode}]"


def test_a_copied_home_snapshots_like_the_template(env, tmp_path):
    home = hc.new_home(env, tmp_path / "home")
    assert not hc.snapshot_difference(env.template_snapshot, hc.snapshot(home))
    assert env.template_snapshot.batch_rows("raw_images", hc.GOOD_BATCH), "the template holds the good batch"


@pytest.mark.parametrize("param", hc.ingest_params(), ids=_case_id)
def test_hostile_batch_is_accepted_exactly_or_refused_cleanly(param, env, tmp_path):
    case, mode = param
    outcome, problems = hc.run_ingest_case(case, mode, env, tmp_path)
    assert not problems, f"{case.id} [{mode}] -> {outcome.describe()}\n" + "\n".join(problems)


# =========================================================================== re-ingestion and the registry


def _ingest_checked(env, home, manifest, batch, **options):
    before = hc.snapshot(home)
    outcome = env.worker.ingest(home, manifest, batch, **options)
    return before, outcome, hc.snapshot(home)


def _changed_copy(env, where: Path) -> Path:
    """A valid batch that differs from `good` in one caption."""
    manifest = copy_fixture(env.pristine, where)
    hc.edit_json(manifest.parent / "annotations/captions_train2017.json",
                 lambda d, r: hc.by_id(d["annotations"], 1001).update(caption="A different dog."))
    return manifest


def _registered(home: Path, batch: str) -> str | None:
    entry = home / "batches" / f"{batch}.json"
    return json.loads(entry.read_text())["manifest"] if entry.exists() else None


def test_reingest_same_data_under_the_same_id_is_accepted(env, tmp_path):
    home = hc.new_home(env, tmp_path / "home")
    before, outcome, after = _ingest_checked(env, home, env.pristine, hc.GOOD_BATCH)
    assert outcome.accepted, outcome.describe()
    content = hc.fixture_content(env.pristine.parent)
    assert not hc.content_problems(after, hc.GOOD_BATCH, content)
    assert set(before.materializations) <= set(after.materializations)
    assert Path(_registered(home, hc.GOOD_BATCH)).resolve() == env.pristine.resolve()


def test_different_data_under_an_existing_id_is_refused(env, tmp_path):
    home = hc.new_home(env, tmp_path / "home")
    changed = _changed_copy(env, tmp_path / "changed")
    before, outcome, after = _ingest_checked(env, home, changed, hc.GOOD_BATCH)
    assert not outcome.accepted and outcome.dataset_error, outcome.describe()
    assert outcome.error_field == "batch", outcome.describe()
    assert not hc.snapshot_difference(before, after)


def test_replace_true_replaces_the_data_and_keeps_the_old_materialization_in_lineage(env, tmp_path):
    home = hc.new_home(env, tmp_path / "home")
    changed = _changed_copy(env, tmp_path / "changed")
    before, outcome, after = _ingest_checked(env, home, changed, hc.GOOD_BATCH, replace=True)
    assert outcome.accepted, outcome.describe()
    content = hc.fixture_content(changed.parent)
    content.captions[1001] = (9, "A different dog.")
    assert not hc.content_problems(after, hc.GOOD_BATCH, content)
    assert set(before.materializations) < set(after.materializations)  # the old row stays; a new one is added
    assert Path(_registered(home, hc.GOOD_BATCH)).resolve() == changed.resolve()


def test_failed_replace_leaves_registry_and_views_as_they_were_and_good_batch_reruns(env, tmp_path):
    home = hc.new_home(env, tmp_path / "home")
    broken = _changed_copy(env, tmp_path / "broken")
    data = (broken.parent / "train2017/000000000009.png").read_bytes()
    (broken.parent / "train2017/000000000009.png").write_bytes(data[: len(data) // 2])
    before, outcome, after = _ingest_checked(env, home, broken, hc.GOOD_BATCH, replace=True)
    assert not outcome.accepted and outcome.dataset_error, outcome.describe()
    assert outcome.error_field == "pixels" and outcome.error_record == "9", outcome.describe()
    assert not hc.snapshot_difference(before, after)
    # the earlier good batch runs again from the registry (no manifest in the run config)
    rerun = env.worker.ingest(home, None, hc.GOOD_BATCH)
    assert rerun.accepted, rerun.describe()
    assert not hc.content_problems(hc.snapshot(home), hc.GOOD_BATCH, hc.fixture_content(env.pristine.parent))


def test_non_ascii_manifest_names_give_distinct_batch_ids(tmp_path):
    from spur_assets.core.data.batches import batch_id_for_manifest, validate_batch_id

    manifest = tmp_path / "dataset.yaml"
    names = ["日本語", "中文", "Ελληνικά", "😀", "---", "caf\u00e9", "cafe\u0301"]
    ids = [batch_id_for_manifest(manifest, name) for name in names]
    assert len(set(ids)) == len(ids), dict(zip(names, ids))
    assert all(validate_batch_id(i) == i for i in ids)
    assert batch_id_for_manifest(manifest, "日本語") == batch_id_for_manifest(manifest, "日本語")  # stable


def test_register_batch_refuses_a_different_manifest_unless_replace(env, tmp_path):
    from spur_assets.core.data.batches import register_batch, registered_manifest
    from spur_assets.core.data.errors import DatasetError

    home = hc.new_home(env, tmp_path / "home")
    other = copy_fixture(env.pristine, tmp_path / "other")
    before = hc.snapshot(home).registry
    with pytest.raises(DatasetError) as refused:
        register_batch(home, hc.GOOD_BATCH, other)
    assert refused.value.field == "batch"
    assert hc.snapshot(home).registry == before
    register_batch(home, hc.GOOD_BATCH, env.pristine)  # the same manifest again: fine
    register_batch(home, hc.GOOD_BATCH, other, replace=True)
    assert registered_manifest(home, hc.GOOD_BATCH).resolve() == other.resolve()


def test_unsafe_partition_key_is_refused_without_writing_anywhere(env, tmp_path):
    home = hc.new_home(env, tmp_path / "home")
    manifest = copy_fixture(env.pristine, tmp_path / "batch")
    before, outcome, after = _ingest_checked(env, home, manifest, "../escape")
    assert not outcome.accepted, outcome.describe()
    assert not hc.snapshot_difference(before, after)
    assert not (home / "escape").exists() and not (home / "artifacts" / "escape").exists()
    assert not (home / "refs" / "escape.json").exists()
    # a partition key is input too: refused as a DatasetError naming the batch, not a bare ValueError
    assert outcome.dataset_error and outcome.error_field == "batch", outcome.describe()


# =========================================================================== inbox


def _drop(env, inbox: Path, name: str, ready: bool = True) -> Path:
    manifest = copy_fixture(env.pristine, inbox / name)
    if ready:
        (manifest.parent / "READY").write_text("")
    return manifest.parent


def _hostile_folder(env, inbox: Path, kind: str) -> str:
    """Make one bad folder in ``inbox``; returns its name."""
    outside = inbox.parent / "inbox-outside" / kind
    if kind == "hidden":
        _drop(env, inbox, ".hidden")
        return ".hidden"
    if kind == "symlinked_folder":
        real = copy_fixture(env.pristine, outside).parent
        (real / "READY").write_text("")
        (inbox / "linked").symlink_to(real, target_is_directory=True)
        return "linked"
    if kind == "symlink_to_root":
        (inbox / "rootlink").symlink_to("/", target_is_directory=True)
        return "rootlink"
    if kind == "ready_is_symlink":
        folder = _drop(env, inbox, "ready-link", ready=False)
        outside.mkdir(parents=True, exist_ok=True)
        (outside / "READY").write_text("")
        (folder / "READY").symlink_to(outside / "READY")
        return "ready-link"
    if kind == "ready_is_directory":
        folder = _drop(env, inbox, "ready-dir", ready=False)
        (folder / "READY").mkdir()
        return "ready-dir"
    if kind == "ready_is_fifo":
        folder = _drop(env, inbox, "ready-fifo", ready=False)
        os.mkfifo(folder / "READY")
        return "ready-fifo"
    if kind == "bad_name":
        _drop(env, inbox, "-bad name")
        return "-bad name"
    if kind == "non_ascii_name":
        _drop(env, inbox, "日本語")
        return "日本語"
    if kind == "name_too_long":
        _drop(env, inbox, "b" * 200)
        return "b" * 200
    if kind == "manifest_nul_path":
        folder = _drop(env, inbox, "nul-path")
        (folder / "dataset.yaml").write_text(hc.manifest_text(train={"images": "a\u0000b"}))
        return "nul-path"
    if kind == "manifest_deep_yaml":
        folder = _drop(env, inbox, "deep-yaml")
        (folder / "dataset.yaml").write_text("name: " + "[" * 100_000 + "]" * 100_000 + "\n")
        return "deep-yaml"
    if kind == "manifest_images_root":
        folder = _drop(env, inbox, "images-root")
        (folder / "dataset.yaml").write_text(hc.manifest_text(train={"images": "/"}))
        return "images-root"
    if kind == "manifest_symlink":
        # the link leads to a complete batch elsewhere: read through it, the inbox folder's files are bypassed
        folder = _drop(env, inbox, "linked-manifest")
        elsewhere = copy_fixture(env.pristine, outside / "batch")
        (folder / "dataset.yaml").unlink()
        (folder / "dataset.yaml").symlink_to(elsewhere)
        return "linked-manifest"
    if kind == "manifest_fifo":
        folder = _drop(env, inbox, "fifo-manifest")
        (folder / "dataset.yaml").unlink()
        os.mkfifo(folder / "dataset.yaml")
        return "fifo-manifest"
    if kind == "manifest_missing":
        folder = _drop(env, inbox, "no-manifest")
        (folder / "dataset.yaml").unlink()
        return "no-manifest"
    raise ValueError(kind)


INBOX_KINDS = [
    "hidden", "symlinked_folder", "symlink_to_root", "ready_is_symlink", "ready_is_directory", "ready_is_fifo",
    "bad_name", "non_ascii_name", "name_too_long", "manifest_nul_path", "manifest_deep_yaml", "manifest_images_root",
    "manifest_missing", "manifest_fifo", "manifest_symlink",
]


@pytest.mark.parametrize("kind", INBOX_KINDS)
def test_inbox_judges_each_folder_on_its_own(env, tmp_path, kind):
    from spur_assets.core.data.inbox import scan_inbox

    inbox = tmp_path / "inbox"
    _drop(env, inbox, "a-good")
    bad = _hostile_folder(env, inbox, kind)
    _drop(env, inbox, "z-good")
    _drop(env, inbox, "m-copying", ready=False)
    try:
        scan = scan_inbox(inbox)
    except Exception as error:  # noqa: BLE001
        pytest.fail(f"scan_inbox raised {type(error).__name__}: {error}")
    assert sorted(r.batch for r in scan.ready) == ["a-good", "z-good"], scan
    rejected = {r.folder.name: r.problem for r in scan.rejected}
    assert bad in rejected, f"{bad!r} not rejected: {scan}"
    assert isinstance(rejected[bad], str) and rejected[bad].strip()
    assert [p.name for p in scan.arriving] == ["m-copying"], scan


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]


def test_inbox_sensor_takes_good_batches_past_every_bad_one_and_logs_each_once(env, tmp_path):
    import dagster as dg

    from spur_assets.pipeline.inbox_sensor import inbox_sensor
    from spur_assets.pipeline.resources import SpurSettings

    home, inbox = hc.new_home(env, tmp_path / "home"), tmp_path / "inbox"
    bad = [_hostile_folder(env, inbox, kind) for kind in INBOX_KINDS]
    _drop(env, inbox, "a-good")
    _drop(env, inbox, "z-good")
    registry_before = hc.snapshot(home).registry
    settings = SpurSettings(home=str(home), inbox=str(inbox))
    instance = dg.DagsterInstance.ephemeral()

    def tick(cursor):
        context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"settings": settings})
        collected = _Collect()
        context.log.addHandler(collected)  # the sensor's own logger (an InstigationLogger; it does not propagate)
        result = inbox_sensor(context)
        return result, (context.cursor if isinstance(result, dg.SkipReason) else result.cursor), collected.errors()

    result, cursor, errors = tick(None)
    assert not isinstance(result, dg.SkipReason), result
    assert sorted(r.run_key for r in result.run_requests) == ["a-good", "z-good"]
    rejected = json.loads(cursor)["rejected"]
    for name in bad:
        assert any(name in line for line in errors), f"{name!r} not logged; errors: {errors}"
        assert name in rejected, f"{name!r} not in the cursor's rejected: {sorted(rejected)}"
    registry = hc.snapshot(home).registry
    assert {k: v for k, v in registry.items() if k in registry_before} == registry_before
    assert set(registry) - set(registry_before) <= {"a-good.json", "z-good.json"}
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    again, cursor, errors = tick(cursor)
    assert isinstance(again, dg.SkipReason), again
    assert not errors, errors  # each rejection is said once, not on every tick


# =========================================================================== CLI


SPUR = str(Path(sys.executable).parent / "spur")


def _spur(home: Path, *args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "SPUR_HOME": str(home)}
    environment.pop("DAGSTER_HOME", None)
    return subprocess.run([SPUR, "--home", str(home), *args], capture_output=True, text=True, timeout=300,
                          env=environment)


def _one_clean_error_line(run: subprocess.CompletedProcess, *must_name: str) -> str:
    assert run.returncode != 0, run.stdout[-2000:]
    assert "Traceback" not in run.stderr + run.stdout, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("spur: error: ")]
    assert len(lines) == 1, run.stderr[-3000:]
    for name in must_name:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
def test_cli_manifest_error_is_one_line_and_registers_nothing(env, tmp_path):
    home = tmp_path / "home"
    manifest = copy_fixture(env.pristine, tmp_path / "batch")
    manifest.write_text(hc.manifest_text(train={"images": "a\u0000b"}))
    run = _spur(home, "run", "--dataset", str(manifest), "--select", "raw_pairs")
    _one_clean_error_line(run, "dataset.yaml", "splits.train.images")
    assert not list(home.glob("batches/*.json")), "a refused manifest registered a batch"


@pytest.mark.slow
def test_cli_failed_run_under_an_existing_id_keeps_registry_and_data(env, tmp_path):
    home = hc.new_home(env, tmp_path / "home")
    broken = _changed_copy(env, tmp_path / "broken")
    data = (broken.parent / "train2017/000000000009.png").read_bytes()
    (broken.parent / "train2017/000000000009.png").write_bytes(data[: len(data) // 2])
    before = hc.snapshot(home)
    run = _spur(home, "run", "--dataset", str(broken), "--batch", hc.GOOD_BATCH, "--select", "raw_pairs")
    _one_clean_error_line(run, hc.GOOD_BATCH)
    assert not hc.snapshot_difference(before, hc.snapshot(home))
    assert Path(_registered(home, hc.GOOD_BATCH)).resolve() == env.pristine.resolve()


def test_zz_template_home_was_never_touched(env):
    """Copied homes' views read the template's Parquet files: no case may have changed them."""
    assert not hc.snapshot_difference(env.template_snapshot, hc.snapshot(env.template_home))
