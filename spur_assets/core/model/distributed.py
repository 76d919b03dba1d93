"""Data-parallel contrastive training across processes: torch.distributed + DistributedDataParallel.

Processes are started by `torchrun` (torch.distributed.run), which sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address; nothing here launches processes.

Why the result equals the one-process run. Every rank builds the same global batch (the batch
order depends only on the seed, see training.epoch_batches) and embeds a contiguous slice of
its rows: of the batch images plus their hard-negative images, and of the batch captions plus
their hard-negative captions. The slices are gathered with gradient
(functional all_gather, whose backward is a reduce-scatter), so every rank holds the features of the whole
global batch in the one-process row order and computes the same InfoNCE loss f on it, hard
negatives and masks included (the B x B logits are cheap next to the towers). In backward the
gather sums the W identical gradients of f for each slice, so rank r's tower gradient is
W * (df/dtheta through its slice); DistributedDataParallel averages over the W ranks, which
gives df/dtheta for the towers, and for logit_scale (used by every rank's loss directly) the
average of W copies of df/dscale. The optimizer then takes the same step on every rank.
What differs from one process is float rounding only: a tower's matrix products over a
slice instead of the whole batch, and gradient sums in another order.

Slices are padded to equal length (gloo and NCCL gather equal shapes) by repeating a row of
the batch; padded rows are dropped after the gather, so they get no gradient. Padding also
means every rank always runs both towers, so every parameter receives a gradient on every rank
in every step, as DistributedDataParallel requires.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives
import torch.distributed.nn.functional as dist_functional
from torch.nn.parallel import DistributedDataParallel

from spur_assets.core.model.clip_model import pixel_values_from_uint8
from spur_assets.core.runtime.devices import autocast_for, resolve_device

DIST_BACKENDS = ("auto", "gloo", "nccl")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DataParallelGroup:
    """This process's place in a running process group (set up by `init_data_parallel`)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and reports to the orchestrator."""
        return self.rank == 0


def resolve_backend(preference: str, device: torch.device) -> str:
    """The torch.distributed backend for `device`: "auto" = NCCL on CUDA, gloo elsewhere.

    "gloo" works on every device (slowly on GPUs); "nccl" needs a CUDA device and raises
    ValueError otherwise; any other preference raises ValueError listing DIST_BACKENDS.
    """
    text = str(preference).strip().lower()
    if text not in DIST_BACKENDS:
        raise ValueError(f"dist_backend {preference!r} is not a backend: expected one of {DIST_BACKENDS}.")
    if text == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if text == "nccl" and device.type != "cuda":
        raise ValueError(
            f"dist_backend 'nccl' needs CUDA devices but this process trains on {device}; "
            "use dist_backend 'gloo' (or 'auto') on CPU."
        )
    return text


def rank_device(preference: str, local_rank: int) -> torch.device:
    """The device one rank trains on: `preference` as resolve_device reads it, with "cuda" meaning
    the GPU numbered `local_rank` on this node (one GPU per process, as torchrun places them)."""
    device = resolve_device(preference)
    if device.type == "cuda" and device.index is None:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise RuntimeError(
                f"rank with LOCAL_RANK={local_rank} needs its own GPU but this node has {count}; "
                f"start torchrun with --nproc_per_node at most {count}."
            )
        return torch.device("cuda", local_rank)
    return device


def init_data_parallel(
    backend: str = "auto",
    device: str = "auto",
    environ: Mapping[str, str] | None = None,
    timeout_seconds: float = 1800.0,
) -> tuple[DataParallelGroup, torch.device]:
    """Join the process group torchrun set up (env:// rendezvous); return this rank's place and device.

    Reads RANK, WORLD_SIZE and LOCAL_RANK (and torchrun's MASTER_ADDR/MASTER_PORT); raises
    RuntimeError naming the missing variables when the process was not started by torchrun.
    `backend` and `device` are preferences as resolve_backend and rank_device read them.
    Call `close_data_parallel` when done.
    """
    env = os.environ if environ is None else environ
    missing = [name for name in TORCHRUN_ENV if name not in env]
    if missing:
        raise RuntimeError(
            f"init_data_parallel: environment variables {missing} are not set; start this module with "
            "`torchrun --nproc_per_node=N -m ...` (torch.distributed.run), which sets them."
        )
    rank, world_size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    rank_dev = rank_device(device, local_rank)
    if rank_dev.type == "cuda" and world_size > 1 and ":" in str(device):
        raise ValueError(
            f"device preference {device!r} puts every one of the {world_size} ranks on the same GPU; "
            "set the device to 'auto' or 'cuda' so that each rank takes the GPU numbered by its LOCAL_RANK."
        )
    backend_name = resolve_backend(backend, rank_dev)
    if rank_dev.type == "cuda":
        torch.cuda.set_device(rank_dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend_name,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_seconds),
        )
    return DataParallelGroup(rank, world_size, local_rank, backend_name), rank_dev


