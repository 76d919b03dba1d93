"""The small CLIP: tokenizer, checkpoints loadable by plain transformers, image loading and embeddings."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from spur_assets.core.model.clip_model import (
    checkpoint_sha256,
    embed_images,
    embed_texts,
    load_checkpoint,
    load_images_uint8,
    new_small_clip,
    pixel_values_from_uint8,
    save_checkpoint,
    train_caption_tokenizer,
)
from spur_assets.core.runtime.devices import autocast_for, resolve_device

CAPTIONS = [
    "A dog catching a frisbee in the park.",
    "Two dogs playing with a red frisbee",
    "a cat sleeping on a sofa",
    "A man riding a surfboard on a wave.",
    "People standing next to a bus at the stop",
    "a plate of food with broccoli and carrots",
    "A giraffe eating leaves from a tall tree.",
    "Three zebras grazing in a field",
] * 4

TINY = dict(vocab_size=300, max_text_length=16, patch_size=8, width=32, layers=1, heads=2, projection_dim=16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_bundle():
    return new_small_clip(CAPTIONS, image_size=16, seed=0, **TINY)


def _write_images(folder: Path) -> list[Path]:
    """A few PNGs of different shapes and modes: RGB non-square both ways, L, RGBA with transparency."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    specs = [("rgb_wide.png", "RGB", (30, 20)), ("rgb_tall.png", "RGB", (17, 41)), ("gray.png", "L", (25, 25)),
             ("alpha.png", "RGBA", (22, 19)), ("exact.png", "RGB", (16, 16))]
    paths = []
    for name, mode, (width, height) in specs:
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
        if mode == "RGBA":
            array[:5, :5, 3] = 0  # fully transparent corner
        image = Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)
        image.save(folder / name)
        paths.append(folder / name)
    return paths


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_adds_bos_eos_and_round_trips_normalised_text():
    tokenizer = train_caption_tokenizer(CAPTIONS, vocab_size=300, max_length=16)
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2, 3)
    ids = tokenizer("A Dog catching a Frisbee.")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a dog catching a frisbee."
    # NFKC folds the "fi" ligature and full-width letters; unseen characters still round-trip (byte level).
    assert tokenizer.decode(tokenizer("Ａ ﬁsh")["input_ids"], skip_special_tokens=True) == "a fish"
    assert tokenizer.decode(tokenizer("un café ☕")["input_ids"], skip_special_tokens=True) == "un café ☕"
    assert tokenizer.unk_token_id not in tokenizer("un café ☕ 🐶")["input_ids"]
    long = tokenizer("a dog " * 40, truncation=True, max_length=16)["input_ids"]
    assert len(long) == 16 and long[0] == 2 and long[-1] == 3


def test_tokenizer_training_is_deterministic():
    # Each `tokenizers` trainer hashes with its own random state, so two runs in one process
    # exercise the same nondeterminism as two processes would.
    first = train_caption_tokenizer(CAPTIONS, vocab_size=300)
    second = train_caption_tokenizer(CAPTIONS, vocab_size=300)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert len(first) > 256 + 4  # it learned merges, not just bytes


# --------------------------------------------------------------------------- checkpoints


PLAIN_TRANSFORMERS_SCRIPT = r"""
import json, sys
import numpy as np, torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
folder, texts_json, out = sys.argv[1], sys.argv[2], sys.argv[3]
texts = json.loads(open(texts_json).read())["texts"]
images = [Image.open(p) for p in json.loads(open(texts_json).read())["images"]]
model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
processor = CLIPImageProcessor.from_pretrained(folder)
with torch.no_grad():
    t = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    text = model.get_text_features(**t).pooler_output
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    image = model.get_image_features(pixel_values=pixels).pooler_output
text = torch.nn.functional.normalize(text, dim=-1).numpy()
image = torch.nn.functional.normalize(image, dim=-1).numpy()
assert not any(m.startswith("spur_assets") for m in sys.modules), "must not import project code"
np.savez(out, text=text, image=image, pixels=pixels.numpy(), ids=t["input_ids"].numpy())
"""


