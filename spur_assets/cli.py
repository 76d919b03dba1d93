"""The `spur` console script: one-shot runs and lineage audits through the same definitions the UI uses."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path

BUILTIN_BATCH_PREVIEW = "preview"


def _prepare_environment(home: str | None) -> Path:
    """Fix SPUR_HOME and DAGSTER_HOME before Dagster or the definitions are imported."""
    if home:
        os.environ["SPUR_HOME"] = home
    spur_home = Path(os.environ.get("SPUR_HOME") or ".spur").expanduser().resolve()
    os.environ["SPUR_HOME"] = str(spur_home)
    # One Dagster instance for CLI runs and `dagster dev`, so the UI shows both.
    dagster_home = Path(os.environ.get("DAGSTER_HOME") or spur_home / "dagster").resolve()
    dagster_home.mkdir(parents=True, exist_ok=True)
    _write_instance_settings(dagster_home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    return spur_home


INSTANCE_SETTINGS = {
    # Machines running this are often offline; telemetry would only retry in vain.
    "telemetry": {"enabled": False},
    # The daemon fails runs stuck starting or canceling instead of leaving them in that state.
    "run_monitoring": {"enabled": True, "start_timeout_seconds": 180, "cancel_timeout_seconds": 60, "poll_interval_seconds": 30},
}


def _write_instance_settings(instance_yaml: Path) -> None:
    """Create DAGSTER_HOME/dagster.yaml, or add the sections spur-assets relies on to a user's own."""
    import yaml

    current = yaml.safe_load(instance_yaml.read_text()) if instance_yaml.exists() else None
    current = current if isinstance(current, dict) else {}
    missing = {key: value for key, value in INSTANCE_SETTINGS.items() if key not in current}
    if missing:
        staged = instance_yaml.with_name(f".{instance_yaml.name}.{os.getpid()}.tmp")
        staged.write_text(yaml.safe_dump({**current, **missing}, sort_keys=False))
        os.replace(staged, instance_yaml)


def load_definitions():
    """The Definitions `spur run` materializes: the package's, with settings read from the environment now."""
    from spur_assets.definitions import build_definitions

    return build_definitions()


def _resolve_batch(spur_home: Path, dataset: str | None, batch: str | None, replace: bool, allowed_roots) -> tuple[str, str]:
    """(batch id, manifest path or "") for this run. Nothing is registered here: raw_pairs registers on success."""
    from spur_assets.core.data.batches import BUILTIN_BATCH, batch_id_for_manifest, refuse_other_manifest, validate_batch_id
    from spur_assets.core.data.coco_ingest import read_manifest

    dataset = dataset or os.environ.get("SPUR_DATASET") or None
    try:
        if batch:
            validate_batch_id(batch)
    except ValueError as error:
        raise SystemExit(f"spur: error: --batch: {error}") from None
    if dataset is None:
        return batch or BUILTIN_BATCH, ""
    manifest = read_manifest(Path(dataset).expanduser().resolve(), allowed_roots)
    key = batch or batch_id_for_manifest(manifest.path, manifest.name)
    refuse_other_manifest(spur_home, key, manifest.path, replace)
    return key, str(manifest.path)


