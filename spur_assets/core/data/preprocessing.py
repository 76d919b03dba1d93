"""Images prepared exactly as a checkpoint's own CLIP image processor prepares them.

A transformers image processor is a heavy object tied to one library version; what it does to
an image is a handful of numbers. `ImagePreprocessing` holds those numbers as plain picklable
data (it travels to DataLoader worker processes and into cache keys), `decode_image_uint8` does
the integer part (decode, convert to RGB, resize, centre crop) on one file, and `pixel_values`
does the float part (rescale, mean/std) as tensor ops on a whole batch, on any device.

The reference is transformers 5's PIL backend (`CLIPImageProcessorPil`, used when torchvision
is absent) called on `PIL.Image.open(path)`:

- conversion is transformers' `convert_to_rgb`: an image with an "A" band or a
  `transparency` entry is converted to RGBA and composited onto opaque white, anything else
  goes through Pillow's `convert("RGB")` (so CMYK is Pillow's naive conversion without ICC
  profiles, and 16/32-bit and float modes are clipped to 0..255, not scaled);
- resize is Pillow's `Image.resize` with the processor's resample filter, to the size of
  transformers' `get_resize_output_image_size(..., default_to_square=False)` for
  `shortest_edge`, or exactly (height, width);
- the centre crop uses transformers' offsets, `(h - crop_h) // 2`, and zero-pads an image
  smaller than the crop the way transformers' numpy `center_crop` does;
- no EXIF orientation is applied: the processor given a PIL image does not apply it either
  (only transformers' `load_image(str)` does), and dataset annotations refer to the stored
  pixel grid.

The uint8 images equal the PIL backend's exactly; `pixel_values` differs from its float64
rescale by float32 rounding only (below 1e-6). The torchvision backend (`CLIPImageProcessor`
when torchvision is installed) reads the same settings but resizes with torch kernels, so its
output differs from both by a few grey levels at edges.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# Pillow's resample filters by number (PIL.Image.Resampling), the only values `Image.resize` takes.
PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# torchvision's InterpolationMode values, as a torchvision-backend processor may hold them;
# the same mapping transformers uses (`torch_pil_interpolation_mapping`).
_INTERPOLATION_MODE_TO_PIL = {
    "nearest": 0, "nearest-exact": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5,
}
# transformers' PIL backend falls back to bilinear when a processor has no resample set.
_DEFAULT_RESAMPLE = 2
# The processor methods whose standard behaviour this module reproduces. A processor class that
# overrides one of them does something else to its images, and `ImagePreprocessing.of` refuses it.
_STANDARD_METHODS = (
    "preprocess", "_preprocess_image_like_inputs", "process_image", "_preprocess",
    "resize", "center_crop", "rescale", "normalize",
)
_FINGERPRINT_VERSION = "ImagePreprocessing/1"


@dataclass(frozen=True, kw_only=True)
class ImagePreprocessing:
    """What a CLIP image processor does to an image, as plain picklable data.

    Fields (sizes are (height, width), as transformers writes them):
    - convert_rgb: composite transparency onto white and convert to RGB (transformers'
      `do_convert_rgb`); when False only RGB files are accepted.
    - shortest_edge: resize so the shorter side is this long, the longer side
      int(shortest_edge * long / short); or
    - resize_to: resize to exactly (height, width). At most one of the two; neither = no resize.
    - resample: Pillow filter number (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming).
    - crop: centre crop (height, width), or None.
    - do_rescale / rescale_factor, do_normalize / image_mean / image_std: the float steps of
      `pixel_values`. rescale_factor is None when not rescaling; mean and std are None when
      not normalising.
    Build one with `of(image_processor)` or `square(size)`.
    """

    convert_rgb: bool
    shortest_edge: int | None
    resize_to: tuple[int, int] | None
    resample: int
    crop: tuple[int, int] | None
    do_rescale: bool
    rescale_factor: float | None
    do_normalize: bool
    image_mean: tuple[float, float, float] | None
    image_std: tuple[float, float, float] | None

    def __post_init__(self) -> None:
        # Coerce to canonical plain types so that equality, hashing, pickling and the
        # fingerprint do not depend on whether a value came from JSON, an enum or a list.
        set_field = object.__setattr__
        set_field(self, "convert_rgb", bool(self.convert_rgb))
        set_field(self, "do_rescale", bool(self.do_rescale))
        set_field(self, "do_normalize", bool(self.do_normalize))
        if self.shortest_edge is not None and self.resize_to is not None:
            raise ValueError(
                f"ImagePreprocessing: got shortest_edge={self.shortest_edge} and resize_to={self.resize_to}; "
                "set one of them (or neither, for no resize)."
            )
        if self.shortest_edge is not None:
            set_field(self, "shortest_edge", _positive_int(self.shortest_edge, "shortest_edge"))
        if self.resize_to is not None:
            set_field(self, "resize_to", _height_width(self.resize_to, "resize_to"))
        if self.crop is not None:
            set_field(self, "crop", _height_width(self.crop, "crop"))
        resample = int(self.resample)
        if resample not in PIL_RESAMPLE_NAMES:
            raise ValueError(
                f"ImagePreprocessing: resample={self.resample!r} is not a Pillow resize filter; "
                f"use one of {PIL_RESAMPLE_NAMES}."
            )
        set_field(self, "resample", resample)
        if self.do_rescale or self.rescale_factor is not None:
            if self.rescale_factor is None or not math.isfinite(float(self.rescale_factor)) or float(self.rescale_factor) <= 0:
                raise ValueError(
                    f"ImagePreprocessing: do_rescale is set but rescale_factor={self.rescale_factor!r}; "
                    "give a positive factor such as 1/255."
                )
            set_field(self, "rescale_factor", float(self.rescale_factor))
        if self.do_normalize or self.image_mean is not None or self.image_std is not None:
            set_field(self, "image_mean", _three_floats(self.image_mean, "image_mean"))
            std = _three_floats(self.image_std, "image_std")
            if any(value == 0 for value in std):
                raise ValueError(f"ImagePreprocessing: image_std={std} has a zero; every channel needs a non-zero std.")
            set_field(self, "image_std", std)

    @classmethod
    def of(cls, image_processor: Any) -> ImagePreprocessing:
        """The preprocessing of a transformers 5 CLIP image processor (PIL or torchvision backend).

        Reads do_convert_rgb, do_resize/size/resample, do_center_crop/crop_size,
        do_rescale/rescale_factor and do_normalize/image_mean/image_std, whether sizes are
        SizeDict objects, dicts or ints and whether resample is an enum, an int or a torchvision
        InterpolationMode. Settings that do not change the output are dropped (the rescale factor
        when not rescaling, mean/std when not normalising), so equal behaviour gives equal objects.
        Raises ValueError for settings this module cannot reproduce (padding, longest_edge or
        max_height sizes) and TypeError for a processor class that overrides the standard pipeline.
        """
        name = type(image_processor).__name__
        _check_standard_pipeline(image_processor)
        if getattr(image_processor, "do_pad", None):
            raise ValueError(
                f"ImagePreprocessing.of: {name} has do_pad=True; padding is not reproduced here. "
                "Save the processor with do_pad=False."
            )

        shortest_edge = resize_to = None
        if getattr(image_processor, "do_resize", False):
            size = _size_fields(image_processor, "size")
            # The PIL backend's `resize` checks the keys in this order.
            if size.get("shortest_edge") and size.get("longest_edge"):
                raise ValueError(
                    f"ImagePreprocessing.of: {name}.size={size} caps the longest edge; only shortest_edge or "
                    "height+width resizes are reproduced. Use a processor without longest_edge."
                )
            if size.get("shortest_edge"):
                shortest_edge = size["shortest_edge"]
            elif size.get("height") and size.get("width"):
                resize_to = (size["height"], size["width"])
            else:
                raise ValueError(
                    f"ImagePreprocessing.of: {name}.size={size} is not a shortest_edge or height+width size; "
                    "only those two resize rules are reproduced."
                )

        crop = None
        if getattr(image_processor, "do_center_crop", False):
            crop_size = _size_fields(image_processor, "crop_size")
            if not (crop_size.get("height") and crop_size.get("width")):
                raise ValueError(
                    f"ImagePreprocessing.of: {name}.crop_size={crop_size} needs height and width, "
                    "as transformers' center_crop does."
                )
            crop = (crop_size["height"], crop_size["width"])

        do_rescale = bool(getattr(image_processor, "do_rescale", False))
        do_normalize = bool(getattr(image_processor, "do_normalize", False))
        return cls(
            convert_rgb=bool(getattr(image_processor, "do_convert_rgb", False)),
            shortest_edge=shortest_edge,
            resize_to=resize_to,
            resample=_pil_resample(getattr(image_processor, "resample", None), name),
            crop=crop,
            do_rescale=do_rescale,
            rescale_factor=getattr(image_processor, "rescale_factor", None) if do_rescale else None,
            do_normalize=do_normalize,
            image_mean=_channel_values(getattr(image_processor, "image_mean", None)) if do_normalize else None,
            image_std=_channel_values(getattr(image_processor, "image_std", None)) if do_normalize else None,
        )

    @classmethod
    def square(cls, size: int) -> ImagePreprocessing:
        """The preprocessing of `clip_model.clip_image_processor(size)`: square `size` x `size` inputs.

        Bicubic shortest-edge resize to `size`, centre crop `size` x `size`, rescale by 1/255,
        OpenAI CLIP mean/std, transparency composited onto white.
        """
        # Imported here, not at module level: worker processes that unpickle an
        # ImagePreprocessing should not pay for importing transformers.
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        side = _positive_int(size, "size")
        return cls(
            convert_rgb=True,
            shortest_edge=side,
            resize_to=None,
            resample=3,  # bicubic, CLIPImageProcessor's class default
            crop=(side, side),
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=tuple(OPENAI_CLIP_MEAN),
            image_std=tuple(OPENAI_CLIP_STD),
        )

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of every prepared image: the crop, else the exact resize.

        Raises ValueError when the size depends on each image (shortest-edge resize or no resize
        without a crop), because such images cannot be stacked into one batch.
        """
        if self.crop is not None:
            return self.crop
        if self.resize_to is not None:
            return self.resize_to
        raise ValueError(
            f"ImagePreprocessing: without a centre crop, {'the shortest-edge resize' if self.shortest_edge else 'no resize'} "
            "gives each image its own size; set do_center_crop (crop_size) or an exact height+width size."
        )

    @property
    def decoding(self) -> tuple:
        """The fields that decide the prepared uint8 pixels (RGB conversion, resize, crop), not the float steps.

        Two preprocessings with equal `decoding` turn a file into the same uint8 array, so one
        decode serves both; only `pixel_values` differs.
        """
        return (self.convert_rgb, self.shortest_edge, self.resize_to, self.resample, self.crop)

    def fingerprint(self) -> str:
        """A 16-hex-digit SHA-256 of the fields, stable across processes and machines, for cache keys."""
        canonical = json.dumps({"version": _FINGERPRINT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def decode_image_uint8(path: str | Path, prep: ImagePreprocessing, max_pixels: int | None = None) -> np.ndarray:
    """One image file prepared as `prep` says: a C-contiguous uint8 array [3, H, W].

    Decode with Pillow, convert to RGB, resize and centre crop exactly as transformers' PIL
    backend does (see the module docstring). When `max_pixels` is given and the file's width *
    height exceeds it, raises ValueError naming the file, its size and the limit before any pixel
    is decoded (only the header is read). A missing, unreadable, truncated or unconvertible file
    raises OSError naming the file.
    """
    try:
        opened = Image.open(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"decode_image_uint8: no image file at {path}; check the dataset's image paths or restore the file."
        ) from error
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"decode_image_uint8: {path} is too large for Pillow ({error}); downscale the file or remove it from the dataset."
        ) from error
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise OSError(
            f"decode_image_uint8: cannot read image {path}: {error}; check the file (re-encode it as JPEG or PNG) "
            "or remove it from the dataset."
        ) from error

    with opened:
        width, height = opened.size  # from the header; no pixel decoded yet
        if max_pixels is not None and width * height > max_pixels:
            raise ValueError(
                f"decode_image_uint8: {path} is {width}x{height} = {width * height} pixels, over max_pixels={max_pixels}; "
                "downscale the file, drop it from the dataset, or raise max_pixels."
            )
        try:
            opened.load()
        except (OSError, ValueError, SyntaxError, EOFError) as error:
            raise OSError(
                f"decode_image_uint8: cannot decode image {path} ({opened.format} {width}x{height}, mode {opened.mode}): {error}; "
                "the file is truncated or corrupt: re-download or re-encode it, or remove it from the dataset."
            ) from error
        # Convert while the file is open: closing an image that was not converted frees its pixels.
        image = _to_rgb(opened, prep, path)

    image = _resize(image, prep)
    array = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    if prep.crop is not None:
        array = _center_crop(array, prep.crop)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def pixel_values(images_uint8: torch.Tensor, prep: ImagePreprocessing) -> torch.Tensor:
    """Model input from prepared uint8 images [N, 3, H, W]: rescale and mean/std as float32 tensor ops.

    Runs on the input's device and returns float32 there. Equals the processor's `pixel_values`
    for the same files up to float32 rounding. Raises ValueError when the images are not uint8
    [N, 3, H, W], or not of `prep.output_size` when that size is fixed.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
        raise ValueError(
            f"pixel_values: expected uint8 images [N, 3, H, W], got {images_uint8.dtype} {tuple(images_uint8.shape)}; "
            "prepare them with decode_image_uint8 or clip_model.load_images_uint8."
        )
    if prep.crop is not None or prep.resize_to is not None:
        expected = prep.output_size
        if tuple(images_uint8.shape[2:]) != expected:
            raise ValueError(
                f"pixel_values: images are {tuple(images_uint8.shape[2:])} (height, width) but this preprocessing "
                f"produces {expected}; prepare them with the same ImagePreprocessing."
            )
    # Same float32 operations, in the same order, as clip_model.pixel_values_from_uint8 always used,
    # so embeddings computed before this module existed are reproduced bit for bit.
    pixels = images_uint8.to(torch.float32)
    if prep.do_rescale:
        pixels = pixels * float(prep.rescale_factor)
    if prep.do_normalize:
        mean = torch.tensor(prep.image_mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(prep.image_std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        pixels = (pixels - mean) / std
    return pixels


# --------------------------------------------------------------------------- the steps


def _to_rgb(image: Image.Image, prep: ImagePreprocessing, path: str | Path) -> Image.Image:
    # transformers.image_transforms.convert_to_rgb, step for step: its alpha test is "an 'A' band or
    # a transparency entry", so it also routes LAB (bands L, A, B) through RGBA; we keep that.
    if not prep.convert_rgb:
        if image.mode != "RGB":
            raise OSError(
                f"decode_image_uint8: {path} has mode {image.mode} and the processor has do_convert_rgb=False; "
                "re-encode the file as RGB or use a processor with do_convert_rgb=True."
            )
        return image.copy()
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise OSError(
            f"decode_image_uint8: cannot convert image {path} (mode {image.mode}) to RGB: {error}; "
            "re-encode the file as 8-bit RGB or remove it from the dataset."
        ) from error


def _resize(image: Image.Image, prep: ImagePreprocessing) -> Image.Image:
    width, height = image.size
    if prep.shortest_edge is not None:
        # transformers' get_resize_output_image_size(size=shortest_edge, default_to_square=False).
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(prep.shortest_edge * long / short)
        new_width, new_height = (prep.shortest_edge, new_long) if width <= height else (new_long, prep.shortest_edge)
    elif prep.resize_to is not None:
        new_height, new_width = prep.resize_to
    else:
        return image
    # Pillow returns a plain copy for a same-size resize; skipping it gives the same pixels.
    if (new_width, new_height) == (width, height):
        return image
    return image.resize((new_width, new_height), resample=prep.resample)


def _center_crop(array: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    # transformers.image_transforms.center_crop on [H, W, C]: floor offsets, and an image smaller
    # than the crop is first zero-padded with ceil((new - old) / 2) before it.
    height, width = array.shape[:2]
    crop_height, crop_width = crop
    top = (height - crop_height) // 2
    left = (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return array[top : top + crop_height, left : left + crop_width]
    padded_height, padded_width = max(crop_height, height), max(crop_width, width)
    top_pad = math.ceil((padded_height - height) / 2)
    left_pad = math.ceil((padded_width - width) / 2)
    padded = np.zeros((padded_height, padded_width) + array.shape[2:], dtype=array.dtype)
    padded[top_pad : top_pad + height, left_pad : left_pad + width] = array
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top) : min(padded_height, top + crop_height), max(0, left) : min(padded_width, left + crop_width)]


# --------------------------------------------------------------------------- reading processors


def _check_standard_pipeline(image_processor: Any) -> None:
    from transformers.image_processing_backends import PilBackend, TorchvisionBackend

    name = type(image_processor).__name__
    for backend in (PilBackend, TorchvisionBackend):
        if isinstance(image_processor, backend):
            overridden = [m for m in _STANDARD_METHODS if getattr(type(image_processor), m, None) is not getattr(backend, m, None)]
            if overridden:
                raise TypeError(
                    f"ImagePreprocessing.of: {name} overrides {overridden} of transformers' {backend.__name__}, so it may do "
                    "more than convert/resize/crop/rescale/normalise; only the standard CLIP pipeline is reproduced."
                )
            return
    raise TypeError(
        f"ImagePreprocessing.of: {name} is not a transformers 5 image processor (PilBackend or TorchvisionBackend); "
        "pass the checkpoint's CLIPImageProcessor(Pil), e.g. clip_model.load_checkpoint(path).image_processor."
    )


def _size_fields(image_processor: Any, attribute: str) -> dict[str, int]:
    # transformers 5 keeps sizes as SizeDict objects; dicts and bare ints come from older code or
    # hand-built processors. Only the keys that are set are returned.
    value = getattr(image_processor, attribute, None)
    name = type(image_processor).__name__
    if value is None:
        raise ValueError(
            f"ImagePreprocessing.of: {name}.{attribute} is not set but the step using it is enabled; "
            f"set {attribute} in the processor config."
        )
    if not isinstance(value, Mapping) and not hasattr(value, "__dataclass_fields__"):
        from transformers.image_processing_utils import get_size_dict

        default_to_square = getattr(image_processor, "default_to_square", True) if attribute == "size" else True
        value = get_size_dict(value, default_to_square=bool(default_to_square), param_name=attribute)
    items = value.items() if isinstance(value, Mapping) else iter(value)
    return {key: int(number) for key, number in items if number is not None}


def _pil_resample(resample: Any, processor_name: str) -> int:
    if resample is None:
        return _DEFAULT_RESAMPLE
    if isinstance(resample, int):  # int, PIL.Image.Resampling and transformers' PILImageResampling
        return int(resample)
    mode = getattr(resample, "value", resample)  # torchvision InterpolationMode
    if isinstance(mode, str) and mode.lower() in _INTERPOLATION_MODE_TO_PIL:
        return _INTERPOLATION_MODE_TO_PIL[mode.lower()]
    # The PIL backend quietly falls back to bilinear here; refusing is safer than guessing.
    raise ValueError(
        f"ImagePreprocessing.of: {processor_name}.resample={resample!r} is neither a Pillow filter nor a torchvision "
        f"InterpolationMode; set resample to one of {PIL_RESAMPLE_NAMES} in the processor config."
    )


def _channel_values(value: Any) -> tuple[float, ...] | None:
    # transformers accepts one float for all channels.
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(v) for v in value)


# --------------------------------------------------------------------------- field checks


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) <= 0:
        raise ValueError(f"ImagePreprocessing: {field}={value!r} must be a positive int (pixels).")
    return int(value)


def _height_width(value: Any, field: str) -> tuple[int, int]:
    if not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"ImagePreprocessing: {field}={value!r} must be a (height, width) pair.")
    return (_positive_int(value[0], f"{field}[0] (height)"), _positive_int(value[1], f"{field}[1] (width)"))


def _three_floats(value: Any, field: str) -> tuple[float, float, float]:
    if value is None or isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise ValueError(f"ImagePreprocessing: do_normalize is set but {field}={value!r}; give one value per RGB channel (3 floats).")
    values = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"ImagePreprocessing: {field}={values} has a non-finite value.")
    return values