def test_checkpoint_loads_in_plain_transformers_with_same_embeddings(tiny_bundle, tmp_path):
    folder = save_checkpoint(tiny_bundle, tmp_path / "ckpt")
    names = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in names and "config.json" in names
    assert "tokenizer.json" in names and "preprocessor_config.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert not list(tmp_path.glob(".ckpt*"))  # no temp folder left behind

    image_paths = _write_images(tmp_path / "images")
    texts = ["a dog catching a frisbee", "three zebras", "A CAT on a sofa, sleeping."]
    (tmp_path / "inputs.json").write_text(json.dumps({"texts": texts, "images": [str(p) for p in image_paths]}))
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS_SCRIPT, str(folder), str(tmp_path / "inputs.json"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plain = np.load(tmp_path / "out.npz")

    ids = plain["ids"]
    assert (ids[:, 0] == 2).all() and all(3 in row for row in ids)

    images_uint8 = load_images_uint8(image_paths, size=16, workers=2)
    ours_pixels = pixel_values_from_uint8(images_uint8, tiny_bundle.image_processor).numpy()
    np.testing.assert_allclose(ours_pixels, plain["pixels"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(embed_texts(tiny_bundle, texts).numpy(), plain["text"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(embed_images(tiny_bundle, images_uint8).numpy(), plain["image"], atol=1e-5, rtol=0)

    reloaded = load_checkpoint(folder)
    assert reloaded.path == folder
    torch.testing.assert_close(embed_texts(reloaded, texts), embed_texts(tiny_bundle, texts), atol=1e-6, rtol=0)


def test_save_checkpoint_replaces_existing_folder_and_hash_is_content_based(tiny_bundle, tmp_path):
    folder = save_checkpoint(tiny_bundle, tmp_path / "ckpt")
    (folder / "stale.txt").write_text("from an older save")
    save_checkpoint(tiny_bundle, folder)
    assert not (folder / "stale.txt").exists()

    digest = checkpoint_sha256(folder)
    assert len(digest) == 64
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    assert checkpoint_sha256(copy) == digest
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert checkpoint_sha256(copy) != digest
    (copy / "config.json").write_text((folder / "config.json").read_text())
    (copy / "config.json").rename(copy / "config2.json")
    assert checkpoint_sha256(copy) != digest


def test_load_checkpoint_refuses_eos_mismatch_and_missing_folder(tiny_bundle, tmp_path):
    folder = save_checkpoint(tiny_bundle, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="eos_token_id=5"):
        load_checkpoint(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere" / "ckpt")


# --------------------------------------------------------------------------- images and embeddings


def test_pixel_values_equal_clip_image_processor():
    rng = np.random.default_rng(0)
    for processor, size in [
        (CLIPImageProcessorPil(), 224),  # the OpenAI defaults
        (CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                               image_mean=[0.1, 0.5, 0.9], image_std=[0.2, 0.3, 0.4]), 16),
    ]:
        images = rng.integers(0, 256, size=(3, size, size, 3), dtype=np.uint8)
        expected = processor(images=list(images), return_tensors="pt")["pixel_values"]
        ours = pixel_values_from_uint8(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), processor)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"\[N, 3, 16, 16\]"):
        pixel_values_from_uint8(torch.zeros((1, 3, 8, 8), dtype=torch.uint8), processor)


def test_load_images_converts_modes_like_transformers(tmp_path):
    paths = _write_images(tmp_path)
    images = load_images_uint8(paths, size=16)
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.uint8
    # Exact-size image: untouched pixels.
    exact = np.array(Image.open(paths[4]).convert("RGB")).transpose(2, 0, 1).copy()
    assert torch.equal(images[4], torch.from_numpy(exact))
    # Gray: three equal channels.
    assert torch.equal(images[2][0], images[2][1]) and torch.equal(images[2][1], images[2][2])
    # Wide 30x20 -> 24x16 bicubic, then columns 4..20 (hand-computed offsets).
    reference = np.asarray(Image.open(paths[0]).resize((24, 16), Image.Resampling.BICUBIC))[:, 4:20].transpose(2, 0, 1)
    assert torch.equal(images[0], torch.from_numpy(np.ascontiguousarray(reference)))
    # Transparent corner of the RGBA image composited onto white.
    rgba = Image.open(paths[3])
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    composited = Image.alpha_composite(background, rgba).convert("RGB")
    assert np.asarray(composited)[:5, :5].min() == 255
    with pytest.raises(OSError, match="missing.png"):
        load_images_uint8([tmp_path / "missing.png"], size=16)


def test_text_embedding_pools_on_eos_so_padding_does_not_matter(tiny_bundle):
    alone = embed_texts(tiny_bundle, ["a cat"])
    padded = embed_texts(tiny_bundle, ["a cat", "a giraffe eating leaves from a tall tree next to three zebras"])
    torch.testing.assert_close(padded[0:1], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(padded[0], padded[1], atol=1e-3)
    assert torch.allclose(padded.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert tiny_bundle.model.config.text_config.eos_token_id == tiny_bundle.tokenizer.eos_token_id == 3


def test_embed_images_batches_and_reports_progress(tiny_bundle):
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    seen = []
    batched = embed_images(tiny_bundle, images, batch_size=2, progress=lambda done, total: seen.append((done, total)))
    whole = embed_images(tiny_bundle, images, batch_size=64)
    torch.testing.assert_close(batched, whole, atol=1e-5, rtol=0)
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert batched.dtype == torch.float32 and batched.device.type == "cpu"


# --------------------------------------------------------------------------- devices


def test_resolve_device_honours_preferences():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    if torch.cuda.is_available():
        assert auto.type == "cuda"
    elif not torch.backends.mps.is_available():
        assert auto == torch.device("cpu")
        with pytest.raises(RuntimeError, match="'cuda'"):
            resolve_device("cuda")
        with pytest.raises(RuntimeError, match="'cuda:1'"):
            resolve_device("cuda:1")
    with pytest.raises(ValueError, match="gpu0"):
        resolve_device("gpu0")
    assert isinstance(autocast_for(torch.device("cpu")), contextlib.nullcontext)


def test_captions_tokenized_ahead_in_batches_embed_as_one_batch_in_order(tiny_bundle):
    texts = [f"a {colour} cat next to {n} dogs" for colour in ("red", "blue", "green") for n in range(7)]
    whole = embed_texts(tiny_bundle, texts, batch_size=len(texts))
    seen: list[tuple[int, int]] = []
    # batches of 4: the next batch is tokenized in a helper thread while this one is embedded
    batched = embed_texts(tiny_bundle, texts, batch_size=4, progress=lambda done, total: seen.append((done, total)))
    torch.testing.assert_close(batched, whole, atol=1e-5, rtol=0)
    assert seen == [(min(end, len(texts)), len(texts)) for end in range(4, len(texts) + 4, 4)]
    assert embed_texts(tiny_bundle, [], batch_size=4).shape[0] == 0
