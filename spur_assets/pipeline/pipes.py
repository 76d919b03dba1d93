"""Training past one process: torchrun ranks started and heard through Dagster Pipes.

The `pipes_subprocess` resource is a plain `dg.PipesSubprocessClient`. An asset writes a
training job folder (core/model/training_job.py), then `train_with_torchrun` runs
`torchrun --standalone --nproc_per_node=N -m spur_assets.train_worker JOB_DIR` through it:
rank 0 streams its log lines into the run's log and reports the loss curve, wall time, world
size and backend as Pipes metadata; the trained checkpoint and `result.json` come back as files.
The same code runs in a Kubernetes step pod (k8s_job_executor): the pod's GPUs are the
ranks' devices, and NCCL is the backend there (docs/cluster.md).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import dagster as dg

from spur_assets.core.model.training_job import TrainingJob, read_training_result, write_training_job

PIPES_SUBPROCESS_KEY = "pipes_subprocess"
TRAIN_WORKER_MODULE = "spur_assets.train_worker"


def pipes_subprocess_client(env: Mapping[str, str] | None = None) -> dg.PipesSubprocessClient:
    """The `pipes_subprocess` resource: a PipesSubprocessClient that forwards the ranks' output and,
    when the run is cancelled, sends torchrun SIGINT and gives it a minute to stop its ranks.

    `env` is added to the ranks' environment (for example NCCL_DEBUG=INFO on a cluster).
    """
    return dg.PipesSubprocessClient(env=dict(env or {}), forward_termination=True, termination_timeout_seconds=60)


def torchrun_command(module: str, args: Sequence[str], nproc_per_node: int, python: str | None = None) -> list[str]:
    """argv of `torchrun --standalone --nproc_per_node=N -m module *args`, with this interpreter.

    `python -m torch.distributed.run` is the module behind the `torchrun` console script; naming
    the interpreter keeps the ranks in the same environment as the Dagster process.
    Raises ValueError when nproc_per_node < 1.
    """
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node={nproc_per_node} must be >= 1 (processes, one per GPU on a GPU node).")
    return [
        python or sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc_per_node}",
        "-m",
        module,
        *args,
    ]


def train_with_torchrun(
    context: dg.AssetExecutionContext,
    client: dg.PipesSubprocessClient,
    job: TrainingJob,
    job_dir: Path,
    nproc_per_node: int,
) -> tuple[list[dict], dict]:
    """Write `job` to `job_dir`, run it on `nproc_per_node` torchrun ranks through Pipes, and wait.

    Returns (the per-epoch history train_clip returned on rank 0, the metadata rank 0 reported
    through Pipes). The trained checkpoint is then at `job.output_checkpoint`. A failing rank
    fails the step with DagsterPipesExecutionError (torchrun's exit status); its traceback is in
    the run's log.
    """
    command = torchrun_command(TRAIN_WORKER_MODULE, [str(job_dir)], nproc_per_node)
    write_training_job(job_dir, job)
    context.log.info(f"starting {nproc_per_node} training process(es): {' '.join(command)}")
    invocation = client.run(
        context=context,
        command=command,
        extras={"job_dir": str(job_dir), "nproc_per_node": nproc_per_node},
    )
    reported = invocation.get_materialize_result(implicit_materialization=False).metadata or {}
    result = read_training_result(job_dir)
    return list(result["history"]), dict(reported)
