"""The real-size run: a COCO 2017-layout batch of 640x480 JPEGs and a ViT-B/32-shaped pretrained-style
checkpoint through the whole graph with `spur run --dataset`, per stage: wall time, images/s, peak RSS.

    .venv/bin/python bench/benchmarks/real_size.py --train 5000 --test 1000            # this machine (CPU)
    .venv/bin/python bench/benchmarks/real_size.py --train 200 --test 100 --shape tiny # a smoke run (minutes)
    (bench/benchmarks/gpu.py --real-size runs the same on CUDA, with GPU utilisation and memory)

Inputs come from bench/benchmarks/real_size_inputs.py (written once under --work and reused when present).
The run is one `spur run --dataset batch/dataset.yaml` (the whole graph) with
SPUR_BASE_MODEL set to the ViT-B/32-shaped folder, so fine-tuning follows the pretrained recipe
(core/model/recipes.py); `--finetune-steps` caps its optimizer steps (the recipe's five epochs of
ViT-B/32 at 224 px would take hours on 2 CPU cores). Per stage the figures come from the
materialization metadata every asset records: `seconds`, `peak_rss_mb` (the step's own peak),
`peak_rss_largest_child_mb` (the largest child process so far: decoding workers, inpainting
pools), `peak_gpu_mb` on CUDA. Images/s counts what the stage processed: images ingested, eval + train counterfactual images written, image
embeddings computed in metric_report (test + removal + control images, per checkpoint),
(image, caption) pairs trained in finetuned_checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
STAGES = (
    "raw_pairs", "spurious_features", "base_checkpoint", "batch_counterfactuals", "synthetic_counterfactuals",
    "finetuned_checkpoint", "metric_report", "counterfactual_dataset",
)


def ensure_inputs(work: Path, n_train: int, n_test: int, shape: str, workers: int) -> tuple[Path, Path, float]:
    """(dataset.yaml, model folder, seconds spent generating; 0 when reused)."""
    inputs = work / f"inputs-{n_train}x{n_test}-{shape.replace('/', '')}"
    manifest, model = inputs / "batch" / "dataset.yaml", inputs / ("vit-b-32-random" if shape == "vit-b/32" else "tiny-random")
    if manifest.is_file() and model.is_dir():
        return manifest, model, 0.0
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "bench/benchmarks/real_size_inputs.py", "--out", str(inputs), "--train", str(n_train), "--test", str(n_test),
         "--workers", str(workers), "--shape", shape],
        cwd=REPO, check=True,
    )
    if not model.is_dir():  # the generator names the folder after the shape
        model = next(p for p in inputs.iterdir() if p.is_dir() and p.name != "batch")
    return manifest, model, time.monotonic() - started


def run_pipeline(manifest: Path, model: Path, home: Path, finetune_steps: int, micro_batch: int, workers: int,
                 device: str, threads: int | None) -> float:
    """One `spur run` of the whole graph; its wall seconds. Raises on failure (log kept in home)."""
    home.mkdir(parents=True, exist_ok=True)
    config = {
        "ops": {
            "raw_pairs": {"config": {"workers": workers}},
            "batch_counterfactuals": {"config": {"workers": workers}},
            "synthetic_counterfactuals": {"config": {"workers": workers}},
            "finetuned_checkpoint": {"config": {"max_steps": finetune_steps, "micro_batch_size": micro_batch, "workers": workers}},
            "metric_report": {"config": {"workers": workers}},
        },
    }
    config_path = home / "run-config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "SPUR_HOME": str(home), "SPUR_BASE_MODEL": str(model), "SPUR_DEVICE": device}
    env.pop("DAGSTER_HOME", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.monotonic()
    with open(home / "spur-run.log", "w") as log:
        done = subprocess.run(
            [sys.executable, "-m", "spur_assets.cli", "run", "--dataset", str(manifest), "--config", str(config_path)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        raise SystemExit(f"spur run failed (rc {done.returncode}); see {home / 'spur-run.log'}")
    return time.monotonic() - started


def stage_figures(home: Path) -> list[dict]:
    """Per stage: seconds, work done (count and unit), peak RSS of the step and its workers, peak GPU memory."""
    import dagster as dg
    import polars as pl

    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    rows = []
    with dg.DagsterInstance.get() as instance:
        for stage in STAGES:
            key = dg.AssetKey(stage)
            events = [e for e in instance.fetch_materializations(key, limit=100).records]
            if not events:
                continue
            metadata_list = [e.asset_materialization.metadata for e in events]
            meta = metadata_list[0]
            value = lambda name, m=meta: m[name].value if name in m else None  # noqa: E731
            count, unit = None, ""
            if stage == "raw_pairs":
                count, unit = value("images"), "images ingested"
            elif stage == "batch_counterfactuals":
                count, unit = (value("eval_images") or 0) + (value("train_removal_candidates") or 0), "counterfactual images"
            elif stage == "synthetic_counterfactuals":
                count, unit = (value("train_paste_images") or 0), "paste images"
            elif stage == "finetuned_checkpoint":
                history = pl.read_parquet(Path(value("artifact_dir")) / "finetuned_checkpoint_history.parquet")
                count, unit = int(history["pairs"].sum()), "pairs trained"
            elif stage == "metric_report":
                report = json.loads((home / "reports" / "latest" / "report.json").read_text())
                counts = report["checkpoints"]["base"]["counts"]
                count = 2 * (counts["test_images"] + counts["removal_queries"] + counts["controls"])
                unit = "images embedded (2 checkpoints)"
            seconds = float(value("seconds"))
            rows.append({
                "stage": stage,
                "seconds": seconds,
                "count": count,
                "unit": unit,
                "per_second": (count / seconds) if count and seconds else None,
                "peak_rss_mb": value("peak_rss_mb"),
                "worker_peak_mb": value("peak_rss_largest_child_mb"),
                "peak_gpu_mb": value("peak_gpu_mb"),
            })
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| stage | wall s | work | per s | peak RSS MiB (the step) | largest child process so far MiB | peak GPU MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        work = f"{r['count']:,} {r['unit']}" if r["count"] is not None else ""
        rate = f"{r['per_second']:.1f}" if r["per_second"] else ""
        gpu = f"{r['peak_gpu_mb']:,.0f}" if r["peak_gpu_mb"] else ""
        lines.append(f"| {r['stage']} | {r['seconds']:.1f} | {work} | {rate} | {r['peak_rss_mb']:,.0f} | "
                     f"{r['worker_peak_mb']:,.0f} | {gpu} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--shape", default="vit-b/32", choices=("vit-b/32", "tiny"))
    parser.add_argument("--work", default="/tmp/spur-real-size")
    parser.add_argument("--finetune-steps", type=int, default=4, help="cap on fine-tuning optimizer steps (batch 256)")
    parser.add_argument("--micro-batch", type=int, default=32, help="rows per forward inside a fine-tuning step")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding / inpainting workers per stage")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch intra-op threads per process (default: torch's)")
    parser.add_argument("--out", help="also write the Markdown here")
    args = parser.parse_args(argv)

    work = Path(args.work)
    manifest, model, generated_s = ensure_inputs(work, args.train, args.test, args.shape, args.workers)
    home = work / f"home-{args.train}x{args.test}-{args.shape.replace('/', '')}-{int(time.time())}"
    wall = run_pipeline(manifest, model, home, args.finetune_steps, args.micro_batch, args.workers, args.device, args.threads)
    rows = stage_figures(home)
    load = os.getloadavg()
    header = (
        f"Real-size run: {args.train:,} train + {args.test:,} test 640x480 JPEGs, {args.shape} (random weights, "
        f"save_pretrained), device {args.device}, {args.workers} worker(s) per stage, torch threads "
        f"{args.threads or 'default'}; fine-tuning capped at {args.finetune_steps} steps of the pretrained recipe "
        f"(micro-batch {args.micro_batch}). Whole `spur run` {wall:.0f} s"
        + (f"; inputs generated in {generated_s:.0f} s" if generated_s else "")
        + f"; load average at end {load[0]:.2f}. SPUR_HOME {home}."
    )
    text = markdown(rows, header)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
