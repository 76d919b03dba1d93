"""Images prepared exactly as the checkpoint's own CLIP image processor prepares them.

The reference is the processor itself: `processor(images=PIL.Image.open(path))`, with the class
the project loads checkpoints with (`clip_model._image_processor_class()`), on real-size files
in every mode COCO-like datasets ship.
"""

from __future__ import annotations

import enum
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import PILImageResampling

from spur_assets.core.model import clip_model
from spur_assets.core.model.clip_model import clip_image_processor, load_image_uint8, load_images_uint8, pixel_values_from_uint8
from spur_assets.core.data.preprocessing import ImagePreprocessing, decode_image_uint8, pixel_values

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ProcessorClass = clip_model._image_processor_class()


def _processors() -> dict[str, object]:
    return {
        # openai/clip-vit-base-patch32's settings: the class defaults.
        "clip_default_224": ProcessorClass(),
        # Shortest edge larger than the crop, bilinear (several pretrained CLIPs ship this).
        "edge256_crop224_bilinear": ProcessorClass(
            size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=PILImageResampling.BILINEAR
        ),
        # The project's small from-scratch CLIP.
        "small_64": clip_image_processor(64),
        # Exact resize to 56x72 then a 64x64 crop: zero-pads the height, crops the width;
        # lanczos, and one scalar mean/std for all channels.
        "exact56x72_crop64_lanczos": ProcessorClass(
            size={"height": 56, "width": 72}, crop_size={"height": 64, "width": 64},
            resample=PILImageResampling.LANCZOS, image_mean=0.5, image_std=0.5,
        ),
    }