def cmd_run(args: argparse.Namespace) -> int:
    # SIGTERM stops a run the way Ctrl-C does (KeyboardInterrupt; Dagster maps it the same way inside a
    # step), so `kill PID`, a service manager or a container stop clean up instead of dying mid-write.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    spur_home = _prepare_environment(args.home)
    import dagster as dg

    from spur_assets.pipeline.ingest import batches

    from spur_assets.pipeline.resources import settings_from_environment

    if args.allow_root:
        roots = [str(Path(root).expanduser().resolve()) for root in args.allow_root]
        os.environ["SPUR_ALLOWED_ROOTS"] = os.pathsep.join(filter(None, [os.environ.get("SPUR_ALLOWED_ROOTS", ""), *roots]))
    defs = load_definitions()
    key, manifest = _resolve_batch(
        spur_home, args.dataset, args.batch, args.replace, settings_from_environment().allowed_root_paths
    )
    # Two `spur run` processes on a new DAGSTER_HOME would both create the SQLite schema
    # ("table runs already exists"); the first one to take the lock creates it.
    with _exclusive_lock(Path(os.environ["DAGSTER_HOME"]) / ".spur-instance.lock"):
        instance = dg.DagsterInstance.get()
        instance.get_runs(limit=1)
        _recover_from_dead_runs(instance, spur_home)
        if not instance.has_dynamic_partition(batches.name, key):
            instance.add_dynamic_partitions(batches.name, [key])

    assets = list(defs.assets or [])
    checks = list(defs.asset_checks or [])
    all_keys = {k for a in assets for k in a.keys}
    selected = all_keys
    if args.select:
        # comma-separated Dagster selections: "raw_pairs,spurious_features" or "*spurious_features"
        clauses = [c.strip() for c in args.select.split(",") if c.strip()]
        selected = set(dg.AssetSelection.from_coercible(clauses).resolve(assets))
    partitioned = {k for a in assets if a.partitions_def == batches for k in a.keys if k in selected}
    unpartitioned = selected - partitioned

    run_config = _read_run_config(args.config)
    if manifest or args.replace:
        ingest = run_config.setdefault("ops", {}).setdefault("raw_pairs", {}).setdefault("config", {})
        if manifest:
            ingest["manifest"] = manifest
        if args.replace:
            ingest["replace"] = True
    started = time.monotonic()
    from spur_assets.pipeline.ingest import raw_pairs

    # Per-batch assets other than raw_pairs read unpartitioned statistics: those run in between.
    per_batch = {k for k in partitioned if k != raw_pairs.key}
    statistics = (set(dg.AssetSelection.assets(*per_batch).upstream().resolve(assets)) & unpartitioned) if per_batch else set()
    for label, keys, partition_key in (
        (f"batch {key}", partitioned - per_batch, key),
        ("statistics", statistics, None),
        (f"batch {key} counterfactuals", per_batch, key),
        ("downstream assets", unpartitioned - statistics, None),
    ):
        if not keys:
            continue
        print(f"[spur] materializing {label}: {', '.join(sorted(k.to_user_string() for k in keys))}", flush=True)
        try:
            result = dg.materialize(
                [*assets, *checks],
                selection=sorted(keys, key=lambda k: k.to_user_string()),
                partition_key=partition_key,
                run_config=_run_config_for(run_config, keys),
                instance=instance,
                resources=defs.resources,
                raise_on_error=False,
                tags=_owner_tags(),
            )
        except KeyboardInterrupt:  # a signal outside a step (Dagster turns those inside into a failed step)
            return _stopped(instance, None)
        if _interrupted(result):
            return _stopped(instance, result.dagster_run)
        if not result.success:
            for line in _dataset_errors(result):
                print(f"spur: error: {line}", file=sys.stderr)
            print(f"[spur] run {result.run_id} failed; see the error above or the run in the UI", file=sys.stderr)
            return 1
    elapsed = time.monotonic() - started
    _print_where_results_are(spur_home, elapsed)
    return 0


def _owner_tags() -> dict[str, str]:
    """Tags naming the process that runs a `spur run` step, so a later start can tell if it died."""
    from spur_assets.pipeline.recovery import owner_tags

    return owner_tags()


def _recover_from_dead_runs(instance, spur_home: Path) -> None:
    """Mark runs whose process is gone as failed, and remove staging folders nobody writes (pipeline/recovery.py)."""
    from spur_assets.pipeline.recovery import fail_dead_runs

    for line in fail_dead_runs(instance, spur_home, "spur run"):
        print(f"[spur] {line}", file=sys.stderr)


def _interrupted(result) -> bool:
    """True if the run ended because this process was told to stop (SIGINT, or SIGTERM which Dagster maps to it)."""
    for event in result.all_events:
        data = event.event_specific_data
        error = getattr(data, "error", None)
        while error is not None:
            if error.cls_name in ("DagsterExecutionInterruptedError", "KeyboardInterrupt"):
                return True
            error = error.cause
    return False


def _stopped(instance, run) -> int:
    """Report a stopped run as CANCELED (not FAILURE: nothing went wrong) and say what was kept."""
    if run is not None:
        instance.report_run_canceled(run, "stopped by a signal (SIGTERM or SIGINT) to `spur run`")
    print(
        f"[spur] stopped{f'; run {run.run_id} marked CANCELED' if run is not None else ''}. Nothing half-written "
        "was kept; what was stored before is unchanged, and a training step resumes from its last epoch "
        "next time.", file=sys.stderr,
    )
    return 130


def _dataset_errors(result) -> list[str]:
    """The DatasetError messages of a failed run's steps (one line each: file, record, field, what to do)."""
    lines = []
    for event in result.all_events:
        if not event.is_step_failure or event.step_failure_data is None:
            continue
        error = event.step_failure_data.error
        while error is not None:
            if error.cls_name == "DatasetError":
                message = error.message.strip().removeprefix("spur_assets.core.data.errors.DatasetError: ")
                lines.append(" ".join(message.split()))
                break
            error = error.cause
    return lines


