"""raw_pairs and spurious_features through real Dagster `materialize`, real files, real DuckDB."""

import json
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest

from spur_assets.core.data.batches import register_batch, registered_manifest
from spur_assets.pipeline.expose import spurious_features
from spur_assets.pipeline.ingest import batches, raw_pairs
from spur_assets.pipeline.refs_io_manager import ArtifactRefIOManager
from spur_assets.pipeline.resources import SpurSettings
from tests.coco_fixtures import build_coco_fixture, copy_fixture, corrupt, fixture_ids


def _resources(home: Path) -> dict:
    settings = SpurSettings(home=str(home))
    return {"settings": settings, "refs": ArtifactRefIOManager(settings=settings)}


def _materialize(instance, home, selection, partition=None, run_config=None, raise_on_error=True):
    return dg.materialize(
        [raw_pairs, spurious_features],
        selection=selection,
        partition_key=partition,
        instance=instance,
        resources=_resources(home),
        run_config=run_config,
        raise_on_error=raise_on_error,
    )


@pytest.fixture()
def instance():
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture(scope="module")
def fixture_manifest(tmp_path_factory):
    return build_coco_fixture(tmp_path_factory.mktemp("coco"))


def _db(home):
    return duckdb.connect(str(home / "lineage.duckdb"), read_only=True)


def test_raw_pairs_then_spurious_features_records_rows_and_edges(tmp_path, instance, fixture_manifest):
    home = tmp_path / "home"
    register_batch(home, "fx", fixture_manifest)
    instance.add_dynamic_partitions(batches.name, ["fx"])
    first = _materialize(instance, home, [raw_pairs.key], partition="fx")
    assert first.success
    meta = first.asset_materializations_for_node("raw_pairs")[0].metadata
    images, captions, annotations = (set(), set(), set())
    for split in ("train", "test"):
        i, c, a = fixture_ids(split)
        images |= i; captions |= c; annotations |= a
    assert meta["images"].value == len(images)
    assert meta["captions"].value == len(captions)
    assert meta["instances"].value == len(annotations)
    assert meta["quarantined_records"].value == 0
    assert "data:image/png;base64," in meta["contact_sheet"].value

    second = _materialize(instance, home, [spurious_features.key],
                          run_config={"ops": {"spurious_features": {"config": {"min_support": 1, "min_conditional": 0.0, "min_lift": 0.0}}}})
    assert second.success

    conn = _db(home)
    rows = conn.execute("select asset, partition, run_id, data_version, config_hash, device, \"rows\", len(outputs) from materializations order by asset").fetchall()
    assert [(r[0], r[1]) for r in rows] == [("raw_pairs", "fx"), ("spurious_features", "")]
    assert rows[0][2] == first.run_id and rows[1][2] == second.run_id
    assert all(len(r[3]) == 64 and len(r[4]) == 64 and r[5] == "cpu" for r in rows)
    assert rows[0][6] == len(images) + len(captions) + len(annotations) + conn.execute("select count(*) from raw_categories").fetchone()[0]
    edges = conn.execute("select upstream_asset, upstream_partition, upstream_data_version from lineage_edges").fetchall()
    raw_dv = rows[0][3]
    assert edges == [("raw_pairs", "fx", raw_dv)]
    # table assets are views of their own names
    assert conn.execute("select count(*) from raw_images").fetchone()[0] == len(images)
    assert conn.execute("select count(distinct caption) from raw_captions").fetchone()[0] >= 1
    assert conn.execute("select count(*) from spurious_features").fetchone()[0] > 0
    conn.close()
    # Dagster sees the same data version the lineage row holds
    event = instance.get_latest_materialization_event(dg.AssetKey("raw_pairs"))
    assert event.asset_materialization.tags["dagster/data_version"] == raw_dv


def test_failed_batch_loses_nothing_already_stored(tmp_path, instance, fixture_manifest):
    home = tmp_path / "home"
    manifest = copy_fixture(fixture_manifest, tmp_path / "data")
    register_batch(home, "fx", manifest)
    instance.add_dynamic_partitions(batches.name, ["fx"])
    assert _materialize(instance, home, [raw_pairs.key], partition="fx").success
    before_files = sorted(p for p in (home / "artifacts").rglob("*") if p.is_file())
    pointer = (home / "refs" / "raw_pairs" / "fx.json").read_text()
    conn = _db(home); images_before = conn.execute("select * from raw_images order by image_id").fetchall(); conn.close()

    broken = corrupt(manifest, "truncated_image")
    result = _materialize(instance, home, [raw_pairs.key], partition="fx", raise_on_error=False)
    assert not result.success
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    message = str(failure.event_specific_data.error)
    assert str(broken.file.name) in message and str(broken.record) in message
    # nothing stored before changed; no half-written staging folder left behind
    assert sorted(p for p in (home / "artifacts").rglob("*") if p.is_file()) == before_files
    assert not list((home / "artifacts").rglob(".staging-*"))
    assert (home / "refs" / "raw_pairs" / "fx.json").read_text() == pointer
    conn = _db(home)
    assert conn.execute("select * from raw_images order by image_id").fetchall() == images_before
    assert conn.execute("select count(*) from materializations").fetchone()[0] == 1
    conn.close()


