"""Retrieval metrics: Recall@K (COCO protocol), ODmAP@k in both directions, HR@k, Delta_ctrl,
pairwise counterfactual accuracy.

Definitions: docs/definitions.md#metrics. Everything that ranks a gallery goes through
`topk_gallery`, which walks the similarity matrix `chunk_size` query rows at a time,
so no full n_query x n_gallery matrix ever exists: peak extra memory is about
chunk_size * n_gallery * 4 bytes (the float32 similarities of one chunk) on the
embeddings' device. Embeddings arrive L2-normalised; similarity is the dot product.

Per-query scores are float64. A query whose metric is undefined (AP@k with no
relevant item) scores nan, and every mean here skips nan values. The composites return
their per-query scores too when asked (`per_query=True`, `recall_hits`,
`delta_ctrl_terms`), so a caller can resample queries (`attribution`) without ranking
again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "RelevantSets",
    "average_precision_at_k",
    "delta_ctrl",
    "delta_ctrl_terms",
    "grouped_mean",
    "hallucination_rate",
    "hallucination_rates",
    "odmap_i2t",
    "odmap_t2i",
    "pairwise_accuracy",
    "recall_at_k",
    "recall_hits",
    "reciprocal_rank_at_k",
    "topk_gallery",
]


# --------------------------------------------------------------------------- ranking


def _check_embeddings(query_emb: Tensor, gallery_emb: Tensor, query_name: str, gallery_name: str) -> None:
    for name, emb in ((query_name, query_emb), (gallery_name, gallery_emb)):
        if not isinstance(emb, Tensor) or emb.ndim != 2 or not emb.is_floating_point():
            raise ValueError(
                f"{name}: expected a 2-D float tensor [n, dim] of L2-normalised embeddings, "
                f"got {type(emb).__name__} {tuple(getattr(emb, 'shape', ()))} {getattr(emb, 'dtype', '')}"
            )
        finite_rows = torch.isfinite(emb).all(dim=1)
        if not bool(finite_rows.all()):
            bad = int((~finite_rows).nonzero()[0, 0])
            raise ValueError(
                f"{name}: row {bad} holds a nan or inf; re-encode that item (its embedding is unusable)"
            )
    if query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(
            f"{query_name} has dim {query_emb.shape[1]} but {gallery_name} has dim {gallery_emb.shape[1]}; "
            "both must come from the same checkpoint's projection"
        )
    if query_emb.device != gallery_emb.device:
        raise ValueError(
            f"{query_name} is on {query_emb.device} but {gallery_name} is on {gallery_emb.device}; "
            "move both to one device"
        )


def _topk_with_index_ties(similarity: Tensor, k: int) -> Tensor:
    """Top-k column indices per row, best first, equal scores ordered by lower column index."""
    # One extra rank shows whether items tied with the k-th score fall outside the cut,
    # without another full-size pass (a bool mask summed to int64 would cost 9 bytes per
    # similarity and dominate peak memory).
    ranked = min(k + 1, similarity.shape[1])
    values, indices = torch.topk(similarity, ranked, dim=1, largest=True, sorted=True)
    if ranked > k:
        boundary_tie = values[:, k] == values[:, k - 1]
        values, indices = values[:, :k], indices[:, :k]
    else:
        boundary_tie = torch.zeros(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    # torch.topk leaves the order among equal scores unspecified, and which of several
    # items tied with the k-th score make the cut. Fix both so results are reproducible
    # across devices and chunk sizes.
    # Inside the top k: order by index, then stable-sort by score, so ties go low index first.
    by_index, perm = torch.sort(indices, dim=1)
    values = torch.gather(values, 1, perm)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    indices = torch.gather(by_index, 1, order)
    if bool(boundary_tie.any()):
        # Rare with real embeddings; a full stable sort of just those rows settles the cut.
        rows = boundary_tie.nonzero().squeeze(1)
        full = torch.sort(similarity[rows], dim=1, descending=True, stable=True).indices[:, :k]
        indices[rows] = full
    return indices


# Memory one chunk of similarities may take when the caller sizes chunks by gallery (see chunk_rows_for).
SIMILARITY_CHUNK_BYTES = 16 * 2**20


def chunk_rows_for(n_gallery: int, chunk_size: int = 1024, budget_bytes: int = SIMILARITY_CHUNK_BYTES) -> int:
    """Query rows per chunk so that one chunk's float32 similarities [rows, n_gallery] stay
    within `budget_bytes`: at most `chunk_size`, at least 64 (small matmuls waste the CPU).

    topk_gallery's results do not depend on the chunk size, so this only bounds memory: the
    peak then stays flat as the gallery grows instead of growing with chunk_size x n_gallery.
    """
    return max(64, min(chunk_size, budget_bytes // (4 * max(1, n_gallery))))


def topk_gallery(query_emb: Tensor, gallery_emb: Tensor, k: int, chunk_size: int = 1024) -> Tensor:
    """Indices of the k most similar gallery rows for every query row, best first.

    Contract: returns a LongTensor [n_query, k] on the embeddings' device. Similarity is
    query_emb @ gallery_emb.T computed in at least float32 (half-precision inputs are
    upcast once). Equal similarities are ordered by lower gallery index, and the same
    rule decides which tied items make the top k, so the result does not depend on
    chunk_size (across devices, matmul rounding may still reorder near-ties). Works on `chunk_size` query rows at a time. Raises ValueError
    for non-finite embeddings, mismatched dim/device, k outside [1, n_gallery] or
    chunk_size < 1.
    """
    _check_embeddings(query_emb, gallery_emb, "query_emb", "gallery_emb")
    n_gallery = gallery_emb.shape[0]
    if not 1 <= k <= n_gallery:
        raise ValueError(f"k={k} must be between 1 and the gallery size {n_gallery}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of query rows")
    dtype = torch.promote_types(torch.promote_types(query_emb.dtype, gallery_emb.dtype), torch.float32)
    gallery_t = gallery_emb.to(dtype).T
    out = torch.empty((query_emb.shape[0], k), dtype=torch.long, device=query_emb.device)
    with torch.no_grad():
        for start in range(0, query_emb.shape[0], chunk_size):
            chunk = query_emb[start : start + chunk_size].to(dtype)
            out[start : start + chunk.shape[0]] = _topk_with_index_ties(chunk @ gallery_t, k)
    return out


# --------------------------------------------------------------------------- relevance


@dataclass(frozen=True)
class RelevantSets:
    """Relevant gallery indices per query, in CSR form: query q's set is
    indices[offsets[q]:offsets[q + 1]], without duplicates. Small at any scale
    (one int64 per relevant pair)."""

    offsets: Tensor
    indices: Tensor

    def __post_init__(self) -> None:
        off, idx = self.offsets, self.indices
        if off.ndim != 1 or off.numel() < 1 or off.dtype != torch.long:
            raise ValueError("RelevantSets.offsets must be a 1-D int64 tensor of length n_query + 1")
        if idx.ndim != 1 or idx.dtype != torch.long:
            raise ValueError("RelevantSets.indices must be a 1-D int64 tensor of gallery indices")
        if int(off[0]) != 0 or int(off[-1]) != idx.numel() or bool((off[1:] < off[:-1]).any()):
            raise ValueError(
                "RelevantSets.offsets must start at 0, never decrease and end at len(indices) "
                f"({idx.numel()}); got start {int(off[0])}, end {int(off[-1])}"
            )
        if idx.numel() and int(idx.min()) < 0:
            raise ValueError(f"RelevantSets.indices holds a negative gallery index ({int(idx.min())})")

    @classmethod
    def from_lists(cls, sets: Sequence[Sequence[int]]) -> RelevantSets:
        """CSR from one sequence of gallery indices per query; duplicates are dropped, order is not kept."""
        sizes = torch.tensor([len(s) for s in sets], dtype=torch.long)
        flat = torch.tensor([int(i) for s in sets for i in s], dtype=torch.long)
        if flat.numel() and int(flat.min()) < 0:
            q = int(torch.repeat_interleave(torch.arange(len(sets)), sizes)[flat.argmin()])
            raise ValueError(f"relevant set of query {q} holds a negative gallery index ({int(flat.min())})")
        width = int(flat.max()) + 1 if flat.numel() else 1
        query_of = torch.repeat_interleave(torch.arange(len(sets), dtype=torch.long), sizes)
        keys = torch.unique(query_of * width + flat)  # sorted, so grouped by query
        counts = torch.bincount(keys // width, minlength=len(sets))
        offsets = torch.zeros(len(sets) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(counts, 0)
        return cls(offsets=offsets, indices=keys % width)

    @property
    def n_query(self) -> int:
        return self.offsets.numel() - 1

    def sizes(self) -> Tensor:
        """|R| per query, int64 [n_query]."""
        return self.offsets[1:] - self.offsets[:-1]


def _as_relevant_sets(relevant: Sequence[Sequence[int]] | RelevantSets) -> RelevantSets:
    return relevant if isinstance(relevant, RelevantSets) else RelevantSets.from_lists(relevant)


def _check_topk(topk: Tensor, k: int) -> Tensor:
    if topk.ndim != 2 or topk.dtype != torch.long:
        raise ValueError(f"topk must be a 2-D int64 tensor [n_query, >=k], got {tuple(topk.shape)} {topk.dtype}")
    if k < 1 or topk.shape[1] < k:
        raise ValueError(f"k={k} must be between 1 and the number of ranked columns in topk ({topk.shape[1]})")
    if topk.numel() and int(topk.min()) < 0:
        raise ValueError(f"topk holds a negative gallery index ({int(topk.min())})")
    return topk[:, :k]


def _relevance_matrix(topk: Tensor, relevant: RelevantSets) -> Tensor:
    """Bool [n_query, k]: is topk[q, i] in query q's relevant set."""
    n_query = topk.shape[0]
    idx = relevant.indices.to(topk.device)
    sizes = relevant.sizes().to(topk.device)
    width = max(int(topk.max()) if topk.numel() else 0, int(idx.max()) if idx.numel() else 0) + 1
    query_of = torch.repeat_interleave(torch.arange(n_query, device=topk.device), sizes)
    relevant_keys = query_of * width + idx
    if torch.unique(relevant_keys).numel() != relevant_keys.numel():
        raise ValueError(
            "RelevantSets lists a gallery index twice for one query; build it with RelevantSets.from_lists"
        )
    ranked_keys = torch.arange(n_query, device=topk.device).unsqueeze(1) * width + topk
    return torch.isin(ranked_keys, relevant_keys)


