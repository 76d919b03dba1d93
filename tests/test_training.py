"""Contrastive training: the loss against references, batching, a toy task, determinism, failure, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import CLIPModel

from spur_assets.core.model.clip_model import embed_images, embed_texts, new_small_clip, small_clip_config
from spur_assets.core.model.training import TrainConfig, batch_loss, contrastive_loss, epoch_batches, train_clip

TINY = dict(vocab_size=300, max_text_length=12, patch_size=8, width=32, layers=1, heads=2, projection_dim=16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
TEMPLATES = ["a {} square", "a square that is {}", "{} block on black", "the colour {}", "something {}"]


def colour_square_task(images_per_colour: int = 12, seed: int = 0):
    """16-px images of one coloured square on black, 5 template captions per image."""
    rng = np.random.default_rng(seed)
    images, captions, caption_image, labels = [], [], [], []
    for label, (name, rgb) in enumerate(COLOURS.items()):
        for _ in range(images_per_colour):
            image = rng.integers(0, 25, size=(16, 16, 3)).astype(np.uint8)
            side = int(rng.integers(6, 11))
            top, left = rng.integers(0, 16 - side, size=2)
            image[top : top + side, left : left + side] = np.clip(np.array(rgb) + rng.integers(-20, 20, size=3), 0, 255)
            index = len(images)
            images.append(image.transpose(2, 0, 1))
            labels.append(label)
            for template in TEMPLATES:
                captions.append(template.format(name))
                caption_image.append(index)
    return (torch.from_numpy(np.stack(images)), captions, torch.tensor(caption_image), torch.tensor(labels))


def reference_loss(image, text, scale, extra_text=None, extra_image=None, text_mask=None, image_mask=None, dup_mask=None):
    """Hand-written float64 InfoNCE: one softmax row per query, written as loops."""
    image, text = image.double().numpy(), text.double().numpy()
    batch = image.shape[0]
    i2t_losses, t2i_losses = [], []
    for row in range(batch):
        candidates = [(text[c], c == row) for c in range(batch) if c == row or dup_mask is None or not dup_mask[row, c]]
        if extra_text is not None:
            candidates += [(extra_text[e].double().numpy(), False) for e in range(extra_text.shape[0]) if text_mask is None or not text_mask[row, e]]
        logits = np.array([scale * image[row] @ vector for vector, _ in candidates])
        positive = [is_positive for _, is_positive in candidates].index(True)
        i2t_losses.append(-(logits[positive] - np.log(np.exp(logits).sum())))

        candidates = [(image[c], c == row) for c in range(batch) if c == row or dup_mask is None or not dup_mask[c, row]]
        if extra_image is not None:
            candidates += [(extra_image[e].double().numpy(), False) for e in range(extra_image.shape[0]) if image_mask is None or not image_mask[row, e]]
        logits = np.array([scale * text[row] @ vector for vector, _ in candidates])
        positive = [is_positive for _, is_positive in candidates].index(True)
        t2i_losses.append(-(logits[positive] - np.log(np.exp(logits).sum())))
    return (np.mean(i2t_losses) + np.mean(t2i_losses)) / 2


def _unit(rows: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --------------------------------------------------------------------------- loss


def test_contrastive_loss_equals_transformers_clip_loss():
    config = small_clip_config(vocab_size=50, image_size=16, patch_size=8, width=32, layers=1, heads=2, projection_dim=16, max_text_length=8)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(6, 3, 16, 16, generator=generator)
    input_ids = torch.randint(4, 50, (6, 8), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 2, 3
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
        ours = contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale)
    torch.testing.assert_close(ours, out.loss, atol=1e-6, rtol=1e-6)


def test_contrastive_loss_with_hard_negatives_and_masks_equals_hand_reference():
    image, text = _unit(5, seed=1), _unit(5, seed=2)
    extra_text, extra_image = _unit(3, seed=3), _unit(2, seed=4)
    logit_scale = torch.tensor(math.log(7.0))
    text_mask = torch.zeros(5, 3, dtype=torch.bool)
    text_mask[1, 0] = text_mask[4, 2] = True
    image_mask = torch.zeros(5, 2, dtype=torch.bool)
    image_mask[0, 1] = True
    dup_mask = torch.zeros(5, 5, dtype=torch.bool)
    dup_mask[2, 3] = dup_mask[3, 2] = True
    dup_mask[0, 0] = True  # the diagonal is never masked

    ours = contrastive_loss(image, text, logit_scale, extra_text, extra_image,
                            false_negative_mask=dup_mask, extra_text_mask=text_mask, extra_image_mask=image_mask)
    expected = reference_loss(image, text, 7.0, extra_text, extra_image, text_mask, image_mask, dup_mask)
    assert ours.item() == pytest.approx(expected, abs=1e-5)
    # Extras only: no masks.
    plain = contrastive_loss(image, text, logit_scale, extra_text, extra_image)
    assert plain.item() == pytest.approx(reference_loss(image, text, 7.0, extra_text, extra_image), abs=1e-5)
    # A hard negative close to the positive must raise the loss.
    assert plain.item() > contrastive_loss(image, text, logit_scale).item()


# --------------------------------------------------------------------------- batching


def test_epoch_batches_hold_distinct_images_and_cover_captions():
    caption_image = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4])  # uneven caption counts
    all_captions = epoch_batches(caption_image, batch_size=2, captions_per_image=None, seed=5, epoch=0)
    for batch in all_captions:
        images = caption_image[batch]
        assert len(set(images.tolist())) == len(images) <= 2
    assert sorted(torch.cat(all_captions).tolist()) == list(range(11))

    one_each = epoch_batches(caption_image, batch_size=4, captions_per_image=1, seed=5, epoch=0)
    assert sorted(caption_image[torch.cat(one_each)].tolist()) == [0, 1, 2, 3, 4]

    again = epoch_batches(caption_image, batch_size=2, captions_per_image=None, seed=5, epoch=0)
    assert all(torch.equal(a, b) for a, b in zip(all_captions, again))
    other_epochs = [torch.cat(epoch_batches(caption_image, 2, None, 5, e)).tolist() for e in range(1, 6)]
    assert any(order != torch.cat(all_captions).tolist() for order in other_epochs)


def test_batch_loss_adds_hard_negatives_and_spares_the_image_they_describe():
    captions = ["a red square", "a green square", "a blue square", "the colour green", "a yellow square"]
    caption_image = torch.tensor([0, 1, 2, 1, 3])
    bundle = new_small_clip(captions, image_size=16, seed=3, **TINY)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    hard_text = torch.tensor([3, -1, -1, 2])  # image 0 <- "the colour green" (image 1's); image 3 <- caption 2
    hard_image = torch.tensor([-1, 2, -1, -1, -1])  # caption 1 <- image 2
    batch = torch.tensor([0, 1])  # images 0 and 1
    tokens = bundle.tokenizer(captions, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    config = TrainConfig(epochs=1, mask_duplicate_captions=False)
    with torch.no_grad():
        ours = batch_loss(bundle, images, tokens["input_ids"], tokens["attention_mask"], torch.arange(5),
                           caption_image, batch, hard_text, hard_image, config, torch.device("cpu"))
    image_emb = embed_images(bundle, images)
    text_emb = embed_texts(bundle, captions)
    # Extra text caption 3 joins image 0's row, not image 1's (it describes image 1);
    # image 3 is not in the batch, so caption 2 stays out; extra image 2 joins both text rows.
    expected = reference_loss(
        image_emb[[0, 1]], text_emb[[0, 1]], bundle.model.logit_scale.exp().item(),
        extra_text=text_emb[[3]], extra_image=image_emb[[2]],
        text_mask=torch.tensor([[False], [True]]),
    )
    assert ours.item() == pytest.approx(expected, abs=1e-4)


# --------------------------------------------------------------------------- training


def _i2t_colour_accuracy(bundle, images, labels) -> float:
    texts = [t.format(name) for name in COLOURS for t in TEMPLATES]
    text_labels = torch.arange(len(COLOURS)).repeat_interleave(len(TEMPLATES))
    similarity = embed_images(bundle, images) @ embed_texts(bundle, texts).T
    return (text_labels[similarity.argmax(dim=1)] == labels).float().mean().item()


def test_training_on_colour_squares_learns_retrieval():
    images, captions, caption_image, labels = colour_square_task()
    bundle = new_small_clip(captions, image_size=16, seed=0, **TINY)
    before = _i2t_colour_accuracy(bundle, images, labels)
    logs = []
    config = TrainConfig(epochs=8, batch_size=16, lr=3e-3, warmup_steps=5, captions_per_image=None, log_every_steps=10)
    history = train_clip(bundle, images, captions, caption_image, config, "cpu", progress=logs.append)
    after = _i2t_colour_accuracy(bundle, images, labels)
    assert [row["epoch"] for row in history] == list(range(1, 9))
    assert all(row["pairs"] == 240 for row in history)
    # Different templates of one colour stay in-batch negatives, so the loss floor is well above 0.
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert before < 0.5 and after >= 0.9, (before, after, history)
    assert logs and {"epoch", "step", "loss", "pairs_per_second"} <= set(logs[0])
    assert not bundle.model.training


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_same_seed_gives_identical_weights():
    images, captions, caption_image, _ = colour_square_task(images_per_colour=4)
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-3, warmup_steps=2, seed=11)
    runs = []
    for _ in range(2):
        bundle = new_small_clip(captions, image_size=16, seed=0, **TINY)
        train_clip(bundle, images, captions, caption_image, config, "cpu")
        runs.append(_weights(bundle.model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    untrained = _weights(new_small_clip(captions, image_size=16, seed=0, **TINY).model)
    assert not torch.equal(untrained["visual_projection.weight"], runs[0]["visual_projection.weight"])


def test_non_finite_loss_raises_naming_epoch_and_step():
    images, captions, caption_image, _ = colour_square_task(images_per_colour=2)
    bundle = new_small_clip(captions, image_size=16, seed=0, **TINY)
    with torch.no_grad():
        bundle.model.visual_projection.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="epoch 1 step 1 "):
        train_clip(bundle, images, captions, caption_image, TrainConfig(epochs=1, batch_size=4), "cpu")


def test_bad_indices_are_refused_with_the_field_name():
    images, captions, caption_image, _ = colour_square_task(images_per_colour=1)
    bundle = new_small_clip(captions, image_size=16, seed=0, **TINY)
    bad = caption_image.clone()
    bad[3] = 99
    with pytest.raises(ValueError, match=r"caption_image\[3\] = 99"):
        train_clip(bundle, images, captions, bad, TrainConfig(epochs=1), "cpu")
    with pytest.raises(ValueError, match="own image"):
        train_clip(bundle, images, captions, caption_image, TrainConfig(epochs=1), "cpu", hard_negative_image=caption_image.clone())


class _Interrupted(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    images, captions, caption_image, _ = colour_square_task(images_per_colour=3)
    hard_text = torch.full((images.shape[0],), -1)
    hard_text[0] = 20  # a caption of another image
    config = TrainConfig(epochs=3, batch_size=6, lr=1e-3, warmup_steps=2, log_every_steps=1)

    straight = new_small_clip(captions, image_size=16, seed=0, **TINY)
    straight_history = train_clip(straight, images, captions, caption_image, config, "cpu", hard_negative_text=hard_text)

    def stop_in_epoch_3(event: dict) -> None:
        if event["epoch"] == 3:
            raise _Interrupted

    first = new_small_clip(captions, image_size=16, seed=0, **TINY)
    with pytest.raises(_Interrupted):
        train_clip(first, images, captions, caption_image, config, "cpu", hard_negative_text=hard_text,
                   checkpoint_dir=tmp_path, progress=stop_in_epoch_3)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["epoch-0002"]
    assert sorted(p.suffix for p in (tmp_path / "epoch-0002").iterdir()) == [".json", ".safetensors", ".safetensors", ".safetensors"]

    resumed = new_small_clip(captions, image_size=16, seed=0, **TINY)
    history = train_clip(resumed, images, captions, caption_image, config, "cpu", hard_negative_text=hard_text, checkpoint_dir=tmp_path)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert [row["loss"] for row in history] == pytest.approx([row["loss"] for row in straight_history], rel=1e-6)
    a, b = _weights(straight.model), _weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ValueError, match="fingerprint"):
        train_clip(resumed, images, captions, caption_image, TrainConfig(epochs=3, batch_size=6, lr=2e-3), "cpu",
                   hard_negative_text=hard_text, checkpoint_dir=tmp_path)
