"""Shapes results for the Dagster UI: Markdown tables and inline plots."""


import base64
import io
from pathlib import Path

import dagster as dg
import polars as pl
from PIL import Image


def markdown_table(frame: pl.DataFrame, max_rows: int = 20, float_digits: int = 3) -> dg.MetadataValue:
    """A Polars frame as a Markdown table (first ``max_rows`` rows) for asset metadata."""
    shown = frame.head(max_rows)
    header = "| " + " | ".join(shown.columns) + " |"
    rule = "| " + " | ".join("---" for _ in shown.columns) + " |"
    lines = [header, rule]
    for row in shown.iter_rows():
        cells = [f"{v:.{float_digits}f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if frame.height > max_rows:
        lines.append(f"\n{frame.height - max_rows} more rows not shown")
    return dg.MetadataValue.md("\n".join(lines))


def markdown_image(png: Path, title: str, max_side: int = 1100) -> dg.MetadataValue:
    """An image file inlined in Markdown (base64 PNG, downscaled to ``max_side``) so the UI shows it."""
    with Image.open(png) as image:
        image = image.convert("RGB")
        image.thumbnail((max_side, max_side))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return dg.MetadataValue.md(f"**{title}**\n\n![{title}](data:image/png;base64,{encoded})")
