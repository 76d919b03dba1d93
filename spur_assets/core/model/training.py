"""Contrastive training of a CLIP model: from scratch, or fine-tuning with counterfactual hard negatives.

Batches (one epoch). Each image contributes up to `captions_per_image` of its captions per epoch
(all of them when None), drawn without replacement. The epoch runs in rounds: round r takes the
r-th drawn caption of every image that has one, shuffles those pairs and cuts them into
near-equal batches of at most `batch_size`. A batch therefore never holds two captions of the
same image, so no image's own caption is ever used as a negative for it. The order of all
batches of the epoch is then shuffled. The shuffling generator is seeded from (seed, epoch), so
an epoch's batches do not depend on what ran before, which keeps resumed runs identical to
uninterrupted ones.

Hard negatives (docs/definitions.md#fine-tuning-set-and-loss). `hard_negative_text[i]` names a caption (by index
into `captions`) that is a hard-negative TEXT for image i: when i is in a batch that caption
joins the image→text denominator of every image in the batch, except images it describes
(its own image). `hard_negative_image[c]` names an image that is a hard-negative IMAGE for
caption c: it joins the text→image denominator of every caption in the batch. Extras already
in the batch are not added twice.

Paired batches and hard-negative weight (issue #4; bench/experiments/RESEARCH.md, `paired_w4`). A removal
image I⁻ᵇ is the image whose `hard_negative_text` (or whose `hard_negative_image` links) point
at captions of its source image I; those captions are I's b-captions. With
`TrainConfig.paired_batches`, `paired_epoch_batches` replaces `epoch_batches`: each round, every
removal image rides in one unit with its source, the source's caption that round is one of its
b-captions (cycled by round and epoch), and units are shuffled and cut at unit boundaries, so
the in-batch InfoNCE itself has to tell I from I⁻ᵇ. Inside a family (I and its removal images)
a caption that is not a hard negative of the image is a true description of it and is masked
as a negative. With `hard_negative_weight` w ≠ 1, log(w) is added to every hard-negative logit
(the cells pairing a removal image with a b-caption of its source, in the batch or extra), i.e.
the hard negative counts w times in the softmax denominator. With either option on, every
b-caption of I (not only `hard_negative_text`'s one) is a hard-negative text of I⁻ᵇ.

Duplicate captions (templated data repeats texts across images) are masked as negatives for
each other when `mask_duplicate_captions` is set: two pairs whose captions are the same
string are not pushed apart.

Data-parallel training (when `data_parallel` is given, inside a torchrun process group): every
rank builds the same global batches, embeds its slice of each and scores the gathered global
batch, so the loss curve and weights equal the one-process run up to float rounding
(core/model/distributed.py says why). Only rank 0 writes the resumable state; every rank reads it.

Resumable state (when `checkpoint_dir` is given): after each epoch,
`checkpoint_dir/epoch-NNNN/` holds model.safetensors, optimizer.safetensors (Adam moments),
rng.safetensors and state.json (scheduler, param groups, history, a fingerprint of config and
data). No pickle anywhere. A call with the same config and data resumes from the last complete
epoch; a different config or data raises.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file, save_model

from spur_assets.core.model.clip_model import ClipBundle, pixel_values_from_uint8, processor_image_size, text_max_length
from spur_assets.core.runtime.devices import autocast_for
from spur_assets.core.model.distributed import DataParallelGroup, data_parallel_towers, gathered_tower_features, padded_shard
from spur_assets.core.data.image_stream import DEFAULT_IN_MEMORY_MB, ImageFiles, ImageSource, decoded_in_memory, source_length, stream_rows

STATE_FORMAT_VERSION = 1
PROGRESS_SECONDS = 30.0  # longest silence between progress reports during training


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one contrastive training run (CLIP's recipe, small-scale defaults)."""

    epochs: int
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 50
    seed: int = 0
    # Captions per image per epoch; None uses every caption every epoch.
    captions_per_image: int | None = 1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98  # CLIP's value; 0.999 is unstable for contrastive training
    adam_eps: float = 1e-6
    grad_clip_norm: float | None = 1.0
    # CLIP clamps the learned temperature multiplier exp(logit_scale) at 100.
    max_logit_scale: float = 100.0
    mask_duplicate_captions: bool = True
    log_every_steps: int = 20
    # log(w) added to every hard-negative logit (module docstring); 1 = plain InfoNCE with extras.
    hard_negative_weight: float = 1.0
    # Each removal image shares its batch with its source image (module docstring, paired_epoch_batches).
    paired_batches: bool = False
    # Stop after this many optimizer steps (the schedule spans min(epochs x steps per epoch, max_steps)).
    max_steps: int | None = None
    # Rows per tower forward inside a step; smaller than the step means cached-gradient accumulation
    # (train_clip: the full-batch loss and gradient in a fraction of the memory). None = whole step.
    micro_batch_size: int | None = None
    # Freeze both towers' embeddings and their lowest N transformer layers (0 = train everything).
    freeze_layers: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"TrainConfig.epochs={self.epochs} must be >= 0.")
        if self.batch_size < 2:
            raise ValueError(f"TrainConfig.batch_size={self.batch_size} must be >= 2 (contrastive loss needs negatives).")
        if self.captions_per_image is not None and self.captions_per_image < 1:
            raise ValueError(f"TrainConfig.captions_per_image={self.captions_per_image} must be >= 1 or None (all).")
        if not self.hard_negative_weight > 0 or not math.isfinite(self.hard_negative_weight):
            raise ValueError(f"TrainConfig.hard_negative_weight={self.hard_negative_weight} must be a finite number > 0 (1 = unweighted).")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"TrainConfig.max_steps={self.max_steps} must be >= 1 or None (no limit).")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"TrainConfig.micro_batch_size={self.micro_batch_size} must be >= 1 or None (whole step).")
        if self.freeze_layers < 0:
            raise ValueError(f"TrainConfig.freeze_layers={self.freeze_layers} must be >= 0.")
        if self.lr <= 0 or self.warmup_steps < 0 or self.max_logit_scale <= 1:
            raise ValueError(
                f"TrainConfig: lr={self.lr} must be > 0, warmup_steps={self.warmup_steps} >= 0, "
                f"max_logit_scale={self.max_logit_scale} > 1."
            )


# --------------------------------------------------------------------------- loss


def contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    extra_text_emb: torch.Tensor | None = None,
    extra_image_emb: torch.Tensor | None = None,
    *,
    false_negative_mask: torch.Tensor | None = None,
    extra_text_mask: torch.Tensor | None = None,
    extra_image_mask: torch.Tensor | None = None,
    hard_negative_weight: float = 1.0,
    hard_text_cells: torch.Tensor | None = None,
    hard_image_cells: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP over a batch of B matching pairs (image i, text i).

    Embeddings are L2-normalised rows [B, D]; `logit_scale` is CLIP's log temperature
    multiplier (logits = exp(logit_scale) * cosine). Loss = (CE(image→text) + CE(text→image)) / 2,
    the same as transformers' CLIP loss when no extras or masks are given.
    `extra_text_emb` [Et, D] are hard-negative texts: extra columns in every image's
    image→text softmax. `extra_image_emb` [Ei, D] are hard-negative images: extra columns in
    every text's text→image softmax. Masks (True = leave out of that row's denominator):
    `false_negative_mask` [B, B] for in-batch pairs (applied in both directions, diagonal
    ignored), `extra_text_mask` [B, Et] for image rows, `extra_image_mask` [B, Ei] for text rows.
    Hard-negative weight w: `hard_text_cells` [B, B+Et] (image→text, in-batch columns then
    extras) and `hard_image_cells` [B, B+Ei] (text→image) mark hard-negative cells, whose
    logits get + log(w), so each counts w times in its row's denominator; w = 1 or no cells
    leaves the loss untouched. Computed in float32.
    """
    image_emb = image_emb.float()
    text_emb = text_emb.float()
    batch = image_emb.shape[0]
    if text_emb.shape[0] != batch:
        raise ValueError(f"contrastive_loss: {batch} images but {text_emb.shape[0]} texts; pairs must match row by row.")
    scale = logit_scale.float().exp()
    logits_i2t = scale * image_emb @ text_emb.T
    logits_t2i = logits_i2t.T
    if false_negative_mask is not None:
        off_diagonal = false_negative_mask.to(torch.bool) & ~torch.eye(batch, dtype=torch.bool, device=image_emb.device)
        logits_i2t = logits_i2t.masked_fill(off_diagonal, float("-inf"))
        logits_t2i = logits_t2i.masked_fill(off_diagonal.T, float("-inf"))
    if extra_text_emb is not None and extra_text_emb.shape[0] > 0:
        extra = scale * image_emb @ extra_text_emb.float().T
        if extra_text_mask is not None:
            extra = extra.masked_fill(extra_text_mask.to(torch.bool), float("-inf"))
        logits_i2t = torch.cat([logits_i2t, extra], dim=1)
    if extra_image_emb is not None and extra_image_emb.shape[0] > 0:
        extra = scale * text_emb @ extra_image_emb.float().T
        if extra_image_mask is not None:
            extra = extra.masked_fill(extra_image_mask.to(torch.bool), float("-inf"))
        logits_t2i = torch.cat([logits_t2i, extra], dim=1)
    if hard_negative_weight != 1.0:
        log_weight = math.log(hard_negative_weight)
        for name, cells, logits in (("hard_text_cells", hard_text_cells, logits_i2t), ("hard_image_cells", hard_image_cells, logits_t2i)):
            if cells is not None and tuple(cells.shape) != tuple(logits.shape):
                raise ValueError(
                    f"contrastive_loss: {name} has shape {tuple(cells.shape)} but the logits it marks are "
                    f"{tuple(logits.shape)} (batch columns, then the extras given)."
                )
        if hard_text_cells is not None:
            logits_i2t = logits_i2t + log_weight * hard_text_cells.to(device=logits_i2t.device, dtype=torch.bool)
        if hard_image_cells is not None:
            logits_t2i = logits_t2i + log_weight * hard_image_cells.to(device=logits_t2i.device, dtype=torch.bool)
    targets = torch.arange(batch, device=image_emb.device)
    return (F.cross_entropy(logits_i2t, targets) + F.cross_entropy(logits_t2i, targets)) / 2


# --------------------------------------------------------------------------- batching


def epoch_batches(
    caption_image: torch.Tensor,
    batch_size: int,
    captions_per_image: int | None,
    seed: int,
    epoch: int,
) -> list[torch.Tensor]:
    """Caption indices of each batch of one epoch (0-based `epoch`), each batch with distinct images.

    The scheme is the module docstring's: rounds of one caption per image, each round shuffled
    and cut into near-equal batches of at most `batch_size`, batch order shuffled. Deterministic
    in (caption_image, batch_size, captions_per_image, seed, epoch).
    """
    generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    n_captions = int(caption_image.shape[0])
    if n_captions == 0:
        return []
    # Random order of captions within each image: sort by random key, then stably by image.
    keys = torch.rand(n_captions, generator=generator)
    by_key = torch.argsort(keys, stable=True)
    grouped = by_key[torch.argsort(caption_image[by_key], stable=True)]
    grouped_images = caption_image[grouped]
    starts = torch.ones(n_captions, dtype=torch.bool)
    starts[1:] = grouped_images[1:] != grouped_images[:-1]
    group_start = torch.cummax(torch.where(starts, torch.arange(n_captions), torch.zeros(n_captions, dtype=torch.long)), 0).values
    rank = torch.arange(n_captions) - group_start
    rounds = int(rank.max()) + 1
    if captions_per_image is not None:
        rounds = min(rounds, captions_per_image)
    batches: list[torch.Tensor] = []
    for round_index in range(rounds):
        members = grouped[rank == round_index]
        members = members[torch.randperm(members.shape[0], generator=generator)]
        n_batches = math.ceil(members.shape[0] / batch_size)
        batches.extend(torch.tensor_split(members, n_batches))
    order = torch.randperm(len(batches), generator=generator)
    return [batches[i] for i in order.tolist()]


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"spur-assets/epoch-batches/{seed}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class HardNegativeLinks:
    """Which captions are hard negatives of which removal image, derived from train_clip's index arrays.

    `b_captions_of_removal[r]`: caption rows of r's source image that are hard negatives of
    removal image r (those with hard_negative_image == r, in row order, with
    hard_negative_text[r] first when no such link names it). `source_of_removal[r]`: the image
    those captions describe. `family` [N]: the source row for removal images, the own row
    otherwise. `caption_removals` [C, K]: the removal images each caption is a hard negative of,
    -1 padded (a caption can be one removal's hard_negative_text and another's hard image link).
    """

    b_captions_of_removal: dict[int, list[int]]
    source_of_removal: dict[int, int]
    family: torch.Tensor
    caption_removals: torch.Tensor

    def is_hard(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """Bool [len(images), len(texts)]: text is a b-caption of that removal image's source."""
        return (self.caption_removals[texts][None, :, :] == images[:, None, None]).any(-1)


