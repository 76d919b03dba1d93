"""Paired batches and the hard-negative weight (issue #4): batching, links, loss against hand references, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spur_assets.core.model.clip_model import embed_images, embed_texts, new_small_clip
from spur_assets.core.model.training import (
    TrainConfig,
    batch_loss,
    contrastive_loss,
    hard_negative_links,
    paired_epoch_batches,
    train_clip,
)

TINY = dict(vocab_size=300, max_text_length=12, patch_size=8, width=32, layers=1, heads=2, projection_dim=16)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_pairing():
    """Originals 0-5 with captions (2i, 2i+1); removal 6 of source 0 (b-captions 0 and 1, own caption 12),
    removal 7 of source 3 (b-caption 6, own caption 13)."""
    caption_image = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 7])
    hard_text = torch.full((8,), -1)
    hard_text[6], hard_text[7] = 0, 6
    hard_image = torch.full((14,), -1)
    hard_image[0] = hard_image[1] = 6
    hard_image[6] = 7
    return caption_image, hard_text, hard_image


def test_links_name_each_removal_its_source_b_captions_and_family():
    caption_image, hard_text, hard_image = small_pairing()
    links = hard_negative_links(caption_image, 8, hard_text, hard_image)
    assert links.b_captions_of_removal == {6: [0, 1], 7: [6]}
    assert links.source_of_removal == {6: 0, 7: 3}
    assert links.family.tolist() == [0, 1, 2, 3, 4, 5, 0, 3]
    hard = links.is_hard(torch.tensor([0, 6, 7]), torch.tensor([0, 1, 6, 12]))
    assert hard.tolist() == [[False, False, False, False], [True, True, False, False], [False, False, True, False]]

    # The finetune_data shape of a caption naming two companions: caption 0 is removal 8's
    # hard_negative_text but hard_negative_image links it to removal 6 only; it is hard for both.
    two = torch.cat([caption_image, torch.tensor([8])])
    text2, image2 = torch.cat([hard_text, torch.tensor([0])]), torch.cat([hard_image, torch.tensor([-1])])
    links2 = hard_negative_links(two, 9, text2, image2)
    assert links2.b_captions_of_removal[8] == [0]
    assert links2.is_hard(torch.tensor([6, 8]), torch.tensor([0])).tolist() == [[True], [True]]


def test_links_refuse_a_removal_that_is_itself_a_source():
    caption_image = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="image 1 is both a removal image"):
        hard_negative_links(caption_image, 3, torch.tensor([-1, 0, 1]), None)  # 2 -> caption of 1 -> caption of 0


def test_paired_batches_keep_each_pair_together_and_cover_every_image_once():
    caption_image, hard_text, hard_image = small_pairing()
    links = hard_negative_links(caption_image, 8, hard_text, hard_image)
    for epoch in range(3):
        batches = paired_epoch_batches(caption_image, links, batch_size=3, captions_per_image=1, seed=4, epoch=epoch)
        # 8 captions in one round: ceil(8 / 3) = 3 batches, cut at unit boundaries (at most 3 + 2 - 1 each).
        assert len(batches) == 3 and all(1 <= len(b) <= 4 for b in batches)
        images = caption_image[torch.cat(batches)].tolist()
        assert sorted(images) == list(range(8))  # every image exactly once
        batch_of = {int(caption_image[c]): k for k, b in enumerate(batches) for c in b.tolist()}
        assert batch_of[6] == batch_of[0] and batch_of[7] == batch_of[3]
        chosen = set(torch.cat(batches).tolist())
        # The source's caption is a b-caption, cycled by epoch over [0, 1]; removals bring their own caption.
        assert ({0, 1} & chosen) == {[0, 1][epoch % 2]} and 6 in chosen and {12, 13} <= chosen
        for b in batches:
            assert len(set(caption_image[b].tolist())) == len(b)

    two_rounds = paired_epoch_batches(caption_image, links, batch_size=3, captions_per_image=None, seed=4, epoch=0)
    images = caption_image[torch.cat(two_rounds)].tolist()
    assert sorted(images) == sorted(list(range(8)) * 2)  # two rounds: every image twice
    assert sorted(c for c in torch.cat(two_rounds).tolist() if c in (0, 1)) == [0, 1]  # round 0 -> 0, round 1 -> 1


def test_paired_batches_are_deterministic_in_the_seed():
    caption_image, hard_text, hard_image = small_pairing()
    links = hard_negative_links(caption_image, 8, hard_text, hard_image)
    first = paired_epoch_batches(caption_image, links, 3, 1, seed=4, epoch=0)
    again = paired_epoch_batches(caption_image, links, 3, 1, seed=4, epoch=0)
    assert [b.tolist() for b in first] == [b.tolist() for b in again]
    others = [[b.tolist() for b in paired_epoch_batches(caption_image, links, 3, 1, seed=s, epoch=0)] for s in range(5, 10)]
    assert any(o != [b.tolist() for b in first] for o in others)


def test_hard_negative_weight_adds_log_w_to_the_hard_cells_only():
    image, text, extra_text = _unit(3, seed=1), _unit(3, seed=2), _unit(1, seed=3)
    scale, w = 5.0, 4.0
    # image 2 is a removal image: text 0 (in batch) and the extra text are its hard negatives;
    # in the text->image direction text 0's row has image 2 as hard negative.
    hard_text = torch.zeros(3, 4, dtype=torch.bool)
    hard_text[2, 0] = hard_text[2, 3] = True
    hard_image = torch.zeros(3, 3, dtype=torch.bool)
    hard_image[0, 2] = True
    ours = contrastive_loss(image, text, torch.tensor(math.log(scale)), extra_text_emb=extra_text,
                            hard_negative_weight=w, hard_text_cells=hard_text, hard_image_cells=hard_image)

    # Hand reference in float64: a hard negative counts w times in its row's softmax denominator.
    i, t, x = image.double().numpy(), text.double().numpy(), extra_text.double().numpy()
    i2t_columns = np.concatenate([t, x])
    losses_i2t, losses_t2i = [], []
    for row in range(3):
        logits = scale * i2t_columns @ i[row]
        weights = np.where(hard_text[row].numpy(), w, 1.0)
        losses_i2t.append(-logits[row] + np.log((weights * np.exp(logits)).sum()))
        logits = scale * i @ t[row]
        weights = np.where(hard_image[row].numpy(), w, 1.0)
        losses_t2i.append(-logits[row] + np.log((weights * np.exp(logits)).sum()))
    expected = (np.mean(losses_i2t) + np.mean(losses_t2i)) / 2
    assert ours.item() == pytest.approx(expected, abs=1e-5)
    unweighted = contrastive_loss(image, text, torch.tensor(math.log(scale)), extra_text_emb=extra_text)
    assert ours.item() > unweighted.item() + 1e-3  # the weight changed something
    # w = 1 leaves the loss bit-identical whatever the cells say.
    same = contrastive_loss(image, text, torch.tensor(math.log(scale)), extra_text_emb=extra_text,
                            hard_negative_weight=1.0, hard_text_cells=hard_text, hard_image_cells=hard_image)
    assert torch.equal(same, unweighted)
    with pytest.raises(ValueError, match="hard_text_cells has shape"):
        contrastive_loss(image, text, torch.tensor(0.0), hard_negative_weight=w, hard_text_cells=hard_text)


def test_batch_loss_with_pairs_masks_the_family_and_weights_hard_negatives():
    captions = ["a dog with a frisbee", "a dog and a frisbee on grass", "a cat", "a small cat", "a dog on grass"]
    caption_image = torch.tensor([0, 0, 1, 1, 2])  # image 2 is image 0 with the frisbee removed
    hard_text, hard_image = torch.tensor([-1, -1, 0]), torch.tensor([2, 2, -1, -1, -1])
    bundle = new_small_clip(captions, image_size=16, seed=3, **TINY)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    tokens = bundle.tokenizer(captions, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    batch = torch.tensor([0, 2, 4])  # I with a b-caption, another image, I^-b with its caption
    w = 4.0
    config = TrainConfig(epochs=1, paired_batches=True, hard_negative_weight=w)
    with torch.no_grad():
        ours = batch_loss(bundle, images, tokens["input_ids"], tokens["attention_mask"], torch.arange(5),
                           caption_image, batch, hard_text, hard_image, config, torch.device("cpu"))
    img, txt = embed_images(bundle, images).double().numpy(), embed_texts(bundle, captions).double().numpy()
    scale = bundle.model.logit_scale.exp().item()
    # Rows by hand. Image→text columns: batch captions 0, 2, 4, then extra caption 1 (I's other b-caption).
    # weight: 1 normal, w hard negative, 0 left out (masked).
    i2t = {0: ([0, 2, 4, 1], [1, 1, 0, 0]),  # I: caption 4 truly describes I (family); caption 1 is its own
           1: ([0, 2, 4, 1], [1, 1, 1, 1]),
           2: ([0, 2, 4, 1], [w, 1, 1, w])}  # I^-b: both b-captions hard
    t2i = {0: ([0, 1, 2], [1, 1, w]),  # caption 0: I^-b hard; extra image 2 is already in the batch
           2: ([0, 1, 2], [1, 1, 1]),
           4: ([0, 1, 2], [0, 1, 1])}  # I^-b's caption: I left out (family)
    losses_i2t, losses_t2i = [], []
    for position, (image_row, text_row) in enumerate(zip([0, 1, 2], [0, 2, 4])):
        columns, weights = i2t[image_row]
        logits = scale * txt[columns] @ img[image_row]
        losses_i2t.append(-logits[position] + np.log((np.array(weights) * np.exp(logits)).sum()))
        columns, weights = t2i[text_row]
        logits = scale * img[columns] @ txt[text_row]
        losses_t2i.append(-logits[position] + np.log((np.array(weights) * np.exp(logits)).sum()))
    expected = (np.mean(losses_i2t) + np.mean(losses_t2i)) / 2
    assert ours.item() == pytest.approx(expected, abs=1e-4)


def _unit(rows: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _removal_task():
    """24 random 16-px originals with 2 captions each; removals of originals 0-3 (one caption each)."""
    generator = torch.Generator().manual_seed(7)
    words = ["dog", "cat", "frisbee", "ball", "red", "blue", "park", "grass", "small", "big"]
    rng = np.random.default_rng(7)
    captions, caption_image = [], []
    for image in range(28):
        for _ in range(2 if image < 24 else 1):
            captions.append(" ".join(rng.choice(words, 4)))
            caption_image.append(image)
    images = torch.randint(0, 256, (28, 3, 16, 16), dtype=torch.uint8, generator=generator)
    caption_image = torch.tensor(caption_image)
    hard_text = torch.full((28,), -1)
    hard_image = torch.full((len(captions),), -1)
    for k in range(4):
        hard_text[24 + k] = 2 * k
        hard_image[2 * k] = 24 + k
    return images, captions, caption_image, hard_text, hard_image


def test_paired_weighted_training_is_deterministic_for_a_seed_and_differs_from_the_default():
    images, captions, caption_image, hard_text, hard_image = _removal_task()
    runs = {}
    for name, extra in (("a", {}), ("b", {}), ("default", None)):
        config = TrainConfig(epochs=2, batch_size=8, lr=1e-3, warmup_steps=2, seed=3, captions_per_image=2,
                             **({"paired_batches": True, "hard_negative_weight": 4.0} if extra is not None else {}))
        bundle = new_small_clip(captions, image_size=16, seed=0, **TINY)
        history = train_clip(bundle, images, captions, caption_image, config, "cpu",
                             hard_negative_text=hard_text, hard_negative_image=hard_image)
        runs[name] = ({k: v.clone() for k, v in bundle.model.state_dict().items()}, history)
    (a, history_a), (b, history_b), (default, _) = runs["a"], runs["b"], runs["default"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in history_a] == [r["loss"] for r in history_b]
    # 2 rounds x 28 images: the one-caption removal images ride along with their sources in both rounds
    assert [r["pairs"] for r in history_a] == [56, 56]
    assert not torch.equal(a["visual_projection.weight"], default["visual_projection.weight"])


def test_config_refuses_a_weight_that_is_not_positive():
    with pytest.raises(ValueError, match="hard_negative_weight=0"):
        TrainConfig(epochs=1, hard_negative_weight=0)
