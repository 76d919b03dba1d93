"""`base_checkpoint` (the model under audit), `finetuned_checkpoint` and its originals-only `control_checkpoint`."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Literal, Optional

import dagster as dg
import polars as pl

from spur_assets.core.records.artifacts import ArtifactRef
from spur_assets.core.model.clip_model import load_checkpoint, save_checkpoint
from spur_assets.core.runtime.devices import resolve_device
from spur_assets.core.counterfactuals.finetune_data import COUNTERFACTUAL_RATIO, assemble_finetune_set, originals_only
from spur_assets.core.data.image_stream import DEFAULT_IN_MEMORY_MB, ImageFiles
from spur_assets.core.metrics.plots import loss_curve
from spur_assets.core.model import recipes
from spur_assets.core.model.recipes import (
    BUILTIN_BASE_RECIPE,
    PRETRAINED_RECIPE,
    SMALL_CLIP_RECIPE,
    FinetuneRecipe,
    SmallClipRecipe,
)
from spur_assets.core.runtime.threads import use_torch_threads
from spur_assets.core.model.finetuning import TrainingPlan
from spur_assets.pipeline.cluster import GPU_STEP_TAGS
from spur_assets.pipeline.ingest import ALL_BATCHES, batches_split
from spur_assets.pipeline.pipes import train_with_torchrun
from spur_assets.pipeline.recording import config_hash, recorded_materialization, upstream_refs
from spur_assets.pipeline.resources import SpurSettings
from spur_assets.pipeline.ui_metadata import markdown_image, markdown_table


class BaseCheckpointConfig(dg.Config):
    """The small CLIP trained from scratch when SPUR_BASE_MODEL is unset (ignored otherwise).

    Defaults are core/model/recipes.py's SMALL_CLIP_RECIPE (why those values: its docstring).
    """

    image_size: int = SMALL_CLIP_RECIPE.image_size
    patch_size: int = SMALL_CLIP_RECIPE.patch_size
    width: int = SMALL_CLIP_RECIPE.width
    layers: int = SMALL_CLIP_RECIPE.layers
    heads: int = SMALL_CLIP_RECIPE.heads
    vocab_size: int = SMALL_CLIP_RECIPE.vocab_size
    max_text_length: int = SMALL_CLIP_RECIPE.max_text_length
    epochs: int = SMALL_CLIP_RECIPE.epochs
    batch_size: int = SMALL_CLIP_RECIPE.batch_size
    lr: float = SMALL_CLIP_RECIPE.lr
    captions_per_image: int = SMALL_CLIP_RECIPE.captions_per_image
    seed: int = SMALL_CLIP_RECIPE.seed
    # Image decoding processes beside the training loop (0 = decode on the training thread). Images
    # stream from their files step by step. Results do not depend on it.
    workers: int = 1
    # A split whose prepared pixels fit in this many MiB is decoded once and kept in memory for the
    # run instead (every epoch reads it again); 0 always streams. Bounded whatever the data size.
    in_memory_mb: int = DEFAULT_IN_MEMORY_MB


def write_checkpoint_outputs(session, bundle, history: list[dict], asset: str, saved: bool = False) -> None:
    """Stage the save_pretrained folder and, when there was training, its history table and loss plot.

    `saved`: the folder is already at session.writer.path("checkpoint") (written by a training
    process); it is registered as it is.
    """
    if not saved:
        save_checkpoint(bundle, session.writer.path("checkpoint"))
    session.writer.add_dir("checkpoint", "checkpoint")
    if history:
        session.writer.write_table(f"{asset}_history", pl.DataFrame(history))
        loss_curve(history, session.writer.path("loss.png"), f"{asset} training loss")
        session.writer.add_file("loss_curve", "loss.png")


def checkpoint_metadata(session, bundle, history: list[dict]) -> dict:
    """UI metadata of a committed checkpoint: where, sha256, size, parameters and the training curve."""
    checkpoint = session.ref.output("checkpoint")
    metadata = {
        "checkpoint": dg.MetadataValue.path(checkpoint.uri),
        "checkpoint_sha256": checkpoint.sha256,
        "checkpoint_mb": round(checkpoint.bytes / 2**20, 2),
        "parameters": sum(p.numel() for p in bundle.model.parameters()),
    }
    if history:
        metadata["final_loss"] = float(history[-1]["loss"])
        metadata["seconds_per_epoch"] = round(sum(h["seconds"] for h in history) / len(history), 1)
        metadata["history"] = markdown_table(pl.DataFrame(history), max_rows=50)
        metadata["loss_curve"] = markdown_image(Path(session.ref.output("loss_curve").uri), "training loss")
    return metadata


def _prepared_megabytes(images: ImageFiles) -> float:
    channels, height, width = images.image_shape
    return len(images) * channels * height * width / 2**20


def _training_workers(session, images: ImageFiles, in_memory_mb: int, requested: int) -> int:
    """Decoding processes for a training step (none when the split is held in memory), within the thread policy."""
    held = in_memory_mb > 0 and _prepared_megabytes(images) <= in_memory_mb
    return session.decoding_workers(0 if held else requested)


def _image_path_note(images: ImageFiles, in_memory_mb: int, workers: int) -> str:
    """How training will read its images, for the log."""
    megabytes = _prepared_megabytes(images)
    if in_memory_mb > 0 and megabytes <= in_memory_mb:
        how = f"decoded once on the training thread and kept in memory (in_memory_mb={in_memory_mb})"
    else:
        how = f"streamed from their files step by step by {workers} decoding process(es) (over in_memory_mb={in_memory_mb})"
    return f"{megabytes:.0f} MiB of prepared pixels, {how}"


# What the three training assets share: they train on the accelerator pool, one GPU per step pod
# under the k8s_job_executor (inert elsewhere), read every batch, and store a checkpoint folder.
TRAINING_ASSET = dict(
    kinds={"pytorch", "huggingface"},
    code_version="1",
    io_manager_key="refs",
    pool="accelerator",
    op_tags=GPU_STEP_TAGS,
    ins=ALL_BATCHES,
)


def _log_progress(context: dg.AssetExecutionContext):
    def log(event: dict) -> None:
        context.log.info(
            "epoch {epoch} step {step}/{steps_in_epoch}: loss {loss:.4f}, {pairs_per_second:.0f} pairs/s".format(**event)
        )

    return log


@dg.asset(
    group_name="expose",
    **TRAINING_ASSET,
    description=(
        "The model under audit as a save_pretrained folder (safetensors, config, tokenizer, image "
        "processor) that plain transformers loads: SPUR_BASE_MODEL when set, else a small CLIP "
        "trained from scratch on the train split of every batch, its tokenizer trained beside it."
    ),
)
def base_checkpoint(
    context: dg.AssetExecutionContext,
    config: BaseCheckpointConfig,
    settings: SpurSettings,
    raw_pairs: dict[str, ArtifactRef],
) -> dg.Output:
    device = resolve_device(settings.device)
    history: list[dict] = []
    inputs = [] if settings.base_model else upstream_refs(raw_pairs)
    # A stopped or killed run resumes from its last epoch: the work folder is keyed by what it trains on.
    resume_key = config_hash({"raw": [r.data_version for r in inputs], "config": config.model_dump()})[:16]
    resume_dir = settings.home_path / "work" / "base_checkpoint" / resume_key
    with recorded_materialization(context, settings, config, inputs=inputs, device=str(device)) as session:
        if settings.base_model:
            context.log.info(f"loading the base model {settings.base_model}")
            bundle = load_checkpoint(settings.base_model, device="cpu")
            source = settings.base_model
        else:
            train = batches_split(raw_pairs, "train")
            recipe = SmallClipRecipe.of(config)
            plan = TrainingPlan.from_scratch(originals_only(train.images, train.captions), recipe)
            bundle = recipe.new_model(plan.rows.captions)
            images = plan.images(bundle)
            workers = _training_workers(session, images, config.in_memory_mb, config.workers)
            context.log.info(f"training on {len(images)} train images, {_image_path_note(images, config.in_memory_mb, workers)}")
            history = plan.run(
                bundle, device, images=images, checkpoint_dir=resume_dir, progress=_log_progress(context),
                workers=workers, in_memory_mb=config.in_memory_mb,
            )
            source = f"small CLIP trained from scratch on {len(images)} images"
        write_checkpoint_outputs(session, bundle, history, "base_checkpoint")
    shutil.rmtree(resume_dir, ignore_errors=True)
    metadata = {
        **checkpoint_metadata(session, bundle, history),
        "source": source,
    }
    return session.output(metadata)


class FinetunedCheckpointConfig(dg.Config):
    """Fine-tuning on originals mixed with train counterfactuals (docs/definitions.md#mitigation).

    Optimisation settings left at None come from the recipe for the kind of base
    (core/model/recipes.py): BUILTIN_BASE_RECIPE for the small CLIP trained here, PRETRAINED_RECIPE
    for a SPUR_BASE_MODEL; `recipe` forces one. A value set here overrides that field only.
    """

    recipe: Literal["auto", "builtin", "pretrained"] = "auto"
    epochs: Optional[int] = None
    batch_size: Optional[int] = None  # global batch: the contrastive loss's negatives
    lr: Optional[float] = None  # 0 is read as None (older run configs used 0 for "automatic")
    warmup_steps: Optional[int] = None
    weight_decay: Optional[float] = None
    captions_per_image: Optional[int] = None
    max_steps: Optional[int] = None  # cap on optimizer steps
    micro_batch_size: Optional[int] = None  # rows per forward; the loss and gradient stay the full batch's
    freeze_layers: Optional[int] = None  # freeze both towers' embeddings and this many lowest layers
    counterfactual_ratio: float = COUNTERFACTUAL_RATIO  # share of counterfactual images (core/counterfactuals/finetune_data.py)
    use_removal: bool = True
    # Paste edits are built (and exported) but left out of fine-tuning by default: on the built-in
    # data they lowered ODmAP and R@5 (bench/experiments/ABLATION.md); set True to train on them too.
    use_paste: bool = False
    hard_negatives: bool = True  # I^-b <-> its original b-caption as extra negatives
    # Each hard-negative logit + log(w), and I^-b trained in the same batch as its source I (core/model/training.py).
    # Chosen on a validation split carved from the train images, not on the test set (bench/experiments/RESEARCH.md,
    # `paired_w4`; 3 seeds through this code in its Background section).
    hard_negative_weight: float = 4.0
    paired_batches: bool = True
    seed: int = 0
    # Image decoding processes per training process (0 = on the training thread); results do not depend on it.
    workers: int = 1
    # Decode the fine-tuning set once and keep it in memory when its pixels fit in this many MiB
    # (0 = always stream); single-process training only, DDP ranks stream their own slices.
    in_memory_mb: int = DEFAULT_IN_MEMORY_MB
    # 1 trains in this process. N > 1 runs `torchrun --nproc_per_node=N` (DDP) through the
    # pipes_subprocess resource with the same global batch_size and seed (docs/cluster.md).
    nproc_per_node: int = 1
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: NCCL on GPUs, gloo on CPU


# Kept under these names for callers that only want the rates (the recipes hold the whole story).
BUILTIN_BASE_FINETUNE_LR = BUILTIN_BASE_RECIPE.lr
PRETRAINED_FINETUNE_LR = PRETRAINED_RECIPE.lr


def finetune_recipe(config: FinetunedCheckpointConfig, base_model: str) -> FinetuneRecipe:
    """The recipe a fine-tune runs: the one for the kind of base (or `config.recipe`), with config's overrides."""
    try:
        return recipes.finetune_recipe(
            config.recipe, base_model,
            lr=config.lr, epochs=config.epochs, batch_size=config.batch_size, warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay, captions_per_image=config.captions_per_image, max_steps=config.max_steps,
            micro_batch_size=config.micro_batch_size, freeze_layers=config.freeze_layers,
        )
    except ValueError as problem:
        raise ValueError(f"finetuned_checkpoint config {problem}") from None


def finetune_lr(config: FinetunedCheckpointConfig, base_model: str) -> float:
    """The learning rate fine-tuning uses: config.lr if set, else the recipe's for the kind of base."""
    return finetune_recipe(config, base_model).lr


@dg.asset(
    group_name="mitigate",
    **TRAINING_ASSET,
    description=(
        "base_checkpoint fine-tuned with CLIP's InfoNCE on originals mixed with the synthetic train "
        "counterfactuals; each removal image brings its original companion caption as a hard-negative "
        "text and each such caption the removal image as a hard-negative image. Resumes from the last "
        "epoch if a run was killed. With nproc_per_node > 1 it trains on that many torchrun "
        "processes (DDP) through Dagster Pipes."
    ),
)
def finetuned_checkpoint(
    context: dg.AssetExecutionContext,
    config: FinetunedCheckpointConfig,
    settings: SpurSettings,
    pipes_subprocess: dg.PipesSubprocessClient,
    raw_pairs: dict[str, ArtifactRef],
    base_checkpoint: ArtifactRef,
    synthetic_counterfactuals: ArtifactRef,
) -> dg.Output:
    device = resolve_device(settings.device)
    train = batches_split(raw_pairs, "train")
    finetune_set = assemble_finetune_set(
        train.images,
        train.captions,
        synthetic_counterfactuals.read_table("cf_train_images"),
        synthetic_counterfactuals.read_table("cf_train_captions"),
        counterfactual_ratio=config.counterfactual_ratio,
        use_removal=config.use_removal,
        use_paste=config.use_paste,
        hard_negatives=config.hard_negatives,
        seed=config.seed,
    )
    recipe = finetune_recipe(config, settings.base_model)
    context.log.info(f"fine-tuning set: {finetune_set.summary}; recipe {recipe}")
    inputs = upstream_refs(raw_pairs, base_checkpoint, synthetic_counterfactuals)
    # A killed run resumes from its last epoch: the work folder is keyed by what it trains on.
    resume_key = config_hash(
        {"base": base_checkpoint.data_version, "cf": synthetic_counterfactuals.data_version, "config": config.model_dump()}
    )[:16]
    resume_dir = settings.home_path / "work" / "finetuned_checkpoint" / resume_key
    with recorded_materialization(context, settings, config, inputs=inputs, device=str(device)) as session:
        bundle = load_checkpoint(base_checkpoint.path("checkpoint"), device="cpu")
        plan = TrainingPlan.finetune(finetune_set, recipe, config.seed, config.hard_negative_weight, config.paired_batches)
        # Streamed from the files, prepared exactly as the base checkpoint's own image processor does.
        images = plan.images(bundle)
        steps = plan.steps
        # What control_checkpoint repeats on originals only: the same recipe, seed and number of steps.
        write_training_plan(session, recipe, config.seed, steps)
        parallel_metadata: dict = {}
        if config.nproc_per_node == 1:
            workers = _training_workers(session, images, config.in_memory_mb, config.workers)
            context.log.info(f"fine-tuning on {len(images)} images, {_image_path_note(images, config.in_memory_mb, workers)}")
            history = plan.run(
                bundle, device, images=images, checkpoint_dir=resume_dir, progress=_log_progress(context),
                workers=workers, in_memory_mb=config.in_memory_mb,
            )
            write_checkpoint_outputs(session, bundle, history, "finetuned_checkpoint")
        else:
            # Same training, on nproc_per_node torchrun ranks; rank 0 saves into the staging folder.
            # The ranks share the step's threads (torchrun passes OMP_NUM_THREADS on to each).
            use_torch_threads(max(1, session.policy.total // config.nproc_per_node))
            job = plan.job(
                images, base_checkpoint.path("checkpoint"), session.writer.path("checkpoint"),
                resume_dir=resume_dir, device=settings.device, dist_backend=config.dist_backend,
                loader_workers=config.workers,
            )
            history, parallel_metadata = train_with_torchrun(
                context, pipes_subprocess, job, resume_dir / "torchrun-job", config.nproc_per_node
            )
            bundle = load_checkpoint(session.writer.path("checkpoint"), device="cpu")
            write_checkpoint_outputs(session, bundle, history, "finetuned_checkpoint", saved=True)
    shutil.rmtree(resume_dir, ignore_errors=True)
    return session.output(
        {
            **checkpoint_metadata(session, bundle, history),
            "training_set": dg.MetadataValue.json(finetune_set.summary),
            "learning_rate": dg.MetadataValue.float(recipe.lr),
            "recipe": dg.MetadataValue.json({**asdict(recipe), "base": "pretrained" if settings.base_model else "built here"}),
            "optimizer_steps": steps,
            **parallel_metadata,
        }
    )


TRAINING_PLAN_FILE = "training_plan.json"


def write_training_plan(session, recipe: FinetuneRecipe, seed: int, steps: int) -> None:
    """Stage training_plan.json: the recipe, seed and optimizer steps a fine-tune ran (its control repeats them)."""
    plan = {"recipe": asdict(recipe), "seed": seed, "optimizer_steps": steps}
    session.writer.path(TRAINING_PLAN_FILE).write_text(json.dumps(plan, indent=1, sort_keys=True))
    session.writer.add_file("training_plan", TRAINING_PLAN_FILE)


def read_training_plan(checkpoint: ArtifactRef) -> tuple[FinetuneRecipe, int, int]:
    """(recipe, seed, optimizer steps) of a fine-tune, from its training_plan.json."""
    try:
        plan = json.loads(checkpoint.path("training_plan").read_text())
    except KeyError as error:
        raise ValueError(
            f"{checkpoint.asset} materialization {checkpoint.materialization_id} has no training plan (it predates the "
            "control arm); materialize finetuned_checkpoint again, then control_checkpoint."
        ) from error
    return FinetuneRecipe(**plan["recipe"]), int(plan["seed"]), int(plan["optimizer_steps"])


class ControlCheckpointConfig(dg.Config):
    """The originals-only control of the fine-tune: what extra training alone earns.

    `enabled` False records that no control was trained (the report then scores base and
    fine-tuned only, and says the gains cannot be attributed). On by default: without it a
    report cannot tell what the counterfactuals earned from what more training earned.
    """

    enabled: bool = True
    workers: int = 1
    in_memory_mb: int = DEFAULT_IN_MEMORY_MB


@dg.asset(
    group_name="mitigate",
    **TRAINING_ASSET,
    description=(
        "The control arm: base_checkpoint fine-tuned with finetuned_checkpoint's recipe, seed, number of "
        "optimizer steps and learning-rate schedule, on the original train images and captions only (no "
        "counterfactual, no hard negative). metric_report sets the fine-tune against it, so a gain is "
        "credited to the counterfactuals only when it beats the same amount of plain training. "
        "Switch it off with enabled: false."
    ),
)
def control_checkpoint(
    context: dg.AssetExecutionContext,
    config: ControlCheckpointConfig,
    settings: SpurSettings,
    raw_pairs: dict[str, ArtifactRef],
    base_checkpoint: ArtifactRef,
    finetuned_checkpoint: ArtifactRef,
) -> dg.Output:
    device = resolve_device(settings.device)
    recipe, seed, steps = read_training_plan(finetuned_checkpoint)
    inputs = upstream_refs(raw_pairs, base_checkpoint, finetuned_checkpoint)
    resume_key = config_hash(
        {"base": base_checkpoint.data_version, "finetuned": finetuned_checkpoint.data_version, "config": config.model_dump()}
    )[:16]
    resume_dir = settings.home_path / "work" / "control_checkpoint" / resume_key
    with recorded_materialization(context, settings, config, inputs=inputs, device=str(device)) as session:
        if not config.enabled:
            context.log.info("control_checkpoint is switched off (enabled: false): no control trained")
            session.writer.path("control.json").write_text(json.dumps({"enabled": False}))
            session.writer.add_file("control", "control.json")
            return_metadata = {"enabled": False}
            history, bundle = [], None
        else:
            train = batches_split(raw_pairs, "train")
            plan = TrainingPlan.control(originals_only(train.images, train.captions), recipe, seed, steps)
            bundle = load_checkpoint(base_checkpoint.path("checkpoint"), device="cpu")
            images = plan.images(bundle)
            workers = _training_workers(session, images, config.in_memory_mb, config.workers)
            context.log.info(
                f"control: {len(images)} original images, {len(plan.rows.captions)} captions, {steps} optimizer "
                f"steps ({plan.config.epochs} epoch(s)) as finetuned_checkpoint ran; "
                f"{_image_path_note(images, config.in_memory_mb, workers)}"
            )
            history = plan.run(
                bundle, device, images=images, checkpoint_dir=resume_dir, progress=_log_progress(context),
                workers=workers, in_memory_mb=config.in_memory_mb,
            )
            write_checkpoint_outputs(session, bundle, history, "control_checkpoint")
            write_training_plan(session, plan.recipe, seed, steps)
            return_metadata = {"enabled": True, "optimizer_steps": steps, "training_images": len(images)}
    shutil.rmtree(resume_dir, ignore_errors=True)
    metadata = dict(return_metadata)
    if bundle is not None:
        metadata.update(checkpoint_metadata(session, bundle, history))
    return session.output(metadata)


def control_enabled(control: ArtifactRef) -> bool:
    """Whether a control_checkpoint materialization holds a trained checkpoint."""
    return any(output.name == "checkpoint" for output in control.outputs)