def hard_negative_links(
    caption_image: torch.Tensor,
    n_images: int,
    hard_negative_text: torch.Tensor | None,
    hard_negative_image: torch.Tensor | None,
) -> HardNegativeLinks:
    """The HardNegativeLinks of train_clip's inputs (indices as train_clip validates them; -1 = none).

    Raises ValueError when a removal image's captions name two different source images, or a
    source image is itself a removal image (paired batches could not place such a chain).
    """
    caption_image = torch.as_tensor(caption_image, dtype=torch.long).cpu()
    b_captions: dict[int, list[int]] = {}
    if hard_negative_image is not None:
        for caption, removal in enumerate(torch.as_tensor(hard_negative_image).tolist()):
            if removal >= 0:
                b_captions.setdefault(removal, []).append(caption)
    if hard_negative_text is not None:
        for removal, caption in enumerate(torch.as_tensor(hard_negative_text).tolist()):
            if caption >= 0 and caption not in b_captions.setdefault(removal, []):
                b_captions[removal].insert(0, caption)
    source: dict[int, int] = {}
    for removal, captions in b_captions.items():
        sources = sorted({int(caption_image[c]) for c in captions})
        if len(sources) > 1:
            raise ValueError(
                f"train_clip: removal image {removal} has hard-negative captions {captions} of images {sources}; "
                "hard_negative_text / hard_negative_image must link one removal image to captions of one source image."
            )
        source[removal] = sources[0]
    chained = sorted(set(source.values()) & set(source))
    if chained:
        raise ValueError(
            f"train_clip: image {chained[0]} is both a removal image (it has hard-negative captions) and the source of "
            "another removal image; link each removal image to captions of an original image."
        )
    family = torch.arange(n_images)
    for removal, image in source.items():
        family[removal] = image
    per_caption: dict[int, list[int]] = {}
    for removal, captions in b_captions.items():
        for caption in captions:
            if removal not in per_caption.setdefault(caption, []):
                per_caption[caption].append(removal)
    width = max([len(v) for v in per_caption.values()], default=1)
    caption_removals = torch.full((int(caption_image.shape[0]), width), -1, dtype=torch.long)
    for caption, removals in per_caption.items():
        caption_removals[caption, : len(removals)] = torch.tensor(removals, dtype=torch.long)
    return HardNegativeLinks(b_captions, source, family, caption_removals)


