"""Retrieval metrics against hand-computed cases, torchmetrics and clip_benchmark's Recall@K."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.retrieval import retrieval_average_precision, retrieval_reciprocal_rank

from spur_assets.core.metrics.retrieval_metrics import (
    RelevantSets,
    average_precision_at_k,
    delta_ctrl,
    delta_ctrl_terms,
    grouped_mean,
    hallucination_rate,
    hallucination_rates,
    odmap_i2t,
    odmap_t2i,
    pairwise_accuracy,
    recall_at_k,
    recall_hits,
    reciprocal_rank_at_k,
    topk_gallery,
)

CHUNK_SIZES = (1, 7, 100_000)

# Hand example: 3 queries x 5 gallery items. With the identity as gallery embedding the
# similarity matrix is exactly these rows. Rankings worked out by hand (ties -> lower index):
#   q0: 0.9 0.1 0.5 0.7 0.3  -> 0, 3, 2, 4, 1
#   q1: 0.2 0.8 0.8 0.1 0.8  -> 1, 2, 4, 0, 3   (three-way tie; top-2 cuts inside it)
#   q2: all 0                -> 0, 1, 2, 3, 4
HAND_SIMILARITY = torch.tensor(
    [[0.9, 0.1, 0.5, 0.7, 0.3], [0.2, 0.8, 0.8, 0.1, 0.8], [0.0, 0.0, 0.0, 0.0, 0.0]]
)
HAND_RANKING = [[0, 3, 2, 4, 1], [1, 2, 4, 0, 3], [0, 1, 2, 3, 4]]


def _hand_topk(k: int, chunk_size: int = 1024) -> torch.Tensor:
    return topk_gallery(HAND_SIMILARITY, torch.eye(5), k, chunk_size)


def _unit(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ----------------------------------------------------------------------------- topk_gallery


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_topk_hand_example_breaks_ties_by_lower_index(k, chunk_size):
    expected = torch.tensor([row[:k] for row in HAND_RANKING])
    assert torch.equal(_hand_topk(k, chunk_size), expected)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_topk_matches_lexicographic_sort_on_heavily_tied_scores(chunk_size):
    # Entries in {-1, 0, 1} make dot products small integers: exact in float32, many ties.
    gen = torch.Generator().manual_seed(0)
    query = torch.randint(-1, 2, (40, 4), generator=gen).float()
    gallery = torch.randint(-1, 2, (60, 4), generator=gen).float()
    scores = (query.double() @ gallery.double().T).numpy()
    index = np.arange(gallery.shape[0])
    # Reference: numpy lexsort, primary key -score, secondary key gallery index.
    expected = np.stack([np.lexsort((index, -row))[:9] for row in scores])
    assert np.array_equal(topk_gallery(query, gallery, 9, chunk_size).numpy(), expected)


def test_topk_matches_full_sort_on_random_embeddings():
    query, gallery = _unit(33, 16, 1), _unit(70, 16, 2)
    expected = torch.argsort(query @ gallery.T, dim=1, descending=True)[:, :10]
    for chunk_size in CHUNK_SIZES:
        assert torch.equal(topk_gallery(query, gallery, 10, chunk_size), expected)


def test_topk_refuses_bad_inputs():
    good = _unit(3, 4, 0)
    with pytest.raises(ValueError, match="gallery size"):
        topk_gallery(good, good, 4)
    bad = good.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="gallery_emb: row 1"):
        topk_gallery(good, bad, 2)
    with pytest.raises(ValueError, match="dim"):
        topk_gallery(good, _unit(3, 5, 0), 2)


# ----------------------------------------------------------------------------- AP@k, RR@k


@pytest.mark.parametrize(
    ("k", "relevant", "expected"),
    [
        # q0 top3 [0,3,2], R={3,4}: rel 0,1,0 -> (1/2) / min(3,2)                = 1/4
        # q1 top3 [1,2,4], R={4}:   rel 0,0,1 -> (1/3) / 1                        = 1/3
        # q2 R empty -> nan
        (3, [[3, 4], [4], []], [0.25, 1 / 3, math.nan]),
        # |R| < k: q1 R={1,4}: rel 1,0,1 -> (1 + 2/3) / 2 = 5/6
        # |R| > k: q0 R={0,1,2,4}: rel 1,0,1 -> (1 + 2/3) / 3 = 5/9
        # nothing relevant in the top k: q2 top3 [0,1,2], R={4} -> 0
        (3, [[0, 1, 2, 4], [1, 4], [4]], [5 / 9, 5 / 6, 0.0]),
        # k=1 cuts q1's tie after index 1: R={2} not retrieved -> 0; q0 R={0} -> 1
        (1, [[0], [2], [0, 3]], [1.0, 0.0, 1.0]),
        # duplicates in a relevant list count once: q0 R={3}: rel 0,1 -> (1/2) / 1
        (2, [[3, 3], [2, 1], [1]], [0.5, 1.0, 0.5]),
    ],
)
def test_average_precision_hand_cases(k, relevant, expected):
    for chunk_size in CHUNK_SIZES:
        ap = average_precision_at_k(_hand_topk(5, chunk_size), relevant, k)
        assert ap.dtype == torch.float64
        np.testing.assert_allclose(ap.numpy(), expected, atol=1e-12)
        csr = average_precision_at_k(_hand_topk(5, chunk_size), RelevantSets.from_lists(relevant), k)
        np.testing.assert_allclose(csr.numpy(), expected, atol=1e-12)


def test_reciprocal_rank_hand_cases():
    # q0 target 2 at rank 3 -> 1/3; q1 target 0 at rank 4 > k -> 0; q2 target 1 at rank 2 -> 1/2
    rr = reciprocal_rank_at_k(_hand_topk(5), torch.tensor([2, 0, 1]), 3)
    np.testing.assert_allclose(rr.numpy(), [1 / 3, 0.0, 0.5], atol=1e-12)


def test_relevant_sets_refuse_bad_csr():
    with pytest.raises(ValueError, match="offsets"):
        RelevantSets(offsets=torch.tensor([0, 3]), indices=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="twice"):
        average_precision_at_k(_hand_topk(3), RelevantSets(torch.tensor([0, 2, 2, 2]), torch.tensor([1, 1])), 3)


@pytest.mark.parametrize("k", [1, 5, 10])
def test_average_precision_matches_torchmetrics(k):
    n_query, n_gallery = 60, 40
    query, gallery = _unit(n_query, 8, 10 + k), _unit(n_gallery, 8, 20 + k)
    gen = torch.Generator().manual_seed(k)
    relevant = [
        torch.randperm(n_gallery, generator=gen)[: int(torch.randint(1, 9, (1,), generator=gen))].tolist()
        for _ in range(n_query)
    ]
    ours = average_precision_at_k(topk_gallery(query, gallery, k), relevant, k)
    similarity = query @ gallery.T
    for q in range(n_query):
        target = torch.zeros(n_gallery, dtype=torch.bool)
        target[relevant[q]] = True
        # torchmetrics zeroes the target of every item with a score <= 0, so shift the
        # (cosine) scores to be positive; the ranking is unchanged.
        preds = similarity[q] + 2.0
        reference = float(retrieval_average_precision(preds, target, top_k=k))
        # torchmetrics divides the sum of rel_i * P@i by the number of relevant items
        # found in the top k; ours (docs/definitions.md#odmapk-image-to-text) divides by min(k, |R|). Rescale to ours.
        found = int(target[torch.argsort(preds, descending=True)[:k]].sum())
        reference = reference * found / min(k, len(relevant[q]))
        assert float(ours[q]) == pytest.approx(reference, abs=1e-6)


@pytest.mark.parametrize("k", [1, 5, 10])
def test_reciprocal_rank_matches_torchmetrics(k):
    n_query, n_gallery = 60, 30
    query, gallery = _unit(n_query, 8, 30 + k), _unit(n_gallery, 8, 40 + k)
    target_index = torch.randint(0, n_gallery, (n_query,), generator=torch.Generator().manual_seed(k))
    ours = reciprocal_rank_at_k(topk_gallery(query, gallery, k), target_index, k)
    similarity = query @ gallery.T
    for q in range(n_query):
        target = torch.zeros(n_gallery, dtype=torch.bool)
        target[target_index[q]] = True
        # Same positive shift as above; with one relevant item the definitions agree.
        reference = float(retrieval_reciprocal_rank(similarity[q] + 2.0, target, top_k=k))
        assert float(ours[q]) == pytest.approx(reference, abs=1e-6)


# ----------------------------------------------------------------------------- Recall@K


def clip_benchmark_recall(image_emb, text_emb, text_image, ks, batch_size):
    """Reference: the Recall@K of LAION-AI/CLIP_benchmark, clip_benchmark/metrics/
    zeroshot_retrieval.py (evaluate, recall_at_k, batchify; commit 082089f5), step for
    step in our own words: the full text x image score matrix, a boolean positive-pair
    mask, torch.topk per batch of rows, true positives / positives, a hit when > 0,
    averaged. Its image_retrieval_recall is our t2i, its text_retrieval_recall our i2t.
    """

    def per_row_recall(scores, positive_pairs, k):
        topk_indices = torch.topk(scores, k, dim=1)[1]
        topk_onehot = F.one_hot(topk_indices, num_classes=scores.shape[1])
        true_positives = (topk_onehot * positive_pairs.unsqueeze(1)).sum(dim=(1, 2))
        return true_positives / positive_pairs.sum(dim=1)

    def in_batches(scores, positive_pairs, k):
        return torch.cat(
            [
                per_row_recall(scores[s : s + batch_size], positive_pairs[s : s + batch_size], k)
                for s in range(0, len(scores), batch_size)
            ]
        )

    scores = text_emb @ image_emb.T
    positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
    positive_pairs[torch.arange(len(scores)), text_image] = True
    out = {"i2t": {}, "t2i": {}}
    for k in ks:
        out["t2i"][str(k)] = (in_batches(scores, positive_pairs, k) > 0).float().mean().item()
        out["i2t"][str(k)] = (in_batches(scores.T, positive_pairs.T, k) > 0).float().mean().item()
    return out


@pytest.mark.parametrize("uneven", [False, True])
def test_recall_matches_clip_benchmark(uneven):
    n_images, dim = 80, 16
    gen = torch.Generator().manual_seed(7 + uneven)
    counts = torch.randint(1, 8, (n_images,), generator=gen) if uneven else torch.full((n_images,), 5)
    text_image = torch.repeat_interleave(torch.arange(n_images), counts)
    text_image = text_image[torch.randperm(len(text_image), generator=gen)]
    image_emb = _unit(n_images, dim, 50 + uneven)
    # Captions near their image so recall is neither 0 nor 1.
    text_emb = F.normalize(image_emb[text_image] + 1.2 * torch.randn(len(text_image), dim, generator=gen), dim=-1)
    reference = clip_benchmark_recall(image_emb, text_emb, text_image, (1, 5, 10), batch_size=32)
    assert 0.05 < reference["i2t"]["1"] < 0.95 and 0.05 < reference["t2i"]["10"] < 0.95
    for chunk_size in CHUNK_SIZES:
        ours = recall_at_k(image_emb, text_emb, text_image, (1, 5, 10), chunk_size)
        for direction in ("i2t", "t2i"):
            for k in ("1", "5", "10"):
                assert ours[direction][k] == pytest.approx(reference[direction][k], abs=1e-6)


def test_recall_refuses_image_without_caption():
    with pytest.raises(ValueError, match="image row 2 has no caption"):
        recall_at_k(_unit(3, 4, 0), _unit(2, 4, 1), torch.tensor([0, 1]), ks=(1,))


# ----------------------------------------------------------------------------- HR@k, grouped_mean


def test_hallucination_rate_hand_case():
    # Captions mentioning category 0: {0, 2}; category 1: {1, 3, 4}.
    mentions = torch.zeros(5, 2, dtype=torch.bool)
    mentions[[0, 2], 0] = True
    mentions[[1, 3, 4], 1] = True
    # top3: q0 [0,3,2] cat 1 -> {3}: 1/3; q1 [1,2,4] cat 1 -> {1,4}: 2/3; q2 [0,1,2] cat 0 -> {0,2}: 2/3
    rate = hallucination_rate(_hand_topk(5), mentions, torch.tensor([1, 1, 0]), 3)
    np.testing.assert_allclose(rate.numpy(), [1 / 3, 2 / 3, 2 / 3], atol=1e-12)


def test_grouped_mean_hand_case():
    values = torch.tensor([1.0, 0.0, math.nan, 0.5, 0.25, math.nan])
    result = grouped_mean(values, ["a", "a", "a", "b", "c", "d"])
    # groups: a = (1 + 0) / 2 over 2 values, b = 0.5, c = 0.25, d has no values
    assert result["macro"] == pytest.approx((0.5 + 0.5 + 0.25) / 3)
    assert result["micro"] == pytest.approx((1 + 0 + 0.5 + 0.25) / 4)
    assert result["per_group"]["a"] == (pytest.approx(0.5), 2)
    assert math.isnan(result["per_group"]["d"][0]) and result["per_group"]["d"][1] == 0
    assert list(result["per_group"]) == ["a", "b", "c", "d"]
    assert math.isnan(grouped_mean(torch.tensor([math.nan]), ["x"])["macro"])


def _picks(n_gallery: int, rows: list[list[int]]) -> torch.Tensor:
    """Embeddings whose top-2 against an identity gallery are exactly the listed items."""
    emb = torch.zeros(len(rows), n_gallery)
    for r, (first, second) in enumerate(rows):
        emb[r, first], emb[r, second] = 0.9, 0.5
    return emb


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_hallucination_rates_hand_case(chunk_size):
    dog, frisbee, cat = 0, 1, 2
    # captions: c0 dog+frisbee, c1 dog, c2 frisbee, c3 cat, c4 cat+frisbee, c5 nothing
    mentions = torch.zeros(6, 3, dtype=torch.bool)
    mentions[0, [dog, frisbee]] = True
    mentions[1, dog] = mentions[2, frisbee] = mentions[3, cat] = True
    mentions[4, [cat, frisbee]] = True
    # unedited images: i0 dog+frisbee, i1 dog, i2 cat, i3 nothing, i4 nothing
    objects = torch.zeros(5, 3, dtype=torch.bool)
    objects[0, [dog, frisbee]] = True
    objects[1, dog] = objects[2, cat] = True
    # frisbee share of the top 2: i0 [0,2] 1, i1 [1,0] 1/2, i2 [3,4] 1/2, i3 [5,2] 1/2, i4 [3,5] 0
    image_emb = _picks(6, [[0, 2], [1, 0], [3, 4], [5, 2], [3, 5]])
    # I^-b: r0 dog->frisbee [0,2] 1, r1 dog->frisbee [1,2] 1/2, r2 cat->frisbee [4,3] 1/2
    removal_emb = _picks(6, [[0, 2], [1, 2], [4, 3]])
    result = hallucination_rates(
        removal_emb,
        ["dog->frisbee", "dog->frisbee", "cat->frisbee"],
        image_emb,
        objects,
        torch.eye(6),
        mentions,
        {"dog->frisbee": (dog, frisbee), "cat->frisbee": (cat, frisbee)},
        k=2,
        chunk_size=chunk_size,
    )
    assert result["hr"]["per_pair"] == pytest.approx({"dog->frisbee": 0.75, "cat->frisbee": 0.5})
    assert result["hr"]["macro"] == pytest.approx(0.625)
    assert result["hr"]["micro"] == pytest.approx(2 / 3)
    # natural: dog->frisbee over i2,i3,i4 = (1/2 + 1/2 + 0)/3; cat->frisbee over i1,i3,i4 the same
    assert result["natural"]["per_pair"] == pytest.approx({"dog->frisbee": 1 / 3, "cat->frisbee": 1 / 3})
    assert result["natural"]["n_queries"] == {"dog->frisbee": 3, "cat->frisbee": 3}
    # anchor only: dog->frisbee i1 = 1/2; cat->frisbee i2 = 1/2
    assert result["anchor_only"]["per_pair"] == pytest.approx({"dog->frisbee": 0.5, "cat->frisbee": 0.5})


# ----------------------------------------------------------------------------- composites


def test_odmap_hand_case():
    # i2t on the hand example, k=3: q0 R={3,4} -> 1/4, q1 R={4} -> 1/3, q2 R={} skipped
    result = odmap_i2t(HAND_SIMILARITY, torch.eye(5), [[3, 4], [4], []], ["p", "q", "q"], k=3)
    assert result["per_pair"] == pytest.approx({"p": 0.25, "q": 1 / 3})
    assert result["n_queries"] == {"p": 1, "q": 1}
    assert result["macro"] == pytest.approx((0.25 + 1 / 3) / 2)
    # t2i, k=3: targets 2 (rank 3), 0 (rank 4), 1 (rank 2) -> 1/3, 0, 1/2
    result = odmap_t2i(HAND_SIMILARITY, torch.eye(5), torch.tensor([2, 0, 1]), ["p", "q", "q"], k=3)
    assert result["per_pair"] == pytest.approx({"p": 1 / 3, "q": 0.25})
    assert result["micro"] == pytest.approx((1 / 3 + 0 + 0.5) / 3)


def test_composites_do_not_depend_on_chunk_size():
    query, captions, images = _unit(25, 8, 60), _unit(90, 8, 61), _unit(40, 8, 62)
    gen = torch.Generator().manual_seed(3)
    relevant = [torch.randperm(90, generator=gen)[:4].tolist() for _ in range(25)]
    pairs = ["a->b" if i % 3 else "c->d" for i in range(25)]
    targets = torch.randint(0, 40, (25,), generator=gen)
    results = [
        (
            odmap_i2t(query, captions, relevant, pairs, k=10, chunk_size=c),
            odmap_t2i(query, images, targets, pairs, k=10, chunk_size=c),
            delta_ctrl(query, _unit(25, 8, 63), captions, relevant, k=10, chunk_size=c),
        )
        for c in CHUNK_SIZES
    ]
    assert all(r == results[0] for r in results[1:])


def test_delta_ctrl_sign():
    n_images, dim = 20, 32
    image = _unit(n_images, dim, 70)
    gen = torch.Generator().manual_seed(4)
    # Three captions per image, each close to its image.
    caption_image = torch.arange(n_images).repeat_interleave(3)
    captions = F.normalize(image[caption_image] + 0.3 * torch.randn(len(caption_image), dim, generator=gen), dim=-1)
    relevant = [list(range(3 * i, 3 * i + 3)) for i in range(n_images)]
    # A control that barely changes the image leaves retrieval (nearly) where it was;
    # one that replaces it with noise destroys it.
    faithful = F.normalize(image + 0.01 * torch.randn(n_images, dim, generator=gen), dim=-1)
    broken = _unit(n_images, dim, 71)
    assert abs(delta_ctrl(image, faithful, captions, relevant, k=5)) < 0.05
    assert delta_ctrl(image, broken, captions, relevant, k=5) > 0.5
    assert delta_ctrl(broken, image, captions, relevant, k=5) < -0.5
    assert delta_ctrl(image, image, captions, relevant, k=5) == 0.0


def test_chunk_rows_shrink_with_the_gallery_so_a_chunk_stays_within_its_budget():
    from spur_assets.core.metrics.retrieval_metrics import SIMILARITY_CHUNK_BYTES, chunk_rows_for

    assert chunk_rows_for(1_250) == 1024  # small gallery: the caller's chunk size
    rows = chunk_rows_for(20_000)
    assert rows < 1024 and rows * 20_000 * 4 <= SIMILARITY_CHUNK_BYTES < (rows + 1) * 20_000 * 4
    assert chunk_rows_for(10**8) == 64  # never fewer rows than that
    assert chunk_rows_for(20_000, chunk_size=100) == 100


def test_pairwise_accuracy_hand_case_counts_ties_as_wrong():
    # Gallery = identity, so a query's similarity to gallery row j is its j-th entry.
    query = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [0.8, 0.0, 0.6]])
    gallery = torch.eye(3)
    out = pairwise_accuracy(
        query, gallery, torch.tensor([0, 0, 1, 2, 2]), torch.tensor([1, 0, 2, 0, 2]), torch.tensor([0, 1, 1, 2, 1])
    )
    # q0: 0.8 > 0.6 right, 0.6 > 0.8 wrong; q1: 0.8 > 0.6 right; q2: 0.8 > 0.6 right, 0.6 > 0.0 right.
    assert out.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0] and out.dtype == torch.float64
    tie = pairwise_accuracy(query, gallery, torch.tensor([0]), torch.tensor([2]), torch.tensor([2]))
    assert tie.tolist() == [0.0]  # equal similarity: the model cannot tell them apart
    chunked = pairwise_accuracy(
        query, gallery, torch.tensor([0, 0, 1, 2, 2]), torch.tensor([1, 0, 2, 0, 2]), torch.tensor([0, 1, 1, 2, 1]),
        chunk_size=2,
    )
    assert chunked.tolist() == out.tolist()
    with pytest.raises(ValueError, match="one entry per comparison"):
        pairwise_accuracy(query, gallery, torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="preferred_rows holds row 3"):
        pairwise_accuracy(query, gallery, torch.tensor([0]), torch.tensor([3]), torch.tensor([0]))


def test_recall_hits_are_the_queries_behind_recall_at_k():
    image, text = _unit(9, 8, 80), _unit(20, 8, 81)
    text_image = torch.arange(20) % 9
    hits = recall_hits(image, text, text_image, (1, 5), chunk_size=4)
    means = recall_at_k(image, text, text_image, (1, 5))
    assert hits["i2t"]["5"].shape == (9,) and hits["t2i"]["1"].shape == (20,)
    for direction in ("i2t", "t2i"):
        for k in ("1", "5"):
            assert set(hits[direction][k].tolist()) <= {0.0, 1.0}
            assert float(hits[direction][k].mean()) == pytest.approx(means[direction][k])
    # Brute force: image i hits at 5 when one of its captions is among its 5 most similar.
    ranked = torch.argsort(image @ text.T, dim=1, descending=True)[:, :5]
    assert hits["i2t"]["5"].tolist() == [float((text_image[ranked[i]] == i).any()) for i in range(9)]


def test_delta_ctrl_is_the_mean_of_its_per_control_terms():
    original, control, captions = _unit(6, 8, 90), _unit(6, 8, 91), _unit(15, 8, 92)
    relevant = [[0, 1], [2], [], [5, 6, 7], [8], [9, 10]]  # control 2's image has no caption: skipped
    terms = delta_ctrl_terms(original, control, captions, relevant, k=4)
    ap_o = average_precision_at_k(topk_gallery(original, captions, 4), relevant, 4)
    ap_c = average_precision_at_k(topk_gallery(control, captions, 4), relevant, 4)
    assert math.isnan(float(terms[2])) and torch.allclose(terms[[0, 1, 3, 4, 5]], (ap_o - ap_c)[[0, 1, 3, 4, 5]])
    assert delta_ctrl(original, control, captions, relevant, k=4) == pytest.approx(
        float(torch.nanmean(ap_o) - torch.nanmean(ap_c)), abs=1e-12
    )
