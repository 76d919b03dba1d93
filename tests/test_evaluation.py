"""Evaluation assembly: the eval index by hand, metrics on designed embeddings, a tiny CLIP end to end."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spur_assets.core.metrics import retrieval_metrics as rm
from spur_assets.core.metrics.evaluation import (
    EvalSet,
    build_eval_index,
    evaluate_checkpoint,
    evaluate_checkpoints,
    evaluate_embeddings,
)
from spur_assets.core.metrics.report import check_report_shape

DOG_FRISBEE, PERSON_SURFBOARD = "dog->frisbee", "person->surfboard"


def _frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows)


def _cf_image(cf_id, kind, source, anchor, companion, path=None):
    return {
        "cf_image_id": cf_id,
        "kind": kind,
        "source_image_id": source,
        "pair": f"{anchor}->{companion}",
        "anchor": anchor,
        "companion": companion,
        "path": path or f"/cf/{cf_id}_{kind}.png",
    }


def _cf_caption(cf_id, source_caption, source_image, anchor, companion, caption, accepted):
    return {
        "cf_caption_id": cf_id,
        "cf_image_id": 0,
        "source_caption_id": source_caption,
        "source_image_id": source_image,
        "pair": f"{anchor}->{companion}",
        "anchor": anchor,
        "companion": companion,
        "caption": caption,
        "accepted": accepted,
        "reason": "accepted" if accepted else "no safe edit of the companion phrase",
    }


# ----------------------------------------------------------------------------- the index, by hand


def _hand_eval_set() -> EvalSet:
    # Rows arrive shuffled on purpose: the index sorts by id.
    images = _frame([{"image_id": i, "path": f"/img/{i}.png", "width": 64, "height": 64} for i in (13, 10, 15, 11, 14, 12)])
    captions = _frame(
        [
            {"caption_id": 104, "image_id": 11, "caption": "A surfer in the ocean."},
            {"caption_id": 100, "image_id": 10, "caption": "A dog catches a frisbee in the park."},
            {"caption_id": 101, "image_id": 10, "caption": "A brown dog running on the grass."},
            {"caption_id": 102, "image_id": 10, "caption": "A dog leaps to grab a frisbee."},
            {"caption_id": 103, "image_id": 11, "caption": "A man riding a surfboard on a wave."},
            {"caption_id": 105, "image_id": 12, "caption": "A dog sleeping on a couch."},
            {"caption_id": 106, "image_id": 13, "caption": "A cat on a windowsill."},
            {"caption_id": 107, "image_id": 14, "caption": "A woman walking her dog."},
            {"caption_id": 108, "image_id": 15, "caption": "A red frisbee on the lawn."},
        ]
    )
    instances = _frame(
        [
            {"image_id": image_id, "category": category}
            for image_id, category in [
                (10, "dog"), (10, "frisbee"), (11, "person"), (11, "surfboard"), (12, "dog"),
                (13, "cat"), (14, "person"), (14, "dog"), (15, "frisbee"), (10, "dog"),
            ]
        ]
    )
    cf_images = _frame(
        [
            _cf_image(4, "control", 11, "person", "surfboard"),
            _cf_image(1, "removal", 10, "dog", "frisbee"),
            _cf_image(3, "removal", 11, "person", "surfboard"),
            _cf_image(2, "control", 10, "dog", "frisbee"),
        ]
    )
    cf_captions = _frame(
        [
            _cf_caption(3, 103, 11, "person", "surfboard", "A man riding on a wave.", True),
            _cf_caption(1, 100, 10, "dog", "frisbee", "A dog in the park.", True),
            _cf_caption(2, 102, 10, "dog", "frisbee", None, False),
        ]
    )
    return EvalSet(images, captions, instances, cf_images, cf_captions, [("dog", "frisbee"), ("person", "surfboard")])


def test_index_galleries_and_queries_match_hand_lists():
    index = build_eval_index(_hand_eval_set())
    # Test images by image_id: 10, 11, 12, 13, 14, 15 -> rows 0..5.
    assert index.image_ids == [10, 11, 12, 13, 14, 15]
    assert index.image_paths[0] == "/img/10.png"
    # Caption gallery: originals 100..108 (rows 0..8), then accepted edits 1 and 3 (rows 9, 10);
    # edit 2 was not accepted and is left out.
    assert index.caption_ids == [100, 101, 102, 103, 104, 105, 106, 107, 108, 1, 3]
    assert index.caption_is_edit == [False] * 9 + [True] * 2
    assert index.n_original_captions == 9
    assert index.caption_image_row == [0, 0, 0, 1, 1, 2, 3, 4, 5, 0, 1]
    assert index.caption_texts[9] == "A dog in the park."

    # Removal queries by cf_image_id: cf 1 (image 10, dog->frisbee), cf 3 (image 11, person->surfboard).
    assert index.removal_cf_image_ids == [1, 3]
    assert index.removal_pair == [DOG_FRISBEE, PERSON_SURFBOARD]
    assert index.removal_image_row == [0, 1]
    # Image 10: caption 101 has no frisbee (row 1) + edit 1 (row 9); 100 and 102 mention it.
    # Image 11: caption 104 has no surfboard (row 4) + edit 3 (row 10); 103 mentions it.
    assert [sorted(r) for r in index.removal_relevant] == [[1, 9], [4, 10]]
    assert [sorted(r) for r in index.removal_hard_negatives] == [[0, 2], [3]]

    # Text->image: the b-captions of I; gallery = 6 test images then the 2 removal images.
    assert index.t2i_caption_row == [0, 2, 3]
    assert index.t2i_target == [0, 0, 1]
    assert index.t2i_hard_negative == [6, 6, 7]
    assert index.t2i_pair == [DOG_FRISBEE, DOG_FRISBEE, PERSON_SURFBOARD]

    # Controls: cf 2 (image 10) and cf 4 (image 11); all of I's original captions relevant.
    assert index.control_cf_image_ids == [2, 4]
    assert index.control_image_row == [0, 1]
    assert index.control_pair == [DOG_FRISBEE, PERSON_SURFBOARD]
    assert [sorted(r) for r in index.control_relevant] == [[0, 1, 2], [3, 4]]

    # dog->frisbee: natural = neither (11, 13); anchor-only = dog without frisbee (12, 14).
    # person->surfboard: natural = 10, 12, 13, 15; anchor-only = person without surfboard (14).
    assert index.natural_rows == {DOG_FRISBEE: [1, 3], PERSON_SURFBOARD: [0, 2, 3, 5]}
    assert index.anchor_only_rows == {DOG_FRISBEE: [2, 4], PERSON_SURFBOARD: [4]}


def test_index_mention_and_object_matrices_match_hand_tables():
    index = build_eval_index(_hand_eval_set())
    assert index.categories == ["cat", "dog", "frisbee", "person", "surfboard"]
    expected_mentions = [  # "couch" is ignored: no test image has one
        {"dog", "frisbee"}, {"dog"}, {"dog", "frisbee"}, {"person", "surfboard"}, {"person"},
        {"dog"}, {"cat"}, {"person", "dog"}, {"frisbee"}, {"dog"}, {"person"},
    ]
    got = [{index.categories[j] for j in row.nonzero().flatten().tolist()} for row in index.caption_mentions]
    assert got == expected_mentions
    assert index.caption_mentions.dtype == torch.bool
    expected_objects = [{"dog", "frisbee"}, {"person", "surfboard"}, {"dog"}, {"cat"}, {"person", "dog"}, {"frisbee"}]
    got = [{index.categories[j] for j in row.nonzero().flatten().tolist()} for row in index.image_objects]
    assert got == expected_objects


def test_index_refuses_counterfactuals_of_unknown_pairs_and_images():
    eval_set = _hand_eval_set()
    eval_set.pairs = [("dog", "frisbee")]
    with pytest.raises(ValueError, match="person->surfboard"):
        build_eval_index(eval_set)

    eval_set = _hand_eval_set()
    eval_set.cf_images = pl.concat([eval_set.cf_images, _frame([_cf_image(9, "removal", 999, "dog", "frisbee")])])
    with pytest.raises(ValueError, match="cf_image_id 9.*999"):
        build_eval_index(eval_set)

    eval_set = _hand_eval_set()
    eval_set.captions = pl.concat([eval_set.captions, eval_set.captions.head(1)])
    with pytest.raises(ValueError, match="caption_id \\[104\\]"):
        build_eval_index(eval_set)

    eval_set = _hand_eval_set()
    eval_set.cf_images = pl.concat([eval_set.cf_images, _frame([_cf_image(7, "removal", 10, "dog", "frisbee")])])
    with pytest.raises(ValueError, match="cf_image_id 1 and 7"):
        build_eval_index(eval_set)


# ----------------------------------------------------------------------------- metrics on designed embeddings
#
# Captions are one-hot (row r = e_r, 26 dims), so an image embedding is a weight per caption
# row, normalised: its similarity to caption r is w[r] / |w|. Rankings below are worked out
# by hand from the weights; k = 2.
#
# Caption gallery rows: 0 "A dog catches a frisbee." (image 1), 1 "A dog on the grass." (1),
# 2 "A man riding a surfboard." (2), 3 "A surfer in the ocean." (2), 4-5 dog captions (3),
# 6 "A dog with a frisbee." / 7 "A dog in a yard." (4), 8-9 person captions (5),
# 10-23 cat captions (images 6..12, two each), 24 edit of row 0 (accepted),
# 25 edit of row 2 (accepted). The edit of row 6 is not accepted.

TOY_WEIGHTS = {  # image id -> {caption row: weight}
    1: {0: 0.9, 1: 0.8},
    2: {2: 0.9, 3: 0.8},
    3: {4: 0.9, 0: 0.85, 5: 0.8, 23: 0.5},  # dog-only image that also pulls the frisbee caption
    4: {6: 0.9, 7: 0.8},
    5: {8: 0.9, 9: 0.8},
    **{i: {10 + 2 * (i - 6): 0.9, 11 + 2 * (i - 6): 0.8} for i in range(6, 12)},
    12: {0: 0.9, 2: 0.8, 4: 0.7, 6: 0.6, 8: 0.5, 22: 0.3, 23: 0.2},  # own captions at ranks 6 and 7
}
REMOVAL_WEIGHTS = {  # cf_image_id -> weights
    1: {0: 0.95, 24: 0.8, 1: 0.1},  # image 1 minus frisbee: still retrieves the frisbee caption first
    3: {25: 0.9, 3: 0.8, 2: 0.5},  # image 2 minus surfboard
    5: {7: 0.9, 6: 0.8},  # image 4 minus frisbee
}
CONTROL_WEIGHTS = {
    2: {0: 0.9, 1: 0.8},  # control of image 1: unchanged
    4: {2: 0.9, 10: 0.85, 3: 0.8},  # control of image 2: a cat caption slips in at rank 2
    6: {6: 0.9, 7: 0.8},  # control of image 4: unchanged
}
TOY_CAPTIONS = {
    1: ["A dog catches a frisbee.", "A dog on the grass."],
    2: ["A man riding a surfboard.", "A surfer in the ocean."],
    3: ["A dog sleeping on a bed.", "A sleepy dog."],
    4: ["A dog with a frisbee.", "A dog in a yard."],
    5: ["A woman standing in a kitchen.", "A person cooking."],
    **{i: [f"A grey cat sitting, view {i}.", f"A cat resting, view {i}."] for i in range(6, 13)},
}
TOY_OBJECTS = {1: ["dog", "frisbee"], 2: ["person", "surfboard"], 3: ["dog"], 4: ["dog", "frisbee"], 5: ["person"]}
N_DIMS = 26


def _toy_eval_set() -> EvalSet:
    images = _frame([{"image_id": i, "path": f"/img/{i}.png", "width": 8, "height": 8} for i in range(1, 13)])
    captions = _frame(
        [
            {"caption_id": 2 * (i - 1) + j, "image_id": i, "caption": text}
            for i, texts in TOY_CAPTIONS.items()
            for j, text in enumerate(texts)
        ]
    )
    instances = _frame(
        [{"image_id": i, "category": c} for i in range(1, 13) for c in TOY_OBJECTS.get(i, ["cat"])]
    )
    cf_images = _frame(
        [
            _cf_image(1, "removal", 1, "dog", "frisbee"),
            _cf_image(2, "control", 1, "dog", "frisbee"),
            _cf_image(3, "removal", 2, "person", "surfboard"),
            _cf_image(4, "control", 2, "person", "surfboard"),
            _cf_image(5, "removal", 4, "dog", "frisbee"),
            _cf_image(6, "control", 4, "dog", "frisbee"),
        ]
    )
    cf_captions = _frame(
        [
            _cf_caption(1, 0, 1, "dog", "frisbee", "A dog on the lawn.", True),
            _cf_caption(2, 2, 2, "person", "surfboard", "A man riding on a wave.", True),
            _cf_caption(3, 6, 4, "dog", "frisbee", "A dog.", False),
        ]
    )
    return EvalSet(images, captions, instances, cf_images, cf_captions, [("dog", "frisbee"), ("person", "surfboard")])


def _embed(weights: list[dict[int, float]]) -> torch.Tensor:
    out = torch.zeros(len(weights), N_DIMS)
    for row, w in enumerate(weights):
        for column, value in w.items():
            out[row, column] = value
    return F.normalize(out, dim=1)


def _toy_evaluation(**kwargs):
    index = build_eval_index(_toy_eval_set())
    image_emb = _embed([TOY_WEIGHTS[i] for i in range(1, 13)])
    caption_emb = torch.eye(N_DIMS)
    removal_emb = _embed([REMOVAL_WEIGHTS[i] for i in (1, 3, 5)])
    control_emb = _embed([CONTROL_WEIGHTS[i] for i in (2, 4, 6)])
    return index, evaluate_embeddings(index, image_emb, caption_emb, removal_emb, control_emb, k=2, **kwargs)


def test_toy_index_is_what_the_hand_calculation_assumes():
    index, _ = _toy_evaluation()
    assert index.removal_relevant == [[1, 24], [3, 25], [7]]
    assert index.t2i_caption_row == [0, 2, 6] and index.t2i_target == [0, 1, 3]
    assert index.control_relevant == [[0, 1], [2, 3], [6, 7]]


def test_toy_metrics_equal_hand_computed_values():
    _, result = _toy_evaluation()
    m = result.metrics
    # Recall: image 12's own captions sit at ranks 6-7; caption row 23 ranks its image 2nd.
    assert m["recall"]["i2t"] == pytest.approx({"1": 11 / 12, "5": 11 / 12, "10": 1.0})
    assert m["recall"]["t2i"] == pytest.approx({"1": 23 / 24, "5": 1.0, "10": 1.0})
    # i2t AP@2: removal 1 ranks [0 (b-caption), 24] -> 1/2 * (1/2) = 0.25; removal 3 ranks
    # [25, 3] -> 1.0; removal 5 ranks [7, 6], |R| = 1 -> 1.0. Pairs: dog 0.625, person 1.0.
    assert m["odmap"]["i2t"] == pytest.approx({"2": (0.625 + 1.0) / 2})
    assert m["odmap_micro"]["i2t"] == pytest.approx({"2": 2.25 / 3})
    # t2i: caption 0 ranks removal 1 (0.95/|w| = 0.762) above image 1 (0.747): RR 1/2;
    # captions 2 and 6 find their image first. Pairs: dog 0.75, person 1.0.
    assert m["odmap"]["t2i"] == pytest.approx({"2": 0.875})
    assert m["odmap_micro"]["t2i"] == pytest.approx({"2": 2.5 / 3})
    # HR@2: removals 1 and 5 have one frisbee caption in their top 2, removal 3 none.
    # Natural: only image 12 (top [0, 2]) retrieves a b-caption: dog 0.5 / 9 images,
    # person 0.5 / 10 images. Anchor-only: image 3 (top [4, 0]) 0.5; image 5 0.
    assert m["hr"] == pytest.approx({"2": 0.25, "natural_2": (0.5 / 9 + 0.05) / 2, "anchor_only_2": 0.25})
    assert m["hr_micro"] == pytest.approx({"2": 1 / 3, "natural_2": 1.0 / 19, "anchor_only_2": 0.25})
    # Delta_ctrl: originals all AP 1; controls 1, 0.5 (cat caption at rank 2), 1.
    assert m["delta_ctrl"] == pytest.approx(1 - 2.5 / 3)
    assert m["k"] == 2
    assert m["counts"]["removal_queries"] == 3 and m["counts"]["t2i_queries"] == 3
    assert m["counts"]["accepted_edits"] == 2


def test_toy_per_pair_rows_equal_hand_computed_values():
    _, result = _toy_evaluation()
    rows = {row["pair"]: row for row in result.per_pair}
    assert list(rows) == [DOG_FRISBEE, PERSON_SURFBOARD]
    dog, person = rows[DOG_FRISBEE], rows[PERSON_SURFBOARD]
    assert (dog["n_removal"], dog["n_t2i_queries"], dog["n_controls"]) == (2, 2, 2)
    assert (person["n_removal"], person["n_t2i_queries"], person["n_controls"]) == (1, 1, 1)
    assert dog["anchor"] == "dog" and dog["companion"] == "frisbee"
    assert dog["odmap_i2t"] == pytest.approx(0.625) and person["odmap_i2t"] == pytest.approx(1.0)
    assert dog["odmap_t2i"] == pytest.approx(0.75) and person["odmap_t2i"] == pytest.approx(1.0)
    assert dog["hr"] == pytest.approx(0.5) and person["hr"] == pytest.approx(0.0)
    assert dog["natural"] == pytest.approx(0.5 / 9) and person["natural"] == pytest.approx(0.05)
    assert dog["anchor_only"] == pytest.approx(0.5) and person["anchor_only"] == pytest.approx(0.0)
    assert dog["delta_ctrl"] == pytest.approx(0.0) and person["delta_ctrl"] == pytest.approx(0.5)


def test_toy_examples_show_the_shortcut_with_flags():
    _, result = _toy_evaluation(n_examples=3)
    # Per pair the first query with a b-caption, pairs in turn: removal 1, removal 3, then removal 5.
    assert [ex["cf_image_id"] for ex in result.examples] == [1, 3, 5]
    first = result.examples[0]
    assert first["original_path"] == "/img/1.png" and first["removal_path"] == "/cf/1_removal.png"
    assert first["companion"] == "frisbee" and first["pair"] == DOG_FRISBEE
    # Ranking of removal 1: rows 0 (0.95), 24 (0.8), 1 (0.1), then ties at 0 by lower row: 2, 3.
    assert [item["caption"] for item in first["top"]] == [
        "A dog catches a frisbee.", "A dog on the lawn.", "A dog on the grass.",
        "A man riding a surfboard.", "A surfer in the ocean.",
    ]
    assert [item["offending"] for item in first["top"]] == [True, False, False, False, False]
    assert [item["relevant"] for item in first["top"]] == [False, True, True, False, False]
    assert [item["is_edit"] for item in first["top"]] == [False, True, False, False, False]
    assert first["ap"] == pytest.approx(0.25) and first["hr"] == pytest.approx(0.5)

    _, chosen = _toy_evaluation(example_queries=[2])
    assert [ex["cf_image_id"] for ex in chosen.examples] == [5]


def test_evaluate_embeddings_refuses_rows_out_of_index_order_and_small_splits():
    index, _ = _toy_evaluation()
    good = dict(
        image_emb=_embed([TOY_WEIGHTS[i] for i in range(1, 13)]),
        caption_emb=torch.eye(N_DIMS),
        removal_emb=_embed([REMOVAL_WEIGHTS[i] for i in (1, 3, 5)]),
        control_emb=_embed([CONTROL_WEIGHTS[i] for i in (2, 4, 6)]),
    )
    with pytest.raises(ValueError, match="removal_emb.*removal_paths \\(3\\)"):
        evaluate_embeddings(index, **{**good, "removal_emb": good["removal_emb"][:2]})
    with pytest.raises(ValueError, match="fewer than the largest rank"):
        evaluate_embeddings(index, **good, k=13)


# ----------------------------------------------------------------------------- a tiny CLIP end to end


def _write_png(path, colour, size=24):
    rng = np.random.default_rng(sum(colour))
    pixels = np.clip(np.array(colour, dtype=np.int16) + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from spur_assets.core.model.clip_model import new_small_clip

    root = tmp_path_factory.mktemp("tiny_eval")
    toy = _toy_eval_set()
    colours = {i: ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256) for i in range(1, 13)}
    images = toy.images.with_columns(
        pl.Series("path", [_write_png(root / f"img{i}.png", colours[i]) for i in range(1, 13)])
    )
    cf_images = toy.cf_images.with_columns(
        pl.Series(
            "path",
            [
                _write_png(root / f"cf{row['cf_image_id']}.png", tuple(c // 2 for c in colours[row["source_image_id"]]))
                for row in toy.cf_images.iter_rows(named=True)
            ],
        )
    )
    eval_set = EvalSet(images, toy.captions, toy.instances, cf_images, toy.cf_captions, toy.pairs)
    bundle = new_small_clip(
        toy.captions["caption"].to_list(), image_size=16, patch_size=8, width=32, layers=1, heads=2,
        projection_dim=16, vocab_size=300, max_text_length=16, seed=3,
    )
    return eval_set, bundle


def test_evaluate_checkpoint_end_to_end_equals_metrics_on_own_embeddings(tiny_setup):
    from spur_assets.core.model.clip_model import embed_images, embed_texts, load_images_uint8

    eval_set, bundle = tiny_setup
    messages: list[str] = []
    result = evaluate_checkpoint(bundle, eval_set, k=3, batch_size=4, progress=messages.append, n_examples=2)
    m = result.metrics

    # The fixed keys of report.json's M (docs/data-contract.md#reportjson), values in range.
    assert set(m) >= {"recall", "odmap", "hr", "delta_ctrl"}
    assert set(m["recall"]) == {"i2t", "t2i"} and set(m["recall"]["i2t"]) == {"1", "5", "10"}
    assert set(m["odmap"]["i2t"]) == {"3"} and set(m["hr"]) == {"3", "natural_3", "anchor_only_3"}
    assert check_report_shape({"checkpoints": {"base": m}}) == []
    assert any("embedded" in message for message in messages)
    assert len(result.per_pair) == 2 and len(result.examples) == 2
    assert all(len(ex["top"]) == 5 for ex in result.examples)

    # Embed in the test, in index order, and score with retrieval_metrics and numpy directly.
    size = 16
    image_emb = embed_images(bundle, load_images_uint8(eval_set.images.sort("image_id")["path"].to_list(), size))
    cf = eval_set.cf_images.sort("cf_image_id")
    removal_emb = embed_images(bundle, load_images_uint8(cf.filter(pl.col("kind") == "removal")["path"].to_list(), size))
    control_emb = embed_images(bundle, load_images_uint8(cf.filter(pl.col("kind") == "control")["path"].to_list(), size))
    texts = eval_set.captions.sort("caption_id")["caption"].to_list() + ["A dog on the lawn.", "A man riding on a wave."]
    caption_emb = embed_texts(bundle, texts)
    assert image_emb.shape == (12, 16) and caption_emb.shape == (26, 16)

    # Recall by brute force in numpy (the COCO protocol, ties do not occur with random weights).
    sim = image_emb.numpy() @ caption_emb[:24].numpy().T
    owner = np.repeat(np.arange(12), 2)
    i2t_rank = np.argsort(-sim, axis=1)
    t2i_rank = np.argsort(-sim.T, axis=1)
    for kk in (1, 5, 10):
        i2t = np.mean([np.any(owner[i2t_rank[i, :kk]] == i) for i in range(12)])
        t2i = np.mean([np.any(t2i_rank[j, :kk] == owner[j]) for j in range(24)])
        assert m["recall"]["i2t"][str(kk)] == pytest.approx(i2t, abs=1e-9)
        assert m["recall"]["t2i"][str(kk)] == pytest.approx(t2i, abs=1e-9)

    pairs_of_removal = [DOG_FRISBEE, PERSON_SURFBOARD, DOG_FRISBEE]
    i2t = rm.odmap_i2t(removal_emb, caption_emb, [[1, 24], [3, 25], [7]], pairs_of_removal, k=3)
    assert m["odmap"]["i2t"]["3"] == pytest.approx(i2t["macro"])
    t2i = rm.odmap_t2i(caption_emb[[0, 2, 6]], torch.cat([image_emb, removal_emb]), torch.tensor([0, 1, 3]),
                       pairs_of_removal, k=3)
    assert m["odmap"]["t2i"]["3"] == pytest.approx(t2i["macro"])
    delta = rm.delta_ctrl(image_emb[[0, 1, 3]], control_emb, caption_emb, [[0, 1], [2, 3], [6, 7]], k=3)
    assert m["delta_ctrl"] == pytest.approx(delta)
    for value in (m["odmap"]["i2t"]["3"], m["odmap"]["t2i"]["3"], *m["hr"].values(), *m["recall"]["t2i"].values()):
        assert 0.0 <= value <= 1.0 and math.isfinite(value)
    assert -1.0 <= m["delta_ctrl"] <= 1.0


# ----------------------------------------------------------------------------- edit sources, per-query scores


def test_index_keeps_each_edits_source_caption():
    index = build_eval_index(_hand_eval_set())
    # Edit 1 came from caption 100 (row 0), edit 3 from caption 103 (row 3); originals have none.
    assert index.caption_source_row == [-1] * 9 + [0, 3]

    eval_set = _hand_eval_set()
    eval_set.cf_captions = eval_set.cf_captions.drop("source_caption_id")
    assert build_eval_index(eval_set).caption_source_row == [-1] * 11  # older tables: unknown sources

    eval_set = _hand_eval_set()
    eval_set.cf_captions = eval_set.cf_captions.with_columns(
        pl.when(pl.col("cf_caption_id") == 3).then(999).otherwise(pl.col("source_caption_id")).alias("source_caption_id")
    )
    with pytest.raises(ValueError, match="cf_caption_id 3: source_caption_id 999 is not among the test captions"):
        build_eval_index(eval_set)

    eval_set = _hand_eval_set()
    eval_set.cf_captions = eval_set.cf_captions.with_columns(
        pl.when(pl.col("cf_caption_id") == 3).then(105).otherwise(pl.col("source_caption_id")).alias("source_caption_id")
    )
    with pytest.raises(ValueError, match="source_caption_id 105 describes image_id 12, not its source_image_id 11"):
        build_eval_index(eval_set)


def test_toy_pairwise_accuracy_equals_hand_computed_values():
    _, result = _toy_evaluation()
    # i2t: removal 1 scores its b-caption (row 0, 0.95) above the edit made from it (row 24, 0.8): wrong;
    # removal 3 scores the edit (row 25, 0.9) above its source (row 2, 0.5): right; removal 5 has no edit.
    i2t = result.per_query["pairwise_i2t"]
    assert i2t.values.tolist() == [0.0, 1.0] and i2t.strata.tolist() == [DOG_FRISBEE, PERSON_SURFBOARD]
    # t2i: caption 0 scores removal 1 (0.762) above image 1 (0.747): wrong; caption 2 scores image 2
    # (0.747) above removal 3 (0.383) and caption 6 image 4 (0.747) above removal 5 (0.664): right.
    t2i = result.per_query["pairwise_t2i"]
    assert t2i.values.tolist() == [0.0, 1.0, 1.0]
    assert result.metrics["pairwise"] == pytest.approx({"i2t": (0.0 + 1.0) / 2, "t2i": (0.5 + 1.0) / 2})
    rows = {row["pair"]: row for row in result.per_pair}
    assert rows[DOG_FRISBEE]["pairwise_i2t"] == 0.0 and rows[PERSON_SURFBOARD]["pairwise_i2t"] == 1.0
    assert rows[DOG_FRISBEE]["pairwise_t2i"] == pytest.approx(0.5) and rows[PERSON_SURFBOARD]["pairwise_t2i"] == 1.0
    assert result.metrics["counts"]["edit_comparisons"] == 2


# Image 1 and image 4 (both show a frisbee) after a fine-tune that stopped naming the frisbee: their
# top original captions are now their own frisbee-free caption and a dog caption of image 3. Image 1
# also likes the edit (row 24) best, which is not in the originals-only gallery of the check.
OVERCORRECTED = {1: {24: 0.95, 1: 0.9, 4: 0.5}, 4: {7: 0.9, 5: 0.5}}


def _overcorrected_evaluation():
    index = build_eval_index(_toy_eval_set())
    image_emb = _embed([OVERCORRECTED.get(i, TOY_WEIGHTS[i]) for i in range(1, 13)])
    return evaluate_embeddings(
        index, image_emb, torch.eye(N_DIMS), _embed([REMOVAL_WEIGHTS[i] for i in (1, 3, 5)]),
        _embed([CONTROL_WEIGHTS[i] for i in (2, 4, 6)]), k=2,
    )


def test_overcorrection_catches_a_finetune_that_stops_retrieving_b_captions():
    _, before = _toy_evaluation()
    after = _overcorrected_evaluation()
    # Images showing b: frisbee in images 1 and 4 (dog->frisbee), surfboard in image 2 (person->surfboard).
    # Before: image 1 top-2 [0 frisbee, 1], image 4 [6 frisbee, 7], image 2 [2 surfboard, 3]: 0.5 each.
    assert before.per_query["b_mention_rate"].values.tolist() == [0.5, 0.5, 0.5]
    assert before.per_query["b_mention_rate"].strata.tolist() == [DOG_FRISBEE, DOG_FRISBEE, PERSON_SURFBOARD]
    assert before.metrics["overcorrection"] == {"b_mention_rate": 0.5, "recall_i2t_5": 1.0}
    # After: image 1 top-2 originals [1, 4], image 4 [7, 5]: no frisbee caption; image 2 unchanged.
    assert after.per_query["b_mention_rate"].values.tolist() == [0.0, 0.0, 0.5]
    assert after.metrics["overcorrection"]["b_mention_rate"] == pytest.approx((0.0 + 0.5) / 2)
    # Their own captions still come first, so recall alone would not see it.
    assert after.metrics["overcorrection"]["recall_i2t_5"] == 1.0
    rows = {row["pair"]: row for row in after.per_pair}
    assert rows[DOG_FRISBEE]["b_mention_rate"] == 0.0 and rows[PERSON_SURFBOARD]["b_mention_rate"] == 0.5
    assert rows[DOG_FRISBEE]["n_with_b"] == 2 and rows[DOG_FRISBEE]["recall_i2t_5_with_b"] == 1.0


def _random_evaluation(seed: int, k: int = 3):
    """The toy eval index with random (tie-free) embeddings of one made-up checkpoint."""
    index = build_eval_index(_toy_eval_set())
    gen = torch.Generator().manual_seed(seed)

    def unit(n: int) -> torch.Tensor:
        return F.normalize(torch.randn(n, 8, generator=gen), dim=1)

    emb = (unit(index.n_images), unit(index.n_captions), unit(len(index.removal_paths)), unit(len(index.control_paths)))
    return index, emb, evaluate_embeddings(index, *emb, k=k)


PER_QUERY_METRICS = {
    *(f"recall_{d}_{r}" for d in ("i2t", "t2i") for r in (1, 5, 10)),
    "odmap_i2t", "odmap_t2i", "hr", "delta_ctrl", "pairwise_i2t", "pairwise_t2i", "b_mention_rate",
    "recall_i2t_5_with_b",
}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_query_scores_reproduce_every_headline_metric(seed):
    from spur_assets.core.metrics.attribution import headline_path

    index, (images, captions, removals, controls), result = _random_evaluation(seed)
    assert set(result.per_query) == PER_QUERY_METRICS
    for metric, scores in result.per_query.items():
        value = result.metrics
        for part in headline_path(metric, 3):
            value = value[part]
        assert scores.headline() == value or (math.isnan(value) and math.isnan(scores.headline())), metric
        if scores.strata is not None and metric in result.per_pair[0]:
            for row in result.per_pair:
                picked = scores.values[scores.strata == row["pair"]]
                expected = float(np.nanmean(picked)) if np.isfinite(picked).any() else float("nan")
                assert row[metric] == pytest.approx(expected, nan_ok=True), (metric, row["pair"])

    # Independent per-query references in numpy (random embeddings: no ties).
    img, cap, rem = images.numpy(), captions.numpy(), removals.numpy()
    n_orig = index.n_original_captions
    owner = np.array(index.caption_image_row[:n_orig])
    ranked = np.argsort(-(img @ cap[:n_orig].T), axis=1, kind="stable")
    for r in (1, 5, 10):
        hits = [float(np.any(owner[ranked[i, :r]] == i)) for i in range(index.n_images)]
        assert result.per_query[f"recall_i2t_{r}"].values.tolist() == hits
    edits = [(q, e, index.caption_source_row[e]) for q, rel in enumerate(index.removal_relevant) for e in rel
             if index.caption_is_edit[e]]
    assert result.per_query["pairwise_i2t"].values.tolist() == [
        float(rem[q] @ cap[e] > rem[q] @ cap[s]) for q, e, s in edits
    ]
    gallery = np.concatenate([img, rem])
    assert result.per_query["pairwise_t2i"].values.tolist() == [
        float(cap[c] @ gallery[t] > cap[c] @ gallery[h])
        for c, t, h in zip(index.t2i_caption_row, index.t2i_target, index.t2i_hard_negative, strict=True)
    ]
    frisbee, surfboard = index.categories.index("frisbee"), index.categories.index("surfboard")
    mentions = index.caption_mentions[:n_orig].numpy()
    expected = [mentions[ranked[i, :3], frisbee].mean() for i in (0, 3)] + [mentions[ranked[1, :3], surfboard].mean()]
    assert result.per_query["b_mention_rate"].values.tolist() == pytest.approx(expected)
    delta = rm.delta_ctrl(images[index.control_image_row], controls, captions, index.control_relevant, k=3)
    assert result.metrics["delta_ctrl"] == pytest.approx(delta, abs=1e-12)


# ----------------------------------------------------------------------------- several checkpoints, one decode


def _perturbed(bundle, seed: int):
    """A copy of `bundle` with other weights and the same processor, as a fine-tune or control has."""
    import copy

    twin = copy.deepcopy(bundle)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in twin.model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return twin


def test_evaluate_checkpoints_prepares_each_input_once_per_kind_and_equals_each_alone(tiny_setup, tmp_path, monkeypatch):
    import copy

    from spur_assets.core.data import image_stream
    from spur_assets.core.model import clip_model
    from spur_assets.core.model.embedding_cache import EmbeddingCache

    eval_set, base = tiny_setup
    tuned, control = _perturbed(base, 1), _perturbed(base, 2)
    # Another checkpoint that decodes differently (bilinear resize): it needs a pass of its own.
    other = _perturbed(base, 3)
    other.image_processor = copy.deepcopy(base.image_processor)
    other.image_processor.resample = 2
    bundles = {"base": base, "control": control, "finetuned": tuned, "other": other}
    alone = {name: evaluate_checkpoint(bundle, eval_set, k=3, batch_size=4) for name, bundle in bundles.items()}
    # The control's rows are all in its cache already: the shared pass embeds none of them.
    control_cache = EmbeddingCache(tmp_path / "cache", "control-key")
    evaluate_checkpoint(control, eval_set, k=3, batch_size=4, cache=control_cache)

    decoded: list[str] = []
    real_decode = image_stream.decode_image_uint8

    def counting_decode(path, prep, max_pixels=None):
        decoded.append(str(path))
        return real_decode(path, prep, max_pixels)

    monkeypatch.setattr(image_stream, "decode_image_uint8", counting_decode)
    tokenized: list[str] = []
    real_tokenize = clip_model.tokenize_captions

    def counting_tokenize(bundle, texts):
        tokenized.extend(texts)
        return real_tokenize(bundle, texts)

    monkeypatch.setattr(clip_model, "tokenize_captions", counting_tokenize)
    messages: list[str] = []
    together = evaluate_checkpoints(
        bundles, eval_set, k=3, batch_size=4, progress=messages.append, workers=1,
        caches={"control": control_cache, "base": None},
    )
    files = eval_set.images.height + eval_set.cf_images.height
    assert len(decoded) == 2 * files  # one pass for base, control and fine-tuned; one for "other"
    assert {path: decoded.count(path) for path in set(decoded)} == {path: 2 for path in set(decoded)}
    # All four share the tokenizer: the captions are tokenized once, for all of them.
    assert len(tokenized) == len(build_eval_index(eval_set).caption_texts)
    assert list(together) == list(bundles)
    for name in bundles:
        assert together[name].metrics == alone[name].metrics, name
        assert together[name].per_pair == alone[name].per_pair, name
    assert any(m.startswith(f"evaluation: control: images (test, removal, control): {files} from the embedding cache, 0 embedded")
               for m in messages), messages


def test_embed_images_many_embeds_each_checkpoints_own_rows_as_embed_images_does(tiny_setup):
    from spur_assets.core.data.image_stream import ImageFiles
    from spur_assets.core.data.preprocessing import ImagePreprocessing
    from spur_assets.core.model.clip_model import embed_images, embed_images_many

    eval_set, base = tiny_setup
    tuned = _perturbed(base, 4)
    paths = eval_set.images.sort("image_id")["path"].to_list()
    files = ImageFiles.of(paths, ImagePreprocessing.of(base.image_processor))
    wanted = torch.tensor([i % 3 != 0 for i in range(len(paths))])
    rows_base, rows_tuned = embed_images_many([base, tuned], files, [None, wanted], batch_size=5, workers=1)
    assert torch.equal(rows_base, embed_images(base, files, batch_size=5))
    assert torch.equal(rows_tuned, embed_images(tuned, files, batch_size=5)[wanted])
    assert rows_tuned.shape == (int(wanted.sum()), 16)

    nothing = torch.zeros(len(paths), dtype=torch.bool)
    assert embed_images_many([base], files, [nothing])[0].shape == (0, 16)
    with pytest.raises(ValueError, match="one bool mask of 12 rows per checkpoint"):
        embed_images_many([base, tuned], files, [wanted])
    import copy

    other = copy.deepcopy(base)
    other.image_processor.crop_size = {"height": 8, "width": 8}
    with pytest.raises(ValueError, match="decode images differently"):
        embed_images_many([base, other], files)


def test_embed_texts_many_tokenizes_once_and_matches_embed_texts(tiny_setup):
    import copy

    from spur_assets.core.model.clip_model import embed_texts, embed_texts_many, train_caption_tokenizer

    eval_set, base = tiny_setup
    tuned = _perturbed(base, 5)
    texts = eval_set.captions.sort("caption_id")["caption"].to_list()
    embed_texts(base, texts[:3])  # a call leaves padding and truncation state on one tokenizer: still alike
    wanted = torch.tensor([i % 2 == 0 for i in range(len(texts))])
    rows_base, rows_tuned = embed_texts_many([base, tuned], texts, [None, wanted], batch_size=7)
    assert torch.equal(rows_base, embed_texts(base, texts, batch_size=7))
    assert torch.equal(rows_tuned, embed_texts(tuned, texts, batch_size=7)[wanted])

    other = copy.deepcopy(base)
    other.tokenizer = train_caption_tokenizer(texts[:5], vocab_size=300, max_length=16)
    with pytest.raises(ValueError, match="tokenize differently"):
        embed_texts_many([base, other], texts)