def paired_epoch_batches(
    caption_image: torch.Tensor,
    links: HardNegativeLinks,
    batch_size: int,
    captions_per_image: int | None,
    seed: int,
    epoch: int,
) -> list[torch.Tensor]:
    """Caption indices of each batch of one epoch (0-based `epoch`) where every removal image sits
    in its source image's batch.

    Rounds as in `epoch_batches` (captions_per_image of them; None = the most captions of any
    image). In round r every image that is not a removal image and has an r-th caption forms a
    unit with its removal images: the source's caption is one of each removal's b-captions
    (cycled by round + epoch), each removal image's caption its own (r mod its count). Units are
    shuffled and cut at unit boundaries near the equal split into ceil(n / batch_size) batches
    (so a batch may exceed batch_size by up to a unit's size − 1); batch order is shuffled.
    A batch never holds two captions of one image. Deterministic in its arguments.
    """
    generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch) ^ 0x5EED)
    captions_of: dict[int, list[int]] = {}
    for caption, image in enumerate(torch.as_tensor(caption_image).tolist()):
        captions_of.setdefault(image, []).append(caption)
    for captions in captions_of.values():
        order = torch.randperm(len(captions), generator=generator).tolist()
        captions[:] = [captions[j] for j in order]
    removals_of: dict[int, list[int]] = {}
    for removal, source in links.source_of_removal.items():
        if removal in captions_of:  # a removal image without captions has nothing to train on
            removals_of.setdefault(source, []).append(removal)
    rounds = max((len(c) for c in captions_of.values()), default=0) if captions_per_image is None else captions_per_image
    batches: list[torch.Tensor] = []
    for round_index in range(rounds):
        units: list[list[int]] = []
        for image, captions in captions_of.items():
            if image in links.source_of_removal or round_index >= len(captions):
                continue
            unit = [captions[round_index]]
            for removal in removals_of.get(image, []):
                b_captions = links.b_captions_of_removal[removal]
                unit[0] = b_captions[(round_index + epoch) % len(b_captions)]
                own = captions_of[removal]
                unit.append(own[round_index % len(own)])
            units.append(unit)
        order = torch.randperm(len(units), generator=generator).tolist()
        members = torch.tensor([c for j in order for c in units[j]], dtype=torch.long)
        n_batches = math.ceil(members.shape[0] / batch_size)
        # Cut at the first unit boundary at or past each equal-split point, so a unit is never torn apart.
        bounds, length, cut = [0], 0, 1
        for j in order:
            length += len(units[j])
            if cut < n_batches and length >= round(cut * members.shape[0] / n_batches):
                bounds.append(length)
                cut += 1
        bounds.append(members.shape[0])
        batches.extend(members[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a)
    order = torch.randperm(len(batches), generator=generator)
    return [batches[i] for i in order.tolist()]


# --------------------------------------------------------------------------- training


def train_clip(
    bundle: ClipBundle,
    images: ImageSource,
    captions: Sequence[str],
    caption_image: torch.Tensor,
    config: TrainConfig,
    device: torch.device | str,
    hard_negative_text: torch.Tensor | None = None,
    hard_negative_image: torch.Tensor | None = None,
    checkpoint_dir: Path | None = None,
    progress: Callable[[dict], None] | None = None,
    data_parallel: DataParallelGroup | None = None,
    workers: int = 0,
    in_memory_mb: float = DEFAULT_IN_MEMORY_MB,
) -> list[dict]:
    """Train `bundle.model` in place with CLIP's contrastive loss; return the per-epoch history.

    `images` is an image source (core/data/image_stream.py): a uint8 tensor [N, 3, S, S] of
    prepared images, or `ImageFiles` streamed from disk by `workers` decoding processes
    (0 = on this thread), S being the processor's crop size; files whose prepared pixels fit
    in `in_memory_mb` MiB are decoded once and kept in memory instead (not under
    `data_parallel`, where each rank streams its own slice; see
    image_stream.decoded_in_memory). `captions[c]` describes image
    `caption_image[c]` (int64 [C]). Hard negatives (int64, -1 = none): `hard_negative_text`
    [N] caption index per image, `hard_negative_image` [C] image index per caption; see the
    module docstring. AdamW (no decay on biases, norms, embeddings and logit_scale), linear
    warmup then cosine decay to 0 over min(epochs x steps per epoch, max_steps), gradient
    clipping, logit_scale clamped to [0, log(max_logit_scale)]. `freeze_layers` and
    `micro_batch_size` as TrainConfig documents; TF32 matmuls and bf16 autocast on CUDA.
    On CPU two runs with the same seed give identical weights, whatever `workers`. A
    non-finite loss raises FloatingPointError naming epoch and step. With `checkpoint_dir`,
    state is saved after every epoch and a repeated call resumes from the last complete
    epoch. `progress` receives {epoch, step, steps_in_epoch, loss, lr, pairs_per_second}
    every `log_every_steps` steps. History rows: {epoch, loss, seconds, pairs, lr,
    logit_scale} (epoch counted from 1). The model is left in eval mode on `device`, every
    parameter trainable again. With `data_parallel` (this process's rank in an initialised
    torch.distributed group; every rank calls with the same arguments and `device` its own)
    the global batch is `batch_size` across all ranks, each rank loads only its slice of
    each step's images, the model is wrapped in DistributedDataParallel, every rank returns
    the same history and ends with the same weights, and only rank 0 writes `checkpoint_dir`.
    """
    device = torch.device(device)
    model = bundle.model
    if hard_negative_text is not None:
        hard_negative_text = torch.as_tensor(hard_negative_text, dtype=torch.long).cpu()
    if hard_negative_image is not None:
        hard_negative_image = torch.as_tensor(hard_negative_image, dtype=torch.long).cpu()
    caption_image = _validate_inputs(bundle, images, captions, caption_image, hard_negative_text, hard_negative_image)
    if data_parallel is not None and config.micro_batch_size is not None:
        raise ValueError(
            "train_clip: micro_batch_size (cached-gradient accumulation) runs in one process; with data_parallel "
            "set it to None and raise the number of processes, or lower batch_size."
        )
    captions = [str(c) for c in captions]
    text_id = text_ids(captions)
    links = _links_for(config, caption_image, source_length(images), hard_negative_text, hard_negative_image)
    total_steps = _total_steps(config, caption_image, links)
    model.to(device)
    frozen = freeze_lower_layers(model, config.freeze_layers)
    optimizer = make_optimizer(model, config)
    towers = None if data_parallel is None else data_parallel_towers(model, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, total_steps))

    hn_text, hn_image = hard_negative_text, hard_negative_image
    fingerprint = "" if checkpoint_dir is None else _fingerprint(config, images, captions, caption_image, hn_text, hn_image)
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    # CUDA kernels are not all deterministic; there we only warn, and promise identity on CPU.
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    # Seed the global RNG (dropout, if a config enables it) without disturbing the caller's.
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [torch.cuda.current_device() if device.index is None else device.index]
    # Captions are tokenised once and kept compact (int32 ids, bool mask: 5 bytes a token), which
    # is also faster than tokenising each step (measured on the built-in data, 2 threads).
    input_ids, attention_mask = _tokenized(bundle, captions)
    data = _TrainingData(
        images, captions, caption_image, text_id, hn_text, hn_image, links, workers, input_ids, attention_mask,
    )
    if data_parallel is None:  # after the fingerprint, which stays the files' (cheap, no decoding)
        data = replace(data, images=decoded_in_memory(images, in_memory_mb))
    with torch.random.fork_rng(devices=cuda_devices), tf32_matmuls(device):
        torch.manual_seed(config.seed)
        try:
            history = _run_epochs(
                bundle, data, config, device, optimizer, scheduler, total_steps, fingerprint, checkpoint_dir,
                progress, data_parallel, towers,
            )
        finally:
            torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn_only)
            for parameter in frozen:
                parameter.requires_grad_(True)
            model.eval()
    return history


TOKENIZE_CHUNK = 4096  # captions per tokenizer call: bounds the tokenizer's per-caption objects