@contextlib.contextmanager
def _exclusive_lock(path: Path):
    """An advisory lock held across processes (flock) for the with-block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_run_config(path: str | None) -> dict:
    """Run config from a YAML file shaped like the launchpad's ({ops: {asset: {config: ...}}, resources: ...})."""
    if not path:
        return {}
    import yaml

    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise SystemExit(f"{path}: run config must be a mapping with 'ops' and/or 'resources'")
    return loaded


def _run_config_for(run_config: dict, keys) -> dict:
    """The part of ``run_config`` that applies to the assets in this materialization."""
    names = {k.to_user_string() for k in keys}
    selected = {**run_config}
    if "ops" in run_config:
        selected["ops"] = {name: cfg for name, cfg in run_config["ops"].items() if name in names}
    return selected


def _print_where_results_are(spur_home: Path, elapsed: float) -> None:
    from spur_assets.core.records.lineage import LineageStore

    store = LineageStore(spur_home)
    summary = store.query("materializations_by_asset")
    print(f"[spur] done in {elapsed:.0f} s. Everything is under {spur_home}")
    for row in summary.iter_rows(named=True):
        part = f"[{row['partition']}]" if row["partition"] else ""
        print(f"  {row['asset']}{part}: {row['materializations']} materialization(s), latest {row['latest_materialization_id']}")
    report = spur_home / "reports" / "latest" / "report.json"
    if report.is_file():
        print(f"[spur] report: {report}")
        for sibling in ("report.md", "report.html"):
            if (report.parent / sibling).is_file():
                print(f"[spur] report ({sibling.split('.')[-1]}): {report.parent / sibling}")
    else:
        print("[spur] no metric report yet (metric_report is not part of this run)")
    print(f"[spur] lineage: {store.db_path}  (try: spur lineage ancestry raw_pairs)")
    dagster = Path(sys.executable).with_name("dagster")
    print(f"[spur] UI: DAGSTER_HOME={os.environ['DAGSTER_HOME']} {dagster} dev -m spur_assets.definitions")


def cmd_lineage(args: argparse.Namespace) -> int:
    spur_home = _prepare_environment(args.home)
    import polars as pl

    from spur_assets.core.records.lineage import LineageStore

    store = LineageStore(spur_home)
    pl.Config.set_tbl_rows(200)
    pl.Config.set_tbl_width_chars(200)
    pl.Config.set_fmt_str_lengths(40)
    if args.lineage_command == "sync":
        print(f"applied {store.sync()} pending lineage entries to {store.db_path}")
        return 0
    if args.lineage_command == "materializations":
        print(store.query("materializations_by_asset"))
        return 0
    if args.lineage_command in ("ancestry", "inputs"):
        materialization_id = _resolve_materialization(store, args.target, args.partition)
        if materialization_id is None:
            print(f"no materialization {args.target!r} (asset name or materialization id) in {store.db_path}; "
                  "see `spur lineage materializations`", file=sys.stderr)
            return 1
        if args.lineage_command == "inputs":
            return _print_inputs(store, materialization_id, args.json)
        chain = store.ancestry(materialization_id)
        if args.json:
            print(json.dumps(chain.to_dicts(), default=str, indent=1))
        elif args.mermaid:
            from spur_assets.core.records.lineage_graph import ancestry_mermaid

            print(ancestry_mermaid(chain), end="")
        else:
            print(chain.select("depth", "asset", "partition", "materialization_id", "data_version", "run_id", "ended_at"))
        if args.png:
            from spur_assets.core.records.lineage_graph import render_ancestry_png

            target = chain.row(0, named=True)
            title = f"ancestry of {target['asset']} {materialization_id[:12]}"
            print(f"drawing: {render_ancestry_png(chain, Path(args.png), title)}", file=sys.stderr)
        return 0
    raise AssertionError(args.lineage_command)


def _resolve_materialization(store, target: str, partition: str | None) -> str | None:
    """A materialization id from an asset name (its latest materialization) or an id; None if neither."""
    latest = store.latest(target, partition)
    if latest:
        return latest["materialization_id"]
    found = store.query("materialization_by_id", {"materialization_id": target})
    return target if found.height else None


