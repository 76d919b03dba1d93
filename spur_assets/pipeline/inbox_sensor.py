"""`inbox_sensor`: a batch folder marked READY in SPUR_INBOX becomes a partition of raw_pairs and a run."""


import json

import dagster as dg

from spur_assets.core.data.inbox import READY_MARKER, scan_inbox
from spur_assets.pipeline.counterfactual_assets import batch_counterfactuals, counterfactual_dataset, synthetic_counterfactuals
from spur_assets.pipeline.expose import spurious_features
from spur_assets.pipeline.ingest import batches, raw_pairs
from spur_assets.pipeline.model_assets import base_checkpoint, control_checkpoint, finetuned_checkpoint
from spur_assets.pipeline.recovery import ACTIVE_STATUSES
from spur_assets.pipeline.report_assets import metric_report
from spur_assets.pipeline.resources import SpurSettings

# What a new batch changes: every asset. Its statistics, its counterfactual images, the combined
# counterfactuals and every checkpoint read all batches, so the automation conditions would
# request the whole graph after it anyway, stage by stage, each stage a sensor tick and a run
# launch later (a new process importing torch: about 13 s each on 2 cores, measured). The inbox
# run materializes it in one go, in graph order, as `spur run` does; blocking checks still hold
# back what follows them. The automation conditions cover the rest (a batch ingested alone, an
# upstream asset re-materialized by hand, a fixed check).
GRAPH = [raw_pairs, spurious_features, batch_counterfactuals, base_checkpoint, synthetic_counterfactuals,
         finetuned_checkpoint, control_checkpoint, metric_report, counterfactual_dataset]
WHOLE_GRAPH = [key for asset in GRAPH for key in asset.keys]
INBOX_TAG = "spur/inbox"


def _selection_for(context: dg.SensorEvaluationContext, new: int) -> list[dg.AssetKey]:
    """The whole graph when the batch's run is the only inbox run; its ingestion alone when runs could overlap.

    Two runs computing the statistics or training at once could each read the batches before
    the other's ingestion committed, and the automation does not redo what a run targeted. So
    only a lone run takes the graph along; otherwise each batch is ingested and the automation
    follows once they are in.
    """
    busy = context.instance.get_runs(filters=dg.RunsFilter(statuses=ACTIVE_STATUSES, tags={INBOX_TAG: "batch"}), limit=1)
    return WHOLE_GRAPH if new == 1 and not busy else [raw_pairs.key]


def _read_cursor(cursor: str | None) -> tuple[dict[str, int], dict[str, int]]:
    """(taken, rejected): folder name -> the READY file's mtime (ns) when this sensor last acted on it."""
    if not cursor:
        return {}, {}
    state = json.loads(cursor)
    return dict(state.get("taken", {})), dict(state.get("rejected", {}))


@dg.sensor(
    name="inbox_sensor",
    target=GRAPH,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Watches SPUR_INBOX for batch folders (COCO layout with a dataset.yaml) marked complete by a "
        f"{READY_MARKER} file written last. Each new batch becomes a partition of raw_pairs and one run "
        "with the batch id as run key: the whole graph for it, in graph order (its ingestion alone when "
        "several batches arrive or another inbox run is in flight; then the automation conditions follow)."
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
    selection = _selection_for(context, len(new_batches))
    return dg.SensorResult(
        run_requests=[
            # The manifest travels in the run config; raw_pairs registers the batch once it is stored,
            # so a batch that fails validation leaves the registry as it was.
            dg.RunRequest(
                run_key=r.batch, partition_key=r.batch, asset_selection=selection,
                tags={"spur/batch": r.batch, INBOX_TAG: "batch"},
                run_config={"ops": {"raw_pairs": {"config": {"manifest": str(r.manifest)}}}},
            )
            for r in new_batches
        ],
        dynamic_partitions_requests=[batches.build_add_request(keys)],
        cursor=cursor,
    )
