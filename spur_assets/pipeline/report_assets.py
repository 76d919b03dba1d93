"""`metric_report`: checkpoints scored on the same counterfactual eval set."""

import os
from pathlib import Path

import dagster as dg
import polars as pl

from spur_assets.core.records.artifacts import ArtifactRef
from spur_assets.core.model.clip_model import load_checkpoint
from spur_assets.core.runtime.devices import resolve_device
from spur_assets.core.model.embedding_cache import EmbeddingCache
from spur_assets.core.metrics.evaluation import EvalSet, evaluate_checkpoints
from spur_assets.core.metrics.report import write_report
from spur_assets.pipeline.ingest import ALL_BATCHES, batches_split
from spur_assets.pipeline.model_assets import control_enabled
from spur_assets.pipeline.recording import recorded_materialization, upstream_refs
from spur_assets.pipeline.resources import SpurSettings
from spur_assets.pipeline.ui_metadata import markdown_image, markdown_table


class MetricReportConfig(dg.Config):
    k: int = 10
    batch_size: int = 256
    n_examples: int = 3
    # Image decoding processes beside the embedding loop (0 = decode on the embedding thread).
    workers: int = 1
    # Reuse each image's (by file sha256) and caption's embedding under a checkpoint from earlier
    # reports (SPUR_HOME/cache/embeddings); entries are keyed by content, never expire by time.
    embedding_cache: bool = True
    # Further models scored beside base, control and fine-tuned on the same eval set: save_pretrained
    # folders (or hub ids already in the local cache), as "name=path" or a bare path (named after
    # its folder). E.g. two pretrained CLIPs compared on your data.
    extra_models: list[str] = []
    # Paired bootstrap resamples for the confidence intervals of the gains (over eval queries, by pair).
    bootstrap_resamples: int = 2000


def embedding_cache_for(settings: SpurSettings, checkpoint: ArtifactRef, bundle, device) -> EmbeddingCache:
    """The embedding cache of one checkpoint on this kind of device.

    Keyed by the checkpoint folder's sha256 (its data version: weights, tokenizer, processor),
    the preprocessing that turns files into pixels, and the arithmetic the embeddings come from
    (bf16 autocast on CUDA, float32 elsewhere), so a cached row always equals a fresh one.
    """
    from spur_assets.core.runtime.devices import autocast_for
    from spur_assets.core.data.preprocessing import ImagePreprocessing

    arithmetic = "bf16" if type(autocast_for(device)).__name__ == "autocast" else "fp32"
    key = "/".join((
        checkpoint.output("checkpoint").sha256,
        ImagePreprocessing.of(bundle.image_processor).fingerprint(),
        arithmetic,
        EMBEDDING_FORMAT,
    ))
    return EmbeddingCache(settings.home_path / "cache" / "embeddings", key)


# Bump when the embedding code changes what it computes for the same checkpoint and file.
EMBEDDING_FORMAT = "embed/1"


def publish_latest(home: Path, report_dir: Path) -> Path:
    """Point SPUR_HOME/reports/latest at ``report_dir`` (atomic symlink swap)."""
    reports = home / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    latest = reports / "latest"
    staged = reports / f".latest-{os.getpid()}"
    if staged.is_symlink() or staged.exists():
        staged.unlink()
    staged.symlink_to(report_dir, target_is_directory=True)
    if latest.exists() and not latest.is_symlink():
        raise FileExistsError(f"{latest} is a real folder, not the link spur-assets keeps; move it away")
    os.replace(staged, latest)
    return latest