# --------------------------------------------------------------------------- per-query metrics


def average_precision_at_k(
    topk: Tensor, relevant: Sequence[Sequence[int]] | RelevantSets, k: int
) -> Tensor:
    """AP@k per query: (1 / min(k, |R|)) * sum_{i<=k} rel_i * P@i, float64 [n_query].

    Contract: topk [n_query, >=k] ranks gallery indices best first (only its first k
    columns are read); relevant gives each query's set R of gallery indices, as lists or
    RelevantSets. A query with |R| = 0 scores nan (AP is undefined; means skip it).
    A query with relevant items but none in the top k scores 0.
    """
    ranked = _check_topk(topk, k)
    sets = _as_relevant_sets(relevant)
    if sets.n_query != ranked.shape[0]:
        raise ValueError(f"relevant has {sets.n_query} query sets but topk has {ranked.shape[0]} rows")
    hits = _relevance_matrix(ranked, sets).to(torch.float64)
    ranks = torch.arange(1, k + 1, dtype=torch.float64, device=ranked.device)
    precision_at_i = torch.cumsum(hits, dim=1) / ranks
    n_relevant = sets.sizes().to(ranked.device)
    denominator = torch.clamp(n_relevant, max=k).to(torch.float64)
    ap = (hits * precision_at_i).sum(dim=1) / denominator.clamp(min=1)
    return torch.where(n_relevant > 0, ap, torch.full_like(ap, float("nan")))


