"""Counterfactuals made per batch and combined equal one run over all batches (issue #7, part 2).

Two small built-in batches whose image ids collide (both number their images the
same way), so the combination must key everything by (batch, id) and renumber
exactly as ``union_split`` does.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
from PIL import Image

from spur_assets.core.counterfactuals.batch_counterfactuals import (
    CounterfactualRecipe,
    build_batch_counterfactuals,
    build_synthetic_counterfactuals,
    combine_batch_counterfactuals,
    stale_batches,
)
from spur_assets.core.data.batch_union import SplitTables, union_split
from spur_assets.core.data.builtin_dataset import INJECTED_PAIRS, BuiltinDatasetSpec, generate_builtin_dataset
from spur_assets.core.data.coco_ingest import load_batch
from spur_assets.core.counterfactuals.inpaint import InpainterSpec
from spur_assets.core.records.lineage import LineageStore

PAIRS = pl.DataFrame({"anchor": [a for a, _ in INJECTED_PAIRS], "companion": [b for _, b in INJECTED_PAIRS]})
# Batches counterfactualise both directions (mutual pairs are oriented only over all batches).
BOTH_WAYS = pl.concat([PAIRS, PAIRS.select(pl.col("companion").alias("anchor"), pl.col("anchor").alias("companion"))])
# 1.2% of a 64-px image: some companions are larger, so both builders skip images.
# The draw counts matter only when combining (a batch part holds every removal candidate).
RECIPE = CounterfactualRecipe(
    InpainterSpec("opencv"), max_companion_fraction=0.012, dilation_px=2, seed=3, removal_per_pair=2, paste_per_pair=3
)
BATCHES = {"alpha": 1, "beta": 2}


def _stack(tables: dict) -> SplitTables:
    """The raw tables of every batch stacked, each batch with its own ids."""
    return SplitTables(*(
        pl.concat([getattr(t, attribute) for t in tables.values()], how="vertical_relaxed")
        for attribute in ("images", "captions", "instances")
    ))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("batches")
    manifests = {
        name: generate_builtin_dataset(root / name, BuiltinDatasetSpec(seed=seed, n_train=50, n_test=30))
        for name, seed in BATCHES.items()
    }
    tables = {name: load_batch(manifest, name) for name, manifest in manifests.items()}
    return manifests, tables


@pytest.fixture(scope="module")
def runs(raw, tmp_path_factory):
    _, tables = raw
    root = tmp_path_factory.mktemp("runs")
    stacked = _stack(tables)
    one = build_synthetic_counterfactuals(stacked, PAIRS, root / "one", RECIPE)
    parts = [
        build_batch_counterfactuals(
            SplitTables(t.images, t.captions, t.instances), BOTH_WAYS, root / f"part-{name}", RECIPE, source="v1"
        )
        for name, t in tables.items()
    ]
    combined = combine_batch_counterfactuals(list(reversed(parts)), stacked, PAIRS, root / "combined", RECIPE)
    return root, one, parts, combined, stacked


def _relative(frame: pl.DataFrame, root: Path) -> pl.DataFrame:
    """Output paths relative to their run's folder (source paths stay: both runs read the same raw images)."""
    columns = [c for c in ("path", "mask_path") if c in frame.columns]
    return frame.with_columns(pl.col(c).str.replace(str(root) + os.sep, "", literal=True) for c in columns)


def _pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_combined_tables_equal_the_one_run_row_by_row(runs):
    root, one, _, combined, _ = runs
    tables = {
        "eval images": (one.eval.images, combined.eval.images),
        "eval captions": (one.eval.captions, combined.eval.captions),
        "eval skipped": (one.eval.skipped, combined.eval.skipped),
        "train images": (one.train.images, combined.train.images),
        "train captions": (one.train.captions, combined.train.captions),
        "train objects": (one.train.objects, combined.train.objects),
        "train lift": (one.train.lift, combined.train.lift),
        "train skipped": (one.train.skipped, combined.train.skipped),
    }
    for name, (reference, ours) in tables.items():
        reference, ours = _relative(reference, root / "one"), _relative(ours, root / "combined")
        assert ours.columns == reference.columns, name
        assert ours.height == reference.height, name
        for i, (want, got) in enumerate(zip(reference.iter_rows(named=True), ours.iter_rows(named=True), strict=True)):
            assert got == want, f"{name} row {i}"
    assert combined.train.settings == one.train.settings
    # The comparison has teeth: both batches, both kinds of skip, a draw that dropped candidates, pastes.
    assert set(one.eval.images["batch"]) == set(BATCHES) and set(one.train.images["batch"]) == set(BATCHES)
    assert one.eval.skipped.height > 0 and one.train.skipped.height > 0
    removals = one.train.images.filter(pl.col("kind") == "removal").group_by("pair").len()
    assert removals["len"].to_list() == [RECIPE.removal_per_pair] * len(PAIRS)
    assert one.train.images.filter(pl.col("kind") == "paste").height > 0


