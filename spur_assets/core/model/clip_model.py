"""The CLIP model under audit: a small from-scratch CLIP, its caption tokenizer, checkpoints, embeddings.

Checkpoints are plain Hugging Face `save_pretrained` folders (safetensors weights, config,
tokenizer, image processor) that `transformers` loads with no project code. Nothing here
unpickles anything: weights are read with `use_safetensors=True`.

Images travel as uint8 tensors [N, 3, S, S] already resized and cropped to the model's input
size (see `load_images_uint8`); the image processor's rescale and mean/std normalisation is
applied as tensor ops at embedding time (`pixel_values_from_uint8`), which is much faster than
calling the processor per image and gives the same numbers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

if TYPE_CHECKING:
    # Looking transformers.CLIPImageProcessor up without torchvision installed logs a fallback
    # warning; `_image_processor_class` picks the class at run time instead.
    from transformers import CLIPImageProcessor

from spur_assets.core.runtime.devices import autocast_for
from spur_assets.core.runtime.threads import prompt_gil_handover
from spur_assets.core.data.image_stream import DECODE_ITEM_ROWS, ImageFiles, ImageSource, chunk_steps, source_length, stream_rows
from spur_assets.core.data.preprocessing import ImagePreprocessing, decode_image_uint8, pixel_values

PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Fixed ids 0..3. The eos id must not be 2: CLIPTextTransformer treats eos_token_id == 2 as a
# legacy config and pools on the highest token id instead of on the eos token.
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
LEGACY_EOS_TOKEN_ID = 2

# File names a save_pretrained folder may hold that can carry pickled objects.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class ClipBundle:
    """A CLIP model with the tokenizer and image processor that define its inputs."""

    model: CLIPModel
    tokenizer: PreTrainedTokenizerBase
    image_processor: "CLIPImageProcessor"
    path: Path | None = None


# --------------------------------------------------------------------------- tokenizer


def train_caption_tokenizer(
    captions: Iterable[str], vocab_size: int = 2048, max_length: int = 32
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE caption tokenizer with the `tokenizers` library.

    Text is NFKC-normalised and lower-cased; byte-level BPE means no character is ever unknown
    and decode(encode(text)) gives back the normalised text exactly. Every encoding is
    `<|startoftext|> ... <|endoftext|>` with ids pad=0, unk=1, bos=2, eos=3; truncation to
    `max_length` keeps the eos token (the text tower pools on it). The vocabulary may come out
    smaller than `vocab_size` on a small corpus; use `len(tokenizer)`. Deterministic: the same
    captions give the same tokenizer, in any process.
    """
    caption_list = [str(caption) for caption in captions]
    if not caption_list:
        raise ValueError("train_caption_tokenizer: got no captions; pass the training captions of the dataset.")
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(
            f"train_caption_tokenizer: vocab_size={vocab_size} is below the byte alphabet "
            f"(256 + {len(SPECIAL_TOKENS)} special tokens); use at least 261."
        )
    if max_length < 3:
        raise ValueError(f"train_caption_tokenizer: max_length={max_length} leaves no room for text between bos and eos.")

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(caption_list, trainer=trainer)
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    if [ids[token] for token in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"train_caption_tokenizer: special tokens got ids {ids}, expected 0..3; tokenizers changed behaviour.")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, ids[BOS_TOKEN]), (EOS_TOKEN, ids[EOS_TOKEN])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------- model


def small_clip_config(
    vocab_size: int,
    image_size: int = 64,
    patch_size: int = 8,
    width: int = 128,
    layers: int = 3,
    heads: int = 4,
    projection_dim: int = 128,
    max_text_length: int = 32,
    **token_ids: int,
) -> CLIPConfig:
    """Config of a small CLIP with equal text and vision towers (`width` wide, `layers` deep).

    `token_ids` may set pad_token_id, bos_token_id, eos_token_id (defaults: the ids that
    `train_caption_tokenizer` assigns, 0, 2, 3). The MLP is 4x `width`, as in CLIP.
    eos_token_id == 2 is refused because transformers then pools on the highest token id.
    """
    unknown = set(token_ids) - {"pad_token_id", "bos_token_id", "eos_token_id"}
    if unknown:
        raise TypeError(f"small_clip_config: unknown arguments {sorted(unknown)}; token ids are pad_token_id, bos_token_id, eos_token_id.")
    ids = {
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
    } | token_ids
    if ids["eos_token_id"] == LEGACY_EOS_TOKEN_ID:
        raise ValueError(
            "small_clip_config: eos_token_id=2 makes transformers pool text on the highest token id "
            "(legacy CLIP configs); give the tokenizer's real eos id, not 2."
        )
    if image_size % patch_size:
        raise ValueError(f"small_clip_config: image_size={image_size} is not a multiple of patch_size={patch_size}.")
    if width % heads:
        raise ValueError(f"small_clip_config: width={width} is not divisible by heads={heads}.")
    tower = {
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
    }
    return CLIPConfig(
        text_config={"vocab_size": vocab_size, "max_position_embeddings": max_text_length, **tower, **ids},
        vision_config={"image_size": image_size, "patch_size": patch_size, "num_channels": 3, **tower},
        projection_dim=projection_dim,
    )


