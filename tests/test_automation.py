"""The automation policy, evaluated the way the daemon evaluates it, on recorded materializations.

Materializations are reported as runless events with data versions, so each tick's
decision can be checked without running the assets: cheap assets follow any new
input, training and the report only an input whose data version changed.
"""

import dagster as dg

from spur_assets.pipeline.automation import CONDITIONS, with_automation
from spur_assets.pipeline.checks import ALL_CHECKS
from spur_assets.pipeline.counterfactual_assets import batch_counterfactuals, counterfactual_dataset, synthetic_counterfactuals
from spur_assets.pipeline.expose import spurious_features
from spur_assets.pipeline.ingest import batches, raw_pairs
from spur_assets.pipeline.model_assets import base_checkpoint, control_checkpoint, finetuned_checkpoint
from spur_assets.pipeline.pipes import PIPES_SUBPROCESS_KEY, pipes_subprocess_client
from spur_assets.pipeline.refs_io_manager import ArtifactRefIOManager
from spur_assets.pipeline.report_assets import metric_report
from spur_assets.pipeline.resources import SpurSettings

ASSETS = with_automation([
    raw_pairs, spurious_features, base_checkpoint, batch_counterfactuals, synthetic_counterfactuals, finetuned_checkpoint,
    control_checkpoint, metric_report, counterfactual_dataset,
])
_SETTINGS = SpurSettings(home="/nonexistent-spur-home")  # nothing is executed, only evaluated
DEFS = dg.Definitions(
    assets=ASSETS,
    asset_checks=ALL_CHECKS,
    resources={"settings": _SETTINGS, "refs": ArtifactRefIOManager(settings=_SETTINGS),
               PIPES_SUBPROCESS_KEY: pipes_subprocess_client()},
)


def _materialize(instance, asset: str, version: str, partition: str | None = None) -> None:
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key=asset, partition=partition, tags={"dagster/data_version": version})
    )


def _passing_checks(instance, asset: str) -> None:
    """The blocking checks on ``asset`` pass, as they would in the run that materialized it."""
    for check in ALL_CHECKS:
        for spec in check.check_specs:
            if spec.asset_key == dg.AssetKey(asset):
                instance.report_runless_asset_event(
                    dg.AssetCheckEvaluation(asset_key=spec.asset_key, check_name=spec.name, passed=True)
                )


class Ticks:
    def __init__(self, instance):
        self.instance = instance
        self.cursor = None

    def __call__(self) -> set[str]:
        result = dg.evaluate_automation_conditions(defs=DEFS, instance=self.instance, cursor=self.cursor)
        self.cursor = result.cursor
        return {key.to_user_string() for a in ASSETS for key in a.keys if result.get_num_requested(key) > 0}


def _build_all(instance, ticks, version: str, batch: str = "b1") -> None:
    """Materialize everything downstream of raw_pairs at ``version`` and let one tick pass."""
    _materialize(instance, "spurious_features", f"spurious_features-{version}")
    _passing_checks(instance, "spurious_features")
    _materialize(instance, "batch_counterfactuals", f"batch-{version}", batch)
    for asset in ("base_checkpoint", "synthetic_counterfactuals", "finetuned_checkpoint", "control_checkpoint",
                  "metric_report", "counterfactual_dataset"):
        _materialize(instance, asset, f"{asset}-{version}")
        _passing_checks(instance, asset)
    ticks()


def test_every_asset_but_raw_pairs_has_a_condition():
    names = {key.to_user_string() for a in ASSETS for key in a.keys}
    assert set(CONDITIONS) == names - {"raw_pairs"}
    for asset in ASSETS:
        for spec in asset.specs:
            assert (spec.automation_condition is None) == (spec.key == raw_pairs.key)


