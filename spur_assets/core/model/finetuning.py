"""A recipe turned into a trained checkpoint: the one path every training in spur-assets takes.

`TrainingPlan` binds a set of rows to train on (a `FinetuneSet`: image paths, captions, which
image each caption describes, hard-negative links) to the optimisation that runs on it (a
`FinetuneRecipe`, or the `SmallClipRecipe` of a base trained from scratch) and a seed. It
knows, before anything trains, the `TrainConfig` and the number of optimizer steps; `run`
trains a model in place and returns the per-epoch history. Three plans exist:

- `TrainingPlan.finetune`: a fine-tune of a base on originals mixed with counterfactuals
  (finetuned_checkpoint, bench/experiments/ablation.py);
- `TrainingPlan.control`: the same recipe and seed on the originals only, for exactly as many
  optimizer steps as a given fine-tune took (control_checkpoint), so that what the
  counterfactuals earned can be told from what more training earned;
- `TrainingPlan.from_scratch`: the small CLIP's own training (base_checkpoint without
  SPUR_BASE_MODEL, bench/experiments/research_mitigate.py).

`job` packs a plan for torchrun ranks (core/model/training_job.py), which run the same
`train_clip`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from spur_assets.core.counterfactuals.finetune_data import FinetuneSet
from spur_assets.core.data.image_stream import DEFAULT_IN_MEMORY_MB, ImageFiles, ImageSource
from spur_assets.core.data.preprocessing import ImagePreprocessing
from spur_assets.core.model.clip_model import ClipBundle
from spur_assets.core.model.recipes import FinetuneRecipe, SmallClipRecipe
from spur_assets.core.model.training import TrainConfig, optimizer_steps, train_clip
from spur_assets.core.model.training_job import TrainingJob


def _links(values: np.ndarray) -> torch.Tensor | None:
    """Hard-negative indices as train_clip takes them; None when no row has one (-1 everywhere)."""
    tensor = torch.as_tensor(np.asarray(values), dtype=torch.long)
    return tensor if bool((tensor >= 0).any()) else None


@dataclass(frozen=True)
class TrainingPlan:
    """What one training runs: these rows, this TrainConfig, this many optimizer steps.

    `recipe` is the FinetuneRecipe a fine-tune or control follows (None for a base trained
    from scratch, whose whole story is its SmallClipRecipe and `config`).
    """

    rows: FinetuneSet
    config: TrainConfig
    recipe: FinetuneRecipe | None
    caption_image: torch.Tensor
    hard_negative_text: torch.Tensor | None
    hard_negative_image: torch.Tensor | None
    steps: int

    @classmethod
    def _of(cls, rows: FinetuneSet, config: TrainConfig, recipe: FinetuneRecipe | None) -> TrainingPlan:
        caption_image = torch.as_tensor(np.asarray(rows.caption_image), dtype=torch.long)
        hard_text, hard_image = _links(rows.hard_negative_text), _links(rows.hard_negative_image)
        steps = optimizer_steps(caption_image, len(rows.image_paths), config, hard_text, hard_image)
        return cls(rows, config, recipe, caption_image, hard_text, hard_image, steps)

    @classmethod
    def finetune(
        cls,
        rows: FinetuneSet,
        recipe: FinetuneRecipe,
        seed: int,
        hard_negative_weight: float = 1.0,
        paired_batches: bool = False,
    ) -> TrainingPlan:
        """`recipe` on `rows` with this seed and loss (hard-negative weight, paired batches)."""
        return cls._of(rows, recipe.train_config(seed, hard_negative_weight, paired_batches), recipe)

    @classmethod
    def control(cls, originals: FinetuneSet, recipe: FinetuneRecipe, seed: int, steps: int) -> TrainingPlan:
        """`recipe` and seed on `originals` for exactly `steps` optimizer steps, with the same schedule.

        As many epochs over the originals as reach `steps`, capped there: the learning rate
        then warms up and decays over the same number of steps as the fine-tune it controls.
        """
        if steps < 1:
            raise ValueError(f"a control needs the fine-tune's optimizer steps (>= 1), got {steps}")
        one_epoch = cls._of(originals, replace(recipe, epochs=1, max_steps=None).train_config(seed), None).steps
        matched = recipe.with_(epochs=math.ceil(steps / one_epoch), max_steps=steps)
        return cls._of(originals, matched.train_config(seed), matched)

    @classmethod
    def from_scratch(cls, rows: FinetuneSet, recipe: SmallClipRecipe) -> TrainingPlan:
        """The small CLIP's own training (`recipe.new_model` makes the model it trains)."""
        return cls._of(rows, recipe.train_config(), None)

    def images(self, bundle: ClipBundle) -> ImageFiles:
        """The rows' image files, streamed and prepared as `bundle`'s own image processor does."""
        return ImageFiles.of(self.rows.image_paths, ImagePreprocessing.of(bundle.image_processor))

    def run(
        self,
        bundle: ClipBundle,
        device: torch.device | str = "cpu",
        *,
        images: ImageSource | None = None,
        checkpoint_dir: Path | None = None,
        progress: Callable[[dict], None] | None = None,
        workers: int = 0,
        in_memory_mb: float = DEFAULT_IN_MEMORY_MB,
    ) -> list[dict]:
        """Train `bundle.model` in place by this plan; the per-epoch history (`training.train_clip`).

        `images` defaults to `self.images(bundle)`; pass a prepared uint8 tensor (or other
        ImageFiles) of the same rows to reuse decoded pixels. The other arguments are
        train_clip's: where to resume from, progress events, decoding processes, in-memory cap.
        """
        return train_clip(
            bundle,
            self.images(bundle) if images is None else images,
            self.rows.captions,
            self.caption_image,
            self.config,
            device,
            hard_negative_text=self.hard_negative_text,
            hard_negative_image=self.hard_negative_image,
            checkpoint_dir=checkpoint_dir,
            progress=progress,
            workers=workers,
            in_memory_mb=in_memory_mb,
        )

    def job(self, images: ImageSource, base_checkpoint: Path, output_checkpoint: Path, **job: object) -> TrainingJob:
        """This plan as a TrainingJob for torchrun ranks; `job` takes TrainingJob's other fields."""
        return TrainingJob(
            images, list(self.rows.captions), self.caption_image, self.hard_negative_text, self.hard_negative_image,
            self.config, base_checkpoint=base_checkpoint, output_checkpoint=output_checkpoint, **job,
        )
