"""Benchmark 6: the whole demo, `bash scripts/demo.sh`, and the share of its wall time outside the science core.

Runs the README's command with SPUR_HOME in a fresh temporary folder (the venv is already
set up, so scripts/setup.sh only checks its stamp) and `bench/benchmarks/demo_probe` on PYTHONPATH:
its `sitecustomize` times every call the Dagster layer makes into `spur_assets.core`
(and the artifact/lineage methods) inside the `spur` process without changing any
pipeline code. Three sources, one run:

- wall time, measured here around the command;
- per-asset start/end from `SPUR_HOME/lineage.duckdb` (`materializations`), which bound
  each asset body's `recorded_materialization` block;
- the probe's timed calls, by category: core science (training, inpainting, metrics,
  ingest, co-occurrence, ...), core figures and report (plots, contact sheet, report
  writer), artifact I/O (Parquet reads and writes, commits with sha256) and lineage
  (journal + DuckDB).

Outside the science core = wall - core science: shell and setup check, interpreter and
Dagster start-up, definitions, run orchestration and event log, the pipeline layer,
figures, artifact I/O and lineage. At scale "tiny" (the smoke test) only raw_pairs and
spurious_features run, on a small built-in dataset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timezone
from pathlib import Path

from bench.benchmarks.harness import REPO_ROOT, Figure, Section

PROBE_DIR = REPO_ROOT / "bench" / "benchmarks" / "demo_probe"
# What to do about each asset if it is the slowest stage (the figures cited are in the sections above).
PLANS = {
    "base_checkpoint": (
        "It is `train_clip` itself (the core time inside the block is nearly all of it): 16 epochs x 10,000 "
        "pairs of from-scratch training. Plan: (1) let the operator set torch's intra-op threads (a `threads` "
        "field on the `settings` resource applied with `torch.set_num_threads`): section 3's thread row shows "
        "what the default two threads gain or lose at the machine's load of the moment, and on a shared, "
        "loaded CPU one thread avoids OpenMP's spin-waiting; (2) on a GPU the same code runs with bf16 "
        "autocast (bench/benchmarks/gpu.py measures "
        "the step there); (3) section 3 compares the step with a minimal loop: as far as it is close, there "
        "is no wrapper overhead to remove, and fewer epochs or early stopping on a held-out R@5 are the "
        "remaining CPU levers."
    ),
    "finetuned_checkpoint": (
        "It is `train_clip` (4 epochs over originals + removal edits with hard negatives). Same plan as for "
        "base_checkpoint: one intra-op thread on a shared CPU, the GPU otherwise (section 3 for the step's "
        "overhead)."
    ),
    "synthetic_counterfactuals": (
        "Inpainting is the small part; PNG encoding at zlib level 6 dominates (section 4). Fix: "
        "`compress_level=1` in `counterfactuals.save_png`."
    ),
    "metric_report": "Image decoding on one thread (section 2). Fix: pass `workers` through and prefetch decoding.",
    "raw_pairs": "Generating and validating the built-in dataset; `workers` already spreads image decoding.",
}
TINY_CONFIG = """ops:
  raw_pairs:
    config:
      builtin_n_train: 60
      builtin_n_test: 20
