"""COCO batch ingestion: the fixture loads with hand-known values; every bad input is named or quarantined."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from spur_assets.core.data import coco_ingest
from spur_assets.core.data.coco_ingest import (
    CAPTIONS_SCHEMA,
    CATEGORIES_SCHEMA,
    IMAGES_SCHEMA,
    INSTANCES_SCHEMA,
    QUARANTINE_SCHEMA,
    decode_instance_mask,
    load_batch,
    read_manifest,
)
from spur_assets.core.data.errors import DatasetError
from tests.coco_fixtures import (
    CORRUPTIONS,
    FIXTURE_CAPTIONS,
    FIXTURE_CATEGORIES,
    FIXTURE_IMAGES,
    FIXTURE_INSTANCES,
    SPLIT_FILES,
    build_coco_fixture,
    copy_fixture,
    corrupt,
    fixture_ids,
    rectangles_mask,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return build_coco_fixture(tmp_path_factory.mktemp("coco") / "pristine")


@pytest.fixture
def manifest(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the fixture, free to corrupt."""
    return copy_fixture(pristine, tmp_path / "coco")


@pytest.fixture(scope="module")
def tables(pristine: Path) -> coco_ingest.BatchTables:
    return load_batch(pristine, batch="b1")


def _ids(frame: pl.DataFrame, column: str, split: str | None = None) -> set[int]:
    if split is not None:
        frame = frame.filter(pl.col("split") == split)
    return set(frame[column].to_list())


# --------------------------------------------------------------------------- the good fixture


