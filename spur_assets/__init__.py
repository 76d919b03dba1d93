"""spur-assets: expose and mitigate spurious object correlations in image-text retrieval."""

__version__ = "0.1.0"