"""


def run_demo(home: Path, extra_args: list[str], probe_out: Path, timeout_s: float = 5400) -> dict:
    """Run `bash scripts/demo.sh EXTRA_ARGS` with SPUR_HOME=home and the probe; wall seconds and output tail."""
    env = {
        **os.environ,
        "SPUR_HOME": str(home),
        "SPUR_BENCH_PROBE_OUT": str(probe_out),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROBE_DIR), os.environ.get("PYTHONPATH", "")])),
    }
    env.pop("DAGSTER_HOME", None)  # the CLI puts Dagster's instance under SPUR_HOME
    launched = time.time()
    started = time.perf_counter()
    done = subprocess.run(
        ["bash", "scripts/demo.sh", *extra_args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"bash scripts/demo.sh {' '.join(extra_args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return {"wall_s": wall, "launched": launched, "stdout_head": done.stdout[:2000], "stdout_tail": done.stdout[-2000:]}


def materialization_intervals(home: Path) -> list[dict]:
    """Asset, partition, start and end (epoch seconds) of the latest materialization of every asset in lineage.duckdb."""
    from spur_assets.core.records.lineage import LineageStore

    store = LineageStore(home)
    rows = []
    for row in store.query("materializations_by_asset").iter_rows(named=True):
        latest = store.latest(row["asset"], row["partition"])
        start = latest["started_at"].replace(tzinfo=timezone.utc).timestamp()
        end = latest["ended_at"].replace(tzinfo=timezone.utc).timestamp()
        rows.append({"asset": row["asset"], "partition": row["partition"], "start": start, "end": end, "seconds": end - start})
    return sorted(rows, key=lambda r: r["start"])


def breakdown(wall_s: float, launched: float, probe: dict, intervals: list[dict]) -> dict:
    """Seconds per part of the demo's wall time, from the probe's calls and the lineage intervals."""
    by_category: dict[str, float] = {}
    for call in probe["calls"]:
        by_category[call["category"]] = by_category.get(call["category"], 0.0) + call["seconds"]
    first_start = min((r["start"] for r in intervals), default=probe["process_end"])
    first_call = min((c["start"] for c in probe["calls"]), default=first_start)
    per_asset = []
    for row in intervals:
        inside = [c for c in probe["calls"] if row["start"] <= c["start"] < row["end"]]
        core = sum(c["seconds"] for c in inside if c["category"] == "core: science")
        top = max((c for c in inside if c["category"] == "core: science"), key=lambda c: c["seconds"], default=None)
        per_asset.append({
            **row,
            "core_s": core,
            "largest_call": f"{top['name'].rsplit('.', 1)[-1]} {top['seconds']:.1f} s" if top else "",
        })
    parts = {
        "shell + setup.sh stamp check + interpreter start": probe["process_start"] - launched,
        "imports, definitions, Dagster instance, run launch (until the first core call)": min(first_call, first_start) - probe["process_start"],
        **by_category,
    }
    parts["Dagster orchestration, pipeline layer, exit (the rest)"] = wall_s - sum(parts.values())
    return {
        "parts": parts,
        "core_s": by_category.get("core: science", 0.0),
        "materialized_s": sum(r["seconds"] for r in intervals),
        "per_asset": per_asset,
    }


def run(scale: str = "full", reps: int = 1, device: str = "cpu", log=print) -> Section:
    """One demo run (a repeat costs the whole demo again; see RESULTS.md), then the breakdown."""
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        home = Path(tmp) / "spur-home"
        probe_out = Path(tmp) / "probe.json"
        extra: list[str] = []
        if scale == "tiny":
            config = Path(tmp) / "tiny.yaml"
            config.write_text(TINY_CONFIG)
            extra = ["--select", "raw_pairs,spurious_features", "--config", str(config)]
        log(f"  bash scripts/demo.sh {' '.join(extra)} (SPUR_HOME={home})")
        result = run_demo(home, extra, probe_out)
        probe = json.loads(probe_out.read_text())
        intervals = materialization_intervals(home)
    parts = breakdown(result["wall_s"], result["launched"], probe, intervals)
    wall, core = result["wall_s"], parts["core_s"]
    slowest = max(parts["per_asset"], key=lambda r: r["seconds"])
    figures = [
        Figure(
            "`bash scripts/demo.sh`" + (" (tiny: raw_pairs + spurious_features)" if scale == "tiny" else ""),
            f"{wall:.0f} s wall",
            f"science core {core:.0f} s",
            f"{1 - core / wall:.0%} outside the core",
            "",
            None,
            f"sum of materialization blocks {parts['materialized_s']:.0f} s; one run",
        ),
    ]
    for name, seconds in parts["parts"].items():
        figures.append(Figure(f"part: {name}", f"{seconds:.1f} s", "", f"{seconds / wall:.1%} of wall", "", None, ""))
    lines = ["| asset | materialization s | core inside s | largest core call |", "|---|---|---|---|"]
    for row in parts["per_asset"]:
        label = row["asset"] + (f"[{row['partition']}]" if row["partition"] else "")
        lines.append(f"| {label} | {row['seconds']:.1f} | {row['core_s']:.1f} | {row['largest_call']} |")
    notes = [
        "**Method.** Wall time is measured around `bash scripts/demo.sh` (with SPUR_HOME a fresh temporary "
        "folder; the venv exists, so the setup script only compares its stamp). The science-core time is the "
        "sum of the probe's timed calls from the Dagster layer into `spur_assets.core` (outermost calls only; "
        "spawned inpainting workers run inside such a call). Figures/report, artifact I/O and lineage are "
        "core modules too, but are counted outside the science core. 'The rest' is what no probe sees: "
        "Dagster's run and step machinery, event-log writes, the IO manager, asset checks, metadata and the "
        "pipeline layer's own code.",
        "Per asset (lineage.duckdb start/end of each `recorded_materialization` block; core calls made before "
        "the block opens, such as `assemble_finetune_set`, fall outside it):",
        "\n".join(lines),
        f"**Slowest stage: {slowest['asset']}** ({slowest['seconds']:.0f} s, {slowest['seconds'] / wall:.0%} of the "
        f"demo's wall time; core calls inside it {slowest['core_s']:.0f} s). "
        + PLANS.get(slowest["asset"], ""),
    ]
    if "[setup] installing" in result["stdout_tail"] or "[setup] installing" in result.get("stdout_head", ""):
        notes.append(
            "**Note.** The setup script reinstalled the pinned dependencies in this run (pyproject.toml or "
            "constraints.txt had changed since the venv's stamp), which is inside the first part's time."
        )
    raw = {"wall_s": wall, "parts": parts, "stdout_tail": result["stdout_tail"], "probe_calls": len(probe["calls"])}
    return Section(6, "Whole demo: wall time and the share outside the science core", figures, notes, raw)


if __name__ == "__main__":
    section = run(scale=sys.argv[1] if len(sys.argv) > 1 else "full")
    from bench.benchmarks.harness import render_section

    print(render_section(section))
