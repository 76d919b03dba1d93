"""Streaming data path: training and embedding from files equal the in-memory path; the pretrained
recipe's knobs (max_steps, cached-gradient micro-batches, frozen layers) do what they say."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from spur_assets.core.model.clip_model import embed_images, new_small_clip
from spur_assets.core.data.image_stream import ImageFiles, chunk_steps, decoded_in_memory, stream_rows
from spur_assets.core.data.preprocessing import ImagePreprocessing
from spur_assets.core.model.recipes import BUILTIN_BASE_RECIPE, PRETRAINED_RECIPE, recipe_for_base
from spur_assets.core.model.training import TrainConfig, freeze_lower_layers, train_clip
from tests.test_training import TINY, colour_square_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_pngs(images: torch.Tensor, folder) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{index:04d}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    images, captions, caption_image, _ = colour_square_task(images_per_colour=6)
    paths = _write_pngs(images, tmp_path_factory.mktemp("squares"))
    return images, paths, captions, caption_image


def _hard_negatives(caption_image: torch.Tensor, n_images: int):
    hard_text = torch.full((n_images,), -1)
    hard_text[::4] = torch.arange(0, n_images, 4) * 5 % len(caption_image)  # some caption of another image
    hard_text[hard_text >= 0] = torch.where(caption_image[hard_text[hard_text >= 0]] == torch.arange(0, n_images, 4),
                                            (hard_text[hard_text >= 0] + 7) % len(caption_image), hard_text[hard_text >= 0])
    hard_image = torch.full((len(caption_image),), -1)
    hard_image[::6] = (caption_image[::6] + 3) % n_images
    return hard_text, hard_image


def _train(images, captions, caption_image, config, workers=0, **kwargs):
    bundle = new_small_clip(captions, image_size=16, seed=1, **TINY)
    history = train_clip(bundle, images, captions, caption_image, config, "cpu", workers=workers, **kwargs)
    return bundle, history


def test_training_from_files_equals_training_from_memory_for_any_number_of_workers(task):
    images, paths, captions, caption_image = task
    hard_text, hard_image = _hard_negatives(caption_image, len(paths))
    config = TrainConfig(epochs=2, batch_size=8, lr=3e-3, warmup_steps=2, captions_per_image=2)
    reference, expected = _train(images, captions, caption_image, config, hard_negative_text=hard_text,
                                 hard_negative_image=hard_image)
    files = ImageFiles.of(paths, ImagePreprocessing.of(reference.image_processor))
    for workers in (0, 2):
        bundle, history = _train(files, captions, caption_image, config, workers=workers, in_memory_mb=0,  # streamed
                                 hard_negative_text=hard_text, hard_negative_image=hard_image)
        assert [row["loss"] for row in history] == [row["loss"] for row in expected], workers
        for (name, ours), theirs in zip(bundle.model.state_dict().items(), reference.model.state_dict().values()):
            assert torch.equal(ours, theirs), (workers, name)
    assert expected[-1]["loss"] < expected[0]["loss"]  # it trained


def test_stream_rows_delivers_each_planned_step_in_order(task):
    images, paths, _, _ = task
    files = ImageFiles.of(paths, ImagePreprocessing.square(16))
    # The last step is larger than one decoding item (32 files): decoded in parts, put back in order.
    plan = [[3, 1, 3], [0], list(range(len(paths)))[::-1], list(range(len(paths))) * 3]
    for workers, threads in ((0, False), (2, False), (1, True), (2, True)):
        got = list(stream_rows(files, plan, "cpu", workers=workers, threads=threads))
        assert [tuple(t.shape) for t in got] == [(3, 3, 16, 16), (1, 3, 16, 16), (len(paths), 3, 16, 16),
                                                 (3 * len(paths), 3, 16, 16)], (workers, threads)
        for rows, batch in zip(plan, got):
            assert torch.equal(batch, images[rows]), (workers, threads)
    assert [tuple(t.shape) for t in stream_rows(images, plan)][:3] == [(3, 3, 16, 16), (1, 3, 16, 16), (len(paths), 3, 16, 16)]
    assert chunk_steps(5, 2) == [[0, 1], [2, 3], [4]]
    # Ramped: the first step is small so the first forward starts early; then doubling up to size.
    assert [len(s) for s in chunk_steps(1000, 256, first=32)] == [32, 64, 128, 256, 256, 256, 8]
    assert sum(chunk_steps(1000, 256, first=32), []) == list(range(1000))
    assert chunk_steps(3, 256, first=32) == [[0, 1, 2]]


def test_a_file_that_cannot_be_decoded_is_named_from_a_worker(task, tmp_path):
    _, paths, _, _ = task
    broken = tmp_path / "broken.png"
    broken.write_bytes(open(paths[0], "rb").read()[:40])
    files = ImageFiles.of([paths[0], str(broken)], ImagePreprocessing.square(16))
    with pytest.raises(OSError, match="broken.png"):
        list(stream_rows(files, [[0], [1]], "cpu", workers=1))
    with pytest.raises(OSError, match="broken.png"):
        list(stream_rows(files, [[0], [1]], "cpu", workers=1, threads=True))


def test_a_consumer_that_stops_early_leaves_no_decoding_thread(task):
    _, paths, _, _ = task
    files = ImageFiles.of(paths * 20, ImagePreprocessing.square(16))
    before = {t.name for t in threading.enumerate()}
    stream = stream_rows(files, chunk_steps(len(files), 8), "cpu", workers=2, threads=True)
    next(stream)
    stream.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("spur-decode") and t.name not in before]


def test_embedding_files_equals_embedding_the_decoded_tensor(task):
    images, paths, captions, _ = task
    bundle = new_small_clip(captions, image_size=16, seed=1, **TINY)
    files = ImageFiles.of(paths, ImagePreprocessing.of(bundle.image_processor))
    expected = embed_images(bundle, images, batch_size=7)
    for workers in (0, 1):
        assert torch.equal(embed_images(bundle, files, batch_size=7, workers=workers), expected)
    # From files the steps ramp up (32 files, then the rest): the same embeddings as one batch.
    many = ImageFiles.of(paths * 3, files.preprocessing)  # 72 files: steps of 32 and 40
    assert torch.equal(embed_images(bundle, many, batch_size=256, workers=1), embed_images(bundle, images.repeat(3, 1, 1, 1), batch_size=256))


def test_a_small_training_split_is_decoded_once_into_memory_a_large_one_streams(task):
    images, paths, captions, caption_image = task
    files = ImageFiles.of(paths, ImagePreprocessing.square(16))
    pixels_mb = len(paths) * 3 * 16 * 16 / 2**20
    decoded = decoded_in_memory(files, budget_mb=pixels_mb)  # exactly fits
    assert isinstance(decoded, torch.Tensor) and torch.equal(decoded, images)
    assert decoded_in_memory(files, budget_mb=pixels_mb * 0.99) is files  # one byte too many: streamed
    assert decoded_in_memory(files, budget_mb=0) is files  # 0 = always stream
    assert decoded_in_memory(images, budget_mb=1000) is images
    # Either way, training gives the same weights.
    config = TrainConfig(epochs=1, batch_size=8, lr=3e-3, warmup_steps=2, captions_per_image=2)
    in_memory, _ = _train(files, captions, caption_image, config, in_memory_mb=1)
    streamed, _ = _train(files, captions, caption_image, config, in_memory_mb=0)
    for (name, a), (_, b) in zip(in_memory.model.state_dict().items(), streamed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_micro_batches_give_the_full_batch_gradient(task):
    images, _, captions, caption_image = task
    hard_text, hard_image = _hard_negatives(caption_image, images.shape[0])
    # Hard-negative extras on both sides and duplicate-caption masks: the whole loss, in micro-batches.
    full = TrainConfig(epochs=1, batch_size=12, lr=3e-3, warmup_steps=1, captions_per_image=2)
    micro = TrainConfig(**{**full.__dict__, "micro_batch_size": 5})
    reference, expected = _train(images, captions, caption_image, full, hard_negative_text=hard_text, hard_negative_image=hard_image)
    bundle = new_small_clip(captions, image_size=16, seed=1, **TINY)
    rows_per_forward = []
    bundle.model.vision_model.register_forward_hook(lambda module, args, kwargs_out: rows_per_forward.append(
        int(kwargs_out.last_hidden_state.shape[0])))
    history = train_clip(bundle, images, captions, caption_image, micro, "cpu",
                         hard_negative_text=hard_text, hard_negative_image=hard_image)
    assert max(rows_per_forward) <= 5  # the towers never saw more than a micro-batch at once
    assert [row["loss"] for row in history] == pytest.approx([row["loss"] for row in expected], rel=1e-5)
    for (name, ours), theirs in zip(bundle.model.state_dict().items(), reference.model.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5, msg=name)


def test_max_steps_stops_the_run_and_spans_the_schedule(task):
    images, _, captions, caption_image = task
    config = TrainConfig(epochs=5, batch_size=8, lr=1e-3, warmup_steps=1, captions_per_image=1, max_steps=4)
    _, history = _train(images, captions, caption_image, config)
    # 24 images, batch 8: 3 steps an epoch; 4 steps = one whole epoch and one step of the next.
    assert [row["pairs"] for row in history] == [24, 8]
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine reached its end at step 4


def test_frozen_layers_do_not_move_and_are_thawed_after(task):
    images, _, captions, caption_image = task
    layers2 = {**TINY, "layers": 2}
    before = new_small_clip(captions, image_size=16, seed=1, **layers2)
    bundle = new_small_clip(captions, image_size=16, seed=1, **layers2)
    train_clip(bundle, images, captions, caption_image, TrainConfig(epochs=1, batch_size=8, lr=3e-3, freeze_layers=1), "cpu")
    old = before.model.state_dict()
    for name, value in bundle.model.state_dict().items():
        lower = ".embeddings." in name or ".layers.0." in name or "pre_layrnorm" in name
        assert torch.equal(value, old[name]) == lower, name
    assert all(p.requires_grad for p in bundle.model.parameters())
    with pytest.raises(ValueError, match="freeze_layers=3 exceeds"):
        freeze_lower_layers(bundle.model, 3)


def test_recipes_differ_by_kind_of_base_and_say_where_they_come_from():
    assert recipe_for_base("") is BUILTIN_BASE_RECIPE and recipe_for_base("some/clip") is PRETRAINED_RECIPE
    assert PRETRAINED_RECIPE.lr <= 1e-5 < BUILTIN_BASE_RECIPE.lr
    assert PRETRAINED_RECIPE.batch_size == 256 and PRETRAINED_RECIPE.micro_batch_size < PRETRAINED_RECIPE.batch_size
    config = PRETRAINED_RECIPE.with_(max_steps=7, lr=None).train_config(seed=3, hard_negative_weight=4.0, paired_batches=True)
    assert (config.max_steps, config.lr, config.weight_decay, config.micro_batch_size) == (7, 1e-5, 0.2, 64)
    with pytest.raises(TypeError, match="no field"):
        PRETRAINED_RECIPE.with_(momentum=0.9)


def test_resuming_from_files_that_changed_is_refused(task, tmp_path):
    images, paths, captions, caption_image = task
    folder = tmp_path / "copy"
    copies = _write_pngs(images, folder)
    files = ImageFiles.of(copies, ImagePreprocessing.square(16))
    config = TrainConfig(epochs=1, batch_size=8, lr=1e-3)
    _train(files, captions, caption_image, config, checkpoint_dir=tmp_path / "state")
    _train(files, captions, caption_image, config, checkpoint_dir=tmp_path / "state")  # unchanged: resumes, done
    os.utime(copies[0], ns=(1, 1))  # same bytes, but not provably the file trained on: refuse
    with pytest.raises(ValueError, match="fingerprint"):
        _train(files, captions, caption_image, config, checkpoint_dir=tmp_path / "state")


def test_finetune_recipe_by_name_with_checked_overrides():
    from spur_assets.core.model.recipes import finetune_recipe

    assert finetune_recipe("auto", None) is BUILTIN_BASE_RECIPE
    assert finetune_recipe("auto", "some/clip") is PRETRAINED_RECIPE
    tuned = finetune_recipe("pretrained", None, lr=2e-6, epochs=None, freeze_layers=3)
    assert (tuned.lr, tuned.epochs, tuned.freeze_layers) == (2e-6, PRETRAINED_RECIPE.epochs, 3)
    assert finetune_recipe("builtin", None, lr=0).lr == BUILTIN_BASE_RECIPE.lr  # 0 keeps the recipe's rate
    with pytest.raises(ValueError, match="batch_size=0"):
        finetune_recipe("builtin", None, batch_size=0)
    with pytest.raises(ValueError, match="lr=-0.1"):
        finetune_recipe("builtin", None, lr=-0.1)
    with pytest.raises(ValueError, match="'fancy'"):
        finetune_recipe("fancy", None)


def test_the_base_checkpoint_config_is_the_cores_small_clip_recipe():
    from spur_assets.core.model.recipes import SMALL_CLIP_RECIPE, SmallClipRecipe
    from spur_assets.pipeline.model_assets import BaseCheckpointConfig

    assert SmallClipRecipe.of(BaseCheckpointConfig()) == SMALL_CLIP_RECIPE
    assert SmallClipRecipe.of(BaseCheckpointConfig(epochs=2, width=32)) == SmallClipRecipe(epochs=2, width=32)