def reciprocal_rank_at_k(topk: Tensor, target: Tensor, k: int) -> Tensor:
    """1 / rank of each query's single relevant gallery item if rank <= k, else 0; float64 [n_query].

    Contract: topk [n_query, >=k] ranks gallery indices best first; target [n_query]
    holds the one relevant gallery index per query. This is the t2i AP@k (|R| = 1).
    """
    ranked = _check_topk(topk, k)
    target = torch.as_tensor(target, device=ranked.device)
    if target.ndim != 1 or target.shape[0] != ranked.shape[0]:
        raise ValueError(
            f"target must be 1-D with one gallery index per query ({ranked.shape[0]})"
            f", got {tuple(target.shape)}"
        )
    hit = ranked == target.to(torch.long).unsqueeze(1)
    first = torch.argmax(hit.to(torch.uint8), dim=1)  # first maximal index = best-ranked hit
    rr = 1.0 / (first.to(torch.float64) + 1.0)
    return torch.where(hit.any(dim=1), rr, torch.zeros_like(rr))


def hallucination_rate(topk: Tensor, gallery_mentions: Tensor, query_category: Tensor, k: int) -> Tensor:
    """Share of each query's top-k gallery captions that mention the query's category, float64 [n_query].

    Contract: gallery_mentions is a dense bool [n_gallery, n_categories] (one byte per
    caption and category: 40 MB at 500k captions x 80 classes); query_category
    [n_query] holds a column index of it per query (for HR@k, the companion b).
    """
    ranked = _check_topk(topk, k)
    if gallery_mentions.ndim != 2 or gallery_mentions.dtype != torch.bool:
        raise ValueError(
            f"gallery_mentions must be a bool tensor [n_gallery, n_categories], got "
            f"{tuple(gallery_mentions.shape)} {gallery_mentions.dtype}"
        )
    category = torch.as_tensor(query_category, device=ranked.device).to(torch.long)
    if category.ndim != 1 or category.shape[0] != ranked.shape[0]:
        raise ValueError(
            f"query_category must be 1-D with one entry per query ({ranked.shape[0]})"
            f", got {tuple(category.shape)}"
        )
    n_gallery, n_categories = gallery_mentions.shape
    if ranked.numel() and int(ranked.max()) >= n_gallery:
        raise ValueError(f"topk ranks gallery index {int(ranked.max())} but gallery_mentions has {n_gallery} rows")
    if category.numel() and not (0 <= int(category.min()) and int(category.max()) < n_categories):
        raise ValueError(f"query_category must index the {n_categories} columns of gallery_mentions")
    mentions = gallery_mentions.to(ranked.device)[ranked, category.unsqueeze(1)]
    return mentions.to(torch.float64).mean(dim=1)


