"""Export the counterfactual set as a COCO-layout dataset that others can load and train on.

The dataset's ``train`` split is the train counterfactuals (removal + paste
images, their captions, their objects); its ``test`` split is the counterfactual
eval set (removal + control images). Layout (docs/data-contract.md#exported-counterfactual-dataset)::

    <out_dir>/dataset.yaml
    <out_dir>/DATASHEET.md
    <out_dir>/train/000000000001.png ...
    <out_dir>/test/000010000001.png ...
    <out_dir>/annotations/{captions,instances}_{train,test}.json

Ids: a train image keeps its ``cf_image_id`` and a train caption its
``cf_caption_id``; train annotations count from 1. A test image is
``offset + cf_image_id`` of the eval set, test captions and annotations count
from ``offset + 1``, the offset being the first power of ten (at least
10,000,000, as in the built-in dataset) above every train id, so the splits
never share an id. Category ids are COCO's
(``vocabulary.COCO_CATEGORY_IDS``); a category outside COCO keeps its source id
unless COCO or an earlier category took it, then it gets the next free id from 1000.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import polars as pl

from spur_assets.core.data import vocabulary
from spur_assets.core.counterfactuals.train_counterfactuals import TrainCounterfactuals

_TRAIN_FOLDER = "train"
_TEST_FOLDER = "test"
_MIN_TEST_OFFSET = 10_000_000
# The columns of counterfactuals.EvalCounterfactuals that the export reads.
_EVAL_IMAGE_COLUMNS = (
    "cf_image_id", "kind", "source_image_id", "batch", "pair", "anchor", "companion", "path", "width", "height"
)
_EVAL_CAPTION_COLUMNS = ("cf_image_id", "source_caption_id", "caption", "accepted")


def _require(frame: pl.DataFrame, name: str, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"export_counterfactual_dataset: {name} lacks column(s) {missing}; it has {frame.columns}. "
            f"Pass the table the pipeline built ({name})."
        )


def eval_id_offset(max_train_id: int) -> int:
    """The id offset of the test split: the first power of ten above ``max_train_id``, at least 10,000,000.

    Test image, caption and annotation ids are this offset plus a count from 1,
    so no id repeats between the splits.
    """
    offset = _MIN_TEST_OFFSET
    while offset <= max_train_id:
        offset *= 10
    return offset


def _category_ids(objects: list[pl.DataFrame]) -> dict[str, tuple[int, str]]:
    """category -> (id, supercategory) for every category in ``objects``; COCO's ids for COCO names."""
    seen: dict[str, tuple[int, str]] = {}
    for frame in objects:
        for category, category_id, supercategory in frame.select("category", "category_id", "supercategory").unique(
            maintain_order=True
        ).iter_rows():
            seen.setdefault(category, (category_id, supercategory))
    ids: dict[str, tuple[int, str]] = {}
    taken = set(vocabulary.COCO_CATEGORY_IDS.values())
    for category in sorted(c for c in seen if c in vocabulary.COCO_CATEGORY_IDS):
        ids[category] = (vocabulary.COCO_CATEGORY_IDS[category], vocabulary.COCO_SUPERCATEGORIES[category])
    next_free = 1000
    for category in sorted(c for c in seen if c not in vocabulary.COCO_CATEGORY_IDS):
        source_id, supercategory = seen[category]
        if source_id is None or source_id in taken:
            while next_free in taken:
                next_free += 1
            source_id = next_free
        taken.add(source_id)
        ids[category] = (int(source_id), supercategory or "")
    return ids


def _copy_image(source: str, destination: Path, what: str) -> None:
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: image file of {what} (field 'path') is missing; rebuild the counterfactuals or restore the file"
        )
    shutil.copyfile(path, destination)


def _annotation(annotation_id: int, image_id: int, row: dict, height: int, width: int, category_ids: dict) -> dict:
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_ids[row["category"]][0],
        "segmentation": {"size": [height, width], "counts": row["rle_counts"]},
        "area": float(row["area"]),
        "bbox": [float(row["bbox_x"]), float(row["bbox_y"]), float(row["bbox_w"]), float(row["bbox_h"])],
        "iscrowd": int(bool(row["iscrowd"])),
    }


