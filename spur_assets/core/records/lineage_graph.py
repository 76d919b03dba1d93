"""Drawings of a materialization's ancestry: Mermaid text (renders on GitHub) and Graphviz PNG."""

from __future__ import annotations

from pathlib import Path

import polars as pl

# Fill colour per asset, by pipeline stage (ingest, expose, counterfactuals, mitigate, report).
_STAGE_COLOURS = {
    "raw_pairs": "#dbeafe",
    "spurious_features": "#fef3c7",
    "base_checkpoint": "#fef3c7",
    "synthetic_counterfactuals": "#dcfce7",
    "counterfactual_dataset": "#dcfce7",
    "finetuned_checkpoint": "#fce7f3",
    "metric_report": "#ede9fe",
}


def _node_id(materialization_id: str) -> str:
    return "m" + materialization_id[:12]


def _label_lines(row: dict) -> list[str]:
    asset = row["asset"] + (f" [{row['partition']}]" if row["partition"] else "")
    ended = row["ended_at"].strftime("%Y-%m-%d %H:%M:%S") if row.get("ended_at") is not None else ""
    return [asset, f"{row['materialization_id'][:12]}  v{row['data_version'][:8]}", ended]


def ancestry_edges(chain: pl.DataFrame) -> list[tuple[str, str]]:
    """(upstream materialization id, reader materialization id) for every edge inside ``chain``.

    ``chain`` is the frame of ``sql/ancestry_of_materialization.sql``: its ``read_by``
    column lists, per row, the materializations of the chain that read it.
    """
    inside = set(chain["materialization_id"].to_list())
    edges = []
    for row in chain.iter_rows(named=True):
        for reader in row["read_by"] or []:
            if reader in inside:
                edges.append((row["materialization_id"], reader))
    return sorted(set(edges))


def ancestry_mermaid(chain: pl.DataFrame) -> str:
    """A Mermaid flowchart (left to right, raw batches first) of an ancestry chain."""
    lines = ["flowchart LR"]
    for row in chain.sort("depth", descending=True).iter_rows(named=True):
        text = "<br/>".join(part.replace('"', "'") for part in _label_lines(row) if part)
        lines.append(f'    {_node_id(row["materialization_id"])}["{text}"]')
    for upstream, reader in ancestry_edges(chain):
        lines.append(f"    {_node_id(upstream)} --> {_node_id(reader)}")
    for row in chain.iter_rows(named=True):
        colour = _STAGE_COLOURS.get(row["asset"])
        if colour:
            lines.append(f"    style {_node_id(row['materialization_id'])} fill:{colour}")
    return "\n".join(lines) + "\n"


def ancestry_dot(chain: pl.DataFrame, title: str = ""):
    """The same drawing as a ``graphviz.Digraph`` (left to right)."""
    import graphviz

    graph = graphviz.Digraph("ancestry", graph_attr={"rankdir": "LR", "label": title, "labelloc": "t", "fontsize": "12"},
                             node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica", "fontsize": "10"})
    for row in chain.iter_rows(named=True):
        graph.node(_node_id(row["materialization_id"]), "\n".join(_label_lines(row)),
                   fillcolor=_STAGE_COLOURS.get(row["asset"], "#f3f4f6"))
    for upstream, reader in ancestry_edges(chain):
        graph.edge(_node_id(upstream), _node_id(reader))
    return graph


def render_ancestry_png(chain: pl.DataFrame, out: Path, title: str = "") -> Path:
    """Write the ancestry as a PNG with Graphviz's ``dot``; a missing ``dot`` is an error that says how to get it."""
    import graphviz

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        out.write_bytes(ancestry_dot(chain, title).pipe(format="png"))
    except graphviz.ExecutableNotFound as error:
        raise RuntimeError(
            "drawing a PNG needs Graphviz's `dot` program, which is not on PATH: install it "
            "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz), or use "
            "--mermaid, which needs nothing"
        ) from error
    return out