def close_data_parallel() -> None:
    """Leave the process group (a no-op when none is initialised)."""
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- slicing a global batch


def shard_sizes(n_rows: int, world_size: int) -> list[int]:
    """Rows per rank when `n_rows` are cut into `world_size` contiguous near-equal slices
    (the first n_rows % world_size ranks get one more, as torch.tensor_split cuts)."""
    if world_size < 1:
        raise ValueError(f"shard_sizes: world_size={world_size} must be >= 1.")
    base, extra = divmod(n_rows, world_size)
    return [base + (1 if rank < extra else 0) for rank in range(world_size)]


def padded_shard(rows: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s contiguous slice of `rows`, padded to ceil(len/world_size) entries by repeating rows[0].

    Every rank gets the same length so the slices can be gathered; `gather_shards` drops the
    padding again. `rows` must not be empty.
    """
    if rows.shape[0] == 0:
        raise ValueError("padded_shard: no rows to share out; a global batch has at least one pair.")
    sizes = shard_sizes(int(rows.shape[0]), world_size)
    start = sum(sizes[:rank])
    own = rows[start : start + sizes[rank]]
    width = math.ceil(rows.shape[0] / world_size)
    if own.shape[0] < width:
        own = torch.cat([own, rows[:1].expand(width - own.shape[0], *rows.shape[1:])])
    return own


def gather_shards(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All ranks' padded slices concatenated in rank order with the padding dropped; differentiable.

    `local` is this rank's [max(sizes), ...] slice; `sizes[r]` the real rows of rank r. The
    backward pass sums every rank's gradient for this rank's rows (see the module docstring).
    """
    width = int(local.shape[0])
    # Recent torch deprecates torch.distributed.nn's autograd all_gather in favour of this one;
    # both sum every rank's gradient for the local rows in backward.
    gather_single = getattr(functional_collectives, "all_gather_single", None)
    if gather_single is not None:
        parts = gather_single(local.contiguous(), 0, dist.group.WORLD).split(width)
    else:
        parts = dist_functional.all_gather(local)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


# --------------------------------------------------------------------------- towers


class ClipTowers(torch.nn.Module):
    """Both CLIP towers as one forward, so DistributedDataParallel sees every step's use of the model.

    forward(pixel_values, input_ids, attention_mask) -> (image_features, text_features), the
    same `pooler_output` features train_clip computes in one process.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image_features = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        text_features = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return image_features, text_features


def data_parallel_towers(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """`model`'s towers wrapped in DistributedDataParallel on `device` (the process group must be up).

    Construction broadcasts rank 0's weights to every rank.
    """
    if not dist.is_initialized():
        raise RuntimeError("data_parallel_towers: no process group; call init_data_parallel first (under torchrun).")
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(ClipTowers(model), device_ids=device_ids)


def gathered_tower_features(
    towers: torch.nn.Module,
    group: DataParallelGroup,
    own_images_uint8: torch.Tensor,
    n_images: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_processor,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of a global batch's `n_images` images and of its captions, in order, computed a
    slice per rank and gathered with gradient.

    `own_images_uint8` are this rank's images: rows `padded_shard(image_rows, rank, world_size)`
    of the step's image rows (each rank loads only its slice). `input_ids` / `attention_mask`
    [T, L] tokenise every caption of the global batch, already cut to its longest caption, as in
    one process. Every rank of `group` must call this for the same step.
    """
    n_texts = int(input_ids.shape[0])
    image_sizes = shard_sizes(n_images, group.world_size)
    text_sizes = shard_sizes(n_texts, group.world_size)
    own_texts = padded_shard(torch.arange(n_texts), group.rank, group.world_size).to(input_ids.device)
    pixels = pixel_values_from_uint8(own_images_uint8.to(device), image_processor)
    ids = input_ids[own_texts].to(device)
    mask = attention_mask[own_texts].to(device)
    with autocast_for(device):
        image_features, text_features = towers(pixels, ids, mask)
    return gather_shards(image_features, image_sizes), gather_shards(text_features, text_sizes)
