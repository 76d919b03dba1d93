"""On the built-in data, the default spurious-pair rule flags every injected pair (docs/definitions.md#spurious-pairs)."""

import polars as pl

from spur_assets.core.data.builtin_dataset import INJECTED_PAIRS, BuiltinDatasetSpec, generate_builtin_dataset
from spur_assets.core.data.coco_ingest import load_batch
from spur_assets.core.counterfactuals.cooccurrence import (
    PairThresholds,
    image_categories_from_instances,
    image_categories_from_mentions,
    pair_statistics,
)
from spur_assets.core.data.vocabulary import mention_table


def test_default_thresholds_flag_every_injected_pair_and_nothing_else(tmp_path):
    manifest = generate_builtin_dataset(tmp_path / "builtin", BuiltinDatasetSpec(n_train=400, n_test=40))
    tables = load_batch(manifest, batch="builtin")
    train_images = tables.images.filter(pl.col("split") == "train")
    instances = tables.instances.filter(pl.col("split") == "train")
    captions = tables.captions.filter(pl.col("split") == "train")
    by_instances = pair_statistics(image_categories_from_instances(instances), train_images.height, "instances", PairThresholds())
    by_captions = pair_statistics(
        image_categories_from_mentions(captions, mention_table(captions.select("caption_id", "caption"))),
        train_images.height, "captions", PairThresholds(),
    )
    injected = set(INJECTED_PAIRS)
    for stats in (by_instances, by_captions):
        flagged = {(a, b) for a, b in stats.filter(pl.col("flagged")).select("anchor", "companion").iter_rows()}
        assert injected <= flagged
        # the only other flags are the same pairs read backwards (companions rarely appear alone)
        assert flagged - injected <= {(b, a) for a, b in injected}