def _tokenized(bundle: ClipBundle, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every caption tokenised and padded: int32 ids and a bool mask [C, L], filled chunk by chunk.

    One tokenizer call over all captions holds an Encoding object per caption at once (about
    3 KB each: 500 MB for COCO's 590k captions); in chunks the peak is one chunk's.
    """
    length = text_max_length(bundle)
    input_ids = torch.empty((len(captions), length), dtype=torch.int32)
    attention_mask = torch.empty((len(captions), length), dtype=torch.bool)
    for start in range(0, len(captions), TOKENIZE_CHUNK):
        part = captions[start : start + TOKENIZE_CHUNK]
        tokens = bundle.tokenizer(part, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        input_ids[start : start + len(part)] = tokens["input_ids"]
        attention_mask[start : start + len(part)] = tokens["attention_mask"].to(torch.bool)
    return input_ids, attention_mask


def optimizer_steps(
    caption_image: torch.Tensor,
    n_images: int,
    config: TrainConfig,
    hard_negative_text: torch.Tensor | None = None,
    hard_negative_image: torch.Tensor | None = None,
) -> int:
    """How many optimizer steps `train_clip` takes on these inputs: steps per epoch x epochs, capped by max_steps.

    Also the length of its learning-rate schedule (warm-up, then cosine decay to 0 over these
    steps). A control run that must match another run's budget sets max_steps to this number
    and enough epochs to reach it.
    """
    caption_image = torch.as_tensor(caption_image, dtype=torch.long).cpu()
    if hard_negative_text is not None:
        hard_negative_text = torch.as_tensor(hard_negative_text, dtype=torch.long).cpu()
    if hard_negative_image is not None:
        hard_negative_image = torch.as_tensor(hard_negative_image, dtype=torch.long).cpu()
    links = _links_for(config, caption_image, n_images, hard_negative_text, hard_negative_image)
    return _total_steps(config, caption_image, links)


def _links_for(config, caption_image, n_images, hard_negative_text, hard_negative_image) -> HardNegativeLinks | None:
    if config.paired_batches or config.hard_negative_weight != 1.0:
        return hard_negative_links(caption_image, n_images, hard_negative_text, hard_negative_image)
    return None


def _total_steps(config: TrainConfig, caption_image: torch.Tensor, links: HardNegativeLinks | None) -> int:
    steps_per_epoch = len(_epoch_batches_for(config, caption_image, links, 0))
    total_steps = max(1, steps_per_epoch * config.epochs)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    return total_steps


@contextlib.contextmanager
def tf32_matmuls(device: torch.device):
    """TF32 tensor-core matmuls and convolutions on CUDA for the duration (the flags are restored after).

    Ampere and newer GPUs run float32 matmuls several times faster in TF32 (10-bit mantissa);
    contrastive training is insensitive to it, and bf16 autocast covers most of the forward
    anyway. A no-op elsewhere.
    """
    if device.type != "cuda":
        yield
        return
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def freeze_lower_layers(model: torch.nn.Module, n_layers: int) -> list[torch.nn.Parameter]:
    """Stop gradients to both towers' embeddings and their lowest `n_layers` transformer layers.

    Returns the parameters frozen here (those that were trainable), so the caller can thaw
    them. 0 freezes nothing. Raises ValueError when `n_layers` exceeds a tower's depth.
    """
    if n_layers <= 0:
        return []
    frozen: list[torch.nn.Parameter] = []
    for tower_name in ("text_model", "vision_model"):
        tower = getattr(model, tower_name)
        layers = tower.encoder.layers
        if n_layers > len(layers):
            raise ValueError(
                f"freeze_layers={n_layers} exceeds the {tower_name}'s {len(layers)} layers; freeze at most {len(layers)}."
            )
        modules = [tower.embeddings, *layers[:n_layers]]
        if getattr(tower, "pre_layrnorm", None) is not None:  # the vision tower's norm before layer 0
            modules.append(tower.pre_layrnorm)
        for module in modules:
            for parameter in module.parameters():
                if parameter.requires_grad:
                    parameter.requires_grad_(False)
                    frozen.append(parameter)
    return frozen


@dataclass(frozen=True)
class _TrainingData:
    """What every step of a training run reads from: the image source and the caption side."""

    images: ImageSource
    captions: list[str]
    caption_image: torch.Tensor
    text_id: torch.Tensor
    hn_text: torch.Tensor | None
    hn_image: torch.Tensor | None
    links: HardNegativeLinks | None
    workers: int
    input_ids: torch.Tensor | None = None  # int32 [C, L]: every caption tokenised and padded once
    attention_mask: torch.Tensor | None = None  # bool [C, L]


def _run_epochs(
    bundle: ClipBundle,
    data: _TrainingData,
    config: TrainConfig,
    device: torch.device,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    total_steps: int,
    fingerprint: str,
    checkpoint_dir: Path | None,
    progress: Callable[[dict], None] | None,
    data_parallel: DataParallelGroup | None = None,
    towers: torch.nn.Module | None = None,
) -> list[dict]:
    model = bundle.model
    history: list[dict] = []
    start_epoch = 0
    if checkpoint_dir is not None:
        resumed = _load_latest_state(Path(checkpoint_dir), fingerprint, model, optimizer, scheduler, device)
        if resumed is not None:
            start_epoch, history = resumed
    for epoch in range(start_epoch, config.epochs):
        if scheduler.last_epoch >= total_steps:
            break  # max_steps reached in an earlier epoch
        model.train()
        started = time.perf_counter()
        batches = _epoch_batches_for(config, data.caption_image, data.links, epoch)
        batches = batches[: total_steps - scheduler.last_epoch]
        plans = [_plan_step(data, batch, config) for batch in batches]
        step_images = stream_rows(
            data.images, [_rows_to_load(plan, data_parallel) for plan in plans], device, data.workers
        )
        loss_sum, pairs_done, window_pairs, window_started = 0.0, 0, 0, time.perf_counter()
        for step, (plan, images_uint8) in enumerate(zip(plans, step_images, strict=True)):
            texts = plan.all_texts
            tokens = {"input_ids": data.input_ids[texts].long(), "attention_mask": data.attention_mask[texts].long()}

            def check(loss: torch.Tensor, step: int = step) -> None:
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"train_clip: loss is {loss.item()} at epoch {epoch + 1} step {step + 1} of {len(batches)} "
                        f"(global step {scheduler.last_epoch + 1}, lr {scheduler.get_last_lr()[0]:.3g}); "
                        "training stopped. Lower TrainConfig.lr or check the weights and images for NaN/inf."
                    )
                # Gradients are dropped only now, after the forward pass: the allocator then hands
                # their memory straight to the backward pass's new gradients. Dropping them before
                # the forward cost a quarter of the step time with two threads (fresh pages each step).
                optimizer.zero_grad(set_to_none=True)

            loss = _step_loss(
                bundle, plan, images_uint8, tokens["input_ids"], tokens["attention_mask"], data, config, device,
                data_parallel, towers, backward=check,
            )
            if config.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, math.log(config.max_logit_scale))
            batch_pairs = int(plan.batch_captions.shape[0])
            loss_sum += loss.item() * batch_pairs
            pairs_done += batch_pairs
            window_pairs += batch_pairs
            now = time.perf_counter()
            # Every log_every_steps steps, and at least every PROGRESS_SECONDS when steps are slow
            # (a ViT-B/32 step on a CPU takes minutes): long work never goes quiet.
            due = (step + 1) % config.log_every_steps == 0 or step + 1 == len(batches) or now - window_started >= PROGRESS_SECONDS
            if progress is not None and due:
                progress({
                    "epoch": epoch + 1,
                    "step": step + 1,
                    "steps_in_epoch": len(batches),
                    "loss": loss.item(),
                    "lr": scheduler.get_last_lr()[0],
                    "pairs_per_second": window_pairs / max(now - window_started, 1e-9),
                })
                window_pairs, window_started = 0, now
        history.append({
            "epoch": epoch + 1,
            "loss": loss_sum / max(pairs_done, 1),
            "seconds": time.perf_counter() - started,
            "pairs": pairs_done,
            "lr": scheduler.get_last_lr()[0],
            "logit_scale": float(model.logit_scale.exp().item()),
        })
        if checkpoint_dir is not None and (data_parallel is None or data_parallel.is_main):
            _save_state(Path(checkpoint_dir), epoch + 1, fingerprint, model, optimizer, scheduler, history, device)
    return history


def _epoch_batches_for(
    config: TrainConfig, caption_image: torch.Tensor, links: HardNegativeLinks | None, epoch: int
) -> list[torch.Tensor]:
    if config.paired_batches:
        assert links is not None  # train_clip builds them whenever paired_batches is set
        return paired_epoch_batches(caption_image, links, config.batch_size, config.captions_per_image, config.seed, epoch)
    return epoch_batches(caption_image, config.batch_size, config.captions_per_image, config.seed, epoch)


@dataclass(frozen=True)
class _StepPlan:
    """The rows one training step touches: its pairs, then the extra hard negatives it brings."""

    batch_captions: torch.Tensor
    batch_images: torch.Tensor
    extra_texts: torch.Tensor
    extra_images: torch.Tensor
    extended: bool  # every b-caption is a hard-negative text (paired batches or a hard-negative weight)

    @property
    def all_images(self) -> torch.Tensor:
        return torch.cat([self.batch_images, self.extra_images])

    @property
    def all_texts(self) -> torch.Tensor:
        return torch.cat([self.batch_captions, self.extra_texts])


def _plan_step(data: _TrainingData, batch_captions: torch.Tensor, config: TrainConfig) -> _StepPlan:
    caption_image, links, hn_text, hn_image = data.caption_image, data.links, data.hn_text, data.hn_image
    batch_images = caption_image[batch_captions]
    # Paired batches and the hard-negative weight take every b-caption as a hard-negative text;
    # with both off the loss is the original one (only hard_negative_text's caption).
    extended = config.paired_batches or config.hard_negative_weight != 1.0
    extra_texts = torch.empty(0, dtype=torch.long)
    if extended:
        b_captions = [c for i in batch_images.tolist() for c in links.b_captions_of_removal.get(i, [])]
        extra_texts = torch.unique(torch.tensor(b_captions, dtype=torch.long))
        extra_texts = extra_texts[~torch.isin(extra_texts, batch_captions)]
    elif hn_text is not None:
        extra_texts = hn_text[batch_images]
        extra_texts = torch.unique(extra_texts[extra_texts >= 0])
        extra_texts = extra_texts[~torch.isin(extra_texts, batch_captions)]
    extra_images = torch.empty(0, dtype=torch.long)
    if hn_image is not None:
        extra_images = hn_image[batch_captions]
        extra_images = torch.unique(extra_images[extra_images >= 0])
        # An extra image that is in the batch is already a column there (and is its own caption's positive).
        extra_images = extra_images[~torch.isin(extra_images, batch_images)]
    return _StepPlan(batch_captions, batch_images, extra_texts, extra_images, extended)


def _rows_to_load(plan: _StepPlan, data_parallel: DataParallelGroup | None) -> torch.Tensor:
    """The image rows this process embeds for a step: all of them, or its rank's slice."""
    if data_parallel is None:
        return plan.all_images
    return padded_shard(plan.all_images, data_parallel.rank, data_parallel.world_size)


def batch_loss(
    bundle: ClipBundle,
    images_uint8: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    text_id: torch.Tensor,
    caption_image: torch.Tensor,
    batch_captions: torch.Tensor,
    hn_text: torch.Tensor | None,
    hn_image: torch.Tensor | None,
    config: TrainConfig,
    device: torch.device,
    data_parallel: DataParallelGroup | None = None,
    towers: torch.nn.Module | None = None,
    links: HardNegativeLinks | None = None,
) -> torch.Tensor:
    """The loss of one batch from whole in-memory arrays (the training loop streams instead; same numbers).

    `images_uint8` [N, 3, S, S] and the tokenised captions `input_ids` / `attention_mask` [C, L]
    hold every row; the step's rows are taken from them. No backward pass is run.
    """
    if (config.paired_batches or config.hard_negative_weight != 1.0) and links is None:
        links = hard_negative_links(caption_image, int(images_uint8.shape[0]), hn_text, hn_image)
    data = _TrainingData(images_uint8, [], caption_image, text_id, hn_text, hn_image, links, 0)
    plan = _plan_step(data, batch_captions, config)
    rows = _rows_to_load(plan, data_parallel)
    return _step_loss(
        bundle, plan, images_uint8[rows].to(device), input_ids[plan.all_texts], attention_mask[plan.all_texts],
        data, config, device, data_parallel, towers,
    )


def _step_loss(
    bundle: ClipBundle,
    plan: _StepPlan,
    images_uint8: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    data: _TrainingData,
    config: TrainConfig,
    device: torch.device,
    data_parallel: DataParallelGroup | None = None,
    towers: torch.nn.Module | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The loss of one planned step; with `backward` (a finiteness check) also its backward pass.

    `images_uint8` are the step's images (rows `_rows_to_load(plan)`, on `device`), `input_ids`
    / `attention_mask` the tokens of `plan.all_texts` [T, L]. With `backward`, the loss is
    checked by it, then back-propagated (through cached features in micro-batches when
    `config.micro_batch_size` is smaller than the step) and returned detached.
    """
    model = bundle.model
    length = int(attention_mask.sum(dim=1).max())  # drop all-padding columns; pooling is on the eos token
    ids, mask = input_ids[:, :length].to(device), attention_mask[:, :length].to(device)
    micro = config.micro_batch_size
    if backward is not None and micro is not None and micro < max(int(images_uint8.shape[0]), int(ids.shape[0])):
        return _micro_batched_step(bundle, plan, images_uint8, ids, mask, data, config, device, micro, backward)
    if data_parallel is not None and towers is not None:
        # Each rank embeds a slice; the gathered features are the whole global batch, in this order.
        image_features, text_features = gathered_tower_features(
            towers, data_parallel, images_uint8, int(plan.all_images.shape[0]), ids, mask, bundle.image_processor, device,
        )
    else:
        pixels = pixel_values_from_uint8(images_uint8, bundle.image_processor)
        with autocast_for(device):
            image_features = model.get_image_features(pixel_values=pixels).pooler_output
            text_features = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    loss = _loss_of_features(bundle, plan, image_features, text_features, data, config, device)
    if backward is not None:
        backward(loss)
        loss.backward()
        return loss.detach()
    return loss


def _micro_batched_step(
    bundle: ClipBundle,
    plan: _StepPlan,
    images_uint8: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    data: _TrainingData,
    config: TrainConfig,
    device: torch.device,
    micro: int,
    check: Callable[[torch.Tensor], None],
) -> torch.Tensor:
    """Forward and backward of one step `micro` rows at a time, with the full-batch gradient.

    Cached-gradient accumulation (GradCache, Gao et al. 2021; open_clip's --accum-freq does the
    same): embed every row without a graph, take the full-batch loss and its gradient with
    respect to the features, then re-embed each micro-batch with a graph and back-propagate
    that gradient. Plain accumulation of micro-batch losses would shrink the set of negatives
    each row sees, i.e. change the loss; this keeps it, for one extra forward pass. The RNG
    state is replayed per micro-batch so dropout (if a config has any) matches.
    """
    model = bundle.model
    image_chunks = torch.arange(int(images_uint8.shape[0])).split(micro)
    text_chunks = torch.arange(int(ids.shape[0])).split(micro)

    def embed_images(rows: torch.Tensor) -> torch.Tensor:
        pixels = pixel_values_from_uint8(images_uint8[rows.to(images_uint8.device)], bundle.image_processor)
        with autocast_for(device):
            return model.get_image_features(pixel_values=pixels).pooler_output

    def embed_texts(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(ids.device)
        with autocast_for(device):
            return model.get_text_features(input_ids=ids[rows], attention_mask=mask[rows]).pooler_output

    states: list[tuple] = []
    with torch.no_grad():
        image_parts, text_parts = [], []
        for rows in image_chunks:
            states.append(_rng_state(device))
            image_parts.append(embed_images(rows))
        for rows in text_chunks:
            states.append(_rng_state(device))
            text_parts.append(embed_texts(rows))
    image_features = torch.cat(image_parts).requires_grad_(True)
    text_features = torch.cat(text_parts).requires_grad_(True)
    loss = _loss_of_features(bundle, plan, image_features, text_features, data, config, device)
    check(loss)
    loss.backward()  # the features' gradients, and logit_scale's
    replay = iter(states)
    for rows in image_chunks:
        _set_rng_state(next(replay), device)
        embed_images(rows).backward(image_features.grad[rows.to(image_features.device)])
    for rows in text_chunks:
        _set_rng_state(next(replay), device)
        embed_texts(rows).backward(text_features.grad[rows.to(text_features.device)])
    return loss.detach()


def _rng_state(device: torch.device) -> tuple:
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _loss_of_features(
    bundle: ClipBundle,
    plan: _StepPlan,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    data: _TrainingData,
    config: TrainConfig,
    device: torch.device,
) -> torch.Tensor:
    """InfoNCE of a step from its features (rows: plan.all_images, plan.all_texts), masks and weights applied."""
    links, caption_image, text_id = data.links, data.caption_image, data.text_id
    batch_images, batch_captions = plan.batch_images, plan.batch_captions
    extra_texts, extra_images = plan.extra_texts, plan.extra_images
    image_emb = F.normalize(image_features.float(), dim=-1)
    text_emb = F.normalize(text_features.float(), dim=-1)

    batch = int(batch_captions.shape[0])
    false_negatives = None
    if config.mask_duplicate_captions:
        batch_text_id = text_id[batch_captions]
        false_negatives = (batch_text_id[:, None] == batch_text_id[None, :]).to(device)
    hard_text_cells = hard_image_cells = None
    if plan.extended:
        hard_in_batch = links.is_hard(batch_images, batch_captions)  # [image row, text column]
        if config.paired_batches:
            # Inside a family (I and its I⁻ᵇ) a caption that is not a hard negative truly describes the image.
            family = links.family[batch_images]
            same_family = ((family[:, None] == family[None, :]) & ~hard_in_batch).to(device)
            false_negatives = same_family if false_negatives is None else false_negatives | same_family
        if config.hard_negative_weight != 1.0:
            hard_text_cells = torch.cat([hard_in_batch, links.is_hard(batch_images, extra_texts)], dim=1).to(device)
            hard_image_cells = torch.cat([hard_in_batch.T, links.is_hard(extra_images, batch_captions).T], dim=1).to(device)
    # A hard-negative text still describes its own image: never a negative for that image.
    extra_text_mask = (batch_images[:, None] == caption_image[extra_texts][None, :]).to(device)
    if config.mask_duplicate_captions and extra_texts.numel():
        extra_text_mask |= (text_id[batch_captions][:, None] == text_id[extra_texts][None, :]).to(device)
    return contrastive_loss(
        image_emb[:batch],
        text_emb[:batch],
        bundle.model.logit_scale,
        extra_text_emb=text_emb[batch:],
        extra_image_emb=image_emb[batch:],
        false_negative_mask=false_negatives,
        extra_text_mask=extra_text_mask,
        hard_negative_weight=config.hard_negative_weight,
        hard_text_cells=hard_text_cells,
        hard_image_cells=hard_image_cells,
    )


def _validate_inputs(
    bundle: ClipBundle,
    images: ImageSource,
    captions: Sequence[str],
    caption_image: torch.Tensor,
    hard_negative_text: torch.Tensor | None,
    hard_negative_image: torch.Tensor | None,
) -> torch.Tensor:
    size = processor_image_size(bundle.image_processor)
    if isinstance(images, ImageFiles):
        if tuple(images.image_shape) != (3, size, size):
            raise ValueError(
                f"train_clip: ImageFiles prepare images of shape {images.image_shape} but the model's image processor "
                f"takes (3, {size}, {size}); build them with the checkpoint's own preprocessing (ImagePreprocessing.of)."
            )
    elif images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
        raise ValueError(
            f"train_clip: images must be ImageFiles or uint8 [N, 3, {size}, {size}] (the image processor's crop size), "
            f"got {images.dtype} {tuple(images.shape)}; load them with load_images_uint8(paths, size={size})."
        )
    n_images, n_captions = source_length(images), len(captions)
    caption_image = torch.as_tensor(caption_image, dtype=torch.long).cpu()
    if caption_image.shape != (n_captions,):
        raise ValueError(f"train_clip: caption_image has shape {tuple(caption_image.shape)}, expected ({n_captions},), one image index per caption.")
    _check_indices("caption_image", caption_image, n_images, "images", allow_none=False)
    if hard_negative_text is not None:
        if tuple(hard_negative_text.shape) != (n_images,):
            raise ValueError(f"train_clip: hard_negative_text has shape {tuple(hard_negative_text.shape)}, expected ({n_images},), one caption index (or -1) per image.")
        _check_indices("hard_negative_text", hard_negative_text.long(), n_captions, "captions", allow_none=True)
    if hard_negative_image is not None:
        if tuple(hard_negative_image.shape) != (n_captions,):
            raise ValueError(f"train_clip: hard_negative_image has shape {tuple(hard_negative_image.shape)}, expected ({n_captions},), one image index (or -1) per caption.")
        _check_indices("hard_negative_image", hard_negative_image.long(), n_images, "images", allow_none=True)
        own = hard_negative_image.long() == caption_image
        if bool(own.any()):
            first = int(torch.nonzero(own)[0])
            raise ValueError(f"train_clip: hard_negative_image[{first}] is caption {first}'s own image {int(caption_image[first])}; a hard negative must be another image.")
    return caption_image


def _check_indices(field: str, values: torch.Tensor, bound: int, target: str, allow_none: bool) -> None:
    low = -1 if allow_none else 0
    bad = (values < low) | (values >= bound)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0])
        allowed = f"-1 (none) or 0..{bound - 1}" if allow_none else f"0..{bound - 1}"
        raise ValueError(f"train_clip: {field}[{first}] = {int(values[first])} is not an index into {target}; expected {allowed}.")


def text_ids(captions: Sequence[str]) -> torch.Tensor:
    """One id per distinct caption text, in order of first appearance (equal texts are not negatives of each other)."""
    seen: dict[str, int] = {}
    return torch.tensor([seen.setdefault(str(c), len(seen)) for c in captions], dtype=torch.long)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, decaying weight matrices only (not gains, biases, embeddings or the logit scale)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        # CLIP's recipe: decay only weight matrices, not gains, biases, embeddings or the temperature.
        if parameter.ndim < 2 or "embedding" in name or "logit_scale" in name:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        foreach=False,  # the per-parameter loop is deterministic and fast enough at this size
    )


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor per step: linear warm-up over `warmup_steps`, then cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# --------------------------------------------------------------------------- resumable state


def _fingerprint(
    config: TrainConfig,
    images: ImageSource,
    captions: Sequence[str],
    caption_image: torch.Tensor,
    hard_negative_text: torch.Tensor | None,
    hard_negative_image: torch.Tensor | None,
) -> str:
    digest = hashlib.sha256()
    settings = {k: v for k, v in asdict(config).items() if k != "log_every_steps"}
    # Fields added after format 1 enter only when set, so states saved before them still resume.
    for name, default in (
        ("hard_negative_weight", 1.0), ("paired_batches", False), ("max_steps", None),
        ("micro_batch_size", None), ("freeze_layers", 0),
    ):
        if settings[name] == default:
            del settings[name]
    digest.update(json.dumps(settings, sort_keys=True).encode())
    if isinstance(images, ImageFiles):
        # Files are not read again here: paths, sizes, mtimes and the preprocessing identify them.
        digest.update(f"files:{len(images)}:{images.fingerprint()}".encode())
    else:
        digest.update(str(tuple(images.shape)).encode())
        digest.update(images.contiguous().cpu().numpy().tobytes())
    digest.update(json.dumps([str(c) for c in captions]).encode())
    for tensor in (caption_image, hard_negative_text, hard_negative_image):
        digest.update(b"none" if tensor is None else tensor.long().cpu().numpy().tobytes())
    return digest.hexdigest()


def _state_dir_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def _save_state(
    checkpoint_dir: Path,
    epoch: int,
    fingerprint: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    history: list[dict],
    device: torch.device,
) -> None:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / _state_dir_name(epoch)
    partial = checkpoint_dir / f".{final.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    save_model(model, str(partial / "model.safetensors"))

    optimizer_state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, object]] = {}
    for index, slot in optimizer_state["state"].items():
        for key, value in slot.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    save_file(tensors, str(partial / "optimizer.safetensors"))

    rng = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["torch_cuda"] = torch.cuda.get_rng_state(device)
    save_file(rng, str(partial / "rng.safetensors"))

    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    state = {
        "format_version": STATE_FORMAT_VERSION,
        "epoch": epoch,
        "fingerprint": fingerprint,
        "history": history,
        "optimizer_param_groups": optimizer_state["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler_state,
    }
    # state.json is written last: its presence marks the state complete.
    (partial / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    for older in checkpoint_dir.glob("epoch-*"):
        if older.name != final.name and older.is_dir():
            shutil.rmtree(older)


def _load_latest_state(
    checkpoint_dir: Path,
    fingerprint: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    device: torch.device,
) -> tuple[int, list[dict]] | None:
    complete = sorted(p for p in checkpoint_dir.glob("epoch-*") if (p / "state.json").is_file())
    if not complete:
        return None
    latest = complete[-1]
    state = json.loads((latest / "state.json").read_text())
    if state.get("format_version") != STATE_FORMAT_VERSION:
        raise ValueError(
            f"train_clip: {latest / 'state.json'} has format_version {state.get('format_version')}, "
            f"this code reads {STATE_FORMAT_VERSION}; use an empty checkpoint_dir."
        )
    if state["fingerprint"] != fingerprint:
        raise ValueError(
            f"train_clip: {latest / 'state.json'} field fingerprint belongs to a different config or data set "
            "than this call; pass a fresh checkpoint_dir, or delete that folder to start over."
        )
    missing, unexpected = load_model(model, str(latest / "model.safetensors"), strict=True, device=str(device))
    if missing or unexpected:
        raise ValueError(f"train_clip: {latest / 'model.safetensors'} does not fit the model (missing {missing}, unexpected {unexpected}).")

    tensors = load_file(str(latest / "optimizer.safetensors"))
    slots: dict[int, dict[str, object]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        slots.setdefault(int(index), {})[name] = value
    for index, values in state["optimizer_scalars"].items():
        slots.setdefault(int(index), {}).update(values)
    param_groups = state["optimizer_param_groups"]
    for group in param_groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": slots, "param_groups": param_groups})
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})

    rng = load_file(str(latest / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in rng:
        torch.cuda.set_rng_state(rng["torch_cuda"], device)
    return int(state["epoch"]), list(state["history"])
