"""The spur-assets Dagster definitions, built in one place.

`defs` is what `dagster dev -w workspace.yaml` serves (the root definitions.py re-exports it),
what `spur run` materializes, and what deploy/k8s/definitions.py extends with its executor.

The executor is chosen, not left to Dagster's default (a process per step). Locally every run
already has a process of its own: the daemon's run launcher starts one per run, so a crash
fails that run and never the daemon or the UI. Inside a run the steps share that process
(`in_process_executor`): most steps and every check take seconds, and a process per step
cost each of them a fresh Python with torch imported, which made most of the time from a
batch's READY to its report. Isolation that pays stays: multi-GPU fine-tuning starts its
ranks with torchrun through Pipes (pipeline/pipes.py), and on Kubernetes every step is a pod
(deploy/k8s/definitions.py passes `k8s_job_executor`). On a machine with many cores,
SPUR_EXECUTOR=multiprocess brings back a process per step, with independent steps in parallel.
"""

from __future__ import annotations

import os

import dagster as dg

from spur_assets.pipeline.automation import automation_sensor, with_automation
from spur_assets.pipeline.checks import ALL_CHECKS
from spur_assets.pipeline.counterfactual_assets import batch_counterfactuals, counterfactual_dataset, synthetic_counterfactuals
from spur_assets.pipeline.expose import spurious_features
from spur_assets.pipeline.inbox_sensor import inbox_sensor
from spur_assets.pipeline.ingest import raw_pairs
from spur_assets.pipeline.model_assets import base_checkpoint, control_checkpoint, finetuned_checkpoint
from spur_assets.pipeline.pipes import PIPES_SUBPROCESS_KEY, pipes_subprocess_client
from spur_assets.pipeline.recovery import dead_run_sensor
from spur_assets.pipeline.refs_io_manager import ArtifactRefIOManager
from spur_assets.pipeline.report_assets import metric_report
from spur_assets.pipeline.resources import SpurSettings, settings_from_environment

ASSETS = [
    raw_pairs,
    spurious_features,
    base_checkpoint,
    batch_counterfactuals,
    synthetic_counterfactuals,
    finetuned_checkpoint,
    control_checkpoint,
    metric_report,
    counterfactual_dataset,
]


def resources_for(settings: SpurSettings) -> dict[str, object]:
    """The resources every asset and check reads: settings, the artifact-reference IO manager, Pipes."""
    return {
        "settings": settings,
        "refs": ArtifactRefIOManager(settings=settings),
        PIPES_SUBPROCESS_KEY: pipes_subprocess_client(),
    }


EXECUTORS = {"in_process": dg.in_process_executor, "multiprocess": dg.multiprocess_executor}


def executor_from_environment(environ: dict[str, str] | None = None) -> dg.ExecutorDefinition:
    """SPUR_EXECUTOR: `in_process` (default) or `multiprocess` (a process per step, steps in parallel)."""
    name = (os.environ if environ is None else environ).get("SPUR_EXECUTOR", "").strip() or "in_process"
    if name not in EXECUTORS:
        raise ValueError(f"SPUR_EXECUTOR={name!r}: use one of {', '.join(EXECUTORS)} (or leave it unset for in_process)")
    return EXECUTORS[name]


def build_definitions(
    settings: SpurSettings | None = None, executor: dg.ExecutorDefinition | None = None
) -> dg.Definitions:
    """The assets with their automation conditions, checks, sensors and resources.

    `settings` default to the environment's, `executor` to SPUR_EXECUTOR's.
    """
    settings = settings if settings is not None else settings_from_environment()
    executor = executor if executor is not None else executor_from_environment()
    return dg.Definitions(
        assets=with_automation(ASSETS),
        asset_checks=ALL_CHECKS,
        sensors=[inbox_sensor, automation_sensor, dead_run_sensor],
        resources=resources_for(settings),
        executor=executor,
    )


defs = build_definitions()