def test_quarantine_mode_counts_bad_records(tmp_path, instance, fixture_manifest):
    home = tmp_path / "home"
    manifest = copy_fixture(fixture_manifest, tmp_path / "data")
    broken = corrupt(manifest, "missing_image")
    instance.add_dynamic_partitions(batches.name, ["fx"])
    result = _materialize(
        instance, home, [raw_pairs.key], partition="fx",
        run_config={"ops": {"raw_pairs": {"config": {"manifest": str(manifest), "on_bad_record": "quarantine"}}}},
    )
    meta = result.asset_materializations_for_node("raw_pairs")[0].metadata
    assert meta["quarantined_records"].value == broken.quarantine_rows
    conn = _db(home)
    quarantined = conn.execute("select file, record, field from raw_quarantine").fetchall()
    kept = {r[0] for r in conn.execute("select image_id from raw_images").fetchall()}
    conn.close()
    assert len(quarantined) == broken.quarantine_rows
    assert str(broken.record) == quarantined[0][1]
    assert not (kept & broken.lost_images)


def test_unknown_batch_says_how_to_register(tmp_path, instance):
    instance.add_dynamic_partitions(batches.name, ["nowhere"])
    result = _materialize(instance, tmp_path / "home", [raw_pairs.key], partition="nowhere", raise_on_error=False)
    assert not result.success
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert "spur run --dataset" in str(failure.event_specific_data.error)


def _config(manifest, **extra) -> dict:
    return {"ops": {"raw_pairs": {"config": {"manifest": str(manifest), **extra}}}}


def _failure_error(result):
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    error = failure.event_specific_data.error
    while error.cause is not None and error.cls_name != "DatasetError":
        error = error.cause
    return error


def test_a_batch_id_holding_other_data_is_refused_unless_replaced(tmp_path, instance, fixture_manifest):
    # Re-ingesting different data under an existing id once replaced it without a word.
    home = tmp_path / "home"
    first = copy_fixture(fixture_manifest, tmp_path / "first")
    instance.add_dynamic_partitions(batches.name, ["fx"])
    assert _materialize(instance, home, [raw_pairs.key], partition="fx", run_config=_config(first)).success
    assert registered_manifest(home, "fx") == first.resolve()
    # the same data again (same manifest): accepted, a new materialization of equal content
    assert _materialize(instance, home, [raw_pairs.key], partition="fx", run_config=_config(first)).success

    second = copy_fixture(fixture_manifest, tmp_path / "second")
    refused = _materialize(instance, home, [raw_pairs.key], partition="fx", run_config=_config(second), raise_on_error=False)
    error = _failure_error(refused)
    assert error.cls_name == "DatasetError" and "field 'batch'" in error.message and "registered for" in error.message
    # the registry still names the first manifest; then different content at the registered path
    assert registered_manifest(home, "fx") == first.resolve()
    captions = first.parent / "annotations" / "captions_train2017.json"
    captions.write_text(captions.read_text().replace('"caption": "', '"caption": "edited: ', 1))
    changed = _materialize(instance, home, [raw_pairs.key], partition="fx", raise_on_error=False)
    error = _failure_error(changed)
    assert error.cls_name == "DatasetError" and "holds different data" in error.message and "--replace" in error.message
    conn = _db(home)
    assert conn.execute("select count(*) from materializations").fetchone()[0] == 2
    assert not conn.execute("select count(*) from raw_captions where caption like 'edited: %'").fetchone()[0]
    earlier = conn.execute("select materialization_id from materializations order by ended_at").fetchall()
    conn.close()

    replaced = _materialize(instance, home, [raw_pairs.key], partition="fx", run_config=_config(second, replace=True))
    assert replaced.success and registered_manifest(home, "fx") == second.resolve()
    conn = _db(home)
    # the earlier versions stay addressable in lineage, their artifacts on disk
    ids = {r[0] for r in conn.execute("select materialization_id from materializations").fetchall()}
    assert {r[0] for r in earlier} < ids and len(ids) == 3
    outputs = conn.execute(
        "select o.uri from materializations m, unnest(m.outputs) t(o) where m.materialization_id = ? and o.name = 'raw_captions'",
        [earlier[0][0]],
    ).fetchall()
    conn.close()
    assert Path(outputs[0][0]).is_file()


def test_a_failed_ingest_leaves_the_registry_as_it_was(tmp_path, instance, fixture_manifest):
    # A failed ingest once overwrote batches/<id>.json, so the good batch could no longer be re-run.
    home = tmp_path / "home"
    good = copy_fixture(fixture_manifest, tmp_path / "good")
    instance.add_dynamic_partitions(batches.name, ["fx"])
    assert _materialize(instance, home, [raw_pairs.key], partition="fx", run_config=_config(good)).success
    entry = (home / "batches" / "fx.json").read_text()
    bad = copy_fixture(fixture_manifest, tmp_path / "bad")
    corrupt(bad, "truncated_image")
    result = _materialize(
        instance, home, [raw_pairs.key], partition="fx", run_config=_config(bad, replace=True), raise_on_error=False
    )
    assert not result.success and _failure_error(result).cls_name == "DatasetError"
    assert (home / "batches" / "fx.json").read_text() == entry
    assert _materialize(instance, home, [raw_pairs.key], partition="fx").success  # the good batch re-runs by id