# --------------------------------------------------------------------------- averaging


def grouped_mean(values: Tensor, groups: Sequence[str]) -> dict:
    """Macro and micro means of per-query values grouped by a label (a pair id), skipping nan.

    Contract: returns {"macro": mean over groups of their group means, "micro": mean over
    all non-nan values, "per_group": {group: (mean, count)}} as Python floats/ints, with
    groups in first-seen order. count is the number of non-nan values; a group with none
    has mean nan and is left out of the macro mean. Means of nothing are nan.
    """
    values = torch.as_tensor(values).detach().to("cpu", torch.float64)
    groups = list(groups)
    if values.ndim != 1 or values.shape[0] != len(groups):
        raise ValueError(
            f"values has shape {tuple(values.shape)} but there are {len(groups)} group labels"
            "; give one label per value"
        )
    labels = list(dict.fromkeys(groups))
    code = {g: i for i, g in enumerate(labels)}
    group_of = torch.tensor([code[g] for g in groups], dtype=torch.long)
    valid = ~torch.isnan(values)
    counts = torch.bincount(group_of[valid], minlength=len(labels))
    sums = torch.bincount(group_of[valid], weights=values[valid], minlength=len(labels)).to(torch.float64)
    means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
    has_values = counts > 0
    macro = float(means[has_values].mean()) if bool(has_values.any()) else float("nan")
    micro = float(values[valid].mean()) if bool(valid.any()) else float("nan")
    per_group = {g: (float(means[i]), int(counts[i])) for i, g in enumerate(labels)}
    return {"macro": macro, "micro": micro, "per_group": per_group}


def _pair_summary(values: Tensor, pair_of_query: Sequence[str], per_query: bool = False) -> dict:
    summary = grouped_mean(values, pair_of_query)
    result = {
        "macro": summary["macro"],
        "micro": summary["micro"],
        "per_pair": {pair: mean for pair, (mean, _) in summary["per_group"].items()},
        "n_queries": {pair: count for pair, (_, count) in summary["per_group"].items()},
    }
    if per_query:
        result["per_query"] = torch.as_tensor(values).detach().to("cpu", torch.float64)
    return result


# --------------------------------------------------------------------------- report composites


