"""Inpainting backends: outside pixels exact, fills match the surround, batching changes nothing."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from spur_assets.core.counterfactuals.inpaint import (
    DiffusersInpainter,
    InpainterSpec,
    OpenCVInpainter,
    TorchInpainter,
    make_inpainter,
    spec_of,
)

BACKENDS = [OpenCVInpainter(), OpenCVInpainter(method="ns"), TorchInpainter()]
BACKEND_IDS = ["opencv-telea", "opencv-ns", "torch"]


def square_hole(height: int, width: int, top: int, left: int, size: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def noisy_field(rng: np.random.Generator, height: int, width: int, colour, sd: float) -> np.ndarray:
    field = np.asarray(colour, dtype=float) + rng.normal(0.0, sd, (height, width, 3))
    return field.round().clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("inpainter", BACKENDS, ids=BACKEND_IDS)
def test_uniform_field_is_filled_with_its_colour_and_outside_is_untouched(inpainter):
    rng = np.random.default_rng(3)
    colour = np.array([90, 150, 60])
    sd = 6.0
    image = noisy_field(rng, 64, 80, colour, sd)
    # A marker the fill must erase: the hole holds a saturated red square.
    image[20:44, 28:52] = (255, 0, 0)
    mask = square_hole(64, 80, 20, 28, 24)

    (out,) = inpainter.inpaint([image], [mask])

    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out[~mask], image[~mask])
    filled = out[mask].astype(float)
    # Every backend fills with a (weighted) average of surrounding pixels, so the
    # noise (sd 6) averages out: the mean sits within half an sd of the field colour,
    # and no pixel strays beyond 3 sd, while the red marker was 165+ levels away.
    np.testing.assert_allclose(filled.mean(axis=0), colour, atol=sd / 2)
    assert np.abs(filled - colour).max() <= 3 * sd


@pytest.mark.parametrize("inpainter", BACKENDS, ids=BACKEND_IDS)
def test_hole_across_two_colours_takes_each_side_from_its_neighbours(inpainter):
    rng = np.random.default_rng(4)
    red, blue = np.array([200, 40, 30]), np.array([30, 60, 210])
    image = noisy_field(rng, 48, 96, red, 3.0)
    image[:, 48:] = noisy_field(rng, 48, 48, blue, 3.0)
    mask = np.zeros((48, 96), dtype=bool)
    mask[14:34, 28:68] = True

    (out,) = inpainter.inpaint([image], [mask])

    np.testing.assert_array_equal(out[~mask], image[~mask])
    left_strip = out[14:34, 28:36].reshape(-1, 3).mean(axis=0)
    right_strip = out[14:34, 60:68].reshape(-1, 3).mean(axis=0)
    assert np.linalg.norm(left_strip - red) < np.linalg.norm(left_strip - blue)
    assert np.linalg.norm(right_strip - blue) < np.linalg.norm(right_strip - red)


def test_torch_fill_reproduces_a_linear_ramp():
    # Linear functions are harmonic (and solve the discrete Laplace equation
    # exactly), so a membrane fill of a ramp is the ramp itself; allow 1 level for rounding.
    height, width = 64, 96
    ramp = np.linspace(40, 220, width)
    image = np.repeat(np.repeat(ramp[None, :, None], height, 0), 3, 2).round().astype(np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    mask[16:48, 30:70] = True

    (out,) = TorchInpainter().inpaint([image], [mask])

    assert np.abs(out.astype(int) - image.astype(int)).max() <= 1


def test_torch_batched_equals_one_by_one():
    rng = np.random.default_rng(5)
    shapes = [(37, 53), (64, 48), (90, 71), (20, 20)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    masks = [rng.random((h, w)) < 0.3 for h, w in shapes]
    masks[3][:] = True  # a fully masked image must not borrow colour from its batch mates
    inpainter = TorchInpainter(batch_size=4)

    batched = inpainter.inpaint(images, masks)
    single = [inpainter.inpaint([image], [mask])[0] for image, mask in zip(images, masks, strict=True)]

    for one, other in zip(batched, single, strict=True):
        np.testing.assert_array_equal(one, other)
    # Nothing known anywhere: the documented fallback is mid-grey.
    assert set(np.unique(batched[3])) <= {127, 128}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_on_cuda_matches_cpu():
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    mask = square_hole(120, 160, 30, 40, 50)
    (on_cpu,) = TorchInpainter("cpu").inpaint([image], [mask])
    (on_cuda,) = TorchInpainter("cuda").inpaint([image], [mask])
    np.testing.assert_array_equal(on_cuda[~mask], image[~mask])
    assert np.abs(on_cuda.astype(int) - on_cpu.astype(int)).max() <= 1


@pytest.mark.parametrize("inpainter", BACKENDS, ids=BACKEND_IDS)
def test_empty_mask_returns_an_equal_copy(inpainter):
    image = np.random.default_rng(7).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    (out,) = inpainter.inpaint([image], [np.zeros((16, 24), dtype=bool)])
    np.testing.assert_array_equal(out, image)
    assert out is not image


def test_mismatched_mask_is_refused_naming_its_index():
    image = np.zeros((16, 24, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"mask #1: shape \(24, 16\)"):
        OpenCVInpainter().inpaint([image, image], [np.zeros((16, 24), bool), np.zeros((24, 16), bool)])
    with pytest.raises(ValueError, match=r"image #0: expected an HxWx3 uint8"):
        TorchInpainter().inpaint([image[..., 0]], [np.zeros((16, 24), bool)])


def _through_worker(spec):
    return spec


def test_make_inpainter_and_specs_round_trip_through_a_spawned_worker():
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with pytest.raises(ValueError, match="opencv, torch, diffusers"):
        make_inpainter("lama")
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    for backend, options in [("opencv", {"radius": 5, "method": "ns"}), ("torch", {"iterations_per_level": 7})]:
        built = make_inpainter(backend, **options)
        spec = pool.submit(_through_worker, spec_of(built)).result()  # what counterfactual workers receive
        rebuilt = spec.build()
        assert type(rebuilt) is type(built)
        assert rebuilt.spec == built.spec
        for key, value in options.items():
            assert getattr(rebuilt, key) == value
    pool.shutdown()
    assert spec_of(InpainterSpec("opencv")) == InpainterSpec("opencv")


def test_diffusers_backend_names_the_extra_when_diffusers_is_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'spur-assets\[diffusers\]'"):
        make_inpainter("diffusers", model_dir=tmp_path)


def test_diffusers_backend_refuses_a_folder_without_a_pipeline(tmp_path):
    pytest.importorskip("diffusers")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        DiffusersInpainter(tmp_path / "nowhere")


def _byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, each symbol alone and as a word end, plus the two specials."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    symbols = [chr(code) for code in codes]
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


@pytest.fixture(scope="module")
def tiny_inpainting_pipeline(tmp_path_factory):
    """A randomly initialised Stable-Diffusion inpainting pipeline, built from configs (as diffusers' tests do)."""
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=9,  # latents + masked-image latents + mask
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )
    vocab = _byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(vocab),
            max_position_embeddings=77,
        )
    )
    pipeline = diffusers.StableDiffusionInpaintPipeline(
        unet=unet,
        vae=vae,
        scheduler=diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("tiny-sd-inpaint")
    pipeline.save_pretrained(folder)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    return folder


def test_diffusers_backend_end_to_end_on_a_tiny_local_pipeline(tiny_inpainting_pipeline):
    rng = np.random.default_rng(8)
    images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)]
    masks = [square_hole(40, 50, 10, 10, 16), square_hole(30, 30, 4, 6, 10)]
    inpainter = make_inpainter("diffusers", model_dir=tiny_inpainting_pipeline, steps=2)

    batched = inpainter.inpaint(images, masks)

    for image, mask, out in zip(images, masks, batched, strict=True):
        assert out.shape == image.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out[~mask], image[~mask])
        assert (out[mask] != image[mask]).any()  # the pipeline's output was composited in
    # One generator per image, seeded alike: an image's fill does not depend on its batch.
    (alone,) = inpainter.inpaint([images[1]], [masks[1]])
    assert np.abs(alone.astype(int) - batched[1].astype(int)).max() <= 1
    assert spec_of(inpainter).options["model_dir"] == str(tiny_inpainting_pipeline)
