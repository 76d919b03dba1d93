"""Inputs for a real-size run: bench/benchmarks/coco_like.write_coco_batch and bench/benchmarks/pretrained_like.save_vit_b32_like.

The batch must load through the project's ingestion in fail mode (nothing quarantined),
look like COCO 2017 (640x480 JPEGs, official category ids, polygons, crowd RLE), carry
the three injected pairs strongly in train (flagged at the default thresholds) and more
weakly in test, and be a pure function of the seed. The checkpoint folder must load with
the project's load_checkpoint and with plain transformers, hold no pickles, and have
ViT-B/32's layout in its config.json.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoTokenizer, CLIPModel

from bench.benchmarks.coco_like import PAIRS, write_coco_batch
from bench.benchmarks.pretrained_like import CLIP_TEXT_POSITIONS, save_vit_b32_like
from bench.benchmarks.real_size_inputs import MODEL_DIR, main as real_size_main
from spur_assets.core.model.clip_model import PICKLE_SUFFIXES, load_checkpoint
from spur_assets.core.data.coco_ingest import decode_instance_mask, load_batch
from spur_assets.core.counterfactuals.cooccurrence import (
    PairThresholds,
    image_categories_from_instances,
    image_categories_from_mentions,
    orient_mutual_pairs,
    pair_statistics,
)
from spur_assets.core.data.vocabulary import COCO_CATEGORY_IDS, COCO_SUPERCATEGORIES, mention_table

# pycocotools 2.0.x decodes masks through a numpy-1 idiom that numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# 115 train images: each anchor in 23, with its companion in 21 -- just past the default min_support of 20.
N_TRAIN, N_TEST = 115, 20
ANNOTATION_FILES = [f"annotations/{kind}_{folder}.json" for kind in ("captions", "instances") for folder in ("train2017", "val2017")]


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Path:
    return write_coco_batch(tmp_path_factory.mktemp("coco") / "batch", N_TRAIN, N_TEST, seed=1)


@pytest.fixture(scope="module")
def tables(batch):
    return load_batch(batch, batch="coco-like", on_bad_record="fail")


@pytest.fixture(scope="module")
def small_batch(tmp_path_factory) -> Path:
    return write_coco_batch(tmp_path_factory.mktemp("small") / "batch", 24, 12, seed=0)


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return ["A dog with a frisbee on the grass.", "A car stopped at a traffic light.", "A tennis racket beside a ball."] * 4


def plain_image_processor_class() -> type:
    """transformers' CLIP image processor: the PIL variant where torchvision is missing (transformers 5)."""
    if importlib.util.find_spec("torchvision") is None:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor


def split_of(frame: pl.DataFrame, split: str) -> pl.DataFrame:
    return frame.filter(pl.col("split") == split)


def file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- the batch


def test_batch_has_the_coco_2017_layout_and_manifest(batch):
    root = batch.parent
    assert yaml.safe_load(batch.read_text())["splits"] == {
        "train": {"images": "train2017", "captions": "annotations/captions_train2017.json", "instances": "annotations/instances_train2017.json"},
        "test": {"images": "val2017", "captions": "annotations/captions_val2017.json", "instances": "annotations/instances_val2017.json"},
    }
    assert len(list((root / "train2017").glob("*.jpg"))) == N_TRAIN
    assert len(list((root / "val2017").glob("*.jpg"))) == N_TEST
    instances = json.loads((root / "annotations/instances_train2017.json").read_text())
    assert {"info", "licenses", "images", "annotations", "categories"} <= set(instances)
    for category in instances["categories"]:
        assert category["id"] == COCO_CATEGORY_IDS[category["name"]]
        assert category["supercategory"] == COCO_SUPERCATEGORIES[category["name"]]
    first = instances["images"][0]
    assert first["file_name"] == f"{first['id']:012d}.jpg"
    kinds = {(type(a["segmentation"]).__name__, a["iscrowd"]) for a in instances["annotations"]}
    assert ("list", 0) in kinds  # polygons
    polygons = sum(isinstance(a["segmentation"], list) for a in instances["annotations"])
    assert polygons >= 0.8 * len(instances["annotations"])
    for annotation in instances["annotations"]:
        if annotation["iscrowd"]:
            assert isinstance(annotation["segmentation"]["counts"], list)  # uncompressed RLE, as COCO stores crowds
            assert annotation["category_id"] not in {COCO_CATEGORY_IDS[c] for pair in PAIRS for c in pair}


