"""Asset checks fail on the faults they guard against (called directly, as Dagster allows)."""

import numpy as np
import polars as pl
from safetensors.numpy import save_file

from spur_assets.core.records.artifacts import ArtifactRef, OutputFile
from spur_assets.pipeline.checks import edited_captions_drop_companion, weights_finite, counterfactual_masks_non_empty


def _ref(name, kind, path):
    return ArtifactRef("x", "", "m1", "dv", (OutputFile(name, kind, str(path), "s", 0, 0),))


def test_weights_finite_catches_nan(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(); bad.mkdir()
    save_file({"w": np.ones((2, 2), np.float32)}, str(good / "model.safetensors"))
    save_file({"w": np.array([1.0, np.nan], np.float32), "ok": np.zeros(3, np.float32)}, str(bad / "model.safetensors"))
    assert weights_finite(_ref("checkpoint", "dir", good)).passed
    result = weights_finite(_ref("checkpoint", "dir", bad))
    assert not result.passed and "w" in result.metadata["non_finite_tensors"].value
    assert not weights_finite(_ref("checkpoint", "dir", tmp_path / "empty")).passed


def test_caption_and_mask_checks_catch_bad_rows(tmp_path):
    captions = pl.DataFrame({
        "cf_caption_id": [0, 1], "companion": ["frisbee", "frisbee"], "accepted": [True, True],
        "caption": ["A dog on the grass.", "A dog with a frisbee."],
    })
    captions.write_parquet(tmp_path / "c.parquet")
    result = edited_captions_drop_companion(_ref("cf_eval_captions", "table", tmp_path / "c.parquet"))
    assert not result.passed and result.metadata["still_mentioning"].value == 1
    captions.head(1).write_parquet(tmp_path / "c1.parquet")
    assert edited_captions_drop_companion(_ref("cf_eval_captions", "table", tmp_path / "c1.parquet")).passed

    pl.DataFrame({"masked_pixels": [10, 0]}).write_parquet(tmp_path / "i.parquet")
    assert not counterfactual_masks_non_empty(_ref("cf_eval_images", "table", tmp_path / "i.parquet")).passed


def test_pair_statistics_check_catches_inconsistent_rows(tmp_path):
    from spur_assets.pipeline.checks import pair_statistics_consistent

    good = pl.DataFrame({
        "anchor": ["dog", "car"], "companion": ["frisbee", "traffic light"], "n_anchor": [10, 4], "n_both": [9, 1],
        "p_companion_given_anchor": [0.9, 0.25], "lift": [4.5, 1.0], "flagged": [True, False], "source": ["instances"] * 2,
    })
    good.write_parquet(tmp_path / "good.parquet")
    result = pair_statistics_consistent(_ref("spurious_features", "table", tmp_path / "good.parquet"))
    assert result.passed and result.metadata["flagged"].value == 1
    # n_both > n_anchor, and a P(b|a) that does not equal n_both / n_anchor
    bad = good.with_columns(pl.Series("n_both", [11, 1]), pl.Series("p_companion_given_anchor", [0.9, 0.5]))
    bad.write_parquet(tmp_path / "bad.parquet")
    result = pair_statistics_consistent(_ref("spurious_features", "table", tmp_path / "bad.parquet"))
    assert not result.passed and result.metadata["inconsistent"].value == 2


def test_exported_dataset_check_reads_it_back(tmp_path):
    from spur_assets.pipeline.checks import exported_dataset_reloads
    from tests.coco_fixtures import build_coco_fixture, corrupt

    manifest = build_coco_fixture(tmp_path / "dataset")
    assert exported_dataset_reloads(_ref("dataset", "dir", manifest.parent)).passed
    corrupt(manifest, "missing_image")
    result = exported_dataset_reloads(_ref("dataset", "dir", manifest.parent))
    assert not result.passed and "dataset" in result.metadata["error"].value
