"""Lineage audit: which batches and counterfactuals fed a checkpoint, drawn as Mermaid and PNG, via `spur lineage`."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from spur_assets.core.records.lineage import LineageStore
from spur_assets.core.records.lineage_graph import ancestry_edges, ancestry_mermaid, render_ancestry_png
from tests.test_lineage import _record

SPUR = str(Path(sys.executable).with_name("spur"))


@pytest.fixture()
def graph(tmp_path):
    """raw_pairs[b1], raw_pairs[b2] -> spurious_features -> synthetic_counterfactuals -> finetuned_checkpoint,
    plus base_checkpoint from b1 only, and a raw_pairs[b3] nobody read."""
    store = LineageStore(tmp_path)
    b1 = _record(tmp_path, "raw_pairs", "b1", pl.DataFrame({"x": [1]}))
    b2 = _record(tmp_path, "raw_pairs", "b2", pl.DataFrame({"x": [2]}))
    b3 = _record(tmp_path, "raw_pairs", "b3", pl.DataFrame({"x": [3]}))
    features = _record(tmp_path, "spurious_features", "", pl.DataFrame({"y": [1]}), upstream=[b1, b2])
    base = _record(tmp_path, "base_checkpoint", "", None, upstream=[b1])
    cf = _record(tmp_path, "synthetic_counterfactuals", "", pl.DataFrame({"z": [1, 2]}), upstream=[features, b1, b2])
    tuned = _record(tmp_path, "finetuned_checkpoint", "", None, upstream=[base, cf, b1, b2])
    for record in (b1, b2, b3, features, base, cf, tuned):
        store.record(record)
    return store, dict(b1=b1, b2=b2, b3=b3, features=features, base=base, cf=cf, tuned=tuned)


def test_inputs_query_names_batches_and_counterfactuals(graph):
    store, m = graph
    rows = store.query("batches_and_counterfactuals_of_checkpoint", {"materialization_id": m["tuned"].materialization_id})
    assert sorted(zip(rows["asset"], rows["batch"], rows["materialization_id"])) == sorted([
        ("raw_pairs", "b1", m["b1"].materialization_id),
        ("raw_pairs", "b2", m["b2"].materialization_id),
        ("synthetic_counterfactuals", "", m["cf"].materialization_id),
    ])
    only_base = store.query("batches_and_counterfactuals_of_checkpoint", {"materialization_id": m["base"].materialization_id})
    assert only_base["batch"].to_list() == ["b1"]


def test_mermaid_and_edges_follow_the_chain(graph):
    store, m = graph
    chain = store.ancestry(m["tuned"].materialization_id)
    edges = ancestry_edges(chain)
    ids = {k: r.materialization_id for k, r in m.items()}
    expected = {
        (ids["b1"], ids["features"]), (ids["b2"], ids["features"]), (ids["b1"], ids["base"]),
        (ids["features"], ids["cf"]), (ids["b1"], ids["cf"]), (ids["b2"], ids["cf"]),
        (ids["base"], ids["tuned"]), (ids["cf"], ids["tuned"]), (ids["b1"], ids["tuned"]), (ids["b2"], ids["tuned"]),
    }
    assert set(edges) == expected
    text = ancestry_mermaid(chain)
    assert text.startswith("flowchart LR\n")
    arrows = re.findall(r"^\s+(m\w+) --> (m\w+)$", text, flags=re.M)
    assert len(arrows) == len(expected)
    assert "raw_pairs [b3]" not in text and "raw_pairs [b1]" in text


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is installed by scripts/test.sh")
def test_png_is_drawn(graph, tmp_path):
    store, m = graph
    out = render_ancestry_png(store.ancestry(m["tuned"].materialization_id), tmp_path / "chain.png", "test")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 100


def test_png_without_graphviz_says_what_to_install(graph, tmp_path, monkeypatch):
    store, m = graph
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(RuntimeError, match="apt-get install graphviz"):
        render_ancestry_png(store.ancestry(m["tuned"].materialization_id), tmp_path / "x.png")


def test_cli_inputs_and_ancestry_drawings(graph, tmp_path):
    store, m = graph
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPUR_", "DAGSTER_"))}
    env["SPUR_HOME"] = str(store.home)

    def spur(*args):
        return subprocess.run([SPUR, *args], env=env, capture_output=True, text=True, timeout=120)

    inputs = spur("lineage", "inputs", "finetuned_checkpoint")
    assert inputs.returncode == 0, inputs.stderr
    assert "2 batch(es)" in inputs.stdout and m["b1"].materialization_id in inputs.stdout
    assert m["cf"].materialization_id in inputs.stdout and m["b3"].materialization_id not in inputs.stdout

    by_id = spur("lineage", "ancestry", m["cf"].materialization_id, "--mermaid")
    assert by_id.returncode == 0, by_id.stderr
    assert "synthetic_counterfactuals" in by_id.stdout and "finetuned_checkpoint" not in by_id.stdout

    if shutil.which("dot"):
        png = spur("lineage", "ancestry", "finetuned_checkpoint", "--png", str(tmp_path / "c.png"))
        assert png.returncode == 0, png.stderr
        assert (tmp_path / "c.png").stat().st_size > 1000

    unknown = spur("lineage", "inputs", "no_such_asset")
    assert unknown.returncode == 1 and "no materialization 'no_such_asset'" in unknown.stderr
