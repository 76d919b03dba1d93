"""Mitigation ablation: which counterfactuals and whether hard negatives, on the built-in data.

Reads what a demo run left in SPUR_HOME (the latest raw_pairs, base_checkpoint and
synthetic_counterfactuals, found through lineage.duckdb), fine-tunes the base
checkpoint once per arm with the pipeline's own code and defaults, scores every
arm on the same eval set, and writes a Markdown table.

    .venv/bin/python bench/experiments/ablation.py --home .spur --seeds 0 --out bench/experiments/ABLATION.md

Arms: removal + paste with hard negatives, the same without hard negatives,
removal only with hard negatives (the default until issue #4), paste only,
originals only (the same fine-tuning budget with no counterfactual: the control
that separates "trained longer" from "trained on counterfactuals"), and removal
only with paired batches and hard negatives weighted x4 (the pipeline default).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import torch

from spur_assets.core.records.artifacts import ArtifactRef, OutputFile
from spur_assets.core.data.batch_union import union_split
from spur_assets.core.model.clip_model import load_checkpoint, load_images_uint8, processor_image_size
from spur_assets.core.metrics.evaluation import EvalSet, evaluate_checkpoint
from spur_assets.core.counterfactuals.finetune_data import assemble_finetune_set
from spur_assets.core.records.lineage import LineageStore
from spur_assets.core.model.finetuning import TrainingPlan
from spur_assets.core.counterfactuals.finetune_data import COUNTERFACTUAL_RATIO
from spur_assets.core.model.recipes import finetune_recipe

# Each arm: which counterfactuals (assemble_finetune_set) and which loss (TrainConfig). Arms 1-5
# keep the loss they were measured with (bench/experiments/ABLATION.md); arm 6 is the pipeline default since
# issue #4. Arm numbers are what --arms takes, so new arms go at the end.
ARMS = {
    "removal + paste, hard negatives": dict(use_removal=True, use_paste=True, hard_negatives=True),
    "removal + paste, no hard negatives": dict(use_removal=True, use_paste=True, hard_negatives=False),
    "removal, hard negatives (previous default)": dict(use_removal=True, use_paste=False, hard_negatives=True),
    "paste only": dict(use_removal=False, use_paste=True, hard_negatives=False),
    "originals only (control)": dict(use_removal=False, use_paste=False, hard_negatives=False),
    "removal, paired batches, hard negatives x4": dict(
        use_removal=True, use_paste=False, hard_negatives=True, paired_batches=True, hard_negative_weight=4.0
    ),
}
LOSS_FIELDS = {"paired_batches": False, "hard_negative_weight": 1.0}  # the loss of arms that do not name it


def latest_ref(store: LineageStore, asset: str) -> ArtifactRef:
    row = store.latest(asset)
    if row is None:
        raise SystemExit(f"no {asset} in {store.db_path}; run `bash scripts/demo.sh` first")
    outputs = tuple(OutputFile(**o) for o in row["outputs"])
    return ArtifactRef(asset, row["partition"], row["materialization_id"], row["data_version"], outputs)


def headline(metrics: dict) -> dict:
    return {
        "odmap_i2t": metrics["odmap"]["i2t"]["10"],
        "odmap_t2i": metrics["odmap"]["t2i"]["10"],
        "hr": metrics["hr"]["10"],
        "natural": metrics["hr"]["natural_10"],
        "r5_i2t": metrics["recall"]["i2t"]["5"],
        "r5_t2i": metrics["recall"]["t2i"]["5"],
        "delta_ctrl": metrics["delta_ctrl"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=".spur")
    parser.add_argument("--seeds", default="0", help="comma-separated fine-tuning seeds")
    parser.add_argument("--arms", default="", help="comma-separated arm numbers (1-based); default all")
    parser.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs; 0 = the pipeline default")
    parser.add_argument("--ratio", type=float, default=0.0, help="counterfactual ratio; 0 = the pipeline default")
    parser.add_argument("--lr", type=float, default=0.0, help="fine-tuning learning rate; 0 = the pipeline default")
    parser.add_argument("--out", default="bench/experiments/ABLATION.md")
    args = parser.parse_args()
    store = LineageStore(Path(args.home))
    raw, base, cf = (latest_ref(store, a) for a in ("raw_pairs", "base_checkpoint", "synthetic_counterfactuals"))
    tables = [raw.read_table(t) for t in ("raw_images", "raw_captions", "raw_instances")]
    train, test = union_split(*[[t] for t in tables], "train"), union_split(*[[t] for t in tables], "test")
    eval_set = EvalSet.of(test, cf)
    ratio = args.ratio or COUNTERFACTUAL_RATIO
    recipe = finetune_recipe("builtin", None, epochs=args.epochs or None, lr=args.lr or None)  # with the overrides
    base_metrics = headline(evaluate_checkpoint(load_checkpoint(base.path("checkpoint")), eval_set).metrics)
    print("base", base_metrics, flush=True)
    chosen = [list(ARMS)[int(i) - 1] for i in args.arms.split(",")] if args.arms else list(ARMS)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in chosen:
            data = {k: v for k, v in ARMS[arm].items() if k not in LOSS_FIELDS}
            loss = {k: ARMS[arm].get(k, default) for k, default in LOSS_FIELDS.items()}
            fs = assemble_finetune_set(
                train.images, train.captions, cf.read_table("cf_train_images"), cf.read_table("cf_train_captions"),
                counterfactual_ratio=ratio, seed=seed, **data,
            )
            bundle = load_checkpoint(base.path("checkpoint"))
            plan = TrainingPlan.finetune(fs, recipe, seed, **loss)
            images = load_images_uint8(fs.image_paths, processor_image_size(bundle.image_processor), workers=2)
            started = time.monotonic()
            plan.run(bundle, "cpu", images=images)
            seconds = time.monotonic() - started
            m = headline(evaluate_checkpoint(bundle, eval_set).metrics)
            rows.append({"arm": arm, "seed": seed, "train_images": len(fs.image_paths), "seconds": round(seconds), **m})
            print(rows[-1], flush=True)
    frame = pl.DataFrame(rows)
    mean = frame.group_by("arm", maintain_order=True).agg(pl.len().alias("seeds"), pl.exclude("arm", "seed").mean())
    lines = [
        "# Mitigation ablation on the built-in data",
        "",
        f"Written by `bench/experiments/ablation.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        f"Base checkpoint {base.materialization_id}, counterfactuals {cf.materialization_id}. "
        f"Fine-tuning: the pipeline defaults ({recipe.epochs} epochs, lr {recipe.lr}, batch {recipe.batch_size}, "
        f"counterfactual ratio {ratio}); seeds {args.seeds}. Gains are against the base checkpoint.",
        "",
        "| arm | seeds | train images | ODmAP@10 i2t (gain) | ODmAP@10 t2i (gain) | HR@10 | R@5 i2t (change) | R@5 t2i (change) | Δ_ctrl | fine-tune s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| base checkpoint | – | – | {base_metrics['odmap_i2t']:.3f} | {base_metrics['odmap_t2i']:.3f} | {base_metrics['hr']:.3f} "
        f"| {base_metrics['r5_i2t']:.3f} | {base_metrics['r5_t2i']:.3f} | {base_metrics['delta_ctrl']:+.3f} | – |",
    ]
    for r in mean.iter_rows(named=True):
        lines.append(
            f"| {r['arm']} | {r['seeds']} | {r['train_images']:.0f} "
            f"| {r['odmap_i2t']:.3f} ({r['odmap_i2t'] - base_metrics['odmap_i2t']:+.3f}) "
            f"| {r['odmap_t2i']:.3f} ({r['odmap_t2i'] - base_metrics['odmap_t2i']:+.3f}) | {r['hr']:.3f} "
            f"| {r['r5_i2t']:.3f} ({r['r5_i2t'] - base_metrics['r5_i2t']:+.3f}) "
            f"| {r['r5_t2i']:.3f} ({r['r5_t2i'] - base_metrics['r5_t2i']:+.3f}) | {r['delta_ctrl']:+.3f} | {r['seconds']:.0f} |"
        )
    lines += ["", "Per seed:", "", "```json", json.dumps(rows, indent=1), "```", ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
