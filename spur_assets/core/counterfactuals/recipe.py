"""How counterfactuals are made, besides the data: ``CounterfactualRecipe``, what every builder takes."""

from __future__ import annotations

from dataclasses import dataclass

from spur_assets.core.counterfactuals.inpaint import Inpainter, InpainterSpec, spec_of


@dataclass(frozen=True)
class CounterfactualRecipe:
    """Everything besides the data that decides the counterfactuals' pixels and rows, and how they are rendered.

    - ``inpainter``: the backend that fills masked pixels, an ``Inpainter`` or
      an ``InpainterSpec`` (see ``inpaint.make_inpainter``).
    - ``max_companion_fraction``: in (0, 1]. An image whose companion (b)
      union mask covers more of it gets no removal or control edit (skipped);
      a paste donor instance covering more of its image is not cut.
    - ``dilation_px`` (>= 0): the removal mask is b's union mask dilated by
      this many pixels (an elliptical kernel); the instances a control region
      or a pasted object must stay off are dilated alike.
    - ``seed``: every draw (control placement, which removal edits, paste
      targets, donors, places and words) comes from generators seeded by
      (seed, ...) and the pair / batch / image it concerns.
    - ``removal_per_pair`` (train only; >= 0 or None): removal edits kept per
      pair, drawn among the eligible images; None keeps them all.
    - ``paste_per_pair`` (train only; >= 0 or None): paste edits wanted per
      pair; None means ``pastes_for_unit_lift`` (the number that brings the
      pair's lift to 1 counting its own edits, capped by the targets; on COCO
      it can ask for thousands per pair, so pass a number to bound it).
    - ``workers`` (>= 1): inpainting processes. ``workers > 1`` spreads the
      fixed chunks over a spawned process pool, each worker rebuilding the
      inpainter from its spec (``inpaint.spec_of``); a GPU backend wants 1
      (one process owns the device and batches).
    - ``tasks_per_chunk`` (>= 1 or None): tasks handed to the inpainter at a
      time; None is the builder's default (4 (pair, image) tasks of 2 images
      each for the eval set, 8 images for the train set). Chunks are fixed
      whatever ``workers``, so output is identical for a seed whatever
      ``workers``.

    Two batch results with equal ``fingerprint()`` are interchangeable. It
    holds what changes the batch part's images and rows: the backend and its
    options, ``max_companion_fraction``, ``dilation_px`` and ``seed``. Left
    out: the inpainter's device (the backends give the same bytes on any
    device, up to its float rounding), the train draw counts (a batch part
    holds every removal candidate and no pastes; the counts apply when parts
    are combined), ``workers`` and ``tasks_per_chunk`` (output is the same).
    """

    inpainter: Inpainter | InpainterSpec
    max_companion_fraction: float = 0.25
    dilation_px: int = 2
    seed: int = 0
    removal_per_pair: int | None = None
    paste_per_pair: int | None = None
    workers: int = 1
    tasks_per_chunk: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.max_companion_fraction <= 1.0:
            raise ValueError(f"max_companion_fraction must be in (0, 1], got {self.max_companion_fraction}")
        for name, value in (("removal_per_pair", self.removal_per_pair), ("paste_per_pair", self.paste_per_pair)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None (None: the default rule), got {value}")
        if self.workers < 1 or (self.tasks_per_chunk is not None and self.tasks_per_chunk < 1) or self.dilation_px < 0:
            raise ValueError(
                "workers and tasks_per_chunk must be >= 1 and dilation_px >= 0, "
                f"got {self.workers}, {self.tasks_per_chunk}, {self.dilation_px}"
            )

    def chunk_size(self, default: int) -> int:
        """``tasks_per_chunk``, or the builder's ``default`` when it is None."""
        return default if self.tasks_per_chunk is None else self.tasks_per_chunk

    def fingerprint(self) -> dict:
        """The recipe as JSON-able values: backend, options, max_companion_fraction, dilation_px, seed."""
        spec = spec_of(self.inpainter)
        return {
            "backend": spec.backend,
            "options": dict(sorted(spec.options.items())),
            "max_companion_fraction": self.max_companion_fraction,
            "dilation_px": self.dilation_px,
            "seed": self.seed,
        }