def _natural_rgb(width: int, height: int, seed: int) -> np.ndarray:
    """Photo-like content: smooth gradients, a few soft blobs, edges and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    channels = []
    for c in range(3):
        value = 60 + 120 * (0.6 * u + 0.4 * v if c == 0 else 0.5 * (1 - u) + 0.5 * v * v if c == 1 else 0.5 + 0.3 * np.sin(6 * u + 3 * v))
        for _ in range(4):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            value += rng.uniform(-80, 80) * np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / (2 * r * r))
        value += 40 * ((x // 37 + y // 53) % 2)  # hard edges, where resamplers differ most
        channels.append(value)
    image = np.stack(channels, axis=-1) + rng.normal(0, 6, size=(height, width, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _write(folder: Path, name: str, image: Image.Image, **save_args) -> Path:
    path = folder / name
    image.save(path, **save_args)
    return path


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("modes")
    sizes = [(640, 480), (480, 640), (333, 500), (1000, 97), (97, 1000), (50, 30)]
    rgb = {size: Image.fromarray(_natural_rgb(*size, seed=sum(size))) for size in sizes}
    alpha = Image.fromarray(np.clip(_natural_rgb(480, 640, seed=3)[..., 0].astype(int) * 2 - 80, 0, 255).astype(np.uint8))
    rgba = rgb[(480, 640)].copy()
    rgba.putalpha(alpha)
    la = rgb[(480, 640)].convert("L")
    la.putalpha(alpha)
    palette = rgb[(333, 500)].convert("P", palette=Image.Palette.ADAPTIVE, colors=200)
    gray16 = np.asarray(rgb[(333, 500)].convert("L"), dtype=np.uint16)
    files = {
        "jpeg_rgb_640x480": _write(folder, "rgb_640x480.jpg", rgb[(640, 480)], quality=90),
        "jpeg_rgb_480x640": _write(folder, "rgb_480x640.jpg", rgb[(480, 640)], quality=90),
        "jpeg_rgb_333x500": _write(folder, "rgb_333x500.jpg", rgb[(333, 500)], quality=90),
        "jpeg_rgb_1000x97": _write(folder, "rgb_1000x97.jpg", rgb[(1000, 97)], quality=90),
        "jpeg_rgb_97x1000": _write(folder, "rgb_97x1000.jpg", rgb[(97, 1000)], quality=90),
        "jpeg_rgb_50x30_smaller_than_crop": _write(folder, "rgb_50x30.jpg", rgb[(50, 30)], quality=90),
        "jpeg_gray_L_640x480": _write(folder, "gray_640x480.jpg", rgb[(640, 480)].convert("L"), quality=90),
        "jpeg_cmyk_480x640": _write(folder, "cmyk_480x640.jpg", rgb[(480, 640)].convert("CMYK"), quality=90),
        "jpeg_cmyk_333x500": _write(folder, "cmyk_333x500.jpg", rgb[(333, 500)].convert("CMYK"), quality=90),
        "png_1_333x500": _write(folder, "bilevel.png", rgb[(333, 500)].convert("1")),
        "png_L_640x480": _write(folder, "gray.png", rgb[(640, 480)].convert("L")),
        "png_L_with_trns_640x480": _write(folder, "gray_trns.png", rgb[(640, 480)].convert("L"), transparency=128),
        "png_LA_480x640": _write(folder, "gray_alpha.png", la),
        "png_P_333x500": _write(folder, "palette.png", palette),
        "png_P_transparency_333x500": _write(folder, "palette_trns.png", palette, transparency=5),
        "png_RGB_1000x97": _write(folder, "rgb.png", rgb[(1000, 97)]),
        "png_RGB_with_trns_640x480": _write(folder, "rgb_trns.png", rgb[(640, 480)], transparency=(120, 120, 120)),
        "png_RGBA_480x640": _write(folder, "rgba.png", rgba),
        # 16-bit grayscale as scanners and medical exports write it (full range) ...
        "png_I16_full_range_333x500": _write(folder, "gray16.png", Image.fromarray(gray16 * 257)),
        # ... and with small values, which survive Pillow's clip to 0..255.
        "png_I16_low_values_333x500": _write(folder, "gray16_low.png", Image.fromarray(gray16 * 2)),
        "png_I16_with_trns_333x500": _write(folder, "gray16_trns.png", Image.fromarray(gray16 * 2), transparency=300),
        "tiff_I_333x500": _write(folder, "int32.tif", Image.fromarray(gray16.astype(np.int32) * 3 - 100)),
        "tiff_F_333x500": _write(folder, "float.tif", Image.fromarray(gray16.astype(np.float32) * 1.3 - 20.25)),
    }
    expected_modes = {"jpeg_gray_L_640x480": "L", "jpeg_cmyk_480x640": "CMYK", "png_1_333x500": "1", "png_LA_480x640": "LA",
                      "png_P_transparency_333x500": "P", "png_RGBA_480x640": "RGBA", "png_I16_full_range_333x500": "I;16",
                      "tiff_I_333x500": "I", "tiff_F_333x500": "F"}
    for key, mode in expected_modes.items():
        with Image.open(files[key]) as opened:
            assert opened.mode == mode, (key, opened.mode)
    return files


def _processor_uint8(processor, path: Path) -> torch.Tensor:
    # The processor's own integer stage: everything up to the crop, with rescale and normalise off.
    with Image.open(path) as image:
        return processor(images=image, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"][0]


def _processor_pixel_values(processor, path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return processor(images=image, return_tensors="pt")["pixel_values"]


# --------------------------------------------------------------------------- equal to the processor


@pytest.mark.parametrize("processor_name", list(_processors()))
def test_decoded_images_equal_the_processor_for_every_mode_and_shape(image_files, processor_name):
    processor = _processors()[processor_name]
    prep = ImagePreprocessing.of(processor)
    std = torch.tensor(prep.image_std).view(1, 3, 1, 1)
    mismatches = []
    for key, path in image_files.items():
        ours_uint8 = decode_image_uint8(path, prep)
        assert ours_uint8.dtype == np.uint8 and ours_uint8.flags["C_CONTIGUOUS"] and ours_uint8.shape == (3, *prep.output_size), key
        ours = pixel_values(torch.from_numpy(ours_uint8)[None], prep)
        expected = _processor_pixel_values(processor, path)
        assert ours.dtype == torch.float32 and ours.shape == expected.shape, key
        # The contract: within one grey level per pixel, in [0, 1] units.
        worst = ((ours - expected).abs() * std).max().item()
        assert worst <= 1 / 255 + 1e-6, (key, worst)
        # What we actually get: the same integers as the processor, and float32 rounding only.
        if not torch.equal(torch.from_numpy(ours_uint8), _processor_uint8(processor, path).to(torch.uint8)):
            mismatches.append(key)
        assert (ours - expected).abs().max().item() < 1e-5, key
    assert not mismatches, f"uint8 differs from {processor_name} for {mismatches}"


def test_mode_conversions_follow_transformers_even_where_odd(image_files):
    """What transformers' convert_to_rgb does per mode, pinned so a Pillow/transformers change shows up here."""
    prep = ImagePreprocessing.of(ProcessorClass(size={"height": 32, "width": 32}, do_center_crop=False))

    def rgb(key: str) -> np.ndarray:
        return decode_image_uint8(image_files[key], prep)

    # Grayscale and bilevel: three equal channels; "1" is 0 or 255 only.
    for key in ("jpeg_gray_L_640x480", "png_1_333x500", "png_L_640x480"):
        image = rgb(key)
        assert (image[0] == image[1]).all() and (image[1] == image[2]).all(), key
    # transformers (through Pillow) clips 16-bit values to 255 instead of scaling by 1/257: a
    # full-range 16-bit PNG comes out almost white. Odd, but it is what the checkpoint's processor
    # feeds the model, so we match it rather than "fix" it.
    assert rgb("png_I16_full_range_333x500").mean() > 250
    assert 0 < rgb("png_I16_low_values_333x500").mean() < 250
    # RGBA, LA and palette-with-transparent-index PNGs: composited
    # onto white, so transparent areas are exactly white before resizing.
    as_stored = ImagePreprocessing.of(ProcessorClass(do_resize=False, do_center_crop=False))
    for key in ("png_RGBA_480x640", "png_LA_480x640", "png_P_transparency_333x500"):
        with Image.open(image_files[key]) as opened:
            transparent = np.asarray(opened.convert("RGBA"))[..., 3] == 0
        assert transparent.any(), key
        assert (decode_image_uint8(image_files[key], as_stored).transpose(1, 2, 0)[transparent] == 255).all(), key


