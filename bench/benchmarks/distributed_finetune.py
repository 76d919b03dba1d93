"""finetuned_checkpoint on 1 process vs N torchrun processes (DDP through Dagster Pipes): wall time and loss curves.

Reuses the upstream materializations of an existing SPUR_HOME (raw_pairs, base_checkpoint,
synthetic_counterfactuals; their ref pointers are copied, their files read in place and never
written) and materializes finetuned_checkpoint into a fresh home once per process count, with
the same config otherwise. Prints a Markdown table and writes results.json into --home.

    .venv/bin/python bench/benchmarks/distributed_finetune.py --from-home .spur --home /tmp/spur-ddp-bench --nproc 1 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import dagster as dg
import polars as pl
import torch

from spur_assets.core.model.clip_model import load_checkpoint
from spur_assets.pipeline.ingest import batches
from spur_assets.pipeline.model_assets import finetuned_checkpoint
from spur_assets.pipeline.pipes import PIPES_SUBPROCESS_KEY, pipes_subprocess_client
from spur_assets.pipeline.refs_io_manager import ArtifactRefIOManager
from spur_assets.pipeline.resources import SpurSettings

UPSTREAM = ("raw_pairs", "base_checkpoint", "synthetic_counterfactuals")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-home", type=Path, required=True, help="SPUR_HOME holding the upstream materializations")
    parser.add_argument("--home", type=Path, required=True, help="fresh SPUR_HOME for the fine-tuning runs")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--config", type=json.loads, default={}, help="extra finetuned_checkpoint config as JSON")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="intra-op threads of the 1-process path (0: torch's default); torchrun ranks use 1 each")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    for asset in UPSTREAM:
        source = args.from_home.resolve() / "refs" / asset
        if not source.is_dir():
            raise SystemExit(f"{source} does not exist; materialize {asset} in {args.from_home} first (spur run).")
        shutil.copytree(source, args.home / "refs" / asset, dirs_exist_ok=True)
    partitions = sorted(p.stem for p in (args.home / "refs" / "raw_pairs").glob("*.json"))

    settings = SpurSettings(home=str(args.home.resolve()), device="cpu")
    resources = {"settings": settings, "refs": ArtifactRefIOManager(settings=settings),
                 PIPES_SUBPROCESS_KEY: pipes_subprocess_client()}
    source_assets = [
        dg.SourceAsset(key=a, io_manager_key="refs", partitions_def=batches if a == "raw_pairs" else None) for a in UPSTREAM
    ]
    runs = {}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(batches.name, partitions)
        for nproc in args.nproc:
            config = {**args.config, "nproc_per_node": nproc, "dist_backend": "gloo"}
            started = time.perf_counter()
            result = dg.materialize([finetuned_checkpoint, *source_assets], instance=instance, resources=resources,
                                    run_config={"ops": {"finetuned_checkpoint": {"config": config}}})
            wall = time.perf_counter() - started
            metadata = result.asset_materializations_for_node("finetuned_checkpoint")[0].metadata
            folder = Path(metadata["artifact_dir"].value)
            history = pl.read_parquet(folder / "finetuned_checkpoint_history.parquet")
            runs[nproc] = {
                "wall_seconds": round(wall, 1),
                "train_seconds": round(float(history["seconds"].sum()), 1),
                "loss": history["loss"].to_list(),
                "pairs_per_epoch": history["pairs"].to_list(),
                "checkpoint": str(folder / "checkpoint"),
            }
    reference = min(runs)
    weights = {n: load_checkpoint(runs[n]["checkpoint"]).model.state_dict() for n in runs}
    for nproc in runs:
        runs[nproc]["max_abs_weight_diff_vs_%d" % reference] = max(
            float((weights[nproc][k] - weights[reference][k]).abs().max()) for k in weights[reference]
        )
        runs[nproc]["max_rel_loss_diff_vs_%d" % reference] = max(
            abs(a - b) / abs(b) for a, b in zip(runs[nproc]["loss"], runs[reference]["loss"])
        )
    results = {"torch_threads_in_process": torch.get_num_threads(), "config": args.config, "runs": runs}
    (args.home / "results.json").write_text(json.dumps(results, indent=1))
    print(f"1-process path: {torch.get_num_threads()} torch thread(s); torchrun ranks: 1 thread each")
    print("| processes | wall s (materialization) | training s | loss per epoch | max rel. loss diff | max abs. weight diff |")
    print("|---|---|---|---|---|---|")
    for nproc, run in runs.items():
        losses = ", ".join(f"{v:.5f}" for v in run["loss"])
        print(f"| {nproc} | {run['wall_seconds']} | {run['train_seconds']} | {losses} | "
              f"{run['max_rel_loss_diff_vs_%d' % reference]:.1e} | {run['max_abs_weight_diff_vs_%d' % reference]:.1e} |")


if __name__ == "__main__":
    main()
