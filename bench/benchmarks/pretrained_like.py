"""A checkpoint folder shaped like openai/clip-vit-base-patch32, with random weights.

For real-size runs without downloading anything: `save_vit_b32_like` writes a
`save_pretrained` folder (safetensors weights, config.json, a byte-level BPE tokenizer
trained on the dataset's captions, CLIP's image processor) that `load_checkpoint` and
plain transformers load like the OpenAI checkpoint. Speed, memory and the data path
depend on the shape, not on the weights, so this stands in for ViT-B/32 wherever the
point is size, not accuracy.

ViT-B/32: vision 224 px, patch 32, 768 wide, 12 layers, 12 heads, MLP 3072; text 512
wide, 12 layers, 8 heads, MLP 2048, 77 positions; projection 512; quick_gelu; logit
scale initialised to ln(1/0.07). Only the vocabulary differs: the tokenizer is trained on
the given captions, up to CLIP's 49408 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerBase

from spur_assets.core.model.clip_model import ClipBundle, clip_image_processor, save_checkpoint, train_caption_tokenizer

CLIP_VOCAB_SIZE = 49408  # openai/clip-vit-base-patch32
CLIP_TEXT_POSITIONS = 77
IMAGE_SIZE, PATCH_SIZE = 224, 32
SHAPES: dict[str, dict] = {
    "vit-b/32": {
        "text": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8},
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        "projection_dim": 512,
    },
    # The same layout (224 px, patch 32, 77 positions, quick_gelu) with towers small enough for tests.
    "tiny": {
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        "projection_dim": 32,
    },
}


def vit_b32_like_config(tokenizer: PreTrainedTokenizerBase, shape: str = "vit-b/32") -> CLIPConfig:
    """The CLIPConfig of `shape` ("vit-b/32" or "tiny") for a tokenizer from `train_caption_tokenizer`."""
    if shape not in SHAPES:
        raise ValueError(f"vit_b32_like_config: unknown shape {shape!r}; use one of {sorted(SHAPES)}")
    layout = SHAPES[shape]
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    common = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "initializer_factor": 1.0}
    return CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "max_position_embeddings": CLIP_TEXT_POSITIONS, **layout["text"], **common, **ids,
        },
        vision_config={"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "num_channels": 3, **layout["vision"], **common},
        projection_dim=layout["projection_dim"],
        logit_scale_init_value=2.6592,
    )


def new_vit_b32_like(captions: Sequence[str], seed: int = 0, shape: str = "vit-b/32") -> ClipBundle:
    """The bundle `save_vit_b32_like` writes: random weights from `seed`, tokenizer trained on `captions`.

    The global torch RNG is left as it was.
    """
    tokenizer = train_caption_tokenizer(captions, vocab_size=CLIP_VOCAB_SIZE, max_length=CLIP_TEXT_POSITIONS)
    config = vit_b32_like_config(tokenizer, shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.eval()
    return ClipBundle(model=model, tokenizer=tokenizer, image_processor=clip_image_processor(IMAGE_SIZE))


def save_vit_b32_like(out_dir: Path, captions: Sequence[str], seed: int = 0, shape: str = "vit-b/32") -> Path:
    """Write a ViT-B/32-shaped CLIP with random weights (seeded) as a checkpoint folder; return `out_dir`.

    The tokenizer is a byte-level BPE trained on `captions` (vocabulary as large as they
    allow, at most 49408; 77 positions); the image processor is CLIP's (224 px, bicubic
    shortest-side resize, centre crop, OpenAI mean/std). Written by `save_checkpoint`:
    safetensors only, renamed into place, an existing `out_dir` replaced. `shape="tiny"`
    gives the same layout with tiny towers. Loads with `load_checkpoint` and with
    `CLIPModel.from_pretrained`, `AutoTokenizer.from_pretrained`,
    `CLIPImageProcessor(Pil).from_pretrained`.
    """
    from transformers.utils import logging as hf_logging

    bundle = new_vit_b32_like(captions, seed=seed, shape=shape)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar
    try:
        return save_checkpoint(bundle, Path(out_dir))
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
