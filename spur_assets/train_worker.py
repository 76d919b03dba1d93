"""One rank of a data-parallel training run: `torchrun --nproc_per_node=N --standalone -m spur_assets.train_worker JOB_DIR`.

JOB_DIR holds a training job (core/model/training_job.py). Every rank joins the process group,
reads the job and runs the same `train_clip` as the one-process path, with its slice of each
global batch. Rank 0 alone writes: the trained checkpoint (save_pretrained) at the job's
output_checkpoint and `result.json` in JOB_DIR. When Dagster started the run through Pipes,
rank 0 alone opens the Pipes session: it streams progress as log lines and reports the loss
curve, wall time, world size and backend as the materialization's metadata. Other ranks do not
talk to Dagster.

This module is the Pipes side (dagster_pipes only, no dagster import); the Dagster side lives
in spur_assets/pipeline/pipes.py.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from dagster_pipes import PipesContext, PipesEnvVarParamsLoader, open_dagster_pipes

from spur_assets.core.model.clip_model import load_checkpoint, save_checkpoint
from spur_assets.core.model.distributed import close_data_parallel, init_data_parallel
from spur_assets.core.data.image_stream import source_length
from spur_assets.core.model.training import train_clip
from spur_assets.core.model.training_job import read_training_job, read_training_result, write_training_result


def _progress_line(event: dict) -> str:
    return "epoch {epoch} step {step}/{steps_in_epoch}: loss {loss:.4f}, {pairs_per_second:.0f} pairs/s".format(**event)


def pipes_metadata(result: dict) -> dict:
    """The Pipes metadata rank 0 reports for a finished run (`result` as write_training_result writes it)."""
    history = result["history"]
    return {
        "world_size": result["world_size"],
        "dist_backend": result["dist_backend"],
        "worker_device": result["device"],
        "train_seconds": round(float(result["train_seconds"]), 2),
        "loss_by_epoch": {"raw_value": [float(row["loss"]) for row in history], "type": "json"},
    }


def main(argv: list[str] | None = None) -> int:
    """Run one rank of the job in argv[0]; returns the exit status (0 on success, errors raise)."""
    parser = argparse.ArgumentParser(prog="spur_assets.train_worker", description=__doc__.splitlines()[0])
    parser.add_argument("job_dir", type=Path, help="folder written by core.model.training_job.write_training_job")
    args = parser.parse_args(argv)

    job = read_training_job(args.job_dir)
    group, device = init_data_parallel(job.dist_backend, job.device)
    with contextlib.ExitStack() as stack:
        stack.callback(close_data_parallel)
        pipes: PipesContext | None = None
        if group.is_main and PipesEnvVarParamsLoader().is_dagster_pipes_process():
            # Entered after the process group so a failed rendezvous surfaces as torchrun's error;
            # inside it, any exception on rank 0 is reported to Dagster with its traceback.
            pipes = stack.enter_context(open_dagster_pipes())

        def log(line: str) -> None:
            if pipes is not None:
                pipes.log.info(line)
            else:
                print(line, flush=True)

        if group.is_main:
            log(f"torchrun: {group.world_size} process(es), backend {group.backend}, rank 0 on {device}; "
                f"{source_length(job.images)} images, {len(job.captions)} captions")
        bundle = load_checkpoint(job.base_checkpoint, device="cpu")
        started = time.perf_counter()
        history = train_clip(
            bundle,
            job.images,
            job.captions,
            job.caption_image,
            job.config,
            device,
            hard_negative_text=job.hard_negative_text,
            hard_negative_image=job.hard_negative_image,
            checkpoint_dir=job.resume_dir,
            progress=(lambda event: log(_progress_line(event))) if group.is_main else None,
            data_parallel=group,
            workers=job.loader_workers,
        )
        train_seconds = time.perf_counter() - started
        if group.is_main:
            save_checkpoint(bundle, job.output_checkpoint)
            write_training_result(args.job_dir, history, group.world_size, group.backend, str(device), train_seconds)
            if pipes is not None:
                pipes.report_asset_materialization(metadata=pipes_metadata(read_training_result(args.job_dir)))
            log(f"rank 0 wrote {job.output_checkpoint} after {train_seconds:.1f} s of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