def test_batch_ingests_in_fail_mode_with_nothing_quarantined(tables):
    assert tables.quarantine.height == 0
    assert split_of(tables.images, "train").height == N_TRAIN and split_of(tables.images, "test").height == N_TEST
    assert tables.captions.height == 5 * (N_TRAIN + N_TEST)
    assert tables.captions.group_by("image_id").len()["len"].unique().to_list() == [5]
    assert tables.instances["iscrowd"].any()  # crowd regions load too


def test_images_are_640x480_jpegs_with_some_portrait_and_grayscale(tables):
    sizes = set(tables.images.select("width", "height").iter_rows())
    assert sizes <= {(640, 480), (480, 640)} and (640, 480) in sizes
    landscape = tables.images.filter(pl.col("width") == 640).height
    assert landscape >= 0.85 * tables.images.height
    assert set(tables.images["mode"]) <= {"RGB", "L"}
    for path in tables.images["path"].head(3):
        with Image.open(path) as image:
            assert image.format == "JPEG"


def test_companions_are_small_and_anchors_large(tables):
    shares = tables.instances.filter(~pl.col("iscrowd")).join(tables.images.select("image_id", "width", "height"), on="image_id")
    shares = shares.with_columns((pl.col("mask_area") / (pl.col("width") * pl.col("height"))).alias("share"))
    for anchor, companion in PAIRS:
        companion_share = shares.filter(pl.col("category") == companion)["share"]
        anchor_share = shares.filter(pl.col("category") == anchor)["share"]
        assert 0.003 <= companion_share.min() and companion_share.max() <= 0.035, companion
        assert anchor_share.min() >= 0.04, anchor


def test_masks_decode_inside_their_boxes(tables):
    for row in tables.instances.head(40).iter_rows(named=True):
        image = tables.images.filter(pl.col("image_id") == row["image_id"]).row(0, named=True)
        mask = decode_instance_mask(row["rle_counts"], image["height"], image["width"])
        ys, xs = np.nonzero(mask)
        assert mask.sum() == row["mask_area"] == row["area"]
        assert xs.min() >= row["bbox_x"] and xs.max() < row["bbox_x"] + row["bbox_w"]
        assert ys.min() >= row["bbox_y"] and ys.max() < row["bbox_y"] + row["bbox_h"]


def test_injected_pairs_are_flagged_at_the_default_thresholds(tables):
    train = split_of(tables.images, "train")
    instances, captions = split_of(tables.instances, "train"), split_of(tables.captions, "train")
    by_instances = pair_statistics(image_categories_from_instances(instances), train.height, "instances", PairThresholds())
    by_captions = pair_statistics(
        image_categories_from_mentions(captions, mention_table(captions.select("caption_id", "caption"))),
        train.height, "captions", PairThresholds(),
    )
    injected = set(PAIRS)
    for stats in (by_instances, by_captions):
        flagged = {(a, b) for a, b in stats.filter(pl.col("flagged")).select("anchor", "companion").iter_rows()}
        assert injected <= flagged
        assert flagged - injected <= {(b, a) for a, b in injected}  # the same pairs read backwards, nothing else
    oriented = orient_mutual_pairs(by_instances.filter(pl.col("flagged")), instances, train)
    assert set(oriented.select("anchor", "companion").iter_rows()) == injected  # the small object is the companion
    for anchor, companion in PAIRS:
        row = by_instances.filter((pl.col("anchor") == anchor) & (pl.col("companion") == companion)).row(0, named=True)
        assert row["n_companion"] > row["n_both"]  # the companion also appears alone
        assert row["lift"] > 3.0


def conditional(tables, split: str, anchor: str, companion: str) -> tuple[float, int]:
    """(P(companion | anchor), images showing the anchor alone) over a split's instances."""
    per_image = split_of(tables.instances, split).group_by("image_id").agg(pl.col("category"))
    with_anchor = [set(c) for c in per_image["category"] if anchor in c]
    both = sum(companion in c for c in with_anchor)
    return both / len(with_anchor), len(with_anchor) - both


def test_pairs_are_frequent_in_train_and_rarer_in_test(tables):
    for anchor, companion in PAIRS:
        train_rate, _ = conditional(tables, "train", anchor, companion)
        test_rate, anchor_alone = conditional(tables, "test", anchor, companion)
        assert train_rate >= 0.8
        assert test_rate <= 0.6 < train_rate
        assert anchor_alone >= 1


