"""Benchmark 2: embedding throughput through the pipeline's data path vs the raw model forward.

Pipeline path = what `evaluation.embed_eval_set` does for metric_report: image files ->
`load_images_uint8` (decode, resize, centre crop; `workers` threads, 1 as metric_report
calls it) -> `embed_images` (uint8 -> normalised float, forward, L2 normalise, to CPU),
`batch_size * 8` files read at a time; captions -> `embed_texts` (tokenize + forward).
Raw forward = `get_image_features` / `get_text_features` on pre-decoded, pre-normalised
pixel tensors / pre-tokenized ids, same batches, same autocast: the limit.

Two settings: the built-in data with the demo's base model (64-px PNG scenes, the
2-layer 64-wide CLIP of `BaseCheckpointConfig`) and COCO-like inputs (640x480 JPEGs, a
CLIP shaped like ViT-B/32 at 224 px, random weights: speed does not depend on them).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from bench.coco_like import write_jpegs
from bench.harness import Figure, Section, median, ratios, repeat_interleaved, spread
from spur_assets.core.clip_model import (
    ClipBundle,
    clip_image_processor,
    embed_images,
    embed_texts,
    load_images_uint8,
    new_small_clip,
    pixel_values_from_uint8,
    tokenize_captions,
    train_caption_tokenizer,
)
from spur_assets.core.devices import autocast_for

BATCH_SIZE = 256  # MetricReportConfig.batch_size
TARGET = 0.9
SCALES = {
    "tiny": dict(builtin_images=64, coco_images=8, coco_model="tiny"),
    "quick": dict(builtin_images=256, coco_images=8, coco_model="vit-b/32"),
    "full": dict(builtin_images=1024, coco_images=16, coco_model="vit-b/32"),
}


# --------------------------------------------------------------------------- inputs and models


def builtin_inputs(root: Path, n_images: int) -> tuple[list[str], list[str]]:
    """Image paths and captions of a built-in dataset with n_images test images (generated under root)."""
    import json

    from spur_assets.core.builtin_dataset import BuiltinDatasetSpec, generate_builtin_dataset
    from spur_assets.core.coco_ingest import read_manifest

    manifest = read_manifest(generate_builtin_dataset(root / "builtin", BuiltinDatasetSpec(n_train=16, n_test=n_images)))
    test = manifest.splits["test"]
    document = json.loads(Path(test.captions).read_text())
    paths = sorted(str(p) for p in Path(test.images_dir).iterdir())
    return paths, [a["caption"] for a in document["annotations"]]


def builtin_model(captions: list[str]) -> ClipBundle:
    """The demo's base model architecture (BaseCheckpointConfig defaults), random weights."""
    return new_small_clip(captions, image_size=64, seed=0, vocab_size=1024, patch_size=8, width=64, layers=2, heads=4, max_text_length=24)


def coco_model(captions: list[str], shape: str) -> ClipBundle:
    """A CLIP with ViT-B/32's towers (224 px, 12 layers; text 512 wide, vision 768) or a tiny one for smoke tests."""
    tokenizer = train_caption_tokenizer(captions, vocab_size=2048, max_length=32)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if shape == "vit-b/32":
        text = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8}
        vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
        image_size, patch, projection = 224, 32, 512
    else:
        text = vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        image_size, patch, projection = 224, 32, 32
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "max_position_embeddings": 32, **text, **ids},
        vision_config={"image_size": image_size, "patch_size": patch, **vision},
        projection_dim=projection,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config).eval()
    return ClipBundle(model=model, tokenizer=tokenizer, image_processor=clip_image_processor(image_size))


def coco_captions(n: int) -> list[str]:
    subjects = ["A dog", "Two people", "A man", "A woman", "A cat", "A red car", "Some children", "A tennis player"]
    actions = ["playing with a frisbee", "sitting on a bench", "next to a traffic light", "holding a racket", "on the grass"]
    places = ["in a park.", "near the road.", "on a sunny day.", "in front of a building.", "at the beach."]
    return [f"{subjects[i % 8]} {actions[(i // 8) % 5]} {places[(i // 40) % 5]}" for i in range(n)]


# --------------------------------------------------------------------------- the paths being compared


def pipeline_images(bundle: ClipBundle, paths: list[str], size: int, device: str, workers: int = 1) -> torch.Tensor:
    """embed_eval_set's image path: read batch_size*8 files at a time, decode, embed."""
    read_at_once = BATCH_SIZE * 8
    parts = []
    for start in range(0, len(paths), read_at_once):
        pixels = load_images_uint8(paths[start : start + read_at_once], size, workers=workers)
        parts.append(embed_images(bundle, pixels, batch_size=BATCH_SIZE, device=device))
    return torch.cat(parts)


