import polars as pl
import pytest

from spur_assets.core.data.batch_union import union_split


def _tables(batch, image_ids, split="test"):
    images = pl.DataFrame({"batch": batch, "split": split, "image_id": image_ids, "path": [f"{batch}/{i}.png" for i in image_ids]})
    captions = pl.DataFrame({"batch": batch, "split": split, "caption_id": [10 * i for i in image_ids], "image_id": image_ids,
                             "caption": [f"{batch} caption of {i}" for i in image_ids]})
    instances = pl.DataFrame({"batch": batch, "split": split, "annotation_id": [100 + i for i in image_ids], "image_id": image_ids,
                              "category": ["dog"] * len(image_ids)})
    return images, captions, instances


def test_colliding_ids_become_unique_and_keep_their_links():
    a, b = _tables("a", [1, 2]), _tables("b", [1, 5])
    union = union_split([b[0], a[0]], [b[1], a[1]], [b[2], a[2]], "test")
    assert union.images.select("image_id", "batch", "source_image_id").rows() == [(0, "a", 1), (1, "a", 2), (2, "b", 1), (3, "b", 5)]
    linked = union.captions.join(union.images, on="image_id").select("caption", "path").rows()
    assert sorted(linked) == sorted([("a caption of 1", "a/1.png"), ("a caption of 2", "a/2.png"),
                                     ("b caption of 1", "b/1.png"), ("b caption of 5", "b/5.png")])
    assert union.captions["caption_id"].n_unique() == 4
    assert union.instances.join(union.images, on="image_id")["path"].sort().to_list() == ["a/1.png", "a/2.png", "b/1.png", "b/5.png"]


def test_other_split_is_dropped_and_empty_split_errors():
    a = _tables("a", [1], split="train")
    with pytest.raises(ValueError, match="no 'test' images"):
        union_split([a[0]], [a[1]], [a[2]], "test")
