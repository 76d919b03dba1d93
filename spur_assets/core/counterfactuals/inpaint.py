"""Inpainting backends behind one interface: fill a masked region of an image.

Three backends, all taking RGB ``uint8`` images (H×W×3) and boolean masks (H×W,
True = fill) and returning new images in which every pixel outside the mask is
byte-identical to the input:

- ``OpenCVInpainter``: ``cv2.inpaint`` (Telea or Navier–Stokes), CPU, the default.
- ``TorchInpainter``: a batched multi-scale harmonic fill in pure torch ops; runs
  on CUDA (or any torch device) when given one.
- ``DiffusersInpainter``: a local Stable-Diffusion-style inpainting pipeline
  (optional ``diffusers`` extra); never downloads.

Worker processes cannot share a loaded backend, so every backend can describe
itself as an ``InpainterSpec`` (backend name, device, options), which pickles
cheaply and rebuilds the backend with ``InpainterSpec.build()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from spur_assets.core.runtime.devices import resolve_device

BACKENDS = ("opencv", "torch", "diffusers")
DIFFUSERS_PIN = "diffusers==0.42.1"


@runtime_checkable
class Inpainter(Protocol):
    """Fills masked pixels of a batch of images; pixels outside each mask stay exactly as they were."""

    name: str

    def inpaint(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> list[np.ndarray]:
        """HxWx3 uint8 images + HxW bool masks (True = fill) -> new HxWx3 uint8 images."""
        ...


@dataclass(frozen=True)
class InpainterSpec:
    """A picklable recipe for an inpainter: what ``make_inpainter`` takes, kept for later."""

    backend: str
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Inpainter:
        """Construct the inpainter this spec describes (in the calling process)."""
        return make_inpainter(self.backend, device=self.device, **self.options)


def make_inpainter(backend: str, device: str = "cpu", **options: Any) -> Inpainter:
    """Build an inpainter by backend name: "opencv" | "torch" | "diffusers".

    ``device`` ("auto", "cpu", "cuda", "cuda:N", "mps") is resolved by
    ``devices.resolve_device`` and ignored by "opencv" (CPU only); ``options`` go
    to the backend's constructor. An unknown backend raises ValueError listing the choices.
    """
    if backend == "opencv":
        return OpenCVInpainter(**options)
    if backend == "torch":
        return TorchInpainter(device=device, **options)
    if backend == "diffusers":
        return DiffusersInpainter(device=device, **options)
    raise ValueError(f"unknown inpainting backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


def spec_of(inpainter: Inpainter | InpainterSpec) -> InpainterSpec:
    """The picklable spec of an inpainter (or the spec itself); ValueError if it has none."""
    if isinstance(inpainter, InpainterSpec):
        return inpainter
    spec = getattr(inpainter, "spec", None)
    if isinstance(spec, InpainterSpec):
        return spec
    raise ValueError(
        f"inpainter {type(inpainter).__name__} has no `spec`, so worker processes cannot rebuild it; "
        "pass an InpainterSpec (or an inpainter from make_inpainter) when workers > 1"
    )


def _checked_pairs(images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validate shapes/dtypes and return (contiguous uint8 image, bool mask) pairs."""
    if len(images) != len(masks):
        raise ValueError(f"inpaint got {len(images)} images but {len(masks)} masks; pass one mask per image")
    pairs = []
    for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
        image = np.asarray(image)
        mask = np.asarray(mask)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"inpaint image #{index}: expected an HxWx3 uint8 RGB array, got shape {image.shape} "
                f"dtype {image.dtype}; convert with PIL .convert('RGB') first"
            )
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"inpaint mask #{index}: shape {mask.shape} does not match its image's {image.shape[:2]}; "
                "decode the mask at the image's height and width"
            )
        pairs.append((np.ascontiguousarray(image), mask.astype(bool, copy=False)))
    return pairs