# --------------------------------------------------------------------------- the old API


def _load_image_uint8_before(path: Path, size: int) -> np.ndarray:
    # clip_model.load_image_uint8 as it was before ImagePreprocessing (commit 446f0b6), kept here
    # to prove int callers get the same bytes.
    with Image.open(path) as opened:
        image = opened
        image.load()
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba).convert("RGB")
        else:
            image = image.convert("RGB")
    width, height = image.size
    if (width, height) != (size, size):
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(size * long / short)
        new_width, new_height = (size, new_long) if width <= height else (new_long, size)
        image = image.resize((new_width, new_height), resample=Image.Resampling.BICUBIC)
        top = (new_height - size) // 2
        left = (new_width - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def test_int_size_gives_the_same_bytes_as_before(image_files, tmp_path):
    square = _write(tmp_path, "square.png", Image.fromarray(_natural_rgb(64, 64, seed=9)))
    paths = [*image_files.values(), square]
    for size in (16, 64, 224):
        batch = load_images_uint8(paths, size, workers=2)
        assert batch.shape == (len(paths), 3, size, size)
        for index, path in enumerate(paths):
            before = _load_image_uint8_before(path, size)
            assert np.array_equal(load_image_uint8(path, size), before), (size, path.name)
            assert np.array_equal(batch[index].numpy(), before), (size, path.name)
    # A square image of the target size is not resampled at all.
    assert np.array_equal(load_image_uint8(square, 64), np.asarray(Image.open(square)).transpose(2, 0, 1))


def test_load_images_takes_a_preprocessing_with_a_non_square_crop(image_files):
    prep = ImagePreprocessing.of(ProcessorClass(size={"shortest_edge": 80}, crop_size={"height": 48, "width": 64}))
    paths = [image_files["jpeg_rgb_640x480"], image_files["png_P_transparency_333x500"]]
    batch = load_images_uint8(paths, prep)
    assert batch.shape == (2, 3, 48, 64)
    for index, path in enumerate(paths):
        assert np.array_equal(batch[index].numpy(), decode_image_uint8(path, prep))
        assert np.array_equal(load_image_uint8(path, prep), decode_image_uint8(path, prep))
    no_crop = ImagePreprocessing.of(ProcessorClass(do_center_crop=False))
    with pytest.raises(ValueError, match="crop"):
        load_images_uint8(paths, no_crop)


def test_pixel_values_from_uint8_delegates_and_keeps_its_shape_check(image_files):
    processor = clip_image_processor(64)
    images = load_images_uint8(list(image_files.values())[:4], 64)
    assert torch.equal(pixel_values_from_uint8(images, processor), pixel_values(images, ImagePreprocessing.of(processor)))
    with pytest.raises(ValueError, match=r"\[N, 3, 64, 64\]"):
        pixel_values_from_uint8(images[:, :, :32], processor)
    with pytest.raises(ValueError, match=r"\(48, 64\)"):
        pixel_values(images, ImagePreprocessing.of(ProcessorClass(size={"shortest_edge": 64}, crop_size={"height": 48, "width": 64})))
    with pytest.raises(ValueError, match="uint8"):
        pixel_values(images.float(), ImagePreprocessing.square(64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pixel_values_on_cuda_match_cpu(image_files):
    prep = ImagePreprocessing.of(ProcessorClass())
    images = load_images_uint8(list(image_files.values()), prep)
    on_gpu = pixel_values(images.cuda(), prep)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    torch.testing.assert_close(on_gpu.cpu(), pixel_values(images, prep), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- refusals


def test_max_pixels_is_refused_from_the_header_before_decoding(image_files, tmp_path):
    good = image_files["jpeg_rgb_640x480"]
    # Header intact, pixel data cut off: decoding would fail, so a ValueError (not an OSError)
    # proves the limit was checked before any pixel was decoded.
    truncated = tmp_path / "truncated_640x480.jpg"
    truncated.write_bytes(good.read_bytes()[:2000])
    prep = ImagePreprocessing.square(64)
    with pytest.raises(ValueError, match=r"truncated_640x480\.jpg is 640x480 = 307200 pixels, over max_pixels=300000"):
        decode_image_uint8(truncated, prep, max_pixels=300_000)
    assert decode_image_uint8(good, prep, max_pixels=640 * 480).shape == (3, 64, 64)


def test_truncated_corrupt_and_missing_files_raise_oserror_naming_the_file(image_files, tmp_path):
    truncated = tmp_path / "cut_short.jpg"
    truncated.write_bytes(image_files["jpeg_rgb_640x480"].read_bytes()[:5000])
    with pytest.raises(OSError, match=r"cut_short\.jpg.*truncated or corrupt"):
        decode_image_uint8(truncated, ImagePreprocessing.square(64))
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    with pytest.raises(OSError, match=r"notes\.png"):
        decode_image_uint8(not_an_image, ImagePreprocessing.square(64))
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg"):
        decode_image_uint8(tmp_path / "missing.jpg", ImagePreprocessing.square(64))
    # Old API: still an OSError naming the file.
    with pytest.raises(OSError, match=r"cut_short\.jpg"):
        load_images_uint8([truncated], 16)


def test_rgb_only_when_the_processor_does_not_convert(image_files):
    processor = ProcessorClass(do_convert_rgb=False)
    prep = ImagePreprocessing.of(processor)
    path = image_files["jpeg_rgb_333x500"]
    torch.testing.assert_close(pixel_values(torch.from_numpy(decode_image_uint8(path, prep))[None], prep),
                               _processor_pixel_values(processor, path), atol=1e-5, rtol=0)
    # transformers itself fails on such a file (a 1-channel image against 3-channel mean/std).
    with pytest.raises(OSError, match=r"gray_640x480\.jpg has mode L.*do_convert_rgb=False"):
        decode_image_uint8(image_files["jpeg_gray_L_640x480"], prep)


def test_of_refuses_what_it_cannot_reproduce():
    with pytest.raises(ValueError, match="longest_edge"):
        ImagePreprocessing.of(ProcessorClass(size={"shortest_edge": 224, "longest_edge": 300}))
    with pytest.raises(ValueError, match="do_pad"):
        ImagePreprocessing.of(ProcessorClass(do_pad=True, pad_size={"height": 256, "width": 256}))
    with pytest.raises(TypeError, match="not a transformers 5 image processor"):
        ImagePreprocessing.of(object())
    with pytest.raises(ValueError, match="resample"):
        ImagePreprocessing(**{**_fields(ImagePreprocessing.square(8)), "resample": 9})
    with pytest.raises(ValueError, match="image_std"):
        ImagePreprocessing(**{**_fields(ImagePreprocessing.square(8)), "image_std": (0.5, 0.0, 0.5)})


# --------------------------------------------------------------------------- the data object


def _fields(prep: ImagePreprocessing) -> dict:
    return {name: getattr(prep, name) for name in prep.__dataclass_fields__}


def test_square_is_what_clip_image_processor_configures():
    for size in (16, 64, 224):
        assert ImagePreprocessing.square(size) == ImagePreprocessing.of(clip_image_processor(size))
        assert ImagePreprocessing.square(size).output_size == (size, size)
    with pytest.raises(ValueError, match="size"):
        ImagePreprocessing.square(0)


def test_of_reads_sizes_and_resample_in_any_form():
    expected = ImagePreprocessing.of(ProcessorClass(size={"shortest_edge": 96}, crop_size={"height": 80, "width": 80}))
    # Plain dicts and bare ints (older transformers, hand-edited processors), an int resample and
    # torchvision's InterpolationMode (a str-valued enum; torchvision itself is not installed here).
    interpolation_mode = enum.Enum("InterpolationMode", {"BICUBIC": "bicubic"})
    for size, crop_size, resample in [
        ({"shortest_edge": 96}, {"height": 80, "width": 80}, 3),
        (96, 80, interpolation_mode.BICUBIC),
    ]:
        processor = ProcessorClass()
        processor.size, processor.crop_size, processor.resample = size, crop_size, resample
        assert ImagePreprocessing.of(processor) == expected


@pytest.mark.parametrize("processor_name", list(_processors()))
def test_of_survives_save_pretrained_and_pickling(processor_name, tmp_path):
    processor = _processors()[processor_name]
    prep = ImagePreprocessing.of(processor)
    processor.save_pretrained(tmp_path)
    reloaded = ImagePreprocessing.of(ProcessorClass.from_pretrained(tmp_path))
    assert reloaded == prep and reloaded.fingerprint() == prep.fingerprint()
    unpickled = pickle.loads(pickle.dumps(prep))
    assert unpickled == prep and hash(unpickled) == hash(prep) and unpickled.fingerprint() == prep.fingerprint()


def test_fingerprint_is_stable_and_tracks_every_field():
    prep = ImagePreprocessing.square(224)
    # Pinned: cache keys written by one release must still match in the next.
    assert prep.fingerprint() == "96d842adaa63278a"
    assert len({ImagePreprocessing(**{**_fields(prep), name: value}).fingerprint() for name, value in [
        ("convert_rgb", False), ("shortest_edge", 256), ("resample", 2), ("crop", (224, 200)),
        ("rescale_factor", 1 / 256), ("image_mean", (0.5, 0.5, 0.5)), ("image_std", (0.5, 0.5, 0.5)),
    ]} | {prep.fingerprint()}) == 8
    # Equal behaviour, equal fingerprint: an enum or an int resample, a list or a tuple mean.
    same = ImagePreprocessing(**{**_fields(prep), "resample": PILImageResampling.BICUBIC, "image_mean": list(prep.image_mean)})
    assert same == prep and same.fingerprint() == prep.fingerprint()
