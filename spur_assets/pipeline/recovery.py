"""Runs whose process died are marked failed, and their half-written outputs removed.

A process killed with SIGKILL (the OOM killer, a power cut) cannot report its own end: its
Dagster run would stay STARTED forever and its staging folder would stay on disk. Every step
tags its run with the process that executes it (`spur/pid`, `spur/host`); `spur run` checks the
runs of its host when it starts, and `dead_run_sensor` does the same every 30 s for runs the
daemon launched. (Dagster's own run monitoring cannot see a dead run worker under the default
run launcher; it fails runs stuck starting or canceling.)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import dagster as dg

from spur_assets.core.records.artifacts import process_alive, remove_dead_staging
from spur_assets.pipeline.resources import SpurSettings

PID_TAG, HOST_TAG = "spur/pid", "spur/host"
ACTIVE_STATUSES = [  # a run in any of these has not ended
    dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING,
    dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
]


def owner_tags() -> dict[str, str]:
    """Tags naming the process that executes a run's steps, so a later check can tell if it died."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def tag_run_with_this_process(context: dg.AssetExecutionContext) -> None:
    """Tag the run with this process unless it already is (`spur run` tags its runs when it starts them)."""
    if context.run.tags.get(PID_TAG) != str(os.getpid()):
        context.instance.add_run_tags(context.run.run_id, owner_tags())


def fail_dead_runs(instance: dg.DagsterInstance, spur_home: Path, by: str) -> Iterator[str]:
    """Mark runs of this host whose tagged process is gone as FAILURE, remove dead staging; says what it did."""
    host = socket.gethostname()
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=ACTIVE_STATUSES, tags={HOST_TAG: host})):
        pid = run.tags.get(PID_TAG, "")
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            instance.report_run_failed(run, f"the process running it (pid {pid} on {host}) is gone; marked failed by {by}")
            yield f"run {run.run_id}: its process {pid} is gone; marked FAILURE"
    for folder in remove_dead_staging(spur_home):
        yield f"removed {folder}: staging of a process that is gone"


@dg.sensor(
    name="dead_run_sensor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Every 30 s: runs on this host whose process is gone (killed outright, out of memory) are "
        "marked FAILURE and staging folders of dead processes are removed, so nothing stays stuck."
    ),
)
def dead_run_sensor(context: dg.SensorEvaluationContext, settings: SpurSettings) -> dg.SkipReason:
    done = list(fail_dead_runs(context.instance, settings.home_path, "dead_run_sensor"))
    for line in done:
        context.log.warning(line)
    return dg.SkipReason("; ".join(done) if done else "no run with a dead process")
