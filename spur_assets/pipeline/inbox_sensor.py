"""`inbox_sensor`: a batch folder marked READY in SPUR_INBOX becomes a partition of raw_pairs and a run."""


import json

import dagster as dg

from spur_assets.core.inbox import READY_MARKER, scan_inbox
from spur_assets.pipeline.ingest import batches, raw_pairs
from spur_assets.pipeline.resources import SpurSettings


def _read_cursor(cursor: str | None) -> tuple[dict[str, int], dict[str, int]]:
    """(taken, rejected): folder name -> the READY file's mtime (ns) when this sensor last acted on it."""
    if not cursor:
        return {}, {}
    state = json.loads(cursor)
    return dict(state.get("taken", {})), dict(state.get("rejected", {}))


@dg.sensor(
    name="inbox_sensor",
    target=[raw_pairs],
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Watches SPUR_INBOX for batch folders (COCO layout with a dataset.yaml) marked complete by a "
        f"{READY_MARKER} file written last. Each new batch becomes a partition of raw_pairs and one run "
        "with the batch id as run key; downstream assets follow by their automation conditions."
    ),
)
def inbox_sensor(context: dg.SensorEvaluationContext, settings: SpurSettings) -> dg.SensorResult | dg.SkipReason:
    inbox = settings.inbox_path
    taken, rejected = _read_cursor(context.cursor)
    scan = scan_inbox(inbox, settings.allowed_root_paths)
    for bad in scan.rejected:
        if rejected.get(bad.folder.name) != bad.ready_mtime_ns:  # say it once per READY touch (or entry change)
            context.log.error(f"inbox batch not taken: {bad.problem}")
            rejected[bad.folder.name] = bad.ready_mtime_ns
    new_batches = []
    for ready in scan.ready:
        if ready.batch not in taken and context.instance.has_dynamic_partition(batches.name, ready.batch):
            if rejected.get(ready.batch) != ready.ready_mtime_ns:
                context.log.error(
                    f"inbox batch not taken: {ready.folder}: a batch {ready.batch!r} already exists (added by "
                    "`spur run` or the UI); rename the folder, then touch its READY"
                )
                rejected[ready.batch] = ready.ready_mtime_ns
            continue
        if ready.batch not in taken:
            new_batches.append(ready)
        elif taken[ready.batch] != ready.ready_mtime_ns:
            context.log.warning(
                f"{ready.folder}: batch {ready.batch!r} was already taken in and is read once (its run key "
                "is the batch id); drop corrected data under a new folder name"
            )
        taken[ready.batch] = ready.ready_mtime_ns
        rejected.pop(ready.batch, None)
    cursor = json.dumps({"taken": dict(sorted(taken.items())), "rejected": dict(sorted(rejected.items()))})
    if not new_batches:
        waiting = f"; {len(scan.arriving)} folder(s) still without {READY_MARKER}" if scan.arriving else ""
        context.update_cursor(cursor)
        return dg.SkipReason(f"no new batch in {inbox}{waiting}")
    keys = [r.batch for r in new_batches]
    context.log.info(f"new batches in {inbox}: {', '.join(keys)}")
    return dg.SensorResult(
        run_requests=[
            # The manifest travels in the run config; raw_pairs registers the batch once it is stored,
            # so a batch that fails validation leaves the registry as it was.
            dg.RunRequest(
                run_key=r.batch, partition_key=r.batch, asset_selection=[raw_pairs.key], tags={"spur/batch": r.batch},
                run_config={"ops": {"raw_pairs": {"config": {"manifest": str(r.manifest)}}}},
            )
            for r in new_batches
        ],
        dynamic_partitions_requests=[batches.build_add_request(keys)],
        cursor=cursor,
    )
