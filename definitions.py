"""Assembles the spur-assets Dagster definitions; `dagster dev -w workspace.yaml` loads this file."""

import dagster as dg

from spur_assets.pipeline.automation import automation_sensor, with_automation
from spur_assets.pipeline.checks import ALL_CHECKS
from spur_assets.pipeline.counterfactual_assets import batch_counterfactuals, counterfactual_dataset, synthetic_counterfactuals
from spur_assets.pipeline.expose import spurious_features
from spur_assets.pipeline.inbox_sensor import inbox_sensor
from spur_assets.pipeline.ingest import raw_pairs
from spur_assets.pipeline.model_assets import base_checkpoint, control_checkpoint, finetuned_checkpoint
from spur_assets.pipeline.pipes import PIPES_SUBPROCESS_KEY, pipes_subprocess_client
from spur_assets.pipeline.refs_io_manager import ArtifactRefIOManager
from spur_assets.pipeline.report_assets import metric_report
from spur_assets.pipeline.resources import settings_from_environment

settings = settings_from_environment()

defs = dg.Definitions(
    assets=with_automation([
        raw_pairs,
        spurious_features,
        base_checkpoint,
        batch_counterfactuals,
        synthetic_counterfactuals,
        finetuned_checkpoint,
        control_checkpoint,
        metric_report,
        counterfactual_dataset,
    ]),
    asset_checks=ALL_CHECKS,
    sensors=[inbox_sensor, automation_sensor],
    resources={
        "settings": settings,
        "refs": ArtifactRefIOManager(settings=settings),
        PIPES_SUBPROCESS_KEY: pipes_subprocess_client(),
    },
)