def recall_hits(
    image_emb: Tensor,
    text_emb: Tensor,
    text_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, dict[str, Tensor]]:
    """Per-query Recall@K hits in both directions: {"i2t"|"t2i": {str(K): float64 [n_query] of 0/1}}.

    Contract: the queries and the hit rule of `recall_at_k` (whose values are the means
    of these): i2t query i is image row i, a hit when any of its own captions is in its
    top K captions; t2i query j is caption j, a hit when its own image is in its top K
    images. Tensors are on CPU. Same checks and errors as `recall_at_k`.
    """
    _check_embeddings(image_emb, text_emb, "image_emb", "text_emb")
    text_image = torch.as_tensor(text_image, device=image_emb.device).to(torch.long)
    n_images, n_texts = image_emb.shape[0], text_emb.shape[0]
    if text_image.ndim != 1 or text_image.shape[0] != n_texts:
        raise ValueError(
            f"text_image must give one image row per caption ({n_texts})"
            f", got shape {tuple(text_image.shape)}"
        )
    if n_texts and (int(text_image.min()) < 0 or int(text_image.max()) >= n_images):
        bad = int(((text_image < 0) | (text_image >= n_images)).nonzero()[0, 0])
        raise ValueError(f"text_image[{bad}] = {int(text_image[bad])} is not a row of image_emb (0..{n_images - 1})")
    captions_per_image = torch.bincount(text_image, minlength=n_images)
    if bool((captions_per_image == 0).any()):
        bad = int((captions_per_image == 0).nonzero()[0, 0])
        raise ValueError(f"image row {bad} has no caption in text_image; drop it from image_emb or add its captions")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks={ks} must be positive ranks")
    max_k = ks[-1]

    image_rows = torch.arange(n_images, device=image_emb.device).unsqueeze(1)
    i2t_topk = topk_gallery(image_emb, text_emb, max_k, chunk_size)
    i2t_hit = text_image[i2t_topk] == image_rows  # [n_images, max_k]
    t2i_topk = topk_gallery(text_emb, image_emb, max_k, chunk_size)
    t2i_hit = t2i_topk == text_image.unsqueeze(1)  # [n_texts, max_k]
    return {
        "i2t": {str(k): i2t_hit[:, :k].any(dim=1).to("cpu", torch.float64) for k in ks},
        "t2i": {str(k): t2i_hit[:, :k].any(dim=1).to("cpu", torch.float64) for k in ks},
    }


def recall_at_k(
    image_emb: Tensor,
    text_emb: Tensor,
    text_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, dict[str, float]]:
    """Standard COCO Recall@K in both directions: {"i2t": {"1": .., ..}, "t2i": {..}}.

    Contract: text_image[j] is the row of image_emb that caption j describes. i2t R@K is
    the share of images with any own caption among their top K captions; t2i R@K the
    share of captions whose own image is among their top K images. Equals
    clip_benchmark's text_retrieval_recall@K (i2t) and image_retrieval_recall@K (t2i) on
    the same embeddings, up to ties, which here go to the lower index. Every image must
    have at least one caption (clip_benchmark would silently count it as a miss).
    Per-query hits: `recall_hits`.
    """
    hits = recall_hits(image_emb, text_emb, text_image, ks, chunk_size)
    return {direction: {k: float(hit.mean()) for k, hit in by_k.items()} for direction, by_k in hits.items()}


def odmap_i2t(
    removal_emb: Tensor,
    caption_emb: Tensor,
    relevant: Sequence[Sequence[int]] | RelevantSets,
    pair_of_query: Sequence[str],
    k: int = 10,
    chunk_size: int = 1024,
    per_query: bool = False,
) -> dict:
    """ODmAP@k image->text: queries I^-b against the caption gallery, averaged per pair.

    Contract: row q of removal_emb is one I^-b; relevant[q] are the gallery rows of I's
    captions that do not mention b plus the accepted edits of I's captions;
    pair_of_query[q] is its pair id ("dog->frisbee"). Returns {"macro", "micro",
    "per_pair": {pair: mean AP@k}, "n_queries": {pair: count}}; queries with no relevant
    caption are skipped. With per_query, also "per_query": AP@k of every query, float64
    on CPU, nan where skipped.
    """
    topk = topk_gallery(removal_emb, caption_emb, k, chunk_size)
    return _pair_summary(average_precision_at_k(topk, relevant, k), pair_of_query, per_query)


