"""TrainingPlan: the one path from a recipe to a trained checkpoint (fine-tune, control, from scratch)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from spur_assets.core.counterfactuals.finetune_data import FinetuneSet, originals_only
from spur_assets.core.model.clip_model import new_small_clip
from spur_assets.core.model.finetuning import TrainingPlan
from spur_assets.core.model.recipes import BUILTIN_BASE_RECIPE, SmallClipRecipe
from spur_assets.core.model.training import optimizer_steps, train_clip
from tests.test_training import TINY, colour_square_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPE = BUILTIN_BASE_RECIPE.with_(epochs=2, batch_size=16, warmup_steps=2, captions_per_image=2)


def _rows(images: torch.Tensor, captions: list[str], caption_image: torch.Tensor, links: bool) -> FinetuneSet:
    """The colour task as a fine-tuning set; with `links`, image 1 is a 'removal' of image 0's captions."""
    n, c = images.shape[0], len(captions)
    hard_text, hard_image = np.full(n, -1, dtype=np.int64), np.full(c, -1, dtype=np.int64)
    if links:
        hard_text[1] = 0
        hard_image[0] = 1
    paths = [f"image_{i}.png" for i in range(n)]
    return FinetuneSet(paths, list(captions), caption_image.numpy().astype(np.int64), hard_text, hard_image)


def _state(bundle) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in bundle.model.state_dict().items()}


def test_a_finetune_plan_trains_exactly_what_train_clip_trains_with_the_recipe():
    images, captions, caption_image, _ = colour_square_task(images_per_colour=6)
    rows = _rows(images, captions, caption_image, links=True)
    plan = TrainingPlan.finetune(rows, RECIPE, seed=3, hard_negative_weight=4.0, paired_batches=True)
    assert plan.config == RECIPE.train_config(3, 4.0, True)
    hard_text, hard_image = torch.as_tensor(rows.hard_negative_text), torch.as_tensor(rows.hard_negative_image)
    assert plan.steps == optimizer_steps(caption_image, len(images), plan.config, hard_text, hard_image)

    ours = new_small_clip(captions, image_size=16, seed=0, **TINY)
    theirs = new_small_clip(captions, image_size=16, seed=0, **TINY)
    history = plan.run(ours, "cpu", images=images)
    expected = train_clip(
        theirs, images, captions, caption_image, plan.config, "cpu",
        hard_negative_text=hard_text, hard_negative_image=hard_image,
    )
    assert [row["loss"] for row in history] == [row["loss"] for row in expected]
    mine, reference = _state(ours), _state(theirs)
    assert all(torch.equal(mine[k], reference[k]) for k in reference)


def test_rows_without_a_single_link_train_without_hard_negatives():
    images, captions, caption_image, _ = colour_square_task(images_per_colour=3)
    plain = TrainingPlan.finetune(_rows(images, captions, caption_image, links=False), RECIPE, seed=0)
    assert plain.hard_negative_text is None and plain.hard_negative_image is None
    linked = TrainingPlan.finetune(_rows(images, captions, caption_image, links=True), RECIPE, seed=0)
    assert linked.hard_negative_text is not None and int(linked.hard_negative_text[1]) == 0
    assert linked.hard_negative_image is not None and int(linked.hard_negative_image[0]) == 1


@pytest.mark.parametrize("steps", [1, 5, 7, 13])
def test_a_control_runs_the_finetunes_number_of_steps_with_the_same_recipe(steps):
    images, captions, caption_image, _ = colour_square_task(images_per_colour=6)
    originals = _rows(images, captions, caption_image, links=False)
    control = TrainingPlan.control(originals, RECIPE, seed=1, steps=steps)
    one_epoch = optimizer_steps(caption_image, len(images), RECIPE.with_(epochs=1).train_config(1))
    assert control.steps == steps
    assert control.config.max_steps == steps
    assert control.config.epochs == math.ceil(steps / one_epoch)
    assert control.recipe == RECIPE.with_(epochs=control.config.epochs, max_steps=steps)
    # everything else is the fine-tune's recipe
    assert (control.config.lr, control.config.batch_size, control.config.warmup_steps, control.config.seed) == (
        RECIPE.lr, RECIPE.batch_size, RECIPE.warmup_steps, 1,
    )


def test_a_control_takes_exactly_its_steps_when_run():
    images, captions, caption_image, _ = colour_square_task(images_per_colour=6)
    control = TrainingPlan.control(_rows(images, captions, caption_image, links=False), RECIPE, seed=0, steps=7)
    bundle = new_small_clip(captions, image_size=16, seed=0, **TINY)
    before = bundle.model.logit_scale.detach().clone()
    optimizer_calls: list[int] = []
    original_step = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        optimizer_calls.append(1)
        return original_step(self, *args, **kwargs)

    torch.optim.AdamW.step = counting_step
    try:
        control.run(bundle, "cpu", images=images)
    finally:
        torch.optim.AdamW.step = original_step
    assert len(optimizer_calls) == 7
    assert not torch.equal(before, bundle.model.logit_scale.detach())


def test_a_control_needs_a_positive_number_of_steps():
    images, captions, caption_image, _ = colour_square_task(images_per_colour=2)
    with pytest.raises(ValueError, match="optimizer steps"):
        TrainingPlan.control(_rows(images, captions, caption_image, links=False), RECIPE, seed=0, steps=0)


def test_from_scratch_is_the_small_clip_recipe_on_every_original():
    recipe = SmallClipRecipe(epochs=3, batch_size=32, lr=2e-3, seed=5)
    images = pl.DataFrame({"image_id": [2, 0, 1], "path": ["c.png", "a.png", "b.png"]})
    captions = pl.DataFrame({"caption_id": [1, 0, 2, 3], "image_id": [0, 2, 1, 0], "caption": ["w", "x", "y", "z"]})
    plan = TrainingPlan.from_scratch(originals_only(images, captions), recipe)
    assert plan.config == recipe.train_config()
    assert plan.recipe is None
    assert plan.rows.image_paths == ["a.png", "b.png", "c.png"]
    assert plan.rows.captions == ["x", "w", "y", "z"]
    assert plan.caption_image.tolist() == [2, 0, 1, 0]
    assert plan.hard_negative_text is None and plan.hard_negative_image is None


def test_originals_only_names_a_caption_whose_image_is_missing():
    images = pl.DataFrame({"image_id": [0, 1], "path": ["a.png", "b.png"]})
    captions = pl.DataFrame({"caption_id": [0, 1], "image_id": [0, 7], "caption": ["x", "y"]})
    with pytest.raises(ValueError, match=r"image_id\(s\) \[7\]"):
        originals_only(images, captions)
