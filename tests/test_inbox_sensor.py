"""The inbox sensor, evaluated directly: READY marks a batch complete, the cursor launches nothing twice."""

import json
import os

import dagster as dg
from dagster._core.test_utils import create_run_for_test
import pytest

from spur_assets.core.data.batches import registered_manifest
from spur_assets.core.data.inbox import READY_MARKER, scan_inbox
from spur_assets.pipeline.inbox_sensor import INBOX_TAG, inbox_sensor
from spur_assets.pipeline.ingest import batches
from spur_assets.pipeline.resources import SpurSettings
from tests.coco_fixtures import build_coco_fixture, copy_fixture


@pytest.fixture(scope="module")
def fixture_manifest(tmp_path_factory):
    return build_coco_fixture(tmp_path_factory.mktemp("src") / "fixture")


def _drop(fixture_manifest, inbox, name, ready=True):
    manifest = copy_fixture(fixture_manifest, inbox / name)
    if ready:
        (manifest.parent / READY_MARKER).write_text("")
    return manifest.parent


def _tick(instance, settings, cursor):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"settings": settings})
    result = inbox_sensor(context)
    if isinstance(result, dg.SkipReason):
        return result, context.cursor
    return result, result.cursor


def _apply_partition_requests(instance, result):
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))


def test_scan_sorts_ready_arriving_and_rejected(tmp_path, fixture_manifest):
    inbox = tmp_path / "inbox"
    _drop(fixture_manifest, inbox, "b-ready")
    _drop(fixture_manifest, inbox, "a-copying", ready=False)
    bad_name = _drop(fixture_manifest, inbox, "-bad name")
    broken = _drop(fixture_manifest, inbox, "broken")
    (broken / "dataset.yaml").write_text("name: [unclosed\n")

    scan = scan_inbox(inbox)
    assert [r.batch for r in scan.ready] == ["b-ready"]
    assert [p.name for p in scan.arriving] == ["a-copying"]
    problems = {r.folder.name: r.problem for r in scan.rejected}
    assert set(problems) == {bad_name.name, "broken"}
    assert "is not allowed" in problems[bad_name.name]
    assert str(broken / "dataset.yaml") in problems["broken"] and "malformed YAML" in problems["broken"]
    assert scan_inbox(tmp_path / "nowhere").ready == ()


def test_sensor_requests_each_ready_batch_once(tmp_path, fixture_manifest):
    home, inbox = tmp_path / "home", tmp_path / "inbox"
    settings = SpurSettings(home=str(home), inbox=str(inbox))
    with dg.instance_for_test() as instance:
        # an empty inbox and a half-copied batch launch nothing
        skipped, cursor = _tick(instance, settings, None)
        assert isinstance(skipped, dg.SkipReason)
        half = _drop(fixture_manifest, inbox, "batch-1", ready=False)
        skipped, cursor = _tick(instance, settings, cursor)
        assert isinstance(skipped, dg.SkipReason) and f"without {READY_MARKER}" in skipped.skip_message

        # marked complete: one partition, one run with the batch id as run key and the manifest in
        # its run config; registered only by raw_pairs once the batch is stored
        (half / READY_MARKER).write_text("")
        result, cursor = _tick(instance, settings, cursor)
        assert [r.run_key for r in result.run_requests] == ["batch-1"]
        assert [r.partition_key for r in result.run_requests] == ["batch-1"]
        # alone, the run takes the whole graph along (a new batch changes every asset), in one run
        assert [k.to_user_string() for k in result.run_requests[0].asset_selection] == [
            "raw_pairs", "spurious_features", "batch_counterfactuals", "base_checkpoint", "synthetic_counterfactuals",
            "finetuned_checkpoint", "control_checkpoint", "metric_report", "counterfactual_dataset"]
        assert [list(r.partition_keys) for r in result.dynamic_partitions_requests] == [["batch-1"]]
        assert result.run_requests[0].run_config["ops"]["raw_pairs"]["config"]["manifest"] == str((half / "dataset.yaml").resolve())
        assert registered_manifest(home, "batch-1") is None
        _apply_partition_requests(instance, result)

        # the next tick, with that cursor, launches nothing; a second batch launches only itself
        again, cursor = _tick(instance, settings, cursor)
        assert isinstance(again, dg.SkipReason)
        _drop(fixture_manifest, inbox, "batch-2")
        # ... while batch-1's run is in flight: batch-2 is ingested alone (statistics or training in
        # two runs at once could each miss the other's batch; the automation follows instead)
        in_flight = create_run_for_test(instance, job_name="__ASSET_JOB", status=dg.DagsterRunStatus.STARTED,
                                        tags={INBOX_TAG: "batch"})
        second, cursor = _tick(instance, settings, cursor)
        assert [r.run_key for r in second.run_requests] == ["batch-1", "batch-2"][1:]
        assert [k.to_user_string() for k in second.run_requests[0].asset_selection] == ["raw_pairs"]
        instance.report_run_canceled(in_flight)

        # touching READY of a batch already taken does not re-read it
        _apply_partition_requests(instance, second)
        marker = inbox / "batch-1" / READY_MARKER
        stat = marker.stat()
        os.utime(marker, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        touched, cursor = _tick(instance, settings, cursor)
        assert isinstance(touched, dg.SkipReason)
        assert set(json.loads(cursor)["taken"]) == {"batch-1", "batch-2"}
        assert instance.get_dynamic_partitions(batches.name) == ["batch-1", "batch-2"]


def test_sensor_rejects_bad_folder_without_losing_good_ones(tmp_path, fixture_manifest):
    home, inbox = tmp_path / "home", tmp_path / "inbox"
    settings = SpurSettings(home=str(home), inbox=str(inbox))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(batches.name, ["taken-before"])
        broken = _drop(fixture_manifest, inbox, "broken")
        (broken / "dataset.yaml").unlink()
        _drop(fixture_manifest, inbox, "taken-before")  # a batch id `spur run` already used
        _drop(fixture_manifest, inbox, "good")
        result, cursor = _tick(instance, settings, None)
        assert [r.run_key for r in result.run_requests] == ["good"]
        assert len(result.run_requests[0].asset_selection) == 9  # the only new batch, no run in flight
        assert set(json.loads(cursor)["rejected"]) == {"broken", "taken-before"}
        assert registered_manifest(home, "broken") is None

        # fixed (manifest back): taken on the next tick, the READY file untouched
        copy_fixture(fixture_manifest, tmp_path / "again")
        (broken / "dataset.yaml").write_text((tmp_path / "again" / "dataset.yaml").read_text())
        _apply_partition_requests(instance, result)
        fixed, cursor = _tick(instance, settings, cursor)
        assert [r.run_key for r in fixed.run_requests] == ["broken"]