@dg.asset(
    group_name="report",
    kinds={"pytorch", "html"},
    code_version="1",
    io_manager_key="refs",
    pool="accelerator",
    ins=ALL_BATCHES,
    description=(
        "Every checkpoint scored on the same eval set: Recall@1/5/10 both directions (COCO protocol), "
        "ODmAP@k image->text and text->image, HR@k with natural and anchor-only rates (k = config.k, 10 by default; "
        "metadata keys end in _<k>), Delta_ctrl, per "
        "pair, for base_checkpoint, control_checkpoint, finetuned_checkpoint and any extra models side by side, with "
        "the fine-tune's gains over base and over the control (paired bootstrap 95% CIs), pairwise counterfactual "
        "accuracy and the over-correction check. Writes report.json, report.md and report.html; SPUR_HOME/reports/latest points at the newest."
    ),
)
def metric_report(
    context: dg.AssetExecutionContext,
    config: MetricReportConfig,
    settings: SpurSettings,
    raw_pairs: dict[str, ArtifactRef],
    synthetic_counterfactuals: ArtifactRef,
    base_checkpoint: ArtifactRef,
    control_checkpoint: ArtifactRef,
    finetuned_checkpoint: ArtifactRef,
) -> dg.Output:
    device = resolve_device(settings.device)
    eval_set = EvalSet.of(batches_split(raw_pairs, "test"), synthetic_counterfactuals)
    checkpoints = {"base": base_checkpoint, "control": control_checkpoint, "finetuned": finetuned_checkpoint}
    if not control_enabled(control_checkpoint):
        del checkpoints["control"]
        context.log.warning("no control checkpoint (control_checkpoint enabled: false): gains cannot be attributed")
    extra_models = parse_extra_models(config.extra_models, reserved=set(checkpoints))
    inputs = upstream_refs(raw_pairs, synthetic_counterfactuals, base_checkpoint, control_checkpoint, finetuned_checkpoint)
    with recorded_materialization(context, settings, config, inputs=inputs, device=str(device)) as session:
        workers = session.decoding_workers(config.workers)
        bundles, caches = {}, {}
        for name, ref in checkpoints.items():
            context.log.info(f"loading the {name} checkpoint ({ref.path('checkpoint')}) on {device}")
            bundles[name] = load_checkpoint(ref.path("checkpoint"), device=device)
            caches[name] = embedding_cache_for(settings, ref, bundles[name], device) if config.embedding_cache else None
        for name, location in extra_models.items():
            context.log.info(f"loading the extra model {name} ({location}) on {device}")
            bundles[name] = load_checkpoint(location, device=device)
        # One pass over the eval images for every checkpoint that decodes them alike (the fine-tune
        # and the control keep the base's image processor): each file is decoded once, not per model.
        evaluations = evaluate_checkpoints(
            bundles, eval_set, k=config.k, device=device, batch_size=config.batch_size,
            progress=context.log.info, n_examples=config.n_examples, workers=workers, caches=caches,
        )
        extra = {
            "lineage": {name: ref.materialization_id for name, ref in checkpoints.items()},
            "extra_models": extra_models,
            "eval_set": synthetic_counterfactuals.materialization_id,
        }
        written = write_report(
            evaluations, session.writer.path("report"), extra=extra, bootstrap_resamples=config.bootstrap_resamples
        )
        session.writer.add_dir("report", "report")
        session.writer.write_table("metric_report_per_pair", pl.DataFrame(_per_pair_rows(evaluations)))
    report_dir = Path(session.ref.output("report").uri)
    latest = publish_latest(settings.home_path, report_dir)
    context.log.info(f"report: {latest / 'report.json'}")
    base, tuned = evaluations["base"].metrics, evaluations["finetuned"].metrics
    k = str(config.k)
    metadata = {
        "report_json": dg.MetadataValue.path(str(latest / "report.json")),
        "report_html": dg.MetadataValue.path(str(report_dir / "report.html")),
        "verdict": _verdict_line(report_dir),
        f"base_odmap_i2t_{k}": base["odmap"]["i2t"][k],
        f"base_odmap_t2i_{k}": base["odmap"]["t2i"][k],
        f"base_hr_{k}": base["hr"][k],
        f"base_hr_natural_{k}": base["hr"][f"natural_{k}"],
        "base_delta_ctrl": base["delta_ctrl"],
        "base_recall_i2t_5": base["recall"]["i2t"]["5"],
        "base_recall_t2i_5": base["recall"]["t2i"]["5"],
        f"finetuned_odmap_i2t_{k}": tuned["odmap"]["i2t"][k],
        f"finetuned_odmap_t2i_{k}": tuned["odmap"]["t2i"][k],
        f"finetuned_hr_{k}": tuned["hr"][k],
        "finetuned_delta_ctrl": tuned["delta_ctrl"],
        "finetuned_recall_i2t_5": tuned["recall"]["i2t"]["5"],
        "finetuned_recall_t2i_5": tuned["recall"]["t2i"]["5"],
        f"gain_odmap_i2t_{k}": tuned["odmap"]["i2t"][k] - base["odmap"]["i2t"][k],
        f"gain_odmap_t2i_{k}": tuned["odmap"]["t2i"][k] - base["odmap"]["t2i"][k],
        "per_pair": markdown_table(pl.DataFrame(_per_pair_rows(evaluations))),
    }
    if "control" in evaluations:
        control = evaluations["control"].metrics
        metadata.update({
            f"control_odmap_i2t_{k}": control["odmap"]["i2t"][k],
            f"control_odmap_t2i_{k}": control["odmap"]["t2i"][k],
            f"control_hr_{k}": control["hr"][k],
            "control_recall_i2t_5": control["recall"]["i2t"]["5"],
            "control_recall_t2i_5": control["recall"]["t2i"]["5"],
        })
    gains = _report_json(report_dir).get("gains", {})
    if gains:
        metadata["gains"] = markdown_table(pl.DataFrame([
            {"metric": metric, "comparison": comparison, "gain": row["gain"], "ci95_low": row["ci95"][0], "ci95_high": row["ci95"][1]}
            for metric, by in gains.items() for comparison, row in by.items()
            if row.get("gain") is not None and row.get("ci95") and None not in row["ci95"]
        ]))
    for name, path in written.items():
        if str(path).endswith(".png"):
            metadata[f"plot_{name}"] = markdown_image(report_dir / Path(path).name, name)
    return session.output(metadata)


def parse_extra_models(entries: list[str], reserved: set[str]) -> dict[str, str]:
    """{name: location} from "name=path" or bare-path entries; ValueError on a clash or an empty entry."""
    models: dict[str, str] = {}
    for entry in entries:
        name, sep, location = entry.partition("=")
        if not sep:
            location, name = entry, Path(entry.rstrip("/")).name
        name, location = name.strip(), location.strip()
        if not name or not location:
            raise ValueError(f"metric_report extra_models entry {entry!r}: write 'name=path/to/save_pretrained' or a path")
        if name in reserved or name in models:
            raise ValueError(
                f"metric_report extra_models: the name {name!r} is taken (by {'a pipeline checkpoint' if name in reserved else 'another entry'}); "
                "give it another with 'name=path'"
            )
        models[name] = location
    return models


def _per_pair_rows(evaluations) -> list[dict]:
    return [{"checkpoint": name, **row} for name, ev in evaluations.items() for row in ev.per_pair]


def _report_json(report_dir: Path) -> dict:
    import json

    return json.loads((report_dir / "report.json").read_text())


def _verdict_line(report_dir: Path) -> str:
    return str(_report_json(report_dir).get("verdict", ""))
