"""Benchmark: a batch's READY to its report, unattended, against `spur run` on the same data.

Issue #15's question: when a batch lands in the inbox and nobody clicks, how long until a
report that read it exists, and how much of that is the automation (sensor ticks, run
launches, process starts) rather than the work? Per condition, in one invocation:

- `spur run --dataset BATCH` on a fresh SPUR_HOME: the work itself, in one process.
- `dagster dev` (webserver + daemon, as a user starts it) on another fresh SPUR_HOME; once
  the workspace is served, the batch is copied into the inbox and READY written last; the
  clock stops when the lineage store holds a metric_report whose ancestry names the batch.
  Each executor in `--executors` gets its own `dagster dev` (SPUR_EXECUTOR).

"Beside" runs one `while True: pass` process through the whole condition. Both paths run the
assets' default configs on a built-in batch of `--train`/`--test` images.

    .venv/bin/python bench/benchmarks/bench_latency.py [--train 160] [--test 60] [--executors in_process,multiprocess]
        [--conditions quiet,beside] [--out bench/benchmarks/LATENCY.json]

Target (#15): READY -> report <= 1.3 x spur run + 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from spur_assets.core.data.builtin_dataset import BuiltinDatasetSpec, generate_builtin_dataset  # noqa: E402
from spur_assets.core.data.inbox import READY_MARKER  # noqa: E402
from spur_assets.core.records.lineage import LineageStore  # noqa: E402

BIN = Path(sys.executable).parent
BATCH = "latency-batch"


def _environment(root: Path, executor: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPUR_", "DAGSTER_"))}
    env.update(
        SPUR_HOME=str(root / "home"), SPUR_INBOX=str(root / "inbox"), DAGSTER_HOME=str(root / "dagster"),
        SPUR_DEVICE="cpu", SPUR_EXECUTOR=executor,
    )
    for name in ("home", "inbox", "dagster"):
        (root / name).mkdir(parents=True)
    return env


def spur_run_seconds(root: Path, batch: Path) -> float:
    env = _environment(root, "in_process")
    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "spur"), "run", "--dataset", str(batch / "dataset.yaml")],
        cwd=root, env=env, capture_output=True, text=True, timeout=3600,
    )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"spur run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["data"]


def _report_names_batch(store: LineageStore) -> bool:
    latest = store.latest("metric_report")
    if latest is None:
        return False
    chain = store.ancestry(latest["materialization_id"])
    return BATCH in set(chain.filter(chain["asset"] == "raw_pairs")["partition"].to_list())


RUNS = """{ runsOrError { ... on Runs { results { status creationTime startTime endTime
  assetSelection { path } tags { key value } } } } }"""


def _runs_summary(url: str, ready_at: float) -> dict:
    """The runs the automation launched: what each did and when, in seconds after READY."""
    runs = sorted(_graphql(url, RUNS)["runsOrError"]["results"], key=lambda r: r["creationTime"])
    rows = []
    for run in runs:
        rows.append({
            "assets": sorted("/".join(a["path"]) for a in run["assetSelection"] or []),
            "partition": next((t["value"] for t in run["tags"] if t["key"] == "dagster/partition"), None),
            "created_s": round(run["creationTime"] - ready_at, 1),
            "started_s": round((run["startTime"] or run["creationTime"]) - ready_at, 1),
            "ended_s": round((run["endTime"] or time.time()) - ready_at, 1),
            "status": run["status"],
        })
    in_runs = sum(r["ended_s"] - r["started_s"] for r in rows)
    return {"runs": len(rows), "seconds_inside_runs": round(in_runs, 1), "run_log": rows}


def ready_to_report_seconds(root: Path, batch: Path, executor: str, timeout_s: float) -> dict[str, float]:
    env = _environment(root, executor)
    (root / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "dagster-dev.log", "w")
    server = subprocess.Popen(
        [str(BIN / "dagster"), "dev", "-w", "workspace.yaml", "-p", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dagster dev did not serve the workspace: {(root / 'dagster-dev.log').read_text()[-3000:]}")
            try:
                entries = _graphql(url, "{ workspaceOrError { ... on Workspace { locationEntries { "
                                        "locationOrLoadError { __typename } } } } }")["workspaceOrError"]["locationEntries"]
                if entries and (entries[0]["locationOrLoadError"] or {}).get("__typename") == "RepositoryLocation":
                    break
            except OSError:
                pass
            time.sleep(1)
        time.sleep(10)  # the daemon's first sensor ticks
        target = root / "inbox" / BATCH
        shutil.copytree(batch, target)
        dropped = time.monotonic()
        (target / READY_MARKER).write_text("")
        store = LineageStore(root / "home")
        taken = None
        while time.monotonic() - dropped < timeout_s:
            if taken is None and store.latest("raw_pairs", BATCH) is not None:
                taken = time.monotonic() - dropped
            if _report_names_batch(store):
                finished = time.monotonic() - dropped
                return {"ready_to_report_s": finished, "ready_to_raw_pairs_s": taken, **_runs_summary(url, time.time() - finished)}
            failed = _graphql(url, "{ runsOrError(filter: {statuses: [FAILURE]}) { ... on Runs { results { runId } } } }")
            if failed["runsOrError"]["results"]:
                raise RuntimeError(f"a run failed: {(root / 'dagster-dev.log').read_text()[-3000:]}")
            time.sleep(2)
        raise RuntimeError(f"no report naming {BATCH} within {timeout_s} s")
    finally:
        try:
            os.killpg(server.pid, signal.SIGINT)
            server.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--test", type=int, default=60)
    parser.add_argument("--executors", default="in_process,multiprocess")
    parser.add_argument("--conditions", default="quiet,beside")
    parser.add_argument("--timeout", type=float, default=2400)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        work = Path(tmp)
        generate_builtin_dataset(work / "batch", BuiltinDatasetSpec(seed=12, n_train=args.train, n_test=args.test))
        for condition in args.conditions.split(","):
            competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "beside" else None
            try:
                row: dict[str, float | dict] = {"load_before": os.getloadavg()[0]}
                row["spur_run_s"] = round(spur_run_seconds(work / f"{condition}-spur-run", work / "batch"), 1)
                print(f"{condition}: spur run {row['spur_run_s']} s", flush=True)
                for executor in args.executors.split(","):
                    measured = ready_to_report_seconds(work / f"{condition}-{executor}", work / "batch", executor, args.timeout)
                    measured = {k: round(v, 1) if isinstance(v, float) else v for k, v in measured.items()}
                    for run in measured["run_log"]:
                        print(f"  {run}", flush=True)
                    row[executor] = {**measured, "ratio_to_spur_run": round(measured["ready_to_report_s"] / row["spur_run_s"], 2),
                                     "meets_target": measured["ready_to_report_s"] <= 1.3 * row["spur_run_s"] + 30}
                    print(f"{condition}: {executor}: {row[executor]}", flush=True)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
            results[condition] = row
    summary = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (affinity {len(os.sched_getaffinity(0))})",
        "batch": {"train": args.train, "test": args.test},
        "target": "ready_to_report_s <= 1.3 x spur_run_s + 30",
        "results": results,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
