"""Plots people would rather look at than read (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def cooccurrence_heatmap(
    categories: list[str],
    matrix: list[list[float]],
    flagged: set[tuple[str, str]],
    out_png: Path,
    title: str,
) -> Path:
    """Heatmap of P(column | row) with flagged (anchor, companion) cells outlined in red."""
    values = np.asarray(matrix, dtype=float)
    size = max(5.0, 0.42 * len(categories) + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(categories)), categories, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(categories)), categories, fontsize=8)
    ax.set_xlabel("companion b")
    ax.set_ylabel("anchor a")
    ax.set_title(title, fontsize=10)
    index = {c: i for i, c in enumerate(categories)}
    for anchor, companion in flagged:
        if anchor in index and companion in index:
            ax.add_patch(
                plt.Rectangle(
                    (index[companion] - 0.5, index[anchor] - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2
                )
            )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="P(b | a)")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def loss_curve(history: list[dict], out_png: Path, title: str) -> Path:
    """Mean training loss per epoch (``history`` rows carry ``epoch`` and ``loss``)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("contrastive loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