def clip_image_processor(image_size: int) -> "CLIPImageProcessor":
    """CLIP image processor for square `image_size` inputs (bicubic shortest-side resize, centre crop,
    OpenAI CLIP mean/std)."""
    return _image_processor_class()(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


def new_small_clip(captions: Iterable[str], image_size: int = 64, seed: int = 0, **config) -> ClipBundle:
    """A randomly initialised small CLIP with a tokenizer trained on `captions`.

    `config` takes `vocab_size` and `max_text_length` (for the tokenizer and the text tower) and
    any other `small_clip_config` argument. The same captions, seed and config give the same
    weights; the global torch RNG is left as it was.
    """
    vocab_size = config.pop("vocab_size", 2048)
    max_text_length = config.pop("max_text_length", 32)
    tokenizer = train_caption_tokenizer(captions, vocab_size=vocab_size, max_length=max_text_length)
    clip_config = small_clip_config(
        vocab_size=len(tokenizer),
        image_size=image_size,
        max_text_length=max_text_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(clip_config)
    model.eval()
    return ClipBundle(model=model, tokenizer=tokenizer, image_processor=clip_image_processor(image_size))


def _image_processor_class() -> type:
    # Without torchvision, transformers 5 swaps CLIPImageProcessor for its PIL variant and warns;
    # pick the PIL variant ourselves. Both read and write the same preprocessor_config.json.
    if importlib.util.find_spec("torchvision") is None:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(bundle: ClipBundle, out_dir: Path) -> Path:
    """Write model, tokenizer and image processor as one `save_pretrained` folder at `out_dir`.

    Weights are safetensors only. The folder is built beside `out_dir` and renamed into place,
    so readers never see a half-written checkpoint; an existing `out_dir` is replaced. Sets
    `bundle.path` and returns `out_dir`.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    bundle.model.save_pretrained(partial)
    bundle.tokenizer.save_pretrained(partial)
    bundle.image_processor.save_pretrained(partial)
    _make_tokenizer_config_portable(partial / "tokenizer_config.json")
    pickled = sorted(p.name for p in partial.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    has_safetensors = any(partial.glob("model*.safetensors"))
    if pickled or not has_safetensors:
        shutil.rmtree(partial)
        raise RuntimeError(
            f"save_checkpoint: save_pretrained into {out_dir} wrote {pickled or 'no safetensors weights'}; "
            "checkpoints must hold safetensors weights only. Check the transformers version."
        )
    if out_dir.exists():
        retired = out_dir.parent / f".{out_dir.name}.retired-{os.getpid()}"
        os.replace(out_dir, retired)
        os.replace(partial, out_dir)
        shutil.rmtree(retired)
    else:
        os.replace(partial, out_dir)
    bundle.path = out_dir
    return out_dir


def _make_tokenizer_config_portable(config_path: Path) -> None:
    # transformers 5 records "TokenizersBackend", a class transformers 4 lacks; the generic fast
    # tokenizer class loads the same tokenizer.json in both.
    if not config_path.exists():
        return
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_checkpoint(path_or_hub_id: str | Path, device: torch.device | str = "cpu") -> ClipBundle:
    """Load a CLIP checkpoint folder or hub id with plain transformers, weights on `device`.

    Works for folders written by `save_checkpoint` and for Hugging Face CLIP repos such as
    openai/clip-vit-base-patch32 (already in the local hub cache; nothing is downloaded when
    HF_HUB_OFFLINE=1). Only safetensors weights are accepted. The model is float32, in eval mode.
    Raises ValueError when the tokenizer's eos id does not match what the text tower pools on.
    """
    source = Path(path_or_hub_id).expanduser()
    if source.exists():
        if not source.is_dir():
            raise ValueError(f"load_checkpoint: {source} is a file; pass the checkpoint folder that holds config.json.")
        if not (source / "config.json").exists():
            raise FileNotFoundError(
                f"load_checkpoint: {source} has no config.json; pass a folder written by save_pretrained "
                "(model, tokenizer and preprocessor configs)."
            )
        location: str | Path = source
    else:
        text = str(path_or_hub_id)
        if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
            raise FileNotFoundError(f"load_checkpoint: checkpoint folder {text} does not exist.")
        location = text  # a hub id: owner/name
    # transformers draws a per-tensor progress bar on load; in Dagster logs it is noise.
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = CLIPModel.from_pretrained(location, dtype=torch.float32, use_safetensors=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(location)
    image_processor = _image_processor_class().from_pretrained(location)
    model.to(torch.device(device)).eval()
    _check_eos_pooling(model, tokenizer, location)
    return ClipBundle(model=model, tokenizer=tokenizer, image_processor=image_processor, path=source if source.exists() else None)


def _check_eos_pooling(model: CLIPModel, tokenizer: PreTrainedTokenizerBase, location: str | Path) -> None:
    config_eos = model.config.text_config.eos_token_id
    tokenizer_eos = tokenizer.eos_token_id
    if config_eos == LEGACY_EOS_TOKEN_ID:
        # Legacy configs pool on argmax(input_ids): right only if eos is the largest id.
        if tokenizer_eos is None or tokenizer_eos != max(tokenizer.get_vocab().values()):
            raise ValueError(
                f"load_checkpoint: {location} config.json has text_config.eos_token_id=2 (legacy pooling on the "
                f"highest token id) but the tokenizer's eos id {tokenizer_eos} is not the highest id; "
                "set text_config.eos_token_id to the tokenizer's eos id."
            )
    elif tokenizer_eos != config_eos:
        raise ValueError(
            f"load_checkpoint: {location} config.json has text_config.eos_token_id={config_eos} but the "
            f"tokenizer's eos id is {tokenizer_eos}; the text tower would pool on the wrong token. "
            "Set text_config.eos_token_id to the tokenizer's eos id."
        )


def checkpoint_sha256(path: Path) -> str:
    """SHA-256 over a checkpoint folder: every file's relative path and bytes, in sorted path order.

    Stable across machines and copies (timestamps and permissions are not hashed); hidden
    files (names starting with '.') are skipped.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint_sha256: {root} is not a checkpoint folder.")
    digest = hashlib.sha256()
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    for file in files:
        name = file.relative_to(root).as_posix().encode()
        digest.update(len(name).to_bytes(8, "little") + name)
        digest.update(file.stat().st_size.to_bytes(8, "little"))
        with file.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- images


def load_image_uint8(path: str | Path, size: int | ImagePreprocessing) -> np.ndarray:
    """One image file as a uint8 array [3, H, W], prepared like the CLIP image processor.

    `size` is an `ImagePreprocessing` (e.g. `ImagePreprocessing.of(bundle.image_processor)`) or,
    as before, an int S meaning `ImagePreprocessing.square(S)`: transparency composited onto
    white, bicubic shortest-side resize to S, centre crop S x S (an S x S image is left
    untouched). See `preprocessing.decode_image_uint8`; unreadable files raise OSError naming
    the file.
    """
    prep = size if isinstance(size, ImagePreprocessing) else ImagePreprocessing.square(size)
    return decode_image_uint8(path, prep)


def load_images_uint8(paths: Sequence[str | Path], size: int | ImagePreprocessing, workers: int = 1) -> torch.Tensor:
    """Image files as one uint8 tensor [N, 3, H, W], in the order of `paths`.

    `size` is an `ImagePreprocessing` with a fixed output size, or an int S for
    `ImagePreprocessing.square(S)` ([N, 3, S, S]); each image is prepared as `load_image_uint8`
    documents. `workers` > 1 decodes in threads (PIL releases the GIL while decoding and resizing).
    """
    prep = size if isinstance(size, ImagePreprocessing) else ImagePreprocessing.square(size)
    height, width = prep.output_size
    out = torch.empty((len(paths), 3, height, width), dtype=torch.uint8)

    def load_into(index: int) -> None:
        out[index] = torch.from_numpy(decode_image_uint8(paths[index], prep))

    if workers > 1 and len(paths) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(load_into, range(len(paths))))
    else:
        for index in range(len(paths)):
            load_into(index)
    return out


def processor_image_size(image_processor: "CLIPImageProcessor") -> int:
    """Side length of the square images the processor produces (its crop size)."""
    crop = image_processor.crop_size if image_processor.do_center_crop else image_processor.size

    def field(key: str) -> int | None:
        # transformers 5 keeps sizes as SizeDict objects, older versions as plain dicts.
        return crop.get(key) if isinstance(crop, dict) else getattr(crop, key, None)

    height = field("height") or field("shortest_edge")
    width = field("width") or field("shortest_edge")
    if height is None or height != width:
        raise ValueError(f"processor_image_size: the image processor produces {crop}, not a square crop; CLIP needs square inputs.")
    return int(height)


def pixel_values_from_uint8(images_uint8: torch.Tensor, image_processor: "CLIPImageProcessor") -> torch.Tensor:
    """Model input from resized uint8 images [N, 3, S, S]: rescale and mean/std normalise as tensor ops.

    Equals CLIPImageProcessor's `pixel_values` for the same already-resized images (float32, on
    the input's device); `preprocessing.pixel_values` with `ImagePreprocessing.of(image_processor)`.
    Raises ValueError when the images are not uint8 [N, 3, S, S] with S the processor's crop size.
    """
    size = processor_image_size(image_processor)
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or tuple(images_uint8.shape[1:]) != (3, size, size):
        raise ValueError(
            f"pixel_values_from_uint8: expected uint8 images [N, 3, {size}, {size}], got {images_uint8.dtype} "
            f"{tuple(images_uint8.shape)}; load them with load_images_uint8(paths, size={size})."
        )
    return pixel_values(images_uint8, ImagePreprocessing.of(image_processor))


# --------------------------------------------------------------------------- embeddings


def _model_device(model: CLIPModel) -> torch.device:
    return next(model.parameters()).device


def text_max_length(bundle: ClipBundle) -> int:
    """Longest token sequence the model accepts with this tokenizer (bos and eos included)."""
    positions = int(bundle.model.config.text_config.max_position_embeddings)
    tokenizer_limit = getattr(bundle.tokenizer, "model_max_length", positions) or positions
    return int(min(positions, tokenizer_limit))


def tokenize_captions(bundle: ClipBundle, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Token ids and attention mask [N, L] for `texts`, padded to the longest, truncated to `text_max_length`."""
    encoded = bundle.tokenizer(
        [str(text) for text in texts],
        padding="longest",
        truncation=True,
        max_length=text_max_length(bundle),
        return_tensors="pt",
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def embed_images(
    bundle: ClipBundle,
    images: ImageSource,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 0,
) -> torch.Tensor:
    """L2-normalised image embeddings [N, D], float32 on CPU, in the order of the images.

    `images` are prepared uint8 images [N, 3, S, S], or `ImageFiles` streamed from disk
    by `workers` decoders (0 = on this thread; threads of this process on CPU, DataLoader
    processes on CUDA; see core/data/image_stream.py) in steps
    that ramp up from DECODE_ITEM_ROWS files to `batch_size`, so the first forward does not
    wait for a whole batch to be decoded (an image's embedding does not depend on the batch
    it is in: on CPU bit for bit, tested). Runs on `device` (default: where the model is; the model is moved
    there), under bf16 autocast on CUDA, in eval mode without gradients. `progress(done,
    total)` is called after each batch.
    """
    return embed_images_many([bundle], images, None, batch_size, device, progress, workers)[0]


def embed_images_many(
    bundles: Sequence[ClipBundle],
    images: ImageSource,
    needed: Sequence[torch.Tensor | None] | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 0,
) -> list[torch.Tensor]:
    """`embed_images` under several checkpoints at once, each image decoded once for all of them.

    The checkpoints must decode images alike (equal `ImagePreprocessing.decoding` of their image
    processors; mean and std may differ; ValueError otherwise): metric_report scores the base, its fine-tune and its
    control, which keep the base's processor, on the same files, and decoding is most of an
    embedding pass wherever the forward is cheap (a small model on a CPU, any model on a GPU).
    `needed[i]` is a bool mask [N] of the rows checkpoint i needs (None: all of them); only
    rows some checkpoint needs are decoded, and a checkpoint runs its forward on every decoded
    batch holding a row it needs (whole batches, so that each row is computed in the same batch
    for every checkpoint). Returns, per checkpoint, the embeddings of its needed rows in row
    order; where some checkpoint needs every row, each equals `embed_images`' row bit for bit on CPU. Runs on
    `device` (default: where the first model is). `progress(done, total)` counts decoded rows.
    """
    if not bundles:
        return []
    total = source_length(images)
    masks = _row_masks(len(bundles), needed, total, "embed_images_many", "rows")
    target = torch.device(device) if device is not None else _model_device(bundles[0].model)
    preparations = {ImagePreprocessing.of(b.image_processor).decoding for b in bundles}
    if len(preparations) > 1:
        raise ValueError(
            f"embed_images_many: the checkpoints decode images differently ({sorted(map(str, preparations))}: RGB "
            "conversion, resize, resample, crop); embed each group of alike checkpoints separately."
        )
    for bundle in bundles:
        bundle.model.to(target).eval()
        processor_image_size(bundle.image_processor)  # fail early on a non-square processor
    rows = torch.nonzero(torch.stack(masks).any(dim=0)).flatten()
    steps = chunk_steps(len(rows), batch_size, first=DECODE_ITEM_ROWS if isinstance(images, ImageFiles) else None)
    steps = [rows[step].tolist() for step in steps]
    outputs = _EmbeddingRows(bundles, masks)
    done = 0
    with torch.inference_mode(), autocast_for(target):
        # On CPU the decoding runs in threads of this process beside the forward (no process start,
        # no shared-memory copy of each batch: bench/benchmarks/RESULTS.md section 2); on a GPU in
        # DataLoader processes, which keep many cores decoding for it.
        stream = stream_rows(images, steps, target, workers, threads=target.type == "cpu")
        for step, batch in zip(steps, stream, strict=True):
            _embed_step(bundles, masks, outputs, step, lambda bundle: bundle.model.get_image_features(
                pixel_values=pixel_values_from_uint8(batch, bundle.image_processor)
            ).pooler_output)
            done += len(step)
            if progress is not None:
                progress(done, len(rows))
    return outputs.done()


def embed_texts(
    bundle: ClipBundle,
    texts: Sequence[str],
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """L2-normalised text embeddings [N, D], float32 on CPU, in the order of `texts`.

    Texts are tokenized with the bundle's tokenizer (bos/eos added, truncated to
    `text_max_length`), the next batch in a second thread while the model embeds this one (a
    fast tokenizer releases the GIL while it encodes). Same device, autocast and progress rules
    as `embed_images`.
    """
    return embed_texts_many([bundle], texts, None, batch_size, device, progress)[0]


def tokenization_identity(bundle: ClipBundle) -> tuple:
    """What decides a checkpoint's token ids for a text: its tokenizer's definition and length limit.

    Checkpoints with equal identities (a fine-tune and its control keep the base's tokenizer)
    tokenize every text alike, so one tokenization serves them all.
    """
    tokenizer = bundle.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = f"object {id(tokenizer)}"
    if backend is not None:
        # Padding and truncation are state a call leaves on the backend (the wrapper sets them per
        # call from its own arguments), not part of what the tokenizer is.
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
        definition = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return (type(tokenizer).__name__, definition, text_max_length(bundle), tokenizer.padding_side, tokenizer.pad_token_id)


def embed_texts_many(
    bundles: Sequence[ClipBundle],
    texts: Sequence[str],
    needed: Sequence[torch.Tensor | None] | None = None,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[torch.Tensor]:
    """`embed_texts` under several checkpoints that tokenize alike, each text tokenized once for all.

    Checkpoints must have equal `tokenization_identity` (ValueError otherwise). `needed[i]` is a
    bool mask [N] of the texts checkpoint i needs (None: all); only texts some checkpoint needs
    are tokenized, and a checkpoint runs its forward on every batch holding a text it needs (the
    whole batch, as `embed_images_many` does). Returns, per checkpoint, the embeddings of its
    needed texts in order; where some checkpoint needs every text, each equals `embed_texts`'
    row. `progress(done, total)` counts tokenized texts.
    """
    if not bundles:
        return []
    masks = _row_masks(len(bundles), needed, len(texts), "embed_texts_many", "texts")
    identities = {tokenization_identity(b) for b in bundles}
    if len(identities) > 1:
        raise ValueError(
            "embed_texts_many: the checkpoints tokenize differently (tokenizer, length limit or padding); "
            "embed each group of alike checkpoints separately."
        )
    target = torch.device(device) if device is not None else _model_device(bundles[0].model)
    for bundle in bundles:
        bundle.model.to(target).eval()
    rows = torch.nonzero(torch.stack(masks).any(dim=0)).flatten().tolist()
    steps = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    outputs = _EmbeddingRows(bundles, masks)

    def tokenize(step: list[int]) -> dict[str, torch.Tensor]:
        return tokenize_captions(bundles[0], [texts[i] for i in step])

    done = 0
    with prompt_gil_handover(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="spur-tokenize") as pool:
        upcoming = [pool.submit(tokenize, step) for step in steps[:1]]
        with torch.inference_mode(), autocast_for(target):
            for index, step in enumerate(steps):
                tokens = upcoming[index].result()
                if index + 1 < len(steps):
                    upcoming.append(pool.submit(tokenize, steps[index + 1]))
                upcoming[index] = None  # drop this batch's tokens once used
                ids, mask = tokens["input_ids"].to(target), tokens["attention_mask"].to(target)
                _embed_step(bundles, masks, outputs, step, lambda bundle: bundle.model.get_text_features(
                    input_ids=ids, attention_mask=mask
                ).pooler_output)
                done += len(step)
                if progress is not None:
                    progress(done, len(rows))
    return outputs.done()


def _row_masks(n_bundles: int, needed: Sequence[torch.Tensor | None] | None, total: int, caller: str, what: str) -> list[torch.Tensor]:
    """One bool mask [total] per checkpoint (None: every row); ValueError when they do not fit."""
    masks = [torch.ones(total, dtype=torch.bool) if m is None else torch.as_tensor(m, dtype=torch.bool).cpu()
             for m in (needed or [None] * n_bundles)]
    if len(masks) != n_bundles or any(tuple(m.shape) != (total,) for m in masks):
        raise ValueError(f"{caller}: give one bool mask of {total} {what} per checkpoint ({n_bundles}), or None.")
    return masks


class _EmbeddingRows:
    """Each checkpoint's output rows, allocated before the pass and filled in row order.

    Allocated up front so that nothing long-lived lands on the heap among a forward's freed
    activations: when each batch's few rows were kept as tensors of their own, glibc could not
    reuse the pages around them, and the resident set of a pass grew with its number of batches
    (bench/benchmarks/RESULTS.md section 7b).
    """

    def __init__(self, bundles: Sequence[ClipBundle], masks: list[torch.Tensor]) -> None:
        self.rows = [
            torch.empty((int(mask.sum()), bundle.model.config.projection_dim), dtype=torch.float32)
            for bundle, mask in zip(bundles, masks, strict=True)
        ]
        self.filled = [0] * len(bundles)

    def put(self, which: int, features: torch.Tensor) -> None:
        start = self.filled[which]
        self.rows[which][start : start + len(features)] = features
        self.filled[which] = start + len(features)

    def done(self) -> list[torch.Tensor]:
        if self.filled != [len(rows) for rows in self.rows]:
            raise RuntimeError(f"embedding pass filled {self.filled} rows of {[len(rows) for rows in self.rows]}")
        return self.rows


def _embed_step(
    bundles: Sequence[ClipBundle],
    masks: list[torch.Tensor],
    outputs: _EmbeddingRows,
    step: list[int],
    features_of: Callable[[ClipBundle], torch.Tensor],
) -> None:
    """One prepared batch (rows `step`) through every checkpoint that needs one of its rows; keep those rows."""
    step_rows = torch.tensor(step, dtype=torch.long)
    for which, (bundle, mask) in enumerate(zip(bundles, masks, strict=True)):
        wanted = mask[step_rows]
        if not bool(wanted.any()):
            continue
        # The whole batch, then its rows: a row's float rounding depends on the batch shape it was
        # computed in, and this way it is the same for every checkpoint (and the one-model calls).
        features = torch.nn.functional.normalize(features_of(bundle).float(), dim=-1).cpu()
        outputs.put(which, features if bool(wanted.all()) else features[wanted])