def odmap_t2i(
    caption_query_emb: Tensor,
    image_gallery_emb: Tensor,
    target_index: Tensor,
    pair_of_query: Sequence[str],
    k: int = 10,
    chunk_size: int = 1024,
    per_query: bool = False,
) -> dict:
    """ODmAP@k text->image: original b-captions of I against originals plus every I^-b.

    Contract: target_index[q] is the gallery row of query q's own original image I (the
    only relevant item, so AP@k = 1/rank if rank <= k else 0). Same return shape as
    `odmap_i2t` (per_query: the reciprocal rank of every query).
    """
    topk = topk_gallery(caption_query_emb, image_gallery_emb, k, chunk_size)
    return _pair_summary(reciprocal_rank_at_k(topk, target_index, k), pair_of_query, per_query)


def delta_ctrl_terms(
    original_emb: Tensor,
    control_emb: Tensor,
    caption_emb: Tensor,
    relevant: Sequence[Sequence[int]] | RelevantSets,
    k: int = 10,
    chunk_size: int = 1024,
) -> Tensor:
    """Each control's share of Delta_ctrl: AP@k(I) - AP@k(I^c), float64 [n_control] on CPU.

    Contract: as `delta_ctrl`. A control whose I has no relevant caption scores nan: both
    APs are undefined for it, since I and I^c share one relevant set.
    """
    if original_emb.shape != control_emb.shape:
        raise ValueError(
            f"original_emb {tuple(original_emb.shape)} and control_emb {tuple(control_emb.shape)} "
            "must pair row for row (row q of each is the same image I)"
        )
    sets = _as_relevant_sets(relevant)
    ap_original = average_precision_at_k(topk_gallery(original_emb, caption_emb, k, chunk_size), sets, k)
    ap_control = average_precision_at_k(topk_gallery(control_emb, caption_emb, k, chunk_size), sets, k)
    return (ap_original - ap_control).to("cpu")


def delta_ctrl(
    original_emb: Tensor,
    control_emb: Tensor,
    caption_emb: Tensor,
    relevant: Sequence[Sequence[int]] | RelevantSets,
    k: int = 10,
    chunk_size: int = 1024,
) -> float:
    """Artifact control Delta_ctrl = mAP@k(I) - mAP@k(I^c), I's original captions relevant.

    Contract: row q of original_emb is an image I and row q of control_emb its control
    I^c; relevant[q] are the gallery rows of I's original captions (all of them). Both
    means are micro over queries, skipping queries with no relevant caption. Near 0
    means the inpainting itself does not move retrieval; positive means it hurts.
    Both mAPs skip the same controls (I and I^c share a relevant set), so this is the
    mean of `delta_ctrl_terms`, which is how it is computed.
    """
    return float(torch.nanmean(delta_ctrl_terms(original_emb, control_emb, caption_emb, relevant, k, chunk_size)))