def test_tables_have_the_contract_schemas(tables):
    assert tables.images.schema == IMAGES_SCHEMA
    assert tables.captions.schema == CAPTIONS_SCHEMA
    assert tables.instances.schema == INSTANCES_SCHEMA
    assert tables.categories.schema == CATEGORIES_SCHEMA
    assert tables.quarantine.schema == QUARANTINE_SCHEMA
    assert tables.quarantine.height == 0
    for frame in (tables.images, tables.captions, tables.instances, tables.categories):
        assert frame["batch"].unique().to_list() == ["b1"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_record_of_each_split_is_loaded(tables, split):
    images, captions, instances = fixture_ids(split)
    assert _ids(tables.images, "image_id", split) == images
    assert _ids(tables.captions, "caption_id", split) == captions
    assert _ids(tables.instances, "annotation_id", split) == instances
    assert (tables.images.height, tables.captions.height, tables.instances.height) == (5, 10, 7)


def test_frames_are_sorted_by_id(tables):
    for frame, column in ((tables.images, "image_id"), (tables.captions, "caption_id"),
                          (tables.instances, "annotation_id"), (tables.categories, "category_id")):
        assert frame[column].to_list() == sorted(frame[column].to_list())


def test_images_record_size_mode_bytes_and_sha256_of_the_file(tables, pristine):
    root = pristine.parent
    for row in tables.images.iter_rows(named=True):
        expected = FIXTURE_IMAGES[row["image_id"]]
        file = (root / SPLIT_FILES[expected.split][0] / expected.file_name).resolve()
        assert row["path"] == str(file) and Path(row["path"]).is_absolute()
        assert row["file_name"] == expected.file_name
        assert (row["width"], row["height"], row["mode"]) == (expected.width, expected.height, expected.mode)
        assert row["bytes"] == file.stat().st_size
        assert row["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
        with Image.open(file) as image:
            assert image.format == expected.format
    assert set(tables.images["mode"]) == {"RGB", "L", "RGBA"}


def test_captions_are_kept_byte_for_byte(tables):
    for row in tables.captions.iter_rows(named=True):
        image_id, text = FIXTURE_CAPTIONS[row["caption_id"]]
        assert row["image_id"] == image_id
        assert row["caption"].encode("utf-8") == text.encode("utf-8")
    assert "Un café — près d'une tasse ☕!!" in tables.captions["caption"].to_list()


def test_instances_carry_categories_boxes_crowd_flag_and_area_as_given(tables):
    for row in tables.instances.iter_rows(named=True):
        expected = FIXTURE_INSTANCES[row["annotation_id"]]
        assert row["image_id"] == expected.image_id
        assert (row["category"], row["supercategory"]) == FIXTURE_CATEGORIES[expected.category_id]
        assert row["iscrowd"] is expected.iscrowd
        x0 = min(r[0] for r in expected.rectangles)
        y0 = min(r[1] for r in expected.rectangles)
        assert (row["bbox_x"], row["bbox_y"]) == (x0, y0)
        assert row["area"] == float(expected.mask_area)
    assert _ids(tables.instances.filter(pl.col("iscrowd")), "annotation_id") == {104}


def test_mask_area_matches_the_hand_counted_pixels(tables):
    # Polygons, uncompressed and compressed RLE, a two-part polygon, a polygon on the image edge.
    for row in tables.instances.iter_rows(named=True):
        assert row["mask_area"] == FIXTURE_INSTANCES[row["annotation_id"]].mask_area
    assert dict(zip(tables.instances["annotation_id"], tables.instances["mask_area"]))[101] == 8 * 10


def test_decoded_masks_equal_the_hand_drawn_masks_and_pycocotools_annToMask(tables, pristine):
    root = pristine.parent
    coco = {split: COCO(str(root / files[2])) for split, files in SPLIT_FILES.items()}
    for row in tables.instances.iter_rows(named=True):
        expected = FIXTURE_INSTANCES[row["annotation_id"]]
        image = FIXTURE_IMAGES[expected.image_id]
        mask = decode_instance_mask(row["rle_counts"], image.height, image.width)
        assert mask.dtype == bool and mask.shape == (image.height, image.width)
        np.testing.assert_array_equal(mask, rectangles_mask(expected.rectangles, image.height, image.width))
        reference = coco[image.split].annToMask(coco[image.split].anns[row["annotation_id"]])
        np.testing.assert_array_equal(mask, reference.astype(bool))


def test_categories_are_the_union_over_splits(tables):
    rows = {r["category_id"]: (r["category"], r["supercategory"], r["split"]) for r in tables.categories.iter_rows(named=True)}
    assert rows == {i: (n, s, "train,test") for i, (n, s) in FIXTURE_CATEGORIES.items()}


def test_two_workers_give_the_same_tables(pristine, tables):
    threaded = load_batch(pristine, batch="b1", workers=2)
    for name in ("images", "captions", "instances", "categories"):
        assert getattr(threaded, name).equals(getattr(tables, name)), name


def test_progress_reports_image_checks_up_to_100_percent(pristine):
    lines: list[str] = []
    load_batch(pristine, batch="b1", progress=lines.append)
    assert any(line.startswith("train: checked 3/3 image files (100%)") for line in lines), lines
    assert any(line.startswith("test: checked 2/2 image files (100%)") for line in lines), lines


def test_a_batch_may_carry_only_one_split(manifest):
    manifest.write_text(
        "name: only-test\nsplits:\n  test: {images: val2017, captions: annotations/captions_val2017.json, "
        "instances: annotations/instances_val2017.json}\n",
        encoding="utf-8",
    )
    result = load_batch(manifest, batch="b2")
    assert set(result.images["split"]) == {"test"}
    assert _ids(result.images, "image_id") == fixture_ids("test")[0]
    assert set(result.categories["split"]) == {"test"}


def test_an_images_folder_linked_from_elsewhere_needs_its_root_allowed(manifest, tmp_path):
    # Common with COCO: train2017 linked in from a big disk. Outside the batch folder, so refused
    # unless the user names that disk as an allowed root; files inside it are then not "outside".
    images = manifest.parent / "train2017"
    moved = tmp_path / "big-disk" / "train2017"
    moved.parent.mkdir()
    images.rename(moved)
    images.symlink_to(moved, target_is_directory=True)
    with pytest.raises(DatasetError) as refused:
        load_batch(manifest, batch="b1")
    assert refused.value.field == "splits.train.images" and "outside the batch folder" in refused.value.problem
    result = load_batch(manifest, batch="b1", allowed_roots=[tmp_path / "big-disk"])
    assert _ids(result.images, "image_id", "train") == fixture_ids("train")[0]
    assert all(path.startswith(str(moved.resolve())) for path in result.images.filter(pl.col("split") == "train")["path"])


# --------------------------------------------------------------------------- masks


def test_decode_instance_mask_inverts_pycocotools_encode_on_irregular_masks():
    rng = np.random.default_rng(3)
    for height, width in ((1, 1), (1, 57), (31, 1), (120, 300)):
        # Blocky masks give long runs (multi-character counts) and negative deltas.
        mask = rng.random((height, width)) < 0.5
        mask[: height // 2, : width // 3] = True
        mask[height // 3 :, width // 2 :] = False
        encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")
        np.testing.assert_array_equal(decode_instance_mask(encoded, height, width), mask)


def test_decode_instance_mask_reads_a_hand_encoded_run():
    # '<' is code 60 - 48 = 12 with no continuation bit: one run of 12 background pixels.
    mask = decode_instance_mask("<", 3, 4)
    assert mask.shape == (3, 4) and not mask.any()


@pytest.mark.parametrize(
    ("counts", "problem"),
    [("P", "middle of a run"), ("\x7f", "not an RLE character"), ("0", "sum to 0"), ("<", "sum to 12")],
    ids=["ends-mid-run", "bad-character", "no-pixels", "too-few-pixels"],
)
def test_decode_instance_mask_refuses_malformed_rle(counts, problem):
    with pytest.raises(ValueError, match=problem):
        decode_instance_mask(counts, 4, 4)


def test_a_polygon_part_with_fewer_than_three_vertices_is_ignored(manifest):
    # pycocotools would read a 4-number polygon as a box; COCO has a few such parts.
    path = manifest.parent / SPLIT_FILES["train"][2]
    document = json.loads(path.read_text(encoding="utf-8"))
    record = next(r for r in document["annotations"] if r["id"] == 101)
    record["segmentation"] = [[4, 6, 12, 6, 12, 16, 4, 16], [0, 0, 30, 30]]
    path.write_text(json.dumps(document), encoding="utf-8")
    result = load_batch(manifest, batch="b1")
    row = result.instances.filter(pl.col("annotation_id") == 101).row(0, named=True)
    assert row["mask_area"] == 80


def test_polygons_within_one_pixel_of_the_edge_are_accepted(manifest):
    path = manifest.parent / SPLIT_FILES["train"][2]
    document = json.loads(path.read_text(encoding="utf-8"))
    record = next(r for r in document["annotations"] if r["id"] == 101)
    record["segmentation"] = [[-0.9, -0.9, 32.9, -0.9, 32.9, 32.9, -0.9, 32.9]]  # image 9 is 32x32
    path.write_text(json.dumps(document), encoding="utf-8")
    result = load_batch(manifest, batch="b1")
    assert result.instances.filter(pl.col("annotation_id") == 101)["mask_area"].item() == 32 * 32


# --------------------------------------------------------------------------- bad inputs


def test_malformed_json_always_raises_with_its_line_and_column(manifest):
    corruption = corrupt(manifest, "malformed_json")
    text = corruption.file.read_text(encoding="utf-8")
    at = text.index("[,") + 1  # the stray comma
    line = text[:at].count("\n") + 1
    column = at - text.rfind("\n", 0, at)
    for mode in ("fail", "quarantine"):
        with pytest.raises(DatasetError) as caught:
            load_batch(manifest, batch="b1", on_bad_record=mode)
        assert caught.value.file == str(corruption.file)
        assert f"line {line}, column {column}" in str(caught.value)


RECORD_FAULTS = [kind for kind in CORRUPTIONS if kind != "malformed_json"]


@pytest.mark.parametrize("kind", RECORD_FAULTS)
def test_a_bad_record_raises_an_error_naming_file_record_and_field(manifest, kind):
    corruption = corrupt(manifest, kind)
    with pytest.raises(DatasetError) as caught:
        load_batch(manifest, batch="b1")
    error = caught.value
    assert error.file == str(corruption.file)
    assert error.record == corruption.record
    assert corruption.field in error.field
    message = str(error)
    assert str(corruption.file) in message
    assert f"record {corruption.record}" in message
    assert f"field '{error.field}'" in message
    assert error.hint and error.hint in message


@pytest.mark.parametrize("kind", RECORD_FAULTS)
def test_quarantine_keeps_the_good_records_and_lists_each_bad_one(manifest, kind):
    corruption = corrupt(manifest, kind)
    result = load_batch(manifest, batch="b1", on_bad_record="quarantine")
    for frame, column, fixture, lost in (
        (result.images, "image_id", FIXTURE_IMAGES, corruption.lost_images),
        (result.captions, "caption_id", FIXTURE_CAPTIONS, corruption.lost_captions),
        (result.instances, "annotation_id", FIXTURE_INSTANCES, corruption.lost_instances),
    ):
        assert _ids(frame, column) == set(fixture) - lost, column
    quarantine = result.quarantine
    assert quarantine.height == corruption.quarantine_rows
    named = quarantine.filter(
        (pl.col("file") == str(corruption.file)) & (pl.col("record") == str(corruption.record))
        & pl.col("field").str.contains(corruption.field, literal=True)
    )
    assert named.height == 1
    assert named["split"].item() == corruption.split and named["batch"].item() == "b1"


@pytest.mark.parametrize("kind", ["path_traversal", "absolute_path", "symlink_out"])
def test_an_image_path_leaving_its_folder_is_never_read(manifest, kind, monkeypatch):
    read: list[Path] = []
    original = coco_ingest._inspect_image_file

    def spy(path: Path, *limits):
        read.append(path)
        return original(path, *limits)

    monkeypatch.setattr(coco_ingest, "_inspect_image_file", spy)
    corrupt(manifest, kind)
    outside = (manifest.parent / "outside.png").resolve()
    assert outside.is_file()  # readable: only the refusal keeps it out
    result = load_batch(manifest, batch="b1", on_bad_record="quarantine", workers=2)
    assert read and outside not in {p.resolve() for p in read}
    assert str(outside) not in result.images["path"].to_list()


def test_strict_mode_fails_on_json_before_reading_any_image(manifest, monkeypatch):
    read: list[Path] = []
    monkeypatch.setattr(coco_ingest, "_inspect_image_file", lambda path: read.append(path))
    corrupt(manifest, "segmentation_out_of_bounds")
    with pytest.raises(DatasetError, match="segmentation"):
        load_batch(manifest, batch="b1")
    assert read == []


def test_several_faults_are_all_quarantined(manifest):
    for kind in ("truncated_image", "caption_unknown_image", "missing_key", "category_conflict"):
        corrupt(manifest, kind)
    result = load_batch(manifest, batch="b1", on_bad_record="quarantine")
    assert result.quarantine.height == 4
    assert _ids(result.images, "image_id") == {25, 30, 139, 285}
    assert _ids(result.captions, "caption_id") == set(FIXTURE_CAPTIONS) - {1001, 1002, 2001}
    assert _ids(result.instances, "annotation_id") == set(FIXTURE_INSTANCES) - {101, 102, 105}
    truncated = result.quarantine.filter(pl.col("record") == "9")["problem"].item()
    assert "captions: 2, instances: 2" in truncated


# --------------------------------------------------------------------------- manifest


def test_read_manifest_resolves_paths_relative_to_the_manifest(pristine):
    parsed = read_manifest(pristine)
    root = pristine.parent.resolve()
    assert parsed.name == "coco-fixture" and parsed.path == pristine.resolve()
    assert list(parsed.splits) == ["train", "test"]
    assert parsed.splits["test"].images_dir == root / "val2017"
    assert parsed.splits["train"].captions == root / "annotations/captions_train2017.json"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("name: x\nsplits: {val: {images: a, captions: b, instances: c}}\n", "splits.val"),
        ("name: x\nsplits:\n  train: {images: train2017, captions: annotations/nope.json, "
         "instances: annotations/instances_train2017.json}\n", "splits.train.captions"),
        ("name: x\nsplits:\n  train: {images: train2017, captions: annotations/captions_train2017.json}\n",
         "splits.train.instances"),
        ("splits: {}\n", "name"),
        ("name: x\nsplits: [1, 2\n", None),
    ],
    ids=["unknown-split", "missing-file", "missing-key", "no-name", "bad-yaml"],
)
def test_read_manifest_names_the_key_at_fault(manifest, text, field):
    manifest.write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError) as caught:
        read_manifest(manifest)
    assert caught.value.field == field
    assert str(manifest) in str(caught.value)


def _raise_dataset_error():
    raise DatasetError("a.json", 7, "annotations.caption", "missing", "add it")


def test_dataset_error_crosses_a_spawned_worker_intact():
    # load_batch's image checks may run in worker processes; their errors must arrive whole.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        with pytest.raises(DatasetError) as caught:
            pool.submit(_raise_dataset_error).result()
    copy = caught.value
    error = DatasetError("a.json", 7, "annotations.caption", "missing", "add it")
    assert (copy.file, copy.record, copy.field, copy.problem, copy.hint) == ("a.json", 7, "annotations.caption", "missing", "add it")
    assert str(copy) == str(error) == "a.json, record 7, field 'annotations.caption': missing -- add it"


@pytest.mark.parametrize("limit", [1600, 100_000])
def test_decoding_threads_share_the_pixel_limit(manifest, monkeypatch, limit):
    # N threads decoding N near-limit images at once would multiply the memory of one; the
    # pixels being decoded at the same time stay within max_image_pixels (one larger image alone).
    import threading
    import time as clock

    lock, in_flight, peak = threading.Lock(), [0], [0]
    original = Image.Image.load

    def slow_load(image):
        pixels = image.width * image.height
        with lock:
            in_flight[0] += pixels
            peak[0] = max(peak[0], in_flight[0])
        try:
            clock.sleep(0.05)  # long enough for every worker to start one
            return original(image)
        finally:
            with lock:
                in_flight[0] -= pixels

    monkeypatch.setattr(Image.Image, "load", slow_load)
    result = load_batch(manifest, batch="b1", workers=4, max_image_pixels=limit)
    assert result.images.height == 5  # every fixture image is at most 48x32 = 1,536 pixels
    if limit == 1600:
        assert 0 < peak[0] <= limit
    else:
        assert peak[0] > 1600  # without a binding limit the threads do overlap: the check above can fail
