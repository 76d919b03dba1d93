"""A training job on disk: everything a separate training process needs, and nothing pickled.

The orchestrating process decodes the images and assembles the pairs once, writes them here,
and starts the training processes (torchrun ranks) with the folder's path. Layout:

- `tensors.safetensors`: caption_image [C] int64, when present hard_negative_text [N] /
  hard_negative_image [C] int64 (-1 = none), and images_uint8 [N, 3, S, S] uint8 when the
  images are an in-memory tensor;
- `job.json`: format_version, captions, the TrainConfig fields, base_checkpoint (a
  save_pretrained folder), output_checkpoint (where rank 0 saves the trained model),
  resume_dir (train_clip's checkpoint_dir, or null), device and dist_backend preferences,
  `loader_workers`, and `image_files` ({paths, preprocessing, max_pixels}) when the images are
  streamed from files: then every rank decodes only its own slice of each step.

Results, written by rank 0 of the training run: the checkpoint at output_checkpoint and
`result.json` here ({history, world_size, dist_backend, device, train_seconds}).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from spur_assets.core.data.image_stream import ImageFiles, ImageSource
from spur_assets.core.data.preprocessing import ImagePreprocessing
from spur_assets.core.model.training import TrainConfig

JOB_FORMAT_VERSION = 2  # 2: images may be files (image_files), loader_workers
JOB_FILE = "job.json"
TENSORS_FILE = "tensors.safetensors"
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class TrainingJob:
    """What `train_clip` takes, plus where the model comes from and where it goes."""

    images: ImageSource
    captions: list[str]
    caption_image: torch.Tensor
    hard_negative_text: torch.Tensor | None
    hard_negative_image: torch.Tensor | None
    config: TrainConfig
    base_checkpoint: Path
    output_checkpoint: Path
    resume_dir: Path | None
    device: str = "auto"
    dist_backend: str = "auto"
    loader_workers: int = 0  # decoding processes per rank (train_clip's workers)


def write_training_job(folder: Path, job: TrainingJob) -> Path:
    """Write `job` into `folder` (created; files replaced atomically); return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"caption_image": torch.as_tensor(job.caption_image, dtype=torch.long).contiguous().cpu()}
    image_files = None
    if isinstance(job.images, ImageFiles):
        image_files = {
            "paths": list(job.images.paths),
            "preprocessing": asdict(job.images.preprocessing),
            "max_pixels": job.images.max_pixels,
        }
    else:
        tensors["images_uint8"] = job.images.contiguous().cpu()
    for name in ("hard_negative_text", "hard_negative_image"):
        value = getattr(job, name)
        if value is not None:
            tensors[name] = torch.as_tensor(value, dtype=torch.long).contiguous().cpu()
    description = {
        "format_version": JOB_FORMAT_VERSION,
        "captions": [str(c) for c in job.captions],
        "config": asdict(job.config),
        "base_checkpoint": str(job.base_checkpoint),
        "output_checkpoint": str(job.output_checkpoint),
        "resume_dir": None if job.resume_dir is None else str(job.resume_dir),
        "device": job.device,
        "dist_backend": job.dist_backend,
        "loader_workers": job.loader_workers,
        "image_files": image_files,
    }
    _replace(folder / TENSORS_FILE, lambda path: save_file(tensors, str(path)))
    _replace(folder / JOB_FILE, lambda path: path.write_text(json.dumps(description)))
    return folder


def read_training_job(folder: Path) -> TrainingJob:
    """The job written by `write_training_job` in `folder`.

    Raises FileNotFoundError naming the missing file, and ValueError naming the file and field
    when the format version or a TrainConfig field is not what this code writes.
    """
    folder = Path(folder)
    job_path, tensors_path = folder / JOB_FILE, folder / TENSORS_FILE
    for path in (job_path, tensors_path):
        if not path.is_file():
            raise FileNotFoundError(f"read_training_job: {path} does not exist; write the job with write_training_job first.")
    description = json.loads(job_path.read_text())
    if description.get("format_version") != JOB_FORMAT_VERSION:
        raise ValueError(
            f"read_training_job: {job_path} field format_version is {description.get('format_version')!r}, "
            f"this code reads {JOB_FORMAT_VERSION}; rewrite the job with this version of spur-assets."
        )
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(description["config"]) - known)
    if unknown:
        raise ValueError(f"read_training_job: {job_path} field config has keys {unknown} that TrainConfig does not know.")
    tensors = load_file(str(tensors_path))
    files = description.get("image_files")
    if files is not None:
        images: ImageSource = ImageFiles.of(files["paths"], ImagePreprocessing(**files["preprocessing"]), files["max_pixels"])
    elif "images_uint8" in tensors:
        images = tensors["images_uint8"]
    else:
        raise ValueError(f"read_training_job: {job_path} names no image_files and {tensors_path} holds no images_uint8; rewrite the job.")
    return TrainingJob(
        images=images,
        captions=list(description["captions"]),
        caption_image=tensors["caption_image"],
        hard_negative_text=tensors.get("hard_negative_text"),
        hard_negative_image=tensors.get("hard_negative_image"),
        config=TrainConfig(**description["config"]),
        base_checkpoint=Path(description["base_checkpoint"]),
        output_checkpoint=Path(description["output_checkpoint"]),
        resume_dir=None if description["resume_dir"] is None else Path(description["resume_dir"]),
        device=description["device"],
        dist_backend=description["dist_backend"],
        loader_workers=int(description.get("loader_workers", 0)),
    )


def write_training_result(
    folder: Path, history: Sequence[dict], world_size: int, dist_backend: str, device: str, train_seconds: float
) -> Path:
    """Write `result.json` (what the training processes report back) into the job folder."""
    result = {
        "history": list(history),
        "world_size": world_size,
        "dist_backend": dist_backend,
        "device": device,
        "train_seconds": train_seconds,
    }
    path = Path(folder) / RESULT_FILE
    _replace(path, lambda staged: staged.write_text(json.dumps(result, indent=1)))
    return path


def read_training_result(folder: Path) -> dict:
    """The `result.json` of a finished job; FileNotFoundError when rank 0 did not finish."""
    path = Path(folder) / RESULT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"read_training_result: {path} does not exist; the training processes did not finish "
            "(see their log for the failing rank)."
        )
    return json.loads(path.read_text())


def _replace(path: Path, write) -> None:
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(staged)
    os.replace(staged, path)