def _dump(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def _write_split(
    root: Path, folder: str, images: list[dict], captions: list[dict], instances: list[dict],
    categories: list[dict], info: dict,
) -> None:
    """annotations/captions_<folder>.json and instances_<folder>.json, COCO-shaped."""
    common = {"info": info, "licenses": [], "images": images}
    _dump(root / "annotations" / f"captions_{folder}.json", {**common, "annotations": captions})
    _dump(root / "annotations" / f"instances_{folder}.json", {**common, "annotations": instances, "categories": categories})


def export_counterfactual_dataset(
    eval_images: pl.DataFrame,
    eval_captions: pl.DataFrame,
    train_cf: TrainCounterfactuals,
    test_instances: pl.DataFrame,
    out_dir: Path,
    name: str = "spur-counterfactuals",
    source_description: dict | None = None,
    *,
    test_captions: pl.DataFrame,
) -> Path:
    """Write the counterfactual set as a COCO-layout dataset with ``dataset.yaml`` and ``DATASHEET.md``; return the yaml.

    Train split: ``train_cf`` (images copied, captions, instances from
    ``train_cf.objects``). Test split: the eval set (``EvalCounterfactuals.images``
    and ``.captions``); a removal image I⁻ᵇ gets the accepted edits of I's
    captions plus I's captions that never mentioned b, and I's instances minus b;
    a control image gets all of I's captions and instances. ``test_captions`` and
    ``test_instances`` are the ingested test tables of the source (matched on
    batch and source image id). ``source_description`` (source dataset, backend,
    thresholds, ...) goes into the datasheet as given. The result loads with
    ``coco_ingest.load_batch(..., on_bad_record="fail")``. Written to a temporary
    sibling folder and renamed into place; an existing export at ``out_dir`` (a
    folder with ``DATASHEET.md``) is replaced, any other non-empty folder refused.
    """
    _require(eval_images, "eval_images", _EVAL_IMAGE_COLUMNS)
    _require(eval_captions, "eval_captions", _EVAL_CAPTION_COLUMNS)
    _require(test_captions, "test_captions", ("batch", "image_id", "caption_id", "caption"))
    _require(
        test_instances, "test_instances",
        ("batch", "image_id", "annotation_id", "category", "category_id", "supercategory",
         "bbox_x", "bbox_y", "bbox_w", "bbox_h", "area", "iscrowd", "rle_counts"),
    )
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a folder; pass a folder path for the export")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "DATASHEET.md").is_file():
        raise FileExistsError(
            f"{out_dir}: folder is not empty and holds no counterfactual export (no DATASHEET.md); "
            "refusing to overwrite it -- pass an empty or new folder"
        )
    if "split" in test_captions.columns:
        test_captions = test_captions.filter(pl.col("split") == "test")
    if "split" in test_instances.columns:
        test_instances = test_instances.filter(pl.col("split") == "test")

    train_images = train_cf.images.sort("cf_image_id")
    eval_images = eval_images.sort("cf_image_id")
    offset = eval_id_offset(
        max(int(train_images["cf_image_id"].max() or 0), int(train_cf.captions["cf_caption_id"].max() or 0),
            train_cf.objects.height)
    )
    category_ids = _category_ids([train_cf.objects, test_instances])
    categories = [
        {"id": cid, "name": category, "supercategory": supercategory}
        for category, (cid, supercategory) in sorted(category_ids.items(), key=lambda item: item[1][0])
    ]
    info = {"description": f"{name}: counterfactual images and captions made by spur-assets", "version": "1"}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex}"
    (staging / "annotations").mkdir(parents=True)
    (staging / _TRAIN_FOLDER).mkdir()
    (staging / _TEST_FOLDER).mkdir()
    try:
        counts: list[dict] = []

        # ---- train: the train counterfactuals
        images, captions, instances = [], [], []
        captions_by_image: dict[int, list[dict]] = {}
        for row in train_cf.captions.sort("cf_caption_id").iter_rows(named=True):
            captions_by_image.setdefault(row["cf_image_id"], []).append(row)
        objects_by_image: dict[int, list[dict]] = {}
        for row in train_cf.objects.iter_rows(named=True):
            objects_by_image.setdefault(row["cf_image_id"], []).append(row)
        for row in train_images.iter_rows(named=True):
            image_id = row["cf_image_id"]
            file_name = f"{image_id:012d}.png"
            _copy_image(row["path"], staging / _TRAIN_FOLDER / file_name, f"train counterfactual {image_id}")
            height, width = int(row["height"]), int(row["width"])
            images.append(
                {"id": image_id, "file_name": file_name, "width": width, "height": height,
                 "kind": row["kind"], "pair": row["pair"], "source_image_id": row["source_image_id"]}
            )
            own_captions = captions_by_image.get(image_id, [])
            captions += [{"id": c["cf_caption_id"], "image_id": image_id, "caption": c["caption"]} for c in own_captions]
            own_objects = objects_by_image.get(image_id, [])
            instances += [
                _annotation(len(instances) + k + 1, image_id, o, height, width, category_ids)
                for k, o in enumerate(own_objects)
            ]
            counts.append({"split": "train", "pair": row["pair"], "kind": row["kind"],
                           "captions": len(own_captions), "instances": len(own_objects)})
        _write_split(staging, _TRAIN_FOLDER, images, captions, instances, categories, info)

        # ---- test: the eval set
        originals: dict[tuple[str, int], list[dict]] = {}
        for row in test_captions.sort("caption_id").iter_rows(named=True):
            originals.setdefault((row["batch"], row["image_id"]), []).append(row)
        source_objects: dict[tuple[str, int], list[dict]] = {}
        for row in test_instances.sort("annotation_id").iter_rows(named=True):
            source_objects.setdefault((row["batch"], row["image_id"]), []).append(row)
        edits: dict[int, list[dict]] = {}
        for row in eval_captions.filter(pl.col("accepted")).sort("source_caption_id").iter_rows(named=True):
            edits.setdefault(row["cf_image_id"], []).append(row)
        images, captions, instances = [], [], []
        for row in eval_images.iter_rows(named=True):
            image_id = offset + row["cf_image_id"]
            file_name = f"{image_id:012d}.png"
            _copy_image(row["path"], staging / _TEST_FOLDER / file_name, f"eval counterfactual {row['cf_image_id']}")
            height, width = int(row["height"]), int(row["width"])
            images.append(
                {"id": image_id, "file_name": file_name, "width": width, "height": height,
                 "kind": row["kind"], "pair": row["pair"], "source_image_id": row["source_image_id"]}
            )
            key = (row["batch"], row["source_image_id"])
            companion = row["companion"]
            if row["kind"] == "removal":
                texts = [e["caption"] for e in edits.get(row["cf_image_id"], [])]
                texts += [
                    c["caption"] for c in originals.get(key, [])
                    if companion not in vocabulary.mentioned_categories(c["caption"])
                ]
                own_objects = [o for o in source_objects.get(key, []) if o["category"] != companion]
            else:
                texts = [c["caption"] for c in originals.get(key, [])]
                own_objects = source_objects.get(key, [])
            captions += [
                {"id": offset + len(captions) + k + 1, "image_id": image_id, "caption": text}
                for k, text in enumerate(texts)
            ]
            instances += [
                _annotation(offset + len(instances) + k + 1, image_id, o, height, width, category_ids)
                for k, o in enumerate(own_objects)
            ]
            counts.append({"split": "test", "pair": row["pair"], "kind": row["kind"],
                           "captions": len(texts), "instances": len(own_objects)})
        _write_split(staging, _TEST_FOLDER, images, captions, instances, categories, info)

        manifest = (
            f"name: {json.dumps(name)}\n"
            "splits:\n"
            f"  train: {{images: {_TRAIN_FOLDER}, captions: annotations/captions_{_TRAIN_FOLDER}.json, "
            f"instances: annotations/instances_{_TRAIN_FOLDER}.json}}\n"
            f"  test:  {{images: {_TEST_FOLDER}, captions: annotations/captions_{_TEST_FOLDER}.json, "
            f"instances: annotations/instances_{_TEST_FOLDER}.json}}\n"
        )
        (staging / "dataset.yaml").write_text(manifest, encoding="utf-8")
        (staging / "DATASHEET.md").write_text(
            _datasheet(name, train_cf, eval_images, counts, source_description or {}, offset), encoding="utf-8"
        )
        if out_dir.exists():
            retired = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex}"
            out_dir.rename(retired)
            shutil.rmtree(retired, ignore_errors=True)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / "dataset.yaml"