def test_combined_pngs_equal_the_one_run_and_reuse_the_batch_files(runs):
    root, one, parts, combined, _ = runs
    batch_files = {
        Path(p).parts[-2:]: Path(p)
        for part in parts
        for frame in (part.eval.images, part.train_removals.images)
        for p in frame["path"].to_list()
    }
    reference = pl.concat([one.eval.images.select("path"), one.train.images.select("path")])["path"].to_list()
    ours = pl.concat([combined.eval.images.select("path"), combined.train.images.select("path")])["path"].to_list()
    assert len(reference) == len(ours) > 20
    for want, got in zip(reference, ours, strict=True):
        np.testing.assert_array_equal(_pixels(got), _pixels(want), err_msg=got)
    # Eval and removal PNGs are the batch's own files, linked (same inode), not rendered again.
    for got in combined.eval.images["path"].to_list() + combined.train.images.filter(pl.col("kind") == "removal")["path"].to_list():
        assert os.path.samefile(got, batch_files[Path(got).parts[-2:]]), got
    masks = zip(one.eval.images["mask_path"].to_list(), combined.eval.images["mask_path"].to_list(), strict=True)
    for want, got in masks:
        np.testing.assert_array_equal(_pixels(got), _pixels(want), err_msg=got)


def test_ids_are_the_global_ids_of_union_split(runs, raw):
    _, _, _, combined, stacked = runs
    images, captions, instances = stacked.images, stacked.captions, stacked.instances
    for split, image_frame, caption_frame in (
        ("test", combined.eval.images, combined.eval.captions),
        ("train", combined.train.images, None),
    ):
        tables = union_split([images], [captions], [instances], split)
        by_id = {row["image_id"]: row for row in tables.images.iter_rows(named=True)}
        for row in image_frame.iter_rows(named=True):
            source = by_id[row["source_image_id"]]
            assert (source["batch"], source["path"]) == (row["batch"], row["source_path"])
        if caption_frame is not None:
            text_of = dict(tables.captions.select("caption_id", "caption").iter_rows())
            for row in caption_frame.iter_rows(named=True):
                assert text_of[row["source_caption_id"]] == row["source_caption"]
    train = union_split([images], [captions], [instances], "train")
    text_of = dict(train.captions.select("caption_id", "caption").iter_rows())
    for row in combined.train.captions.iter_rows(named=True):
        assert text_of[row["source_caption_id"]] == row["original_caption"]
    category_of = dict(train.instances.select("annotation_id", "category").iter_rows())
    for row in combined.train.objects.iter_rows(named=True):
        assert category_of[row["source_annotation_id"]] == row["category"]
    pasted = combined.train.images.filter(pl.col("kind") == "paste")
    for row in pasted.iter_rows(named=True):
        assert category_of[row["donor_annotation_id"]] == row["companion"]
        assert train.images.row(row["donor_image_id"], named=True)["batch"] == row["donor_batch"]
    # The two batches number their images alike; their global ids are apart.
    _, tables = raw
    assert set(tables["alpha"].images["image_id"]) == set(tables["beta"].images["image_id"])
    global_ids = {b: set(combined.eval.images.filter(pl.col("batch") == b)["source_image_id"]) for b in BATCHES}
    assert global_ids["alpha"] and global_ids["beta"] and not global_ids["alpha"] & global_ids["beta"]


def test_stale_parts_are_named_and_refused(runs):
    root, _, parts, _, stacked = runs
    by_batch = {p.batch: p for p in parts}
    sources = {"alpha": "v1", "beta": "v1"}
    assert stale_batches(by_batch, sources, PAIRS, RECIPE) == {}
    assert stale_batches({"alpha": by_batch["alpha"]}, sources, PAIRS, RECIPE) == {
        "beta": "no counterfactuals of this batch yet"
    }
    assert stale_batches(by_batch, {"alpha": "v2", "beta": "v1"}, PAIRS, RECIPE) == {
        "alpha": "built from 'v1', the batch is now 'v2'"
    }
    other_seed = replace(RECIPE, seed=4)
    assert stale_batches(by_batch, sources, PAIRS, other_seed) == {
        "alpha": "made with other settings (seed)", "beta": "made with other settings (seed)"
    }
    extra = pl.concat([PAIRS, pl.DataFrame({"anchor": ["cat"], "companion": ["umbrella"]})])
    assert stale_batches(by_batch, sources, extra, RECIPE)["alpha"] == "lacks pair(s) cat->umbrella"
    with pytest.raises(ValueError, match=r"alpha: made with other settings \(seed\)"):
        combine_batch_counterfactuals(parts, stacked, PAIRS, root / "refused", other_seed)
    with pytest.raises(ValueError, match=r"one part per batch .*\['alpha', 'beta'\].*\['alpha'\]"):
        combine_batch_counterfactuals(parts[:1], stacked, PAIRS, root / "refused", RECIPE)