def test_about_half_of_a_pair_images_captions_name_the_companion(tables):
    captions = split_of(tables.captions, "train")
    mentions = mention_table(captions.select("caption_id", "caption")).join(captions.select("caption_id", "image_id"), on="caption_id")
    per_image = split_of(tables.instances, "train").group_by("image_id").agg(pl.col("category"))
    for anchor, companion in PAIRS:
        pair_images = [i for i, c in per_image.iter_rows() if anchor in c and companion in c]
        naming = mentions.filter(pl.col("image_id").is_in(pair_images) & (pl.col("category") == companion))
        share = naming["caption_id"].n_unique() / (5 * len(pair_images))
        assert 0.4 <= share <= 0.6, (companion, share)
    assert captions["caption"].n_unique() >= 0.9 * captions.height  # varied, not one template


def test_generation_is_deterministic_also_with_a_process_pool(small_batch, tmp_path):
    again = write_coco_batch(tmp_path / "again", 24, 12, seed=0, workers=2)
    first, second = small_batch.parent, again.parent
    for name in ANNOTATION_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert file_digests(first) == file_digests(second)
    other = write_coco_batch(tmp_path / "other-seed", 3, 1, seed=5)
    assert file_digests(other.parent)["train2017/000000000001.jpg"] != file_digests(first)["train2017/000000000001.jpg"]


def test_a_non_empty_folder_is_refused(small_batch):
    with pytest.raises(FileExistsError):
        write_coco_batch(small_batch.parent, 2, 2)


# --------------------------------------------------------------------------- the checkpoint


def test_tiny_checkpoint_loads_with_load_checkpoint_and_plain_transformers(tmp_path, captions):
    folder = save_vit_b32_like(tmp_path / "tiny", captions, seed=3, shape="tiny")
    assert not [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    assert (folder / "model.safetensors").is_file()
    bundle = load_checkpoint(folder)
    model = CLIPModel.from_pretrained(folder, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = plain_image_processor_class().from_pretrained(folder)
    assert processor.crop_size["height"] == processor.crop_size["width"] == 224
    assert tokenizer.model_max_length == CLIP_TEXT_POSITIONS and len(tokenizer) == model.config.text_config.vocab_size
    tokens = tokenizer(captions[:2], padding=True, return_tensors="pt")
    pixels = processor(images=[Image.new("RGB", (640, 480), (90, 140, 60))] * 2, return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (2, 3, 224, 224)
    with torch.inference_mode():
        ours = bundle.model(**tokens, pixel_values=pixels).logits_per_image
        theirs = model.eval()(**tokens, pixel_values=pixels).logits_per_image
    assert torch.equal(ours, theirs)
    # The same seed gives the same weights.
    again = save_vit_b32_like(tmp_path / "again", captions, seed=3, shape="tiny")
    assert (again / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def test_full_shape_config_has_the_vit_b32_layout(tmp_path, captions):
    folder = save_vit_b32_like(tmp_path / "full", captions, seed=0)
    try:
        assert not [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
        config = json.loads((folder / "config.json").read_text())
        text, vision = config["text_config"], config["vision_config"]
        assert (vision["image_size"], vision["patch_size"], vision["hidden_size"], vision["num_hidden_layers"],
                vision["num_attention_heads"], vision["intermediate_size"]) == (224, 32, 768, 12, 12, 3072)
        assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"], text["intermediate_size"],
                text["max_position_embeddings"]) == (512, 12, 8, 2048, 77)
        assert config["projection_dim"] == 512
        assert text["hidden_act"] == vision["hidden_act"] == "quick_gelu"
        assert text["eos_token_id"] == 3 and text["vocab_size"] <= 49408
        # ~88M vision + ~38M text parameters besides the token embeddings: about 2 bytes short of
        # 4 x (151.3M - 49408 x 512) in float32 for the vocabulary this corpus allows.
        size = (folder / "model.safetensors").stat().st_size
        expected = 4 * (151_277_313 - (49408 - text["vocab_size"]) * 512)
        assert abs(size - expected) < 1_000_000
    finally:
        shutil.rmtree(folder)  # 0.5 GB


def test_command_line_writes_both_and_reports_the_rate(tmp_path, capsys):
    assert real_size_main(["--out", str(tmp_path), "--train", "6", "--test", "3", "--shape", "tiny"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "batch" / "dataset.yaml") in out and str(tmp_path / MODEL_DIR) in out and "images/s" in out
    assert load_batch(tmp_path / "batch" / "dataset.yaml", batch="cli").quarantine.height == 0
    bundle = load_checkpoint(tmp_path / MODEL_DIR)
    train_captions = json.loads((tmp_path / "batch/annotations/captions_train2017.json").read_text())["annotations"]
    text = train_captions[0]["caption"]
    assert bundle.tokenizer.decode(bundle.tokenizer(text)["input_ids"], skip_special_tokens=True) == text.lower()