def hallucination_rates(
    removal_emb: Tensor,
    removal_pair: Sequence[str],
    image_emb: Tensor,
    image_objects: Tensor,
    caption_emb: Tensor,
    caption_mentions: Tensor,
    pairs: Mapping[str, tuple[int, int]],
    k: int = 10,
    chunk_size: int = 1024,
    per_query: bool = False,
) -> dict:
    """HR@k on I^-b with its natural and anchor-only reference rates, per pair.

    Contract: pairs maps a pair id to (anchor, companion) category columns shared by
    image_objects (bool [n_images, n_categories]: the unedited test image shows the
    object) and caption_mentions (bool [n_captions, n_categories]: the gallery caption
    mentions it). removal_pair[q] names the pair of I^-b row q. For each pair (a, b):
    "hr" ranks the I^-b queries, "natural" the unedited images showing neither a nor b,
    "anchor_only" those showing a without b; each scores the share of its top-k captions
    mentioning b. Returns {"hr"|"natural"|"anchor_only": {"macro", "micro", "per_pair",
    "n_queries"}}; a pair with no qualifying image is absent from its rate. With
    per_query, "hr" also holds "per_query": HR@k of every I^-b row, float64 on CPU.
    """
    removal_pair = list(removal_pair)
    unknown = sorted(set(removal_pair) - set(pairs))
    if unknown:
        raise ValueError(
            f"removal_pair names pairs {unknown[:5]}"
            " that are not in pairs; add them or drop those queries"
        )
    if image_objects.ndim != 2 or image_objects.shape[0] != image_emb.shape[0] or image_objects.dtype != torch.bool:
        raise ValueError(
            f"image_objects must be bool [n_images={image_emb.shape[0]}, n_categories], "
            f"got {tuple(image_objects.shape)} {image_objects.dtype}"
        )
    if caption_mentions.shape[0] != caption_emb.shape[0]:
        raise ValueError(
            f"caption_mentions has {caption_mentions.shape[0]}"
            f" rows but caption_emb has {caption_emb.shape[0]}"
        )
    device = removal_emb.device
    companion = torch.tensor([pairs[p][1] for p in removal_pair], dtype=torch.long, device=device)
    hr = hallucination_rate(topk_gallery(removal_emb, caption_emb, k, chunk_size), caption_mentions, companion, k)

    # One ranking of the unedited images serves every pair's reference rates.
    image_topk = topk_gallery(image_emb, caption_emb, k, chunk_size)
    objects = image_objects.to(image_topk.device)
    reference: dict[str, tuple[list[Tensor], list[str]]] = {"natural": ([], []), "anchor_only": ([], [])}
    for pair, (anchor, companion_category) in pairs.items():
        shows_anchor, shows_companion = objects[:, anchor], objects[:, companion_category]
        for name, rows in (
            ("natural", ~shows_anchor & ~shows_companion),
            ("anchor_only", shows_anchor & ~shows_companion),
        ):
            selected = image_topk[rows]
            category = torch.full((selected.shape[0],), companion_category, dtype=torch.long, device=selected.device)
            reference[name][0].append(hallucination_rate(selected, caption_mentions, category, k))
            reference[name][1].extend([pair] * selected.shape[0])

    result = {"hr": _pair_summary(hr, removal_pair, per_query)}
    for name, (rates, labels) in reference.items():
        values = torch.cat(rates) if rates else torch.empty(0, dtype=torch.float64)
        result[name] = _pair_summary(values, labels)
    return result


def pairwise_accuracy(
    query_emb: Tensor,
    gallery_emb: Tensor,
    query_rows: Tensor,
    preferred_rows: Tensor,
    other_rows: Tensor,
    chunk_size: int = 4096,
) -> Tensor:
    """Pairwise counterfactual accuracy (SugarCrepe / Winoground style), 1.0 or 0.0 per comparison.

    Contract: comparison c is correct when query row query_rows[c] is strictly more
    similar to gallery row preferred_rows[c] than to gallery row other_rows[c] (a tie
    is wrong: the model cannot tell the two apart). Similarity is the dot product in at
    least float32, as `topk_gallery` computes it. Returns float64 [n_comparisons] on CPU;
    a mean of it is the accuracy. Raises ValueError for index tensors of unequal length
    or rows outside the embeddings.
    """
    _check_embeddings(query_emb, gallery_emb, "query_emb", "gallery_emb")
    device = query_emb.device
    rows = [
        torch.as_tensor(r, device=device).to(torch.long).reshape(-1) for r in (query_rows, preferred_rows, other_rows)
    ]
    if not rows[0].shape == rows[1].shape == rows[2].shape:
        raise ValueError(
            f"query_rows, preferred_rows and other_rows must have one entry per comparison; got lengths "
            f"{[r.numel() for r in rows]}"
        )
    for name, r, size in (
        ("query_rows", rows[0], query_emb.shape[0]),
        ("preferred_rows", rows[1], gallery_emb.shape[0]),
        ("other_rows", rows[2], gallery_emb.shape[0]),
    ):
        if r.numel() and (int(r.min()) < 0 or int(r.max()) >= size):
            bad = int(r.max()) if int(r.max()) >= size else int(r.min())
            raise ValueError(f"{name} holds row {bad}, outside 0..{size - 1}; give rows of the embeddings")
    dtype = torch.promote_types(torch.promote_types(query_emb.dtype, gallery_emb.dtype), torch.float32)
    out = torch.empty(rows[0].numel(), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, rows[0].numel(), chunk_size):
            q, better, worse = (r[start : start + chunk_size] for r in rows)
            query = query_emb[q].to(dtype)
            correct = (query * gallery_emb[better].to(dtype)).sum(1) > (query * gallery_emb[worse].to(dtype)).sum(1)
            out[start : start + q.numel()] = correct.to("cpu", torch.float64)
    return out
