"""The fine-tune and its control one after the other (2 threads each) against side by side (1 thread each).

What training the two arms at the same time would save on a 2-core machine, measured before
the pipeline is changed to do it. Today control_checkpoint reads the fine-tune's number of
optimizer steps from finetuned_checkpoint's materialization, so the two train one after the
other, each with every core. Both plans are known before either trains
(`core/model/finetuning.py` `TrainingPlan`), so they could run side by side, one core each.

From a finished demo home (`bash scripts/demo.sh`, or any SPUR_HOME with raw_pairs,
base_checkpoint and synthetic_counterfactuals) this builds both plans exactly as the two
assets do with their default configs (`FinetunedCheckpointConfig()`, the recipe for the kind
of base), caps both at `--steps` optimizer steps (the per-step cost is what is measured; the
demo's full count is projected from it), and trains each arm in a process of its own, the
way a side-by-side pipeline would:

- one after the other: the fine-tune, then the control, torch at 2 threads each;
- side by side: both at once, torch at 1 thread each.

The two ways alternate within each repetition. Each worker decodes its images first (timed apart: a fixed
cost, the assets decode their split once too) and reports its training seconds
(`TrainingPlan.run` on the decoded pixels); the parent reports the wall seconds of each way,
process starts and decoding included.

    .venv/bin/python -m bench.benchmarks.arms_side_by_side --home .spur --steps 200 --reps 2 --out bench/benchmarks/ARMS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

ARMS = ("finetune", "control")


def _plans(home: Path, steps: int):
    """(fine-tune plan, control plan, base checkpoint folder) as the assets build them, capped at `steps`."""
    from spur_assets.core.counterfactuals.finetune_data import assemble_finetune_set, originals_only
    from spur_assets.core.data.batch_union import union_split
    from spur_assets.core.model.finetuning import TrainingPlan
    from spur_assets.core.records.lineage import LineageStore
    from spur_assets.pipeline.model_assets import FinetunedCheckpointConfig, finetune_recipe

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from ablation import latest_ref

    store = LineageStore(home)
    raw, base, cf = (latest_ref(store, a) for a in ("raw_pairs", "base_checkpoint", "synthetic_counterfactuals"))
    tables = [raw.read_table(t) for t in ("raw_images", "raw_captions", "raw_instances")]
    train = union_split(*[[t] for t in tables], "train")
    config = FinetunedCheckpointConfig()
    rows = assemble_finetune_set(
        train.images, train.captions, cf.read_table("cf_train_images"), cf.read_table("cf_train_captions"),
        counterfactual_ratio=config.counterfactual_ratio, use_removal=config.use_removal, use_paste=config.use_paste,
        hard_negatives=config.hard_negatives, seed=config.seed,
    )
    recipe = finetune_recipe(config, os.environ.get("SPUR_BASE_MODEL", ""))
    full = TrainingPlan.finetune(rows, recipe, config.seed, config.hard_negative_weight, config.paired_batches)
    capped = TrainingPlan.finetune(
        rows, recipe.with_(max_steps=steps), config.seed, config.hard_negative_weight, config.paired_batches,
    )
    control = TrainingPlan.control(originals_only(train.images, train.captions), recipe, config.seed, capped.steps)
    return capped, control, Path(base.path("checkpoint")), full.steps


def worker(arm: str, home: Path, steps: int, threads: int) -> None:
    """Train one arm in this process at `threads` torch threads; print {"arm", "train_s", "steps"} as JSON."""
    from spur_assets.core.runtime.threads import use_torch_threads

    use_torch_threads(threads)
    import torch

    from spur_assets.core.data.preprocessing import ImagePreprocessing
    from spur_assets.core.model.clip_model import load_checkpoint, load_images_uint8

    finetune, control, base, _ = _plans(home, steps)
    plan = finetune if arm == "finetune" else control
    bundle = load_checkpoint(base, device="cpu")
    # Decoded first and timed apart: a fixed cost (the assets decode the split once too), not a per-step one.
    started = time.perf_counter()
    images = load_images_uint8(plan.rows.image_paths, ImagePreprocessing.of(bundle.image_processor), workers=1)
    decoded = time.perf_counter()
    plan.run(bundle, "cpu", images=images)
    print(json.dumps({"arm": arm, "train_s": time.perf_counter() - decoded, "decode_s": decoded - started,
                      "steps": plan.steps, "threads": torch.get_num_threads()}), flush=True)


def _start(arm: str, home: Path, steps: int, threads: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "bench.benchmarks.arms_side_by_side", "--worker", arm, "--home", str(home),
               "--steps", str(steps), "--threads", str(threads)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])


def _result(process: subprocess.Popen) -> dict:
    out, _ = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"worker failed with exit code {process.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def one_after_the_other(home: Path, steps: int) -> dict:
    started = time.perf_counter()
    arms = [_result(_start(arm, home, steps, 2)) for arm in ARMS]
    return {"wall_s": time.perf_counter() - started, "arms": arms}


def side_by_side(home: Path, steps: int) -> dict:
    started = time.perf_counter()
    processes = [_start(arm, home, steps, 1) for arm in ARMS]
    arms = [_result(p) for p in processes]
    return {"wall_s": time.perf_counter() - started, "arms": arms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=".spur", help="a finished demo's SPUR_HOME")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per arm (the fine-tune's cap)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default="bench/benchmarks/ARMS.md")
    parser.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    home = Path(args.home).resolve()
    if args.worker:
        worker(args.worker, home, args.steps, args.threads)
        return
    _, _, _, demo_steps = _plans(home, args.steps)
    load_start = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"sequential": [], "side_by_side": []}
    for rep in range(args.reps):
        ways = [("sequential", one_after_the_other), ("side_by_side", side_by_side)]
        for name, way in ways if rep % 2 == 0 else ways[::-1]:
            runs[name].append(way(home, args.steps))
            print(f"rep {rep + 1}/{args.reps} {name}: {json.dumps(runs[name][-1])}", flush=True)
    load_end = os.getloadavg()[0]

    seq_train = [sum(a["train_s"] for a in r["arms"]) for r in runs["sequential"]]
    side_train = [max(a["train_s"] for a in r["arms"]) for r in runs["side_by_side"]]
    seq_wall = [r["wall_s"] for r in runs["sequential"]]
    side_wall = [r["wall_s"] for r in runs["side_by_side"]]
    steps = runs["sequential"][0]["arms"][0]["steps"]
    per_step_saving = (median(seq_train) - median(side_train)) / steps
    lines = [
        "# The fine-tune and its control: one after the other vs side by side",
        "",
        f"Written by `bench/benchmarks/arms_side_by_side.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs (1-minute load average {load_start:.2f} "
        f"at the start, {load_end:.2f} at the end), {args.reps} repetition(s), the two ways alternating. Home: the "
        f"demo's (`{args.home}`); both arms as the assets build them with default configs, capped at {steps} "
        f"optimizer steps each (the demo's fine-tune takes {demo_steps}).",
        "",
        "| way | training s (per repetition) | median | wall s with process starts and decoding (median) |",
        "|---|---|---|---|",
        f"| one after the other, 2 threads each (today) | {', '.join(f'{s:.1f}' for s in seq_train)} | "
        f"{median(seq_train):.1f} (sum of the two) | {median(seq_wall):.1f} |",
        f"| side by side, 1 thread each | {', '.join(f'{s:.1f}' for s in side_train)} | "
        f"{median(side_train):.1f} (the longer arm) | {median(side_wall):.1f} |",
        "",
        f"Side by side trains both arms in **{median(side_train) / median(seq_train):.2f}x** the time (training "
        f"seconds, medians; {median(side_wall) / median(seq_wall):.2f}x in wall seconds with the process starts). "
        f"Per optimizer step of the pair that is {per_step_saving * 1000:.0f} ms saved, so at the demo's {demo_steps} "
        f"steps about **{per_step_saving * demo_steps:.0f} s** off `spur run` (projected from {steps}-step runs; "
        "process starts not counted: a pipeline training the arms side by side would start one process per arm, "
        "both at once; their cost is in the wall column).",
        "",
        "Per arm (training seconds, threads):",
        "",
    ]
    for name in runs:
        for rep, run in enumerate(runs[name]):
            arms = "; ".join(f"{a['arm']} {a['train_s']:.1f} s at {a['threads']} thread(s) (decoding {a['decode_s']:.1f} s before)"
                             for a in run["arms"])
            lines.append(f"- {name.replace('_', ' ')}, repetition {rep + 1}: {arms}")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
