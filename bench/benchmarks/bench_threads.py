"""Benchmark: training throughput alone and beside one competing CPU-bound process, by thread policy.

Issue #15's question: on a shared machine, does a training step keep a fair share of the
cores, or collapse the way torch's default threads did (5-9x slower beside one other
process)? Each configuration trains the small CLIP from scratch (the `base_checkpoint`
recipe: 64 px, batch 128, 5 captions per image) for a fixed number of steps on built-in
scenes held in memory, in a fresh process (so thread variables such as OMP_WAIT_POLICY
take effect at torch's start), and reports pairs/s over the steps after the first.
"Beside" runs one `while True: pass` process for the whole configuration. Configurations
run back to back in one invocation, interleaved over `--repeats`; read the ratios.

    .venv/bin/python bench/benchmarks/bench_threads.py [--steps 40] [--repeats 3] [--out bench/benchmarks/THREADS.json] [--with-passive]

Target (#15): beside one competitor, at least 0.8 x half the machine's solo throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

WORKER = r"""
import sys, time, torch
from pathlib import Path
from spur_assets.core.data.builtin_dataset import BuiltinDatasetSpec, generate_builtin_dataset
from spur_assets.core.data.coco_ingest import load_batch
from spur_assets.core.model.clip_model import new_small_clip, load_images_uint8
from spur_assets.core.runtime.threads import ThreadPolicy, govern_torch_threads, use_torch_threads
from spur_assets.core.model.training import TrainConfig, train_clip

root, threads, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
policy = ThreadPolicy.from_setting(threads)  # 0: SPUR_THREADS unset, the cores we may use, adapted to the load
use_torch_threads(policy.total)
governor = govern_torch_threads(policy.total) if policy.adaptive else None
manifest = generate_builtin_dataset(root / "data", BuiltinDatasetSpec(n_train=600, n_test=1))
tables = load_batch(manifest, "bench")
train = tables.images.filter(tables.images["split"] == "train").sort("image_id")
row = {i: r for r, i in enumerate(train["image_id"].to_list())}
caps = tables.captions.filter(tables.captions["split"] == "train").sort("caption_id")
images = load_images_uint8(train["path"].to_list(), 64)
captions = caps["caption"].to_list()
caption_image = torch.tensor([row[i] for i in caps["image_id"].to_list()])
bundle = new_small_clip(captions, image_size=64, seed=0, vocab_size=1024, patch_size=8, width=64, layers=2, heads=4, max_text_length=24)
times = []
def progress(event):
    times.append((time.perf_counter(), event["step"]))
config = TrainConfig(epochs=8, batch_size=128, lr=1e-3, seed=0, captions_per_image=5, max_steps=steps, log_every_steps=1)
train_clip(bundle, images, captions, caption_image, config, "cpu", progress=progress)
(t0, _), (t1, _) = times[0], times[-1]
changes = governor.changes if governor is not None else []
print(f"PAIRS_PER_S {(len(times) - 1) * 128 / (t1 - t0):.1f} torch_threads={torch.get_num_threads()} changes={[t for _, t in changes]}")
"""


def run_config(work: Path, threads: int, steps: int, beside: bool, env_extra: dict[str, str]) -> float:
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if beside else None
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO), **env_extra}
        out = subprocess.run(
            [sys.executable, "-c", WORKER, str(work), str(threads), str(steps)],
            env=env, capture_output=True, text=True, check=True,
        ).stdout
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    line = out[out.index("PAIRS_PER_S"):].splitlines()[0]
    print(f"  {line}", flush=True)
    return float(line.split()[1])


# OMP_WAIT_POLICY="" leaves OpenMP at its own default (spin a while, then sleep); PASSIVE makes
# waiting threads sleep at once (an option for shared machines, not spur-assets' default: see RESULTS.md).
# threads=0 is what SPUR_THREADS unset gives: the cores this process may use, torch's share
# following the cores other processes leave free (core/runtime/threads.py, ThreadGovernor).
CONFIGS = {
    "solo, default (adaptive)": dict(threads=0, beside=False, env={"OMP_WAIT_POLICY": ""}),
    "solo, 2 threads fixed": dict(threads=2, beside=False, env={"OMP_WAIT_POLICY": ""}),
    "solo, 1 thread": dict(threads=1, beside=False, env={}),
    "beside 1, default (adaptive)": dict(threads=0, beside=True, env={"OMP_WAIT_POLICY": ""}),
    "beside 1, 2 threads fixed": dict(threads=2, beside=True, env={"OMP_WAIT_POLICY": ""}),
    "beside 1, 1 thread": dict(threads=1, beside=True, env={}),
}
PASSIVE = {
    "solo, 2 threads, PASSIVE": dict(threads=2, beside=False, env={"OMP_WAIT_POLICY": "PASSIVE"}),
    "beside 1, 2 threads, PASSIVE": dict(threads=2, beside=True, env={"OMP_WAIT_POLICY": "PASSIVE"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="")
    parser.add_argument("--with-passive", action="store_true", help="also OMP_WAIT_POLICY=PASSIVE with 2 fixed threads")
    args = parser.parse_args()
    configs = {**CONFIGS, **(PASSIVE if args.with_passive else {})}
    results: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        work = Path(tmp)
        run_config(work, 1, 3, False, {})  # generate the data once, warm the caches
        for repeat in range(args.repeats):
            for name, config in configs.items():
                value = run_config(work, config["threads"], args.steps, config["beside"], config["env"])
                results[name].append(value)
                print(f"repeat {repeat}: {name}: {value:.0f} pairs/s", flush=True)
    medians = {name: sorted(values)[len(values) // 2] for name, values in results.items()}
    solo = max(value for name, value in medians.items() if name.startswith("solo"))
    fair = 0.8 * solo / 2
    summary = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (affinity {len(os.sched_getaffinity(0))})",
        "steps": args.steps,
        "pairs_per_s": results,
        "median": medians,
        "fair_share_target": round(fair, 1),
        "ratio_to_best_solo": {name: round(value / solo, 3) for name, value in medians.items()},
        "meets_fair_share": {name: value >= fair for name, value in medians.items() if name.startswith("beside")},
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