def raw_image_forward(model: CLIPModel, batches: list[torch.Tensor], device: str) -> None:
    """The limit: the vision tower and projection on pre-normalised pixels already on the device."""
    target = torch.device(device)
    with torch.inference_mode(), autocast_for(target):
        for pixels in batches:
            model.get_image_features(pixel_values=pixels).pooler_output
    if target.type == "cuda":
        torch.cuda.synchronize()


def raw_text_forward(model: CLIPModel, batches: list[dict], device: str) -> None:
    target = torch.device(device)
    with torch.inference_mode(), autocast_for(target):
        for tokens in batches:
            model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
    if target.type == "cuda":
        torch.cuda.synchronize()


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def measure_setting(bundle: ClipBundle, paths: list[str], captions: list[str], size: int, reps: int, device: str, log) -> dict:
    """Seconds per repetition for every path of one setting (images and captions)."""
    model = bundle.model.to(device).eval()
    decoded = load_images_uint8(paths, size)
    pixel_batches = [
        pixel_values_from_uint8(decoded[i : i + BATCH_SIZE], bundle.image_processor).to(device) for i in range(0, len(paths), BATCH_SIZE)
    ]
    token_batches = [
        {k: v.to(device) for k, v in tokenize_captions(bundle, captions[i : i + BATCH_SIZE]).items()}
        for i in range(0, len(captions), BATCH_SIZE)
    ]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    # One untimed pass of each so lazy initialisation (oneDNN primitives, CUDA kernels) is not timed.
    raw_image_forward(model, pixel_batches[:1], device)
    pipeline_images(bundle, paths[:16], size, device)
    embed_texts(bundle, captions[:8], batch_size=BATCH_SIZE, device=device)
    runs = {
        "pipeline": lambda: _timed(lambda: (pipeline_images(bundle, paths, size, device), sync())),
        "raw_forward": lambda: _timed(lambda: raw_image_forward(model, pixel_batches, device)),
        "decode_only": lambda: _timed(lambda: load_images_uint8(paths, size)),
        "embed_from_uint8": lambda: _timed(lambda: (embed_images(bundle, decoded, batch_size=BATCH_SIZE, device=device), sync())),
        "pipeline_2_threads": lambda: _timed(lambda: (pipeline_images(bundle, paths, size, device, workers=2), sync())),
        "text_pipeline": lambda: _timed(lambda: (embed_texts(bundle, captions, batch_size=BATCH_SIZE, device=device), sync())),
        "text_raw_forward": lambda: _timed(lambda: raw_text_forward(model, token_batches, device)),
    }
    return repeat_interleaved(runs, reps, log)


def _figures(label: str, n_images: int, n_captions: int, seconds: dict) -> tuple[list[Figure], dict]:
    image_ratio = ratios(seconds["raw_forward"], seconds["pipeline"])  # throughput ratio = time ratio inverted
    threads_ratio = ratios(seconds["raw_forward"], seconds["pipeline_2_threads"])
    text_ratio = ratios(seconds["text_raw_forward"], seconds["text_pipeline"])
    pipe = median(seconds["pipeline"])
    shares = {
        "decode": median(seconds["decode_only"]) / pipe,
        "to_float": max(0.0, median(seconds["embed_from_uint8"]) - median(seconds["raw_forward"])) / pipe,
        "forward": median(seconds["raw_forward"]) / pipe,
    }
    figures = [
        Figure(
            f"{label}: images/s, pipeline path",
            f"{n_images / pipe:,.0f} img/s",
            f"raw forward {n_images / median(seconds['raw_forward']):,.0f} img/s",
            f"{median(image_ratio):.2f}",
            f">= {TARGET}",
            median(image_ratio) >= TARGET,
            f"spread {spread(image_ratio)}; decode {shares['decode']:.0%} of the path, uint8->float + wrapper "
            f"{shares['to_float']:.0%}, forward {shares['forward']:.0%}",
        ),
        Figure(
            f"{label}: images/s, decoding on 2 threads (`workers=2`)",
            f"{n_images / median(seconds['pipeline_2_threads']):,.0f} img/s",
            f"raw forward {n_images / median(seconds['raw_forward']):,.0f} img/s",
            f"{median(threads_ratio):.2f}",
            f">= {TARGET}",
            median(threads_ratio) >= TARGET,
            "what metric_report would get by passing its workers on (see below)",
        ),
        Figure(
            f"{label}: captions/s, `embed_texts`",
            f"{n_captions / median(seconds['text_pipeline']):,.0f} cap/s",
            f"raw forward {n_captions / median(seconds['text_raw_forward']):,.0f} cap/s",
            f"{median(text_ratio):.2f}",
            f">= {TARGET}",
            median(text_ratio) >= TARGET,
            f"spread {spread(text_ratio)}; the rest is tokenization",
        ),
    ]
    return figures, {"image_ratio": median(image_ratio), "threads_ratio": median(threads_ratio), "text_ratio": median(text_ratio), **shares}


