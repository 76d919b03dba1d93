import numpy as np
import polars as pl
import pytest

from spur_assets.core.counterfactuals.finetune_data import assemble_finetune_set


def _frames():
    train_images = pl.DataFrame({"image_id": [0, 1, 2, 3], "path": ["o0", "o1", "o2", "o3"]})
    train_captions = pl.DataFrame({
        "caption_id": [0, 1, 2, 3, 4, 5],
        "image_id": [0, 0, 1, 2, 3, 3],
        "caption": ["A dog with a frisbee.", "A dog on grass.", "A cat.", "A car.", "A clock.", "A dog and a frisbee."],
    })
    cf_images = pl.DataFrame({
        "cf_image_id": [10, 11], "kind": ["removal", "paste"], "source_image_id": [0, 2],
        "companion": ["frisbee", "frisbee"], "path": ["r0", "p2"],
    })
    cf_captions = pl.DataFrame({
        "cf_caption_id": [20, 21, 22], "cf_image_id": [10, 10, 11],
        "caption": ["A dog.", "A dog on grass.", "A car with a frisbee."],
    })
    return train_images, train_captions, cf_images, cf_captions


def test_hard_negative_links_by_hand():
    s = assemble_finetune_set(*_frames(), counterfactual_ratio=1.0)  # ratio 1: keep every original
    assert s.image_paths == ["o0", "o1", "o2", "o3", "r0", "p2"]
    assert s.captions[-3:] == ["A dog.", "A dog on grass.", "A car with a frisbee."]
    assert s.caption_image.tolist() == [0, 0, 1, 2, 3, 3, 4, 4, 5]
    # I^-b (row 4) -> the first b-caption of image 0 (caption row 0); that caption -> row 4
    assert s.hard_negative_text.tolist() == [-1, -1, -1, -1, 0, -1]
    assert s.hard_negative_image.tolist() == [4, -1, -1, -1, -1, -1, -1, -1, -1]
    assert s.summary["hard_negative_links"] == 1


def test_ratio_subsamples_originals_but_keeps_removal_sources():
    s = assemble_finetune_set(*_frames(), counterfactual_ratio=0.5, seed=3)
    # 2 counterfactuals at ratio 0.5 -> 2 originals, one of them the removal's source (image 0)
    assert s.summary["original_images"] == 2 and "o0" in s.image_paths
    assert s.summary["counterfactual_share"] == pytest.approx(0.5)


def test_switches():
    off = assemble_finetune_set(*_frames(), counterfactual_ratio=1.0, hard_negatives=False)
    assert (off.hard_negative_text == -1).all() and (off.hard_negative_image == -1).all()
    paste_only = assemble_finetune_set(*_frames(), counterfactual_ratio=1.0, use_removal=False)
    assert paste_only.image_paths[-1] == "p2" and "r0" not in paste_only.image_paths
    control = assemble_finetune_set(*_frames(), use_removal=False, use_paste=False)
    assert control.image_paths == ["o0", "o1", "o2", "o3"] and (control.hard_negative_text == -1).all()