def test_new_batch_runs_everything_and_identical_rerun_trains_nothing():
    with dg.instance_for_test() as instance:
        ticks = Ticks(instance)
        assert ticks() == set()  # nothing materialized yet: nothing to follow

        instance.add_dynamic_partitions(batches.name, ["b1"])
        _materialize(instance, "raw_pairs", "pairs-1", "b1")
        # first tick after a new batch: the direct children of raw_pairs (the rest wait for them)
        first = ticks()
        assert {"spurious_features", "base_checkpoint"} <= first
        assert "metric_report" not in first or "finetuned_checkpoint" in first
        _build_all(instance, ticks, "v1")
        assert ticks() == set()  # settled: nothing more without new data

        # the same batch re-ingested with the same bytes (same data version): statistics and
        # counterfactuals refresh (cheap), training and the report do not
        _materialize(instance, "raw_pairs", "pairs-1", "b1")
        same = ticks()
        assert "spurious_features" in same and "batch_counterfactuals" in same  # one run, in graph order
        assert not {"base_checkpoint", "finetuned_checkpoint", "metric_report"} & same
        _materialize(instance, "spurious_features", "spurious_features-v1")
        _passing_checks(instance, "spurious_features")
        _materialize(instance, "batch_counterfactuals", "batch-v1", "b1")
        ticks()

        # a second batch: only its own partition of batch_counterfactuals, not b1's again
        instance.add_dynamic_partitions(batches.name, ["b2"])
        _materialize(instance, "raw_pairs", "pairs-2", "b2")
        result = dg.evaluate_automation_conditions(defs=DEFS, instance=instance, cursor=ticks.cursor)
        ticks.cursor = result.cursor
        assert result.get_requested_partitions(batch_counterfactuals.key) == {"b2"}
        assert result.get_num_requested(spurious_features.key) == 1
        _materialize(instance, "spurious_features", "spurious_features-v2")
        _passing_checks(instance, "spurious_features")
        _materialize(instance, "batch_counterfactuals", "batch-v2", "b2")
        after_statistics = ticks()
        assert "batch_counterfactuals" not in after_statistics  # a statistics refresh alone reruns no batch

        # new data version of the counterfactuals: fine-tuning follows, the base does not
        _build_all(instance, ticks, "v2")
        ticks()
        _materialize(instance, "synthetic_counterfactuals", "cf-v2")
        _passing_checks(instance, "synthetic_counterfactuals")
        changed = ticks()
        assert "finetuned_checkpoint" in changed and "base_checkpoint" not in changed
        # the control reads the fine-tune: pulled into the same run, not a tick and a launch later
        assert {"control_checkpoint", "metric_report"} <= changed


def test_failed_blocking_check_holds_what_follows():
    with dg.instance_for_test() as instance:
        ticks = Ticks(instance)
        instance.add_dynamic_partitions(batches.name, ["b1"])
        _materialize(instance, "raw_pairs", "pairs-1", "b1")
        ticks()
        _build_all(instance, ticks, "v1")
        ticks()
        _materialize(instance, "synthetic_counterfactuals", "cf-bad")
        instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(asset_key=synthetic_counterfactuals.key, check_name="counterfactual_masks_non_empty",
                                    passed=False)
        )
        held = ticks()
        assert "finetuned_checkpoint" not in held and "counterfactual_dataset" not in held


def _check_requested(result, asset_key: dg.AssetKey, name: str) -> bool:
    """Whether the tick requested that check (the result counts requested assets only)."""
    key = dg.AssetCheckKey(asset_key, name)
    return any(r.key == key and r.true_subset.size > 0 for r in result.results)


def test_a_first_build_trains_fine_tune_control_and_report_in_one_tick():
    # No check has ever run: the blocking checks are requested with their assets, so what waits
    # for them joins the same tick (one run) instead of a tick and a run launch each.
    with dg.instance_for_test() as instance:
        ticks = Ticks(instance)
        assert ticks() == set()  # the daemon ticks before any batch arrives
        instance.add_dynamic_partitions(batches.name, ["b1"])
        _materialize(instance, "raw_pairs", "pairs-1", "b1")
        result = dg.evaluate_automation_conditions(defs=DEFS, instance=instance, cursor=ticks.cursor)
        ticks.cursor = result.cursor
        assert _check_requested(result, base_checkpoint.key, "base_checkpoint_weights_finite")
        _materialize(instance, "spurious_features", "sf-1")
        _passing_checks(instance, "spurious_features")
        _materialize(instance, "base_checkpoint", "base-1")
        _passing_checks(instance, "base_checkpoint")
        _materialize(instance, "batch_counterfactuals", "batch-1", "b1")
        result = dg.evaluate_automation_conditions(defs=DEFS, instance=instance, cursor=ticks.cursor)
        requested = {key.to_user_string() for a in ASSETS for key in a.keys if result.get_num_requested(key) > 0}
        assert {"synthetic_counterfactuals", "finetuned_checkpoint", "control_checkpoint", "metric_report"} <= requested
        assert _check_requested(result, synthetic_counterfactuals.key, "counterfactual_masks_non_empty")
        assert _check_requested(result, finetuned_checkpoint.key, "finetuned_checkpoint_weights_finite")