# --------------------------------------------------------------------------- datasheet


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _datasheet(
    name: str, train_cf: TrainCounterfactuals, eval_images: pl.DataFrame, counts: list[dict],
    source_description: dict, offset: int,
) -> str:
    pairs = list(dict.fromkeys([*train_cf.images["pair"].to_list(), *eval_images["pair"].to_list(),
                                *train_cf.lift["pair"].to_list()]))
    summary: dict[tuple[str, str, str], list[int]] = {}
    for row in counts:
        cell = summary.setdefault((row["split"], row["pair"], row["kind"]), [0, 0, 0])
        cell[0] += 1
        cell[1] += row["captions"]
        cell[2] += row["instances"]
    count_rows = [[split, pair, kind, *summary[(split, pair, kind)]] for split, pair, kind in sorted(summary)]
    totals = {}
    for (split, _, _), (n_images, n_captions, n_instances) in summary.items():
        total = totals.setdefault(split, [0, 0, 0])
        total[0] += n_images
        total[1] += n_captions
        total[2] += n_instances
    lift_rows = [
        [r["pair"], r["n_anchor_before"], r["n_both_before"], f"{r['p_before']:.3f}", f"{r['lift_before']:.2f}",
         r["n_anchor_after"], r["n_both_after"], f"{r['p_after']:.3f}", f"{r['lift_after']:.2f}"]
        for r in train_cf.lift.iter_rows(named=True)
    ]
    caption_kinds = (
        train_cf.captions.group_by("pair", "kind").len().sort("pair", "kind").rows()
        if train_cf.captions.height else []
    )
    settings = {**train_cf.settings}
    def shown(value) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    made = [f"- **{key}**: {shown(value)}" for key, value in source_description.items()]
    made += [f"- **train counterfactuals, {key}**: {shown(value)}" for key, value in settings.items()]
    source = source_description.get("source_dataset", "the source dataset")
    return "\n\n".join(
        [
            f"# {name}",
            "Counterfactual images and captions for auditing and mitigating spurious object correlations "
            "(\"dog => frisbee\") in image-text retrieval models, made by spur-assets "
            "(after Kim, Koepke, Schmid and Akata, CVPR 2023 Workshops, arXiv 2304.03391; "
            "the definitions are spur-assets' own, see its docs/definitions.md).",
            "## How it was made\n\n"
            f"Pairs (anchor -> companion): {', '.join(pairs) if pairs else 'none'}.\n\n"
            "- **train** split: for each pair (a, b), *removal* images (a train image showing a and b with every "
            "instance of b inpainted; captions naming b edited to drop it, or kept unchanged when they never "
            "named b) and *paste* images (one instance of b cut with its exact mask from another train image and "
            "pasted, off every object, into a train image showing neither a nor b; each caption gains a mention "
            "of b). Instances: the source image's minus b (removal), plus the pasted b (paste).\n"
            "- **test** split: the counterfactual eval set: *removal* images (a test image with every b inpainted; "
            "captions: the accepted edits plus the captions that never named b; instances minus b) and *control* "
            "images (a region of the same shape and area inpainted off every object; original captions and "
            "instances).\n"
            f"- Image ids: train = the counterfactual id; test = {offset:,} + the eval id. Category ids are COCO's.\n\n"
            + "\n".join(made),
            "## Counts\n\n" + _table(["split", "pair", "kind", "images", "captions", "instances"], count_rows)
            + "\n\n" + _table(["split", "images", "captions", "instances"],
                              [[split, *totals[split]] for split in sorted(totals)])
            + ("\n\nTrain captions by kind:\n\n" + _table(["pair", "kind", "captions"], [list(r) for r in caption_kinds])
               if caption_kinds else ""),
            "## Co-occurrence lift (train split, object instances)\n\n"
            "Before: the original train images. After: originals plus every train counterfactual image. "
            "P(b|a) = n_both / n_anchor; lift = P(b|a) / P(b).\n\n"
            + _table(["pair", "n_anchor before", "n_both before", r"P(b\|a) before", "lift before",
                      "n_anchor after", "n_both after", r"P(b\|a) after", "lift after"], lift_rows)
            + "\n\nEach pair's paste images also add images without the other pairs' companions, so with "
            "several pairs the lift after stays above 1 even where each pair's own edits would bring it to 1.",
            "## Licence\n\n"
            f"Every image, caption and annotation here is derived from {source}: edited copies of its images "
            "(regions inpainted or pasted from its other images) and edits of its captions and annotations. "
            "It is distributed under the same terms as the source dataset (for COCO: annotations CC BY 4.0, "
            "images under their Flickr licences). Credit the source dataset when you use it.",
        ]
    ) + "\n"