# --------------------------------------------------------------------------- through Dagster


@pytest.mark.slow
def test_assets_fan_out_per_batch_and_combine_to_the_one_run(raw, tmp_path):
    from spur_assets.pipeline.counterfactual_assets import batch_counterfactuals, synthetic_counterfactuals
    from spur_assets.pipeline.expose import spurious_features
    from spur_assets.pipeline.ingest import batches, raw_pairs
    from spur_assets.pipeline.refs_io_manager import ArtifactRefIOManager
    from spur_assets.pipeline.resources import SpurSettings

    manifests, tables = raw
    assets = [raw_pairs, spurious_features, batch_counterfactuals, synthetic_counterfactuals]
    settings = SpurSettings(home=str(tmp_path / "home"), device="cpu")
    resources = {"settings": settings, "refs": ArtifactRefIOManager(settings=settings)}
    images = {"max_companion_fraction": 0.012, "seed": 3, "workers": 1}
    combine = {**images, "train_removal_per_pair": 2, "train_paste_per_pair": 3}

    def run(selection, partition=None, config=None):
        result = dg.materialize(assets, selection=selection, partition_key=partition, instance=instance,
                                resources=resources, run_config={"ops": config or {}})
        assert result.success
        return result

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(batches.name, list(BATCHES))
        for name in BATCHES:
            run([raw_pairs.key], name, {"raw_pairs": {"config": {"manifest": str(manifests[name]), "workers": 1}}})
        run([spurious_features.key], config={"spurious_features": {"config": {"min_support": 5}}})
        for name in BATCHES:
            run([batch_counterfactuals.key], name, {"batch_counterfactuals": {"config": images}})
        first = run([synthetic_counterfactuals.key], config={"synthetic_counterfactuals": {"config": combine}})
        # Another seed: the partitions no longer fit, so the combiner rebuilds both batches itself.
        second = run([synthetic_counterfactuals.key],
                     config={"synthetic_counterfactuals": {"config": {**combine, "seed": 4}}})
    meta = first.asset_materializations_for_node("synthetic_counterfactuals")[0].metadata
    assert meta["batches_from_partitions"].value == 2 and meta["batches_rebuilt_here"].value == "none"
    rebuilt = second.asset_materializations_for_node("synthetic_counterfactuals")[0].metadata
    assert rebuilt["batches_from_partitions"].value == 0 and "seed" in rebuilt["batches_rebuilt_here"].value

    store = LineageStore(settings.home_path)
    combined = store.latest("synthetic_counterfactuals")
    edges = store.sql(
        "select upstream_asset, upstream_partition from lineage_edges where materialization_id = "
        f"'{meta['materialization_id'].value}' order by 1, 2"
    ).rows()
    assert edges == [("batch_counterfactuals", "alpha"), ("batch_counterfactuals", "beta"),
                     ("raw_pairs", "alpha"), ("raw_pairs", "beta"), ("spurious_features", "")]
    assert combined["materialization_id"] == rebuilt["materialization_id"].value

    # Both materializations equal the one-run function on the same raw tables, oriented pairs and settings.
    home_refs = settings.home_path / "refs"
    pairs_used = pl.read_parquet(Path(meta["artifact_dir"].value) / "cf_pairs.parquet").select("anchor", "companion")
    stacked = _stack(tables)
    for seed, materialization in ((3, meta), (4, rebuilt)):
        folder = Path(materialization["artifact_dir"].value)
        # The assets' config: max_companion_fraction 0.012, dilation 2, this seed, draws 2 and 3.
        one = build_synthetic_counterfactuals(stacked, pairs_used, tmp_path / f"one-{seed}", replace(RECIPE, seed=seed))
        for table, reference in (("cf_eval_images", one.eval.images), ("cf_eval_captions", one.eval.captions),
                                 ("cf_train_images", one.train.images), ("cf_train_objects", one.train.objects),
                                 ("cf_train_lift", one.train.lift)):
            ours = _relative(pl.read_parquet(folder / f"{table}.parquet"), folder)
            # raw_pairs re-reads the same files, so source paths agree too.
            assert ours.equals(_relative(reference, tmp_path / f"one-{seed}")), (seed, table)
    assert json.loads((home_refs / "synthetic_counterfactuals" / "_.json").read_text())["asset"] == "synthetic_counterfactuals"
