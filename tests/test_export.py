"""Export of the counterfactual set as a COCO-layout dataset: strict round trip, COCO ids, datasheet."""

from __future__ import annotations

import json
import re

import numpy as np
import polars as pl
import pytest
from pycocotools.coco import COCO

from spur_assets.core.data import vocabulary
from spur_assets.core.data.batch_union import SplitTables
from spur_assets.core.data.builtin_dataset import INJECTED_PAIRS, BuiltinDatasetSpec, generate_builtin_dataset
from spur_assets.core.data.coco_ingest import decode_instance_mask, load_batch
from spur_assets.core.counterfactuals.eval_set import build_eval_counterfactuals
from spur_assets.core.counterfactuals.export import eval_id_offset, export_counterfactual_dataset
from spur_assets.core.counterfactuals.inpaint import OpenCVInpainter
from spur_assets.core.counterfactuals.recipe import CounterfactualRecipe
from spur_assets.core.counterfactuals.train_counterfactuals import build_train_counterfactuals

PAIRS = pl.DataFrame({"anchor": [a for a, _ in INJECTED_PAIRS], "companion": [b for _, b in INJECTED_PAIRS]})
SOURCE = {"source_dataset": "spur-assets built-in dataset (seed 5)", "backend": "opencv", "seed": 3,
          "thresholds": {"min_support": 20, "min_lift": 2.0}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    tables = load_batch(generate_builtin_dataset(root / "data", BuiltinDatasetSpec(seed=5, n_train=150, n_test=60)), "b0")
    raw = SplitTables(tables.images, tables.captions, tables.instances)
    recipe = CounterfactualRecipe(OpenCVInpainter(), seed=3, removal_per_pair=8, paste_per_pair=6)
    evaluation = build_eval_counterfactuals(raw, PAIRS, root / "eval", recipe)
    train = build_train_counterfactuals(raw, PAIRS, root / "train", recipe)
    test_captions = tables.captions.filter(pl.col("split") == "test")
    test_instances = tables.instances.filter(pl.col("split") == "test")
    manifest = export_counterfactual_dataset(
        evaluation.images, evaluation.captions, train, test_instances, root / "out",
        source_description=SOURCE, test_captions=test_captions,
    )
    loaded = load_batch(manifest, "cf", on_bad_record="fail")
    return {"tables": tables, "eval": evaluation, "train": train, "manifest": manifest, "loaded": loaded}


def _split(frame: pl.DataFrame, split: str) -> pl.DataFrame:
    return frame.filter(pl.col("split") == split)


def test_eval_id_offset_is_a_power_of_ten_above_every_train_id():
    assert eval_id_offset(0) == 10_000_000
    assert eval_id_offset(9_999_999) == 10_000_000
    assert eval_id_offset(10_000_000) == 100_000_000


def test_round_trip_counts_match(exported):
    loaded, train, evaluation = exported["loaded"], exported["train"], exported["eval"]
    assert loaded.quarantine.height == 0
    assert _split(loaded.images, "train").height == train.images.height
    assert _split(loaded.images, "test").height == evaluation.images.height > 0
    assert _split(loaded.captions, "train").height == train.captions.height
    assert _split(loaded.instances, "train").height == train.objects.height
    assert exported["manifest"].name == "dataset.yaml"


def test_train_captions_and_masks_come_back_identical(exported):
    loaded, train = exported["loaded"], exported["train"]
    got = _split(loaded.captions, "train").select(pl.col("caption_id").alias("cf_caption_id"),
                                                   pl.col("image_id").alias("cf_image_id"), "caption")
    assert got.equals(train.captions.select("cf_caption_id", "cf_image_id", "caption").sort("cf_caption_id"))
    instances = _split(loaded.instances, "train").sort("annotation_id")
    objects = train.objects  # exported in cf_image_id order, then table order
    ordered = pl.concat([objects.filter(pl.col("cf_image_id") == i) for i in train.images["cf_image_id"]])
    assert instances["image_id"].to_list() == ordered["cf_image_id"].to_list()
    assert instances["category"].to_list() == ordered["category"].to_list()
    assert instances["rle_counts"].to_list() == ordered["rle_counts"].to_list()
    # A few masks, decoded: the pasted ones and a copied one.
    pasted = [i for i, flag in enumerate(ordered["pasted"]) if flag][:3] + [0]
    for i in pasted:
        np.testing.assert_array_equal(
            decode_instance_mask(instances["rle_counts"][i], 64, 64),
            decode_instance_mask(ordered["rle_counts"][i], 64, 64),
        )


def test_train_images_are_the_counterfactual_pngs(exported):
    loaded, train = exported["loaded"], exported["train"]
    from pathlib import Path

    paths = dict(_split(loaded.images, "train").select("image_id", "path").iter_rows())
    for row in train.images.head(12).iter_rows(named=True):
        assert Path(paths[row["cf_image_id"]]).read_bytes() == Path(row["path"]).read_bytes()


def test_test_split_holds_the_eval_set_with_its_captions_and_objects(exported):
    loaded, evaluation, tables = exported["loaded"], exported["eval"], exported["tables"]
    offset = eval_id_offset(exported["train"].captions["cf_caption_id"].max())
    source_captions = _split(tables.captions, "test")
    source_instances = _split(tables.instances, "test")
    captions = _split(loaded.captions, "test")
    instances = _split(loaded.instances, "test")
    for row in evaluation.images.iter_rows(named=True):
        image_id = offset + row["cf_image_id"]
        got = sorted(captions.filter(pl.col("image_id") == image_id)["caption"].to_list())
        originals = source_captions.filter(pl.col("image_id") == row["source_image_id"])["caption"].to_list()
        objects = source_instances.filter(pl.col("image_id") == row["source_image_id"])
        if row["kind"] == "removal":
            edits = evaluation.captions.filter((pl.col("cf_image_id") == row["cf_image_id"]) & pl.col("accepted"))
            without_b = [c for c in originals if row["companion"] not in vocabulary.mentioned_categories(c)]
            assert got == sorted(edits["caption"].to_list() + without_b)
            objects = objects.filter(pl.col("category") != row["companion"])
        else:
            assert got == sorted(originals)
        mine = instances.filter(pl.col("image_id") == image_id).sort("annotation_id")
        assert mine["rle_counts"].to_list() == objects.sort("annotation_id")["rle_counts"].to_list()
        assert mine["category"].to_list() == objects.sort("annotation_id")["category"].to_list()


def test_category_ids_are_cocos_and_pycocotools_reads_the_masks(exported):
    root = exported["manifest"].parent
    coco = COCO(str(root / "annotations" / "instances_train.json"))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    # COCO 2017's ids, by hand: dog 18, frisbee 34, car 3, traffic light 10, sports ball 37, tennis racket 43.
    expected = {"dog": 18, "frisbee": 34, "car": 3, "traffic light": 10, "sports ball": 37, "tennis racket": 43}
    for name, cid in expected.items():
        assert names[cid] == name
    objects = exported["train"].objects
    ordered = pl.concat([objects.filter(pl.col("cf_image_id") == i) for i in exported["train"].images["cf_image_id"]])
    for k, annotation_id in enumerate(sorted(coco.getAnnIds())[:20]):
        annotation = coco.loadAnns(annotation_id)[0]
        np.testing.assert_array_equal(
            coco.annToMask(annotation).astype(bool), decode_instance_mask(ordered["rle_counts"][k], 64, 64)
        )


def _datasheet_counts(text: str) -> dict[tuple[str, str, str], tuple[int, int, int]]:
    section = text.split("## Counts", 1)[1].split("##", 1)[0]
    counts = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in ("train", "test"):
            counts[(cells[0], cells[1], cells[2])] = tuple(int(c) for c in cells[3:])
    return counts


def test_datasheet_counts_equal_the_tables(exported):
    root = exported["manifest"].parent
    text = (root / "DATASHEET.md").read_text(encoding="utf-8")
    counts = _datasheet_counts(text)
    loaded, train, evaluation = exported["loaded"], exported["train"], exported["eval"]
    offset = eval_id_offset(train.captions["cf_caption_id"].max())
    kinds = pl.concat(
        [
            train.images.select(pl.lit("train").alias("split"), pl.col("cf_image_id").alias("image_id"), "pair", "kind"),
            evaluation.images.select(
                pl.lit("test").alias("split"), (pl.col("cf_image_id") + offset).alias("image_id"), "pair", "kind"
            ),
        ]
    )
    captions = loaded.captions.group_by("image_id").len().rename({"len": "n_captions"})
    instances = loaded.instances.group_by("image_id").len().rename({"len": "n_instances"})
    expected = (
        kinds.join(captions, on="image_id", how="left").join(instances, on="image_id", how="left").fill_null(0)
        .group_by("split", "pair", "kind")
        .agg(pl.len(), pl.col("n_captions").sum(), pl.col("n_instances").sum())
    )
    assert counts == {(s, p, k): (n, c, i) for s, p, k, n, c, i in expected.iter_rows()}
    for pair in ("dog->frisbee", "car->traffic light", "tennis racket->sports ball"):
        assert counts[("train", pair, "removal")][0] == 8 and counts[("train", pair, "paste")][0] == 6
    assert "## Licence" in text and "same terms as the source dataset" in text
    assert SOURCE["source_dataset"] in text and '"min_lift": 2.0' in text
    lift = train.lift.row(0, named=True)
    assert f"{lift['lift_before']:.2f}" in text and f"{lift['lift_after']:.2f}" in text


def test_manifest_follows_the_design_format(exported):
    manifest = exported["manifest"]
    text = manifest.read_text(encoding="utf-8")
    assert re.search(r"^name: \"spur-counterfactuals\"$", text, re.M)
    for split in ("train", "test"):
        assert f"captions: annotations/captions_{split}.json" in text
        document = json.loads((manifest.parent / "annotations" / f"captions_{split}.json").read_text())
        assert {"images", "annotations"} <= set(document)


def test_export_refuses_a_foreign_folder_and_replaces_its_own(exported, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    evaluation, train, tables = exported["eval"], exported["train"], exported["tables"]
    args = (evaluation.images, evaluation.captions, train, _split(tables.instances, "test"))
    with pytest.raises(FileExistsError, match="holds no counterfactual export"):
        export_counterfactual_dataset(*args, foreign, test_captions=_split(tables.captions, "test"))
    assert (foreign / "notes.txt").read_text() == "mine"
    again = export_counterfactual_dataset(
        *args, exported["manifest"].parent, name="second", test_captions=_split(tables.captions, "test")
    )
    assert 'name: "second"' in again.read_text()
    with pytest.raises(ValueError, match=r"eval_images lacks column\(s\) \['path'\]"):
        export_counterfactual_dataset(
            evaluation.images.drop("path"), *args[1:], tmp_path / "x", test_captions=_split(tables.captions, "test")
        )
