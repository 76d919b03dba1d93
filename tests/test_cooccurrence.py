import itertools

import numpy as np
import polars as pl
import pytest

from spur_assets.core.counterfactuals.cooccurrence import (
    PairThresholds,
    cooccurrence_matrix,
    image_categories_from_instances,
    image_categories_from_mentions,
    pair_statistics,
)


def _image_categories(rows):
    return pl.DataFrame(rows, schema=["image_id", "category"], orient="row").unique()


def test_hand_computed_pair():
    # 10 images: dog in 1-4, frisbee in 1-3 and 9, cat in 5; image 10 empty.
    rows = [(i, "dog") for i in (1, 2, 3, 4)] + [(i, "frisbee") for i in (1, 2, 3, 9)] + [(5, "cat")]
    stats = pair_statistics(_image_categories(rows), n_images=10, source="instances",
                            thresholds=PairThresholds(min_support=3, min_conditional=0.7, min_lift=1.5))
    row = stats.filter((pl.col("anchor") == "dog") & (pl.col("companion") == "frisbee")).row(0, named=True)
    assert (row["n_anchor"], row["n_both"], row["n_companion"], row["n_images"]) == (4, 3, 4, 10)
    assert row["p_companion_given_anchor"] == pytest.approx(0.75)
    assert row["p_companion"] == pytest.approx(0.4)
    assert row["lift"] == pytest.approx(0.75 / 0.4)
    assert row["flagged"] is True
    assert row["source"] == "instances"
    # the reverse direction has the same support and P = 3/4 too; cat never co-occurs -> absent
    assert set(stats["anchor"]) == {"dog", "frisbee"}
    assert stats.row(0, named=True)["flagged"]


def test_thresholds_each_block_flagging():
    rows = [(i, "dog") for i in range(4)] + [(i, "frisbee") for i in range(3)]
    base = dict(min_support=3, min_conditional=0.7, min_lift=1.0)
    for field, value in (("min_support", 4), ("min_conditional", 0.8), ("min_lift", 10.0)):
        th = PairThresholds(**{**base, field: value})
        stats = pair_statistics(_image_categories(rows), 10, "instances", th)
        pair = stats.filter((pl.col("anchor") == "dog") & (pl.col("companion") == "frisbee"))
        assert not pair["flagged"][0], field


def test_matches_numpy_reference_on_random_incidence():
    rng = np.random.default_rng(0)
    categories = [f"c{i}" for i in range(7)]
    incidence = rng.random((300, 7)) < rng.uniform(0.05, 0.6, size=7)
    rows = [(i, categories[j]) for i, j in zip(*np.nonzero(incidence))]
    stats = pair_statistics(_image_categories(rows), 300, "instances", PairThresholds(5, 0.3, 1.1))
    co = incidence.T.astype(int) @ incidence.astype(int)
    n = incidence.sum(0)
    got = {(r["anchor"], r["companion"]): r for r in stats.iter_rows(named=True)}
    for a, b in itertools.permutations(range(7), 2):
        if co[a, b] == 0:
            assert (categories[a], categories[b]) not in got
            continue
        r = got[(categories[a], categories[b])]
        p = co[a, b] / n[a]
        lift = p / (n[b] / 300)
        assert r["n_both"] == co[a, b] and r["n_anchor"] == n[a]
        assert r["lift"] == pytest.approx(lift, rel=1e-12)
        assert r["flagged"] == (co[a, b] >= 5 and p >= 0.3 and lift >= 1.1)


def test_sources_and_matrix():
    instances = pl.DataFrame({"image_id": [1, 1, 1, 2], "category": ["dog", "dog", "frisbee", "dog"]})
    assert image_categories_from_instances(instances).height == 3
    captions = pl.DataFrame({"caption_id": [10, 11, 12], "image_id": [1, 1, 2]})
    mentions = pl.DataFrame({"caption_id": [10, 11, 11, 12], "category": ["dog", "dog", "frisbee", "cat"]})
    by_caption = image_categories_from_mentions(captions, mentions).sort("image_id", "category")
    assert by_caption.rows() == [(1, "dog"), (1, "frisbee"), (2, "cat")]
    cats, matrix = cooccurrence_matrix(image_categories_from_instances(instances), ["dog", "frisbee"])
    assert matrix == [[1.0, 0.5], [1.0, 1.0]]


def test_zero_images_is_an_error():
    with pytest.raises(ValueError):
        pair_statistics(_image_categories([]), 0, "instances")


def test_mutual_pairs_keep_the_smaller_companion():
    from spur_assets.core.counterfactuals.cooccurrence import orient_mutual_pairs

    pairs = pl.DataFrame({"anchor": ["dog", "frisbee", "car"], "companion": ["frisbee", "dog", "traffic light"]})
    images = pl.DataFrame({"image_id": [1, 2], "width": [10, 10], "height": [10, 10]})
    instances = pl.DataFrame({
        "image_id": [1, 1, 2, 2],
        "category": ["dog", "frisbee", "car", "traffic light"],
        "mask_area": [30, 4, 20, 50],  # frisbee smaller than dog; traffic light bigger, but (traffic light, car) is not flagged
    })
    kept = orient_mutual_pairs(pairs, instances, images)
    assert kept.rows() == [("dog", "frisbee"), ("car", "traffic light")]