def run(scale: str = "full", reps: int = 3, device: str = "cpu", log=print) -> Section:
    """Both settings; ratios = raw-forward time / pipeline time per repetition (throughput ratio)."""
    size = SCALES[scale]
    figures: list[Figure] = []
    raw: dict = {}
    summary: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-embedding-") as tmp:
        root = Path(tmp)
        paths, captions = builtin_inputs(root, size["builtin_images"])
        log(f"  built-in: {len(paths)} images, {len(captions)} captions")
        seconds = measure_setting(builtin_model(captions), paths, captions, 64, reps, device, log)
        rows, summary["builtin"] = _figures("built-in 64-px PNG, demo base model", len(paths), len(captions), seconds)
        figures += rows
        raw["builtin"] = seconds

        paths = write_jpegs(root / "coco", size["coco_images"])
        captions = coco_captions(5 * len(paths))
        log(f"  COCO-like: {len(paths)} JPEGs 640x480, {len(captions)} captions, model {size['coco_model']}")
        seconds = measure_setting(coco_model(captions, size["coco_model"]), paths, captions, 224, reps, device, log)
        rows, summary["coco"] = _figures(f"COCO-like 640x480 JPEG, {size['coco_model']} at 224 px", len(paths), len(captions), seconds)
        figures += rows
        raw["coco"] = seconds

    b, c = summary["builtin"], summary["coco"]

    def bound(shares: dict) -> str:
        return "decode-bound" if shares["decode"] > shares["forward"] else "forward-bound"

    notes = [
        "**Method.** Pipeline = `load_images_uint8(paths, size, workers=1)` then `embed_images(batch_size=256)`, "
        "the loop `evaluation.embed_eval_set` runs for `metric_report` (which passes no `workers`); captions "
        "through `embed_texts`. Raw = `get_image_features` / `get_text_features` on tensors prepared "
        "beforehand (decoded, normalised, tokenized), same batches. Ratio = raw time / pipeline time per "
        "repetition (a throughput ratio); the shares are medians of separately timed stages over the "
        "pipeline's median time, so they need not add up to exactly 100%.",
        f"**Where the rest goes.** Decoding and resizing the image files, which runs in the calling thread "
        f"before any forward pass: {b['decode']:.0%} of the path for the built-in 64-px PNGs with the demo's "
        f"tiny model (forward {b['forward']:.0%}: {bound(b)}), {c['decode']:.0%} for 640x480 JPEGs in front "
        f"of a ViT-B/32-sized model (forward {c['forward']:.0%}: {bound(c)}). The uint8 -> float "
        f"normalisation and the wrapper cost {b['to_float']:.0%} / {c['to_float']:.0%}. For captions, "
        "tokenization (one `tokenizer(...)` call per batch) is the whole difference."
        + "".join(
            f" {name}: the timed stages add up to {total:.0%} of the pipeline's time, so the remaining "
            f"{1 - total:.0%} of the gap is run-to-run noise on this loaded machine (see the spread)."
            for name, total in (("Built-in", b["decode"] + b["to_float"] + b["forward"]), ("COCO-like", c["decode"] + c["to_float"] + c["forward"]))
            if total < 0.9
        ),
        "**Fix proposed (pipeline code, not changed here).** (1) `metric_report` calls `evaluate_checkpoint` "
        "without `workers`, so decoding uses one thread although `MetricReportConfig` could pass "
        "`workers` on as `raw_pairs`, `base_checkpoint` and `finetuned_checkpoint` do; the '2 threads' rows "
        "measure that change"
        + (
            f" and show it does not help ({b['threads_ratio']:.2f} / {c['threads_ratio']:.2f} vs one thread's "
            f"{b['image_ratio']:.2f} / {c['image_ratio']:.2f}): a 64-px PNG costs well under a millisecond, "
            "mostly Python-side Pillow and tensor-copy work that holds the GIL, so two threads take turns "
            f"rather than overlap, and for the JPEGs decoding is only {c['decode']:.0%} of the path. "
            if b["threads_ratio"] <= b["image_ratio"] and c["threads_ratio"] <= c["image_ratio"] else ". "
        )
        + "(2) Overlap decoding with the forward pass: in `embed_eval_set`, decode the next `batch_size * 8` "
        "files in a background thread while the current block is embedded (a one-slot prefetch); decoding "
        "then hides behind the forward wherever the forward is the longer of the two and a core is free for "
        "it, and a decode-bound path runs at decode speed, which only more decode threads raise.",
    ]
    return Section(2, "Embedding throughput: pipeline data path vs raw forward", figures, notes, {"seconds": raw, "summary": summary})
