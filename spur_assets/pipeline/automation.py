"""When each asset follows its inputs without a click: declarative automation, chosen by cost.

raw_pairs is started by the inbox sensor (one run per batch). From there:

- Cheap derivations (co-occurrence statistics, counterfactual images, the dataset
  export: seconds to a minute) refresh whenever an input is newly materialized —
  `eager`, the Dagster default for "keep this up to date". The per-batch
  counterfactual partitions follow their own batch only.
- Expensive or published results (training the base model, fine-tuning, the
  report) follow only when an input's *data version* changed, and then as one
  run: an expensive asset requested pulls the expensive ones that read it into
  the same run (a run launch costs seconds of process start and a sensor tick). Every asset here
  versions its data by the sha256 of its outputs (recording.py), so re-running
  an upstream step that produced the same bytes — a retried run, a re-ingested
  identical batch, a deterministic rerun — trains nothing and rewrites no report.

Both wait while an input is missing or in progress (no half-built input is read)
and until the blocking checks on their inputs have passed.
"""


import dagster as dg

from spur_assets.pipeline.ingest import raw_pairs

_WAIT_FOR_INPUTS = (
    ~dg.AutomationCondition.any_deps_missing()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
    & dg.AutomationCondition.all_deps_blocking_checks_passed()
)

REFRESH_ON_NEW_INPUT = (dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()).with_label(
    "eager, once blocking checks on the inputs passed"
)

# Per-batch image work: a batch's partition runs when that batch is (re)ingested. A statistics
# refresh (every new batch) alone does not rerun every older batch: synthetic_counterfactuals
# rebuilds a partition whose flagged pairs are stale itself, and says so in its metadata.
BATCH_REFRESH = (
    dg.AutomationCondition.eager().replace(
        "any_deps_updated",
        dg.AutomationCondition.any_deps_updated().ignore(dg.AssetSelection.assets("spurious_features")),
    )
    & dg.AutomationCondition.all_deps_blocking_checks_passed()
).with_label("its batch newly ingested (a statistics refresh alone does not rerun every batch)")

# The expensive assets, in graph order. When one of them is requested, the ones after it that
# read it are requested in the same tick, so they run in the same run right after it instead
# of a tick and a run launch later each: its inputs' data version changed, so its own output
# will too (training on changed data does not reproduce the old weights).
EXPENSIVE = ("base_checkpoint", "finetuned_checkpoint", "control_checkpoint", "metric_report")

FOLLOW_CHANGED_INPUT = (
    (
        dg.AutomationCondition.newly_missing()
        | dg.AutomationCondition.any_deps_match(dg.AutomationCondition.data_version_changed())
        | dg.AutomationCondition.any_deps_match(dg.AutomationCondition.will_be_requested()).allow(
            dg.AssetSelection.assets(*EXPENSIVE)
        )
    ).since_last_handled()
    & _WAIT_FOR_INPUTS
).with_label("an input's data version changed (or an expensive input is rebuilt in this run)")

# A blocking check runs with its asset: requested in the tick its asset is (or whenever its asset
# updated without it). Requested in the same tick, it lets assets that wait for it join the same
# run (all_deps_blocking_checks_passed accepts a check that will be requested; the run itself
# holds them back if it fails). Without it, a check that never ran yet held every reader of a new
# asset back to a tick and a run of its own.
CHECK_WITH_ITS_ASSET = dg.AutomationCondition.eager().with_label("with its asset")

# asset name -> condition; raw_pairs has none (the inbox sensor requests it).
CONDITIONS: dict[str, dg.AutomationCondition] = {
    "spurious_features": REFRESH_ON_NEW_INPUT,
    "batch_counterfactuals": BATCH_REFRESH,
    "synthetic_counterfactuals": REFRESH_ON_NEW_INPUT,
    "counterfactual_dataset": REFRESH_ON_NEW_INPUT,
    "base_checkpoint": FOLLOW_CHANGED_INPUT,
    "finetuned_checkpoint": FOLLOW_CHANGED_INPUT,
    "control_checkpoint": FOLLOW_CHANGED_INPUT,
    "metric_report": FOLLOW_CHANGED_INPUT,
}


def with_automation(assets: list[dg.AssetsDefinition]) -> list[dg.AssetsDefinition]:
    """The assets with the conditions above attached (an unknown asset name is an error, not a silent skip)."""
    names = {key.to_user_string() for a in assets for key in a.keys}
    unknown = set(CONDITIONS) - names
    if unknown:
        raise KeyError(f"automation conditions for assets that do not exist: {sorted(unknown)}")
    return list(
        dg.map_asset_specs(
            lambda spec: spec.replace_attributes(automation_condition=CONDITIONS[spec.key.to_user_string()])
            if spec.key.to_user_string() in CONDITIONS
            else spec,
            assets,
        )
    )


# Evaluates the conditions every 5 s (Dagster's default is 30 s): each stage of the chain after a
# new batch waits for a tick. On from the start, so a batch dropped into the inbox reaches the
# report without anyone switching it on.
automation_sensor = dg.AutomationConditionSensorDefinition(
    "spur_automation",
    target=dg.AssetSelection.all() - dg.AssetSelection.assets(raw_pairs),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=5,
    description="Runs the spur-assets automation conditions (spur_assets/pipeline/automation.py).",
)