def _print_inputs(store, materialization_id: str, as_json: bool) -> int:
    """The batches and counterfactual sets in a materialization's ancestry."""
    rows = store.query("batches_and_counterfactuals_of_checkpoint", {"materialization_id": materialization_id})
    if as_json:
        print(json.dumps(rows.to_dicts(), default=str, indent=1))
        return 0
    batches = rows.filter(rows["asset"] == "raw_pairs")
    counterfactuals = rows.filter(rows["asset"] == "synthetic_counterfactuals")
    print(f"materialization {materialization_id} was built from")
    print(f"  {batches.height} batch(es):")
    for row in batches.iter_rows(named=True):
        print(f"    {row['batch']:<24} raw_pairs {row['materialization_id']}  {row['rows']:>8} rows  {row['ended_at']}")
    print(f"  {counterfactuals.height} counterfactual set(s):")
    for row in counterfactuals.iter_rows(named=True):
        print(f"    synthetic_counterfactuals {row['materialization_id']}  {row['rows']:>8} rows  {row['ended_at']}")
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    from spur_assets.core.data.builtin_dataset import BuiltinDatasetSpec, generate_builtin_dataset
    from spur_assets.core.data.coco_ingest import load_batch
    from spur_assets.core.data.contact_sheet import draw_contact_sheet

    spec = BuiltinDatasetSpec(seed=args.seed, n_train=args.n_train, n_test=args.n_test, image_size=args.image_size)
    started = time.monotonic()
    manifest = generate_builtin_dataset(Path(args.out), spec, workers=args.workers)
    tables = load_batch(manifest, BUILTIN_BATCH_PREVIEW, workers=args.workers)
    sheet = draw_contact_sheet(tables, "train", Path(args.out) / "contact_sheet.png", title=manifest.parent.name)
    print(f"wrote {manifest} in {time.monotonic() - started:.1f} s; contact sheet: {sheet}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spur", description=__doc__)
    parser.add_argument("--home", help="SPUR_HOME (default: $SPUR_HOME or ./.spur)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="materialize the asset graph for one batch and print where the results are")
    run.add_argument("--dataset", help="a dataset.yaml (default: $SPUR_DATASET, else the built-in dataset)")
    run.add_argument("--batch", help="batch id (partition key); default: the manifest's name, or 'builtin'")
    run.add_argument("--select", help="comma-separated asset selections, e.g. 'raw_pairs,spurious_features' or '*spurious_features'")
    run.add_argument("--config", help="YAML run config, as in the launchpad: {ops: {raw_pairs: {config: {...}}}}")
    run.add_argument(
        "--replace", action="store_true",
        help="replace a batch id that already holds other data (the earlier version stays in lineage)",
    )
    run.add_argument(
        "--allow-root", action="append", default=[], metavar="DIR",
        help="a folder the dataset may read from besides its own (e.g. a shared COCO copy); repeatable; "
        "adds to $SPUR_ALLOWED_ROOTS",
    )
    run.set_defaults(func=cmd_run)

    lineage = sub.add_parser("lineage", help="audit lineage stored in SPUR_HOME/lineage.duckdb")
    lineage_sub = lineage.add_subparsers(dest="lineage_command", required=True)
    ancestry = lineage_sub.add_parser("ancestry", help="upstream chain of an asset's latest materialization, or of a materialization id")
    ancestry.add_argument("target", help="asset name (latest materialization) or materialization id")
    ancestry.add_argument("--partition", help="partition of the asset (e.g. a batch id)")
    ancestry.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ancestry.add_argument("--mermaid", action="store_true", help="print a Mermaid flowchart instead of a table")
    ancestry.add_argument("--png", help="also draw the chain into this PNG file (needs Graphviz's dot)")
    inputs = lineage_sub.add_parser(
        "inputs", help="which batches and which counterfactual sets went into a checkpoint (or any materialization)"
    )
    inputs.add_argument("target", help="asset name (latest materialization), e.g. finetuned_checkpoint, or a materialization id")
    inputs.add_argument("--partition", help="partition of the asset")
    inputs.add_argument("--json", action="store_true", help="print JSON instead of text")
    lineage_sub.add_parser("materializations", help="materializations per asset and partition")
    lineage_sub.add_parser("sync", help="apply journalled lineage rows that a locked database held back")
    lineage.set_defaults(func=cmd_lineage)

    dataset = sub.add_parser("dataset", help="write the built-in dataset to a folder (COCO layout + dataset.yaml)")
    dataset.add_argument("out")
    dataset.add_argument("--seed", type=int, default=0)
    dataset.add_argument("--n-train", type=int, default=None)
    dataset.add_argument("--n-test", type=int, default=None)
    dataset.add_argument("--image-size", type=int, default=None)
    dataset.add_argument("--workers", type=int, default=1)
    dataset.set_defaults(func=cmd_dataset)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "dataset":
        from spur_assets.core.data.builtin_dataset import BuiltinDatasetSpec

        defaults = BuiltinDatasetSpec()
        args.n_train = args.n_train or defaults.n_train
        args.n_test = args.n_test or defaults.n_test
        args.image_size = args.image_size or defaults.image_size
    from spur_assets.core.data.errors import DatasetError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("[spur] stopped", file=sys.stderr)
        return 130
    except DatasetError as error:
        # Bad input is the user's to fix: one readable line (file, record, field, what to do), no traceback.
        print(f"spur: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
