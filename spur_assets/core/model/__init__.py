"""The CLIP model under audit: building and loading it, training and fine-tuning (one process or data-parallel), recipes, training jobs on disk, the embedding cache."""
