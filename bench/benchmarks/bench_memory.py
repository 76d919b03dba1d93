"""Peak memory flat in the number of images: base_checkpoint, finetuned_checkpoint, control_checkpoint
and metric_report at 2k, 8k and 32k train images of the built-in data (64 px), each through `spur run`.

    .venv/bin/python bench/benchmarks/bench_memory.py                      # 2000,8000,32000 train images
    .venv/bin/python bench/benchmarks/bench_memory.py --sizes 500,2000     # a quick look

Each size gets its own SPUR_HOME: the built-in data with N train and N/8 test images, base and
fine-tune trained one epoch on one caption per image (the memory question does not need the
demo's eight epochs; the control repeats the fine-tune's steps). Training splits whose pixels fit in
`in_memory_mb` (256 MiB by default) are decoded once into memory; at 64 px that is every size up to
about 21k images, so the 32k figures are streamed and the 2k ones in memory. The upstream assets run first; then each of the three measured assets runs
in a process of its own (`spur run --select ASSET`), as Dagster's multiprocess executor runs
every step in the UI and under the daemon. Every materialization records its step's peak
resident set (`peak_rss_mb`: Linux's VmHWM, reset when the step starts; it includes what the
process holds anyway: Python, Dagster, torch) and the largest finished child's
(`peak_rss_largest_child_mb`: the image-decoding workers). The script reads them back from the
Dagster instance with the step's wall time and writes a Markdown table (stdout, and --out).
metric_report runs with an empty embedding cache, so it embeds every eval image and caption.
Target (issue "Real scale"): the 32k figure within 1.2x of the 2k figure for each of the three.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
ASSETS = ("base_checkpoint", "finetuned_checkpoint", "control_checkpoint", "metric_report")
TARGET = 1.2


def run_size(n_train: int, work: Path, threads: int) -> dict:
    """The three assets at n_train images, each in its own `spur run` process, as Dagster's
    multiprocess executor runs steps; {asset: {peak_rss_mb, peak_rss_largest_child_mb, seconds}}.

    The upstream assets (ingestion, statistics, counterfactuals) run first in one process and
    are reused when the SPUR_HOME already has them.
    """
    home = work / f"n{n_train}"
    config = {
        "ops": {
            "raw_pairs": {"config": {"builtin_n_train": n_train, "builtin_n_test": max(200, n_train // 8)}},
            "base_checkpoint": {"config": {"epochs": 1, "captions_per_image": 1}},
            "finetuned_checkpoint": {"config": {"epochs": 1, "captions_per_image": 1}},
        }
    }
    home.mkdir(parents=True, exist_ok=True)
    config_path = home / "run-config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "SPUR_HOME": str(home)}
    env.pop("DAGSTER_HOME", None)
    started = time.monotonic()
    selections = list(ASSETS)
    if not (home / "lineage.duckdb").exists():
        selections.insert(0, "raw_pairs,spurious_features,batch_counterfactuals,synthetic_counterfactuals")
    for selection in selections:
        if selection == "metric_report":
            # Cold: a retrained checkpoint is often bit-identical to the last run's, and then
            # every embedding would come from the cache and nothing be embedded.
            shutil.rmtree(home / "cache" / "embeddings", ignore_errors=True)
        done = subprocess.run(
            [sys.executable, "-m", "spur_assets.cli", "run", "--config", str(config_path), "--select", selection],
            cwd=REPO, env=env, capture_output=True, text=True,
        )
        with open(home / "spur-run.log", "a") as log:
            log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise SystemExit(f"spur run --select {selection} at {n_train} images failed (rc {done.returncode}); see {home / 'spur-run.log'}")
    return {"wall_s": time.monotonic() - started, **read_peaks(home / "dagster")}


def read_peaks(dagster_home: Path) -> dict:
    """The latest materialization's memory and time metadata of each asset in ASSETS."""
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(dagster_home)
    with dg.DagsterInstance.get() as instance:
        out = {}
        for asset in ASSETS:
            event = instance.get_latest_materialization_event(dg.AssetKey(asset))
            metadata = event.asset_materialization.metadata
            out[asset] = {key: metadata[key].value for key in ("peak_rss_mb", "peak_rss_largest_child_mb", "seconds")}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2000,8000,32000", help="train images per run (test = N/8)")
    parser.add_argument("--work", default=".spur/bench/memory", help="where the SPUR_HOMEs go")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (OMP_NUM_THREADS) per process")
    parser.add_argument("--out", help="also write the Markdown here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    for n in sizes:
        print(f"[bench_memory] {n} train images ...", file=sys.stderr, flush=True)
        results[n] = run_size(n, Path(args.work).resolve(), args.threads)
        print(f"[bench_memory] {n}: {results[n]}", file=sys.stderr, flush=True)
    smallest, largest = sizes[0], sizes[-1]
    lines = [
        f"Peak resident memory per asset process (MiB), built-in data at 64 px, `bench/benchmarks/bench_memory.py --sizes {args.sizes}`, "
        f"{args.threads} torch thread(s), load average at end {os.getloadavg()[0]:.2f}.",
        "",
        "| asset | " + " | ".join(f"{n:,} train" for n in sizes) + f" | {largest:,} / {smallest:,} | target | largest child process (decoding workers) | step seconds |",
        "|---|" + "---|" * len(sizes) + "---|---|---|---|",
    ]
    for asset in ASSETS:
        peaks = [results[n][asset]["peak_rss_mb"] for n in sizes]
        ratio = peaks[-1] / peaks[0]
        children = " / ".join(f"{results[n][asset]['peak_rss_largest_child_mb']:.0f}" for n in sizes)
        seconds = " / ".join(f"{results[n][asset]['seconds']:.0f}" for n in sizes)
        lines.append(
            f"| {asset} | " + " | ".join(f"{p:,.0f}" for p in peaks)
            + f" | {ratio:.2f}x | <= {TARGET}x {'met' if ratio <= TARGET else '**missed**'} | {children} | {seconds} |"
        )
    lines.append("")
    lines.append("Wall time of the runs per size: " + ", ".join(f"{n:,}: {results[n]['wall_s']:.0f} s" for n in sizes) + ".")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