def _composite(image: np.ndarray, mask: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """Copy of ``image`` with only the masked pixels taken from ``filled`` (outside stays exact)."""
    out = image.copy()
    out[mask] = filled[mask]
    return out


class OpenCVInpainter:
    """``cv2.inpaint`` per image (fast marching "telea" or Navier–Stokes "ns"); CPU only."""

    name = "opencv"

    def __init__(self, radius: int = 3, method: Literal["telea", "ns"] = "telea") -> None:
        if method not in ("telea", "ns"):
            raise ValueError(f"OpenCVInpainter method {method!r} is unknown; choose 'telea' or 'ns'")
        if radius < 1:
            raise ValueError(f"OpenCVInpainter radius must be >= 1 pixel, got {radius}")
        self.radius = int(radius)
        self.method = method
        self._flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS

    @property
    def spec(self) -> InpainterSpec:
        return InpainterSpec("opencv", "cpu", {"radius": self.radius, "method": self.method})

    def inpaint(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Fill each image's mask with cv2.inpaint; pixels outside the mask are returned unchanged."""
        out = []
        for image, mask in _checked_pairs(images, masks):
            if not mask.any():
                out.append(image.copy())
                continue
            # cv2.inpaint treats channels alike, so RGB order needs no conversion.
            filled = cv2.inpaint(image, mask.astype(np.uint8) * 255, self.radius, self._flag)
            out.append(_composite(image, mask, filled))
        return out


def _pool_pairs(t: torch.Tensor) -> torch.Tensor:
    """Sum 2x2 cells (bottom/right padded with zeros to even size), by explicit adds.

    Explicit element-wise adds, not a reduction kernel, so each cell's sum is
    computed in the same order whatever the tensor size: that is what makes a
    padded batch give bit-identical values to images filled one by one.
    """
    h, w = t.shape[-2:]
    t = F.pad(t, (0, w % 2, 0, h % 2))
    return (t[..., 0::2, 0::2] + t[..., 0::2, 1::2]) + (t[..., 1::2, 0::2] + t[..., 1::2, 1::2])


def _upsample_nearest(t: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Each cell copied into its 2x2 children, cropped to ``shape`` (top-left aligned)."""
    up = t.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    return up[..., : shape[0], : shape[1]]


def _neighbour_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of each cell's 4 neighbours (zero outside the tensor)."""
    p = F.pad(t, (1, 1, 1, 1))
    return (p[..., :-2, 1:-1] + p[..., 2:, 1:-1]) + (p[..., 1:-1, :-2] + p[..., 1:-1, 2:])


class TorchInpainter:
    """Batched multi-scale harmonic fill (pyramid push–pull + masked Jacobi smoothing), pure torch.

    Push: known pixels are averaged up a 2x pyramid until one cell covers each
    image. Pull: from the coarsest level down, each hole cell starts from its
    parent's value, then ``iterations_per_level`` Jacobi steps of the 4-neighbour
    Laplace equation relax the holes with known cells held fixed. The result
    approximates the harmonic (membrane) fill: a uniform surround gives exactly
    its colour, smooth gradients continue smoothly. Images in a batch are padded
    to a common size with cells marked "outside" that never influence an image's
    own cells, so a batch gives the same bytes as images filled one by one.
    """

    name = "torch"

    def __init__(
        self,
        device: str | torch.device = "cpu",
        iterations_per_level: int = 24,
        batch_size: int = 8,
    ) -> None:
        if iterations_per_level < 0:
            raise ValueError(f"TorchInpainter iterations_per_level must be >= 0, got {iterations_per_level}")
        if batch_size < 1:
            raise ValueError(f"TorchInpainter batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.iterations_per_level = int(iterations_per_level)
        self.batch_size = int(batch_size)

    @property
    def spec(self) -> InpainterSpec:
        return InpainterSpec(
            "torch",
            str(self.device),
            {"iterations_per_level": self.iterations_per_level, "batch_size": self.batch_size},
        )

    def inpaint(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Fill each mask by batched multi-scale harmonic fill; outside pixels are returned unchanged."""
        pairs = _checked_pairs(images, masks)
        out: list[np.ndarray] = []
        for start in range(0, len(pairs), self.batch_size):
            out.extend(self._inpaint_batch(pairs[start : start + self.batch_size]))
        return out

    @torch.inference_mode()
    def _inpaint_batch(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        height = max(image.shape[0] for image, _ in pairs)
        width = max(image.shape[1] for image, _ in pairs)
        count = len(pairs)
        colour = torch.zeros((count, 3, height, width), dtype=torch.float32)
        known = torch.zeros((count, 1, height, width), dtype=torch.float32)
        inside = torch.zeros((count, 1, height, width), dtype=torch.float32)
        for i, (image, mask) in enumerate(pairs):
            h, w = mask.shape
            colour[i, :, :h, :w] = torch.tensor(image).permute(2, 0, 1)
            known[i, 0, :h, :w] = torch.tensor(~mask)
            inside[i, 0, :h, :w] = 1.0
        filled = self._fill(colour.to(self.device), known.to(self.device), inside.to(self.device))
        filled = filled.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [
            _composite(image, mask, filled[i, : mask.shape[0], : mask.shape[1]])
            for i, (image, mask) in enumerate(pairs)
        ]

    def _fill(self, colour: torch.Tensor, known: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        # Push: pixel-weighted sums of known colour per cell, per level.
        sums, weights, insides = [colour * known], [known], [inside]
        levels = max(0, math.ceil(math.log2(max(colour.shape[-2:]))))
        for _ in range(levels):
            sums.append(_pool_pairs(sums[-1]))
            weights.append(_pool_pairs(weights[-1]))
            insides.append((_pool_pairs(insides[-1]) > 0).to(colour.dtype))
        # Pull: coarse to fine; a cell with nothing known anywhere in its image ends mid-grey.
        value = torch.full_like(sums[-1], 127.5)
        for level in range(levels, -1, -1):
            weight, inside_level = weights[level], insides[level]
            if level < levels:
                value = _upsample_nearest(value, tuple(weight.shape[-2:]))
            is_known = weight > 0
            value = torch.where(is_known, sums[level] / weight.clamp_min(1e-12), value)
            hole = (~is_known) & (inside_level > 0)
            if not bool(hole.any()):
                continue
            value = self._relax(value, hole, inside_level)
        return value

    def _relax(self, value: torch.Tensor, hole: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        """Jacobi steps on the hole cells, computed only over the holes' bounding box plus a 1-cell rim.

        Cells outside that box are fixed and only the rim is read by a hole's
        4-neighbour stencil, so cropping changes no value and saves most work
        when holes are small.
        """
        rows = torch.nonzero(hole.any(dim=0).any(dim=0).any(dim=1)).flatten()
        cols = torch.nonzero(hole.any(dim=0).any(dim=0).any(dim=0)).flatten()
        top, bottom = max(int(rows[0]) - 1, 0), int(rows[-1]) + 2
        left, right = max(int(cols[0]) - 1, 0), int(cols[-1]) + 2
        box = (..., slice(top, bottom), slice(left, right))
        patch, hole_patch, inside_patch = value[box], hole[box], inside[box]
        count = _neighbour_sum(inside_patch)
        update = hole_patch & (count > 0)
        for _ in range(self.iterations_per_level):
            relaxed = _neighbour_sum(patch * inside_patch) / count.clamp_min(1)
            patch = torch.where(update, relaxed, patch)
        value = value.clone()
        value[box] = patch
        return value


def _import_diffusers() -> Any:
    try:
        import diffusers  # noqa: PLC0415  (optional extra, imported only when this backend is used)
    except ImportError as error:
        raise ImportError(
            "the 'diffusers' inpainting backend needs the optional diffusers package: "
            f"pip install 'spur-assets[diffusers]' (pins {DIFFUSERS_PIN}); "
            "or choose backend 'opencv' or 'torch'"
        ) from error
    return diffusers


class DiffusersInpainter:
    """A local diffusers inpainting pipeline (Stable-Diffusion-inpaint style folder); never downloads.

    ``model_dir`` is a ``save_pretrained`` pipeline folder (``model_index.json``
    plus component folders). Images are resized to a square ``resolution`` for the
    pipeline (default: the UNet's sample size times the VAE scale factor), and the
    result is resized back; only the masked pixels are taken from it. Each image
    gets its own generator seeded with ``seed``, so a result does not depend on
    which batch the image arrived in.
    """

    name = "diffusers"

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        steps: int = 25,
        prompt: str = "empty background, nothing there",
        negative_prompt: str | None = "object, animal, person, text",
        guidance_scale: float = 7.5,
        resolution: int | None = None,
        seed: int = 0,
        batch_size: int = 4,
    ) -> None:
        _import_diffusers()
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{self.model_dir}: no model_index.json here; point model_dir at a local diffusers "
                "inpainting pipeline folder (as written by pipeline.save_pretrained); nothing is downloaded"
            )
        if resolution is not None and resolution % 8:
            raise ValueError(f"DiffusersInpainter resolution must be a multiple of 8, got {resolution}")
        self.device = resolve_device(device)
        self.steps = int(steps)
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.guidance_scale = float(guidance_scale)
        self.resolution = resolution
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self._pipeline: Any = None

    @property
    def spec(self) -> InpainterSpec:
        return InpainterSpec(
            "diffusers",
            str(self.device),
            {
                "model_dir": str(self.model_dir),
                "steps": self.steps,
                "prompt": self.prompt,
                "negative_prompt": self.negative_prompt,
                "guidance_scale": self.guidance_scale,
                "resolution": self.resolution,
                "seed": self.seed,
                "batch_size": self.batch_size,
            },
        )

    def _loaded(self) -> Any:
        if self._pipeline is None:
            diffusers = _import_diffusers()
            pipeline = diffusers.AutoPipelineForInpainting.from_pretrained(self.model_dir, local_files_only=True)
            pipeline = pipeline.to(self.device)
            pipeline.set_progress_bar_config(disable=True)
            self._pipeline = pipeline
        return self._pipeline

    def _working_resolution(self, pipeline: Any) -> int:
        if self.resolution is not None:
            return self.resolution
        return int(pipeline.unet.config.sample_size) * int(pipeline.vae_scale_factor)

    def inpaint(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Fill each mask with the diffusion pipeline; outside pixels are returned unchanged."""
        from PIL import Image  # noqa: PLC0415

        pairs = _checked_pairs(images, masks)
        out: list[np.ndarray | None] = [None] * len(pairs)
        todo = [i for i, (_, mask) in enumerate(pairs) if mask.any()]
        for i, (image, mask) in enumerate(pairs):
            if not mask.any():
                out[i] = image.copy()
        if todo:
            pipeline = self._loaded()
            size = self._working_resolution(pipeline)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            pil_images = [Image.fromarray(pairs[i][0]).resize((size, size), Image.BICUBIC) for i in chunk]
            pil_masks = [
                Image.fromarray(pairs[i][1].astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
                for i in chunk
            ]
            generators = [torch.Generator(device="cpu").manual_seed(self.seed) for _ in chunk]
            result = pipeline(
                prompt=[self.prompt] * len(chunk),
                negative_prompt=None if self.negative_prompt is None else [self.negative_prompt] * len(chunk),
                image=pil_images,
                mask_image=pil_masks,
                height=size,
                width=size,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance_scale,
                generator=generators,
                output_type="np",
            ).images
            for j, i in enumerate(chunk):
                image, mask = pairs[i]
                generated = (np.clip(np.asarray(result[j]), 0.0, 1.0) * 255.0).round().astype(np.uint8)
                generated = cv2.resize(generated, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_CUBIC)
                out[i] = _composite(image, mask, generated)
        return [o for o in out if o is not None]
