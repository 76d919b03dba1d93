"""The `spur` console script, run as a user runs it: separate processes, real DuckDB, real Dagster instance."""

import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import yaml

from tests.coco_fixtures import build_coco_fixture, copy_fixture

SPUR = str(Path(sys.executable).with_name("spur"))
RELAXED = {"ops": {"spurious_features": {"config": {"min_support": 1, "min_conditional": 0.0, "min_lift": 0.0}}}}


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPUR_", "DAGSTER_"))}
    env["SPUR_HOME"] = str(home)
    return env


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    first = build_coco_fixture(root / "a")
    return first, copy_fixture(first, root / "b")


@pytest.mark.slow
def test_two_concurrent_runs_are_both_recorded(tmp_path, manifests):
    home = tmp_path / "home"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(RELAXED))
    procs = [
        subprocess.Popen([SPUR, "run", "--dataset", str(m), "--batch", batch, "--config", str(config),
                          "--select", "raw_pairs,spurious_features"],
                         env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for m, batch in zip(manifests, ("batch-a", "batch-b"))
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
        assert "could not set lock" not in (out + err).lower()
        assert "lineage:" in out and str(home / "lineage.duckdb") in out
    conn = duckdb.connect(str(home / "lineage.duckdb"), read_only=True)
    raw = conn.execute("select partition from materializations where asset = 'raw_pairs' order by partition").fetchall()
    features = conn.execute("select materialization_id from materializations where asset = 'spurious_features'").fetchall()
    assert raw == [("batch-a",), ("batch-b",)]
    assert len(features) == 2
    # the later spurious_features read both batches (or each read the ones done by then): every edge resolves
    dangling = conn.execute(
        "select count(*) from lineage_edges e left join materializations m on m.materialization_id = e.upstream_materialization_id where m.asset is null"
    ).fetchone()[0]
    conn.close()
    assert dangling == 0

    ancestry = subprocess.run([SPUR, "lineage", "ancestry", "spurious_features"], env=_env(home),
                              capture_output=True, text=True, timeout=120)
    assert ancestry.returncode == 0, ancestry.stderr
    assert "raw_pairs" in ancestry.stdout and "spurious_features" in ancestry.stdout


@pytest.mark.slow
def test_bad_dataset_error_names_file_and_record(tmp_path, manifests):
    manifest = copy_fixture(manifests[0], tmp_path / "bad")
    from tests.coco_fixtures import corrupt

    broken = corrupt(manifest, "duplicate_image_id")
    run = subprocess.run([SPUR, "run", "--dataset", str(manifest), "--select", "raw_pairs"], env=_env(tmp_path / "home"),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    text = run.stdout + run.stderr
    assert broken.file.name in text and str(broken.record) in text
    # and once more at the end, as one line a user reads without the run's log above it
    errors = [line for line in run.stderr.splitlines() if line.startswith("spur: error: ")]
    assert len(errors) == 1 and broken.file.name in errors[0] and f"record {broken.record}" in errors[0]
    assert not (home := tmp_path / "home" / "batches").exists() or not list(home.iterdir())  # nothing registered


@pytest.mark.parametrize(
    "manifest_text, field",
    [
        ("name: x\nsplits: [unclosed\n", None),  # malformed YAML
        ("name: x\nsplits:\n  train: {images: /, captions: a.json, instances: b.json}\n", "splits.train.images"),
        ("name: x\nsplits:\n  train: {images: \"a\\0b\", captions: a.json, instances: b.json}\n", "splits.train.images"),
    ],
    ids=["malformed-yaml", "images-folder-is-root", "nul-in-path"],
)
def test_a_bad_manifest_is_one_readable_line_not_a_traceback(tmp_path, manifest_text, field):
    # Manifest errors once printed as a raw traceback from the CLI.
    manifest = tmp_path / "data" / "dataset.yaml"
    manifest.parent.mkdir()
    manifest.write_text(manifest_text)
    run = subprocess.run([SPUR, "run", "--dataset", str(manifest)], env=_env(tmp_path / "home"),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"spur: error: {manifest}")
    assert field is None or f"field '{field}'" in run.stderr
