"""Research for issue #4: can fine-tuning on counterfactuals raise ODmAP@10 by 0.05 in both directions?

Reads what a demo run left in SPUR_HOME (latest raw_pairs, base_checkpoint and
synthetic_counterfactuals through lineage.duckdb, as bench/experiments/ablation.py does) and tries
fine-tuning variants the pipeline does not have yet, without touching spur_assets/:

- hard-negative weighting: the hard-negative columns (I^-b's original b-captions in its
  image->text row; I^-b in a b-caption's text->image row) get log(w) added to their logits,
  and/or an explicit two-way term (positive vs. hard negative) weighted by lambda;
- paired sampling: each removal image I^-b shares its batch with its source image I (whose
  caption that round is a b-caption), so the in-batch InfoNCE itself has to separate them;
  I's other captions and I^-b's captions are masked as negatives of each other;
- more epochs, learning rate, counterfactual ratio, frozen text tower, fixed temperature;
- shortcut-wide hard negatives (`anchor_hard`): for a caption naming a flagged pair's companion b,
  every in-batch image that shows the anchor a without b is a weighted hard negative.

Hyperparameters are chosen on a validation split carved from the TRAIN images (never the
test set): `valbase` trains a base checkpoint with the pipeline's base recipe on the train
images minus the validation images; `screen` fine-tunes it on the rest and scores the
validation images' removal counterfactuals (ODmAP, HR, R@5; no controls exist there).
`test` fine-tunes the demo's own base checkpoint on the full train split and scores the
test set once per candidate and seed. `ceiling` measures, on the base, how much ODmAP a
perfect shortcut removal alone could add (hard negatives taken out of the galleries).
With `--eval-home H1,H2,...` (homes where `spur run --config` built another seed's data up
to synthetic_counterfactuals) `test` scores each fine-tune on those draws' test splits
instead: validation sets with the test split's rates that were never trained on.

    nice -n 10 .venv/bin/python bench/experiments/research_mitigate.py ceiling
    nice -n 10 .venv/bin/python bench/experiments/research_mitigate.py valbase
    nice -n 10 .venv/bin/python bench/experiments/research_mitigate.py screen --arms default,w4 --seeds 0
    nice -n 10 .venv/bin/python bench/experiments/research_mitigate.py test --arms w4 --seeds 0,1,2

Every result is appended as one JSON line to --log (default .spur/experiments/research/results.jsonl);
`table` renders them as Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import headline, latest_ref  # noqa: E402  (bench/experiments/ is not a package)

from spur_assets.core.metrics import retrieval_metrics as rm  # noqa: E402
from spur_assets.core.data.batch_union import union_split  # noqa: E402
from spur_assets.core.model.clip_model import (  # noqa: E402
    ClipBundle,
    load_checkpoint,
    load_images_uint8,
    pixel_values_from_uint8,
    processor_image_size,
    save_checkpoint,
    text_max_length,
)
from spur_assets.core.metrics.evaluation import EvalSet, build_eval_index, embed_eval_set, evaluate_checkpoint  # noqa: E402
from spur_assets.core.counterfactuals.finetune_data import FinetuneSet, assemble_finetune_set, originals_only  # noqa: E402
from spur_assets.core.model.finetuning import TrainingPlan  # noqa: E402
from spur_assets.core.model.recipes import SmallClipRecipe  # noqa: E402
from spur_assets.core.records.lineage import LineageStore  # noqa: E402
from spur_assets.core.model.training import (  # noqa: E402
    TrainConfig,
    make_optimizer,
    text_ids,
    warmup_cosine,
    epoch_batches,
    paired_epoch_batches,  # the research version of it, ported; HardLinks has the fields it reads
)

WORK = Path(".spur") / "experiments" / "research"  # under the working directory, beside the demo home
COMPANION_OF_PATH: dict[str, str] = {}  # removal image path -> companion, set in main() for pair_hard_t2i
# image path -> categories it shows (removal images: the source's minus the companion), and the flagged
# (anchor, companion) pairs; set in main() for anchor_hard
CATEGORIES_OF_PATH: dict[str, frozenset[str]] = {}
FLAGGED_PAIRS: list[tuple[str, str]] = []


# --------------------------------------------------------------------------- data


@dataclass
class Demo:
    base_path: Path
    base_id: str
    cf_id: str
    train: object  # SplitTables
    test_eval: EvalSet
    cf_train_images: pl.DataFrame
    cf_train_captions: pl.DataFrame


def load_train_split(home: Path):
    """The train split of the latest raw_pairs (all that `valbase` needs)."""
    raw = latest_ref(LineageStore(home), "raw_pairs")
    tables = [raw.read_table(t) for t in ("raw_images", "raw_captions", "raw_instances")]
    return union_split(*[[t] for t in tables], "train")


def validation_ids(train, n_val: int = 400, seed: int = 1234) -> set[int]:
    """The train images held out for validation (seeded; the same in every command)."""
    ids = np.array(sorted(train.images["image_id"].to_list()))
    return set(np.random.default_rng(seed).choice(ids, size=n_val, replace=False).tolist())


def load_demo(home: Path) -> Demo:
    store = LineageStore(home)
    raw, cf = (latest_ref(store, a) for a in ("raw_pairs", "synthetic_counterfactuals"))
    base = latest_ref(store, "base_checkpoint") if store.latest("base_checkpoint") else None  # absent in an eval-only home
    tables = [raw.read_table(t) for t in ("raw_images", "raw_captions", "raw_instances")]
    train = union_split(*[[t] for t in tables], "train")
    test = union_split(*[[t] for t in tables], "test")
    test_eval = EvalSet.of(test, cf)
    return Demo(Path(base.path("checkpoint")) if base else None, base.materialization_id if base else "", cf.materialization_id, train, test_eval,
                cf.read_table("cf_train_images"), cf.read_table("cf_train_captions"))


@dataclass
class ValSplit:
    fit_images: pl.DataFrame
    fit_captions: pl.DataFrame
    fit_cf_images: pl.DataFrame
    fit_cf_captions: pl.DataFrame
    val_eval: EvalSet


def carve_validation(demo: Demo, n_val: int = 400, seed: int = 1234) -> ValSplit:
    """Hold out n_val train images; their removal counterfactuals become a validation eval set.

    Relevant captions of a validation query I^-b: I's captions without b plus the edited
    b-captions of I (the train counterfactuals' `removal_edit` captions), as in the test set.
    """
    train = demo.train
    val_ids = validation_ids(train, n_val, seed)
    is_val = pl.col("image_id").is_in(sorted(val_ids))
    cf_img = demo.cf_train_images
    cf_cap = demo.cf_train_captions
    # A paste image whose target or donor is a validation image would leak it: drop those too.
    touches_val = pl.col("source_image_id").is_in(sorted(val_ids)) | pl.col("donor_image_id").is_in(sorted(val_ids))
    fit_cf_images = cf_img.filter(~touches_val.fill_null(False))
    fit_cf_captions = cf_cap.join(fit_cf_images.select("cf_image_id"), on="cf_image_id", how="semi")
    val_removals = cf_img.filter((pl.col("kind") == "removal") & pl.col("source_image_id").is_in(sorted(val_ids)))
    edits = (
        cf_cap.filter(pl.col("kind") == "removal_edit")
        .join(val_removals.select("cf_image_id", "source_image_id", "anchor", "companion"), on="cf_image_id")
        .select("cf_caption_id", "source_image_id", "anchor", "companion", "caption",
                (~pl.col("mentions_companion")).alias("accepted"))
    )
    val_cf_images = val_removals.select("cf_image_id", "kind", "source_image_id", "anchor", "companion", "path")
    pairs = list(dict.fromkeys(demo.test_eval.pairs))
    val_eval = EvalSet(
        images=train.images.filter(is_val), captions=train.captions.filter(is_val),
        instances=train.instances.filter(is_val), cf_images=val_cf_images, cf_captions=edits, pairs=pairs,
    )
    return ValSplit(train.images.filter(~is_val), train.captions.filter(~is_val), fit_cf_images, fit_cf_captions, val_eval)


def val_headline(metrics: dict) -> dict:
    return {k: v for k, v in headline(metrics).items() if k != "delta_ctrl"}


# --------------------------------------------------------------------------- base for validation


def train_val_base(train, out: Path, hold_out_validation: bool = True, **base_overrides) -> float:
    """The pipeline's base recipe (the core's SmallClipRecipe, with overrides) on the train images.

    With hold_out_validation the validation images are left out (the base for `screen`).
    """
    c = SmallClipRecipe(**base_overrides)
    is_val = pl.col("image_id").is_in(sorted(validation_ids(train)) if hold_out_validation else [])
    plan = TrainingPlan.from_scratch(originals_only(train.images.filter(~is_val), train.captions.filter(~is_val)), c)
    images = load_images_uint8(plan.rows.image_paths, c.image_size, workers=1)
    bundle = c.new_model(plan.rows.captions)
    started = time.monotonic()
    plan.run(bundle, "cpu", images=images)
    seconds = time.monotonic() - started
    save_checkpoint(bundle, out)
    return seconds


# --------------------------------------------------------------------------- fine-tuning variants


@dataclass(frozen=True)
class Variant:
    """One fine-tuning recipe. The defaults reproduce the pipeline's finetuned_checkpoint."""

    epochs: int = 4
    lr: float = 5e-4
    batch_size: int = 128
    warmup_steps: int = 20
    captions_per_image: int = 5
    counterfactual_ratio: float = 0.34
    use_paste: bool = False
    use_removal: bool = True  # False with use_paste False: originals only, the same budget (the control)
    # log(w) added to hard-negative logits (1 = plain InfoNCE with extras, as the pipeline)
    hn_weight: float = 1.0
    # weight of an extra two-way loss: softplus(s * (cos(hard) - cos(positive))) per hard negative
    pair_lambda: float = 0.0
    # every b-caption of I is a hard-negative text of I^-b (pipeline: only the first)
    all_b_captions: bool = False
    # I and I^-b in the same batch, I's caption that round a b-caption
    paired: bool = False
    # I's non-b captions and I^-b's captions are not negatives of each other (set for paired arms)
    mask_family: bool = False
    # for a b-caption, every removal image of the same pair in the batch (not only its own I^-b) is a
    # hard negative image (its logit + log hn_weight): the images that outrank I at test time
    pair_hard_t2i: bool = False
    # for a caption mentioning the companion b of a flagged pair (a, b), every in-batch image that shows a
    # and not b (natural anchor-only images and removal images alike) is a hard negative image (+ log
    # hn_weight); with "both", for such an image every in-batch caption mentioning b is a hard negative text
    anchor_hard: str = ""  # "", "t2i" or "both"
    freeze_text: bool = False
    fixed_logit_scale: float | None = None  # exp(logit_scale); None = learned as in the pipeline

    def label(self) -> str:
        default = Variant()
        changed = {k: v for k, v in asdict(self).items() if getattr(default, k) != v}
        return ", ".join(f"{k}={v}" for k, v in changed.items()) or "pipeline default"


ARMS: dict[str, Variant] = {
    "default": Variant(),
    "w4": Variant(hn_weight=4.0),
    "w16": Variant(hn_weight=16.0),
    "w4all": Variant(hn_weight=4.0, all_b_captions=True),
    "pair1": Variant(pair_lambda=1.0, all_b_captions=True),
    "paired": Variant(paired=True, mask_family=True),
    "paired_w4": Variant(paired=True, mask_family=True, hn_weight=4.0, all_b_captions=True),
    "ep8": Variant(epochs=8),
    # Around `paired_w4` (the pipeline default since 8b12eb8), screened on the 4000-image data.
    "pw4_ep8": Variant(paired=True, mask_family=True, hn_weight=4.0, all_b_captions=True, epochs=8),
    "pw4_lr1e3": Variant(paired=True, mask_family=True, hn_weight=4.0, all_b_captions=True, lr=1e-3),
    "pw4_paste": Variant(paired=True, mask_family=True, hn_weight=4.0, all_b_captions=True, use_paste=True),
    "pw4_r05": Variant(paired=True, mask_family=True, hn_weight=4.0, all_b_captions=True, counterfactual_ratio=0.5),
    "control": Variant(use_removal=False),
    "pw4_pairhard": Variant(paired=True, mask_family=True, hn_weight=4.0, all_b_captions=True, pair_hard_t2i=True),
    "pw4_anchorhard": Variant(paired=True, mask_family=True, hn_weight=4.0, all_b_captions=True, anchor_hard="t2i"),
    "pw4_anchorhard2": Variant(paired=True, mask_family=True, hn_weight=4.0, all_b_captions=True, anchor_hard="both"),
    "pw4_w16": Variant(paired=True, mask_family=True, hn_weight=16.0, all_b_captions=True),
    "lr1e3": Variant(lr=1e-3),
    "ratio05": Variant(counterfactual_ratio=0.5),
    "freeze_text": Variant(freeze_text=True),
}


@dataclass
class HardLinks:
    """Per fine-tuning row: which captions are hard negatives of which removal image, and families."""

    hard_image_of_caption: torch.Tensor  # [C] removal image row whose hard negative caption c is, -1 none
    b_captions_of_removal: dict[int, list[int]]  # removal image row -> b-caption rows of its source
    source_of_removal: dict[int, int]  # removal image row -> source image row
    family: torch.Tensor  # [N] source row for removal images, own row otherwise
    first_b_caption: torch.Tensor  # [N] the pipeline's hard_negative_text, -1 none
    hard_pairs: torch.Tensor  # [C, 2] removal rows a caption is a hard negative of, -1 none
    pair_of_image: torch.Tensor | None = None  # [N] companion index of a removal image, -1 otherwise
    caption_mentions_b: torch.Tensor | None = None  # [C, P] caption mentions the companion of flagged pair p
    image_anchor_only: torch.Tensor | None = None  # [N, P] image shows the anchor of pair p and not its companion


def hard_links(fs: FinetuneSet, companion_of_path: dict[str, str] | None = None) -> HardLinks:
    hard_image = torch.as_tensor(fs.hard_negative_image, dtype=torch.long)
    caption_image = torch.as_tensor(fs.caption_image, dtype=torch.long)
    first = torch.as_tensor(fs.hard_negative_text, dtype=torch.long)
    b_caps: dict[int, list[int]] = {}
    for c, r in enumerate(hard_image.tolist()):
        if r >= 0:
            b_caps.setdefault(r, []).append(c)
    # A caption naming two companions is linked to one removal only (finetune_data overwrites);
    # the first b-caption is always known through hard_negative_text.
    for r, c in enumerate(first.tolist()):
        if c >= 0 and c not in b_caps.setdefault(r, []):
            b_caps[r].insert(0, c)
    source = {r: int(caption_image[caps[0]]) for r, caps in b_caps.items()}
    family = torch.arange(len(fs.image_paths))
    for r, s in source.items():
        family[r] = s
    # Every (caption, removal) hard link, up to two removals per caption: [C, 2], -1 = none.
    hard_pairs = torch.full((len(fs.captions), 2), -1, dtype=torch.long)
    for r, caps in b_caps.items():
        for c in caps:
            slot = 0 if hard_pairs[c, 0] < 0 or hard_pairs[c, 0] == r else 1
            hard_pairs[c, slot] = r
    pair_of_image = None
    if companion_of_path is not None:
        names = sorted(set(companion_of_path.values()))
        pair_of_image = torch.tensor([names.index(companion_of_path[p]) if p in companion_of_path and i in b_caps else -1
                                      for i, p in enumerate(fs.image_paths)], dtype=torch.long)
    mentions_b = anchor_only = None
    if CATEGORIES_OF_PATH and FLAGGED_PAIRS:
        from spur_assets.core.data.vocabulary import mentioned_categories

        mentions = [mentioned_categories(str(c)) for c in fs.captions]
        mentions_b = torch.tensor([[b in m for _, b in FLAGGED_PAIRS] for m in mentions], dtype=torch.bool)
        cats = [CATEGORIES_OF_PATH[p] for p in fs.image_paths]
        anchor_only = torch.tensor([[a in c and b not in c for a, b in FLAGGED_PAIRS] for c in cats], dtype=torch.bool)
    return HardLinks(hard_image, b_caps, source, family, first, hard_pairs, pair_of_image, mentions_b, anchor_only)


def variant_batch_loss(
    model, bundle: ClipBundle, images_uint8, input_ids, attention_mask, text_id, caption_image, links: HardLinks,
    batch_captions: torch.Tensor, v: Variant,
) -> torch.Tensor:
    batch_images = caption_image[batch_captions]
    # Extra hard-negative texts: b-captions of the sources of the removal images in the batch.
    extra_texts: list[int] = []
    for i in batch_images.tolist():
        caps = links.b_captions_of_removal.get(i)
        if caps:
            extra_texts.extend(caps if v.all_b_captions else [int(links.first_b_caption[i])])
    extra_texts_t = torch.unique(torch.tensor(extra_texts, dtype=torch.long))
    extra_texts_t = extra_texts_t[~torch.isin(extra_texts_t, batch_captions)]
    extra_images = links.hard_image_of_caption[batch_captions]
    extra_images = torch.unique(extra_images[extra_images >= 0])
    extra_images = extra_images[~torch.isin(extra_images, batch_images)]

    all_images = torch.cat([batch_images, extra_images])
    all_texts = torch.cat([batch_captions, extra_texts_t])
    pixels = pixel_values_from_uint8(images_uint8[all_images], bundle.image_processor)
    ids, mask = input_ids[all_texts], attention_mask[all_texts]
    length = int(mask.sum(dim=1).max())
    image_emb = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)
    text_emb = F.normalize(
        model.get_text_features(input_ids=ids[:, :length], attention_mask=mask[:, :length]).pooler_output.float(), dim=-1
    )
    b = int(batch_captions.shape[0])
    img, txt, x_txt, x_img = image_emb[:b], text_emb[:b], text_emb[b:], image_emb[b:]
    scale = model.logit_scale.float().exp()

    # Masks (True = not a negative). In-batch: duplicate strings; I vs I^-b's captions and
    # I^-b vs I's non-b captions (both describe the other image truthfully).
    own = torch.eye(b, dtype=torch.bool)
    tid = text_id[batch_captions]
    mask_bb = tid[:, None] == tid[None, :]
    def is_hard(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """[len(images), len(texts)]: text is a b-caption of the removal image's source."""
        return (links.hard_pairs[texts][None, :, :] == images[:, None, None]).any(-1)

    hard_bb = is_hard(batch_images, batch_captions)  # [image r, text j]
    same_family = links.family[batch_images][:, None] == links.family[batch_images][None, :]
    if v.mask_family:
        mask_bb |= same_family & ~hard_bb
    mask_bb &= ~own
    # Extra texts: never a negative for their own image (or a duplicate string).
    x_text_image = caption_image[extra_texts_t]
    mask_xt = (batch_images[:, None] == x_text_image[None, :]) | (tid[:, None] == text_id[extra_texts_t][None, :])
    hard_xt = is_hard(batch_images, extra_texts_t)
    hard_xi = is_hard(extra_images, batch_captions).T  # [text j, extra image]

    sim_bb = scale * img @ txt.T
    i2t = torch.cat([sim_bb.masked_fill(mask_bb, float("-inf")), (scale * img @ x_txt.T).masked_fill(mask_xt, float("-inf"))], 1)
    t2i = torch.cat([sim_bb.T.masked_fill(mask_bb.T, float("-inf")), scale * txt @ x_img.T], 1)
    hard_i2t = torch.cat([hard_bb, hard_xt], 1)
    hard_t2i = torch.cat([hard_bb.T, hard_xi], 1)
    if v.pair_hard_t2i:
        if links.pair_of_image is None:
            raise ValueError("pair_hard_t2i needs hard_links(fs, companion_of_path)")
        image_pair = links.pair_of_image[batch_images]  # [b]
        caption_pair = torch.where(links.hard_pairs[batch_captions, 0] >= 0,
                                   links.pair_of_image[links.hard_pairs[batch_captions, 0].clamp(min=0)], -1)  # [b]
        same_pair = (caption_pair[:, None] == image_pair[None, :]) & (caption_pair[:, None] >= 0)  # [text j, image r]
        hard_t2i = hard_t2i | torch.cat([same_pair & ~mask_bb.T, torch.zeros_like(hard_xi)], 1)
    if v.anchor_hard:
        if links.caption_mentions_b is None:
            raise ValueError("anchor_hard needs CATEGORIES_OF_PATH and FLAGGED_PAIRS")
        cap_b = links.caption_mentions_b[batch_captions].float()  # [b, P]
        img_ao = links.image_anchor_only[batch_images].float()  # [b, P]
        shortcut = (cap_b @ img_ao.T) > 0  # [text j, image r]: j names b, r shows a without b
        hard_t2i = hard_t2i | torch.cat([shortcut & ~mask_bb.T, torch.zeros_like(hard_xi)], 1)
        if v.anchor_hard == "both":
            hard_i2t = hard_i2t | torch.cat([shortcut.T & ~mask_bb, torch.zeros_like(hard_xt)], 1)
    if v.hn_weight != 1.0:
        i2t = i2t + math.log(v.hn_weight) * hard_i2t
        t2i = t2i + math.log(v.hn_weight) * hard_t2i
    targets = torch.arange(b)
    loss = (F.cross_entropy(i2t, targets) + F.cross_entropy(t2i, targets)) / 2
    if v.pair_lambda > 0:
        pos_i2t, pos_t2i = i2t.diagonal()[:, None], t2i.diagonal()[:, None]
        raw_i2t = torch.cat([sim_bb, scale * img @ x_txt.T], 1)
        raw_t2i = torch.cat([sim_bb.T, scale * txt @ x_img.T], 1)
        terms = torch.cat([F.softplus(raw_i2t - pos_i2t)[hard_i2t], F.softplus(raw_t2i - pos_t2i)[hard_t2i]])
        if terms.numel():
            loss = loss + v.pair_lambda * terms.mean()
    return loss


def finetune(bundle: ClipBundle, fs: FinetuneSet, v: Variant, seed: int) -> float:
    """Fine-tune bundle.model in place with variant v (AdamW, warmup + cosine, as train_clip); seconds."""
    model = bundle.model
    config = TrainConfig(epochs=v.epochs, batch_size=v.batch_size, lr=v.lr, warmup_steps=v.warmup_steps, seed=seed,
                         captions_per_image=v.captions_per_image)
    size = processor_image_size(bundle.image_processor)
    images = load_images_uint8(fs.image_paths, size, workers=1)
    tokens = bundle.tokenizer([str(c) for c in fs.captions], padding="max_length", truncation=True,
                              max_length=text_max_length(bundle), return_tensors="pt")
    input_ids, attention_mask = tokens["input_ids"], tokens["attention_mask"]
    text_id = text_ids(fs.captions)
    caption_image = torch.as_tensor(fs.caption_image, dtype=torch.long)
    links = hard_links(fs, COMPANION_OF_PATH or None)
    if v.freeze_text:
        for name, p in model.named_parameters():
            if name.startswith("text_model") or name.startswith("text_projection"):
                p.requires_grad_(False)
    if v.fixed_logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(v.fixed_logit_scale))
        model.logit_scale.requires_grad_(False)

    def batches_of(epoch: int) -> list[torch.Tensor]:
        if v.paired:
            return paired_epoch_batches(caption_image, links, v.batch_size, v.captions_per_image, seed, epoch)
        return epoch_batches(caption_image, v.batch_size, v.captions_per_image, seed, epoch)

    total = max(1, len(batches_of(0)) * v.epochs)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(v.warmup_steps, total))
    started = time.monotonic()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in range(v.epochs):
            model.train()
            for batch in batches_of(epoch):
                loss = variant_batch_loss(model, bundle, images, input_ids, attention_mask, text_id, caption_image,
                                          links, batch, v)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0.0, math.log(config.max_logit_scale))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return time.monotonic() - started


def check_default_matches_pipeline(bundle: ClipBundle, fs: FinetuneSet) -> float:
    """Loss of the first pipeline batch by training.contrastive_loss vs. this file's loss (variant default)."""
    from spur_assets.core.model.training import batch_loss

    caption_image = torch.as_tensor(fs.caption_image, dtype=torch.long)
    tokens = bundle.tokenizer([str(c) for c in fs.captions], padding="max_length", truncation=True,
                              max_length=text_max_length(bundle), return_tensors="pt")
    images = load_images_uint8(fs.image_paths, processor_image_size(bundle.image_processor), workers=1)
    batch = epoch_batches(caption_image, 128, 5, 0, 0)[0]
    text_id = text_ids(fs.captions)
    config = TrainConfig(epochs=1, batch_size=128)
    bundle.model.eval()
    with torch.no_grad():
        ref = batch_loss(bundle, images, tokens["input_ids"], tokens["attention_mask"], text_id, caption_image, batch,
                          torch.as_tensor(fs.hard_negative_text), torch.as_tensor(fs.hard_negative_image), config,
                          torch.device("cpu"))
        ours = variant_batch_loss(bundle.model, bundle, images, tokens["input_ids"], tokens["attention_mask"], text_id,
                                  caption_image, hard_links(fs), batch, Variant())
    return float(ref), float(ours)


# --------------------------------------------------------------------------- ceiling


def ceiling(bundle: ClipBundle, eval_set: EvalSet) -> dict:
    """Base ODmAP@10 as scored, and with the shortcut's hard negatives taken out of the galleries.

    i2t: I's b-captions dropped (its own hard negatives), or every caption mentioning b dropped.
    t2i: I^-b dropped from the image gallery. The gap is the most that separating I from I^-b
    (with instance retrieval unchanged) can add.
    """
    index = build_eval_index(eval_set)
    emb = embed_eval_set(bundle, index)
    k = 10
    out = {}
    sims = emb.removals @ emb.captions.T
    companion_col = [index.categories.index(index.pair_of(p)[1]) for p in index.removal_pair]
    for mode in ("as scored", "own b-captions removed", "all b-captions removed"):
        aps = []
        for q in range(len(index.removal_paths)):
            s = sims[q].clone()
            if mode == "own b-captions removed":
                s[index.removal_hard_negatives[q]] = -9
            elif mode == "all b-captions removed":
                s[index.caption_mentions[:, companion_col[q]]] = -9
            top = torch.topk(s, k).indices[None]
            aps.append(float(rm.average_precision_at_k(top, [index.removal_relevant[q]], k)[0]))
        out[f"i2t {mode}"] = rm.grouped_mean(torch.tensor(aps), index.removal_pair)["macro"]
    # Who fills the top 10 of an I^-b query, on average.
    fill = {"relevant": 0.0, "own b-captions": 0.0, "other b-captions": 0.0, "other captions": 0.0}
    for q in range(len(index.removal_paths)):
        top = torch.topk(sims[q], k).indices.tolist()
        for r in top:
            if r in index.removal_relevant[q]:
                fill["relevant"] += 1
            elif r in index.removal_hard_negatives[q]:
                fill["own b-captions"] += 1
            elif bool(index.caption_mentions[r, companion_col[q]]):
                fill["other b-captions"] += 1
            else:
                fill["other captions"] += 1
    out["i2t top-10 fill"] = {key: round(v / len(index.removal_paths), 2) for key, v in fill.items()}
    out["i2t mean relevant"] = float(np.mean([len(r) for r in index.removal_relevant]))
    gallery = torch.cat([emb.images, emb.removals])
    sims = emb.captions[index.t2i_caption_row] @ gallery.T
    target_score = sims[torch.arange(sims.shape[0]), torch.tensor(index.t2i_target)]
    out["t2i I^-b above I"] = float((sims[torch.arange(sims.shape[0]), torch.tensor(index.t2i_hard_negative)] > target_score).float().mean())
    out["t2i median rank of I"] = float((sims > target_score[:, None]).sum(1).add(1).float().median())
    out["t2i mean images above I: originals, removals"] = [
        float((sims[:, : index.n_images] > target_score[:, None]).sum(1).float().mean()),
        float((sims[:, index.n_images :] > target_score[:, None]).sum(1).float().mean()),
    ]
    for mode in ("as scored", "I^-b removed", "every removal removed"):
        rr = []
        for q in range(len(index.t2i_caption_row)):
            s = sims[q].clone()
            if mode == "I^-b removed":
                s[index.t2i_hard_negative[q]] = -9
            elif mode == "every removal removed":
                s[index.n_images:] = -9
            top = torch.topk(s, k).indices[None]
            rr.append(float(rm.reciprocal_rank_at_k(top, torch.tensor([index.t2i_target[q]]), k)[0]))
        out[f"t2i {mode}"] = rm.grouped_mean(torch.tensor(rr), index.t2i_pair)["macro"]
    # How often the hard negative outranks the truth.
    return out


# --------------------------------------------------------------------------- main


def log_result(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["ceiling", "valbase", "valbase_eval", "base", "screen", "test", "check", "table"])
    parser.add_argument("--base-name", default="demo", help="folder under --work for `base`; "
                        "for `test`, a folder there to fine-tune instead of the demo's base")
    parser.add_argument("--home", default=".spur", help="the demo home (SPUR_HOME), relative to the working directory")
    parser.add_argument("--arms", default="default")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--work", default=str(WORK), help="folder for the validation base, named bases and the log")
    parser.add_argument("--log", default="", help="results file (default: WORK/results.jsonl)")
    parser.add_argument("--base-set", default="", help="SmallClipRecipe overrides for `valbase`/`base`, e.g. epochs=8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", default="", help="for `test`: save each fine-tuned model under SAVE/ARM-seedN")
    parser.add_argument("--eval-home", default="", help="for `test`/`valbase_eval`: score on these homes' test splits "
                        "instead (comma-separated; built-in datasets of other seeds: validation sets with the test "
                        "split's rates)")
    parser.add_argument("--set", default="", help="extra Variant overrides for every arm, e.g. epochs=6,lr=1e-3")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    log = Path(args.log) if args.log else work / "results.jsonl"
    if args.command == "table":
        print_table(log)
        return
    overrides = {}
    for item in filter(None, args.set.split(",")):
        key, value = item.split("=")
        overrides[key] = value == "True" if value in ("True", "False") else json.loads(value)
    base_overrides = {}
    for item in filter(None, args.base_set.split(",")):
        key, value = item.split("=")
        base_overrides[key] = json.loads(value)
    val_base = work / "val_base"
    if args.command == "valbase":
        seconds = train_val_base(load_train_split(Path(args.home)), val_base, **base_overrides)
        log_result(log, {"kind": "valbase", "overrides": base_overrides, "seconds": round(seconds)})
        return
    if args.command == "base":  # a stronger base on the full train split, e.g. --set epochs=32
        out = work / args.base_name
        seconds = train_val_base(load_train_split(Path(args.home)), out, hold_out_validation=False,
                                 **(base_overrides or overrides))
        log_result(log, {"kind": "base", "name": args.base_name, "overrides": base_overrides or overrides,
                         "seconds": round(seconds)})
        demo = load_demo(Path(args.home))
        m = evaluate_checkpoint(load_checkpoint(out), demo.test_eval).metrics
        log_result(log, {"kind": "base_eval", "name": args.base_name, **headline(m), "r10_i2t": m["recall"]["i2t"]["10"]})
        log_result(log, {"kind": "ceiling", "set": "test", "base": args.base_name, **ceiling(load_checkpoint(out), demo.test_eval)})
        return
    demo = load_demo(Path(args.home))
    removals = demo.cf_train_images.filter(pl.col("kind") == "removal")
    COMPANION_OF_PATH.update(zip(removals["path"].to_list(), removals["companion"].to_list()))
    cats_of_image = {i: frozenset(g["category"].to_list()) for (i,), g in demo.train.instances.group_by("image_id")}
    for image_id, path in demo.train.images.select("image_id", "path").iter_rows():
        CATEGORIES_OF_PATH[path] = cats_of_image.get(image_id, frozenset())
    path_of_id = dict(demo.train.images.select("image_id", "path").iter_rows())
    for path, kind, source, companion in demo.cf_train_images.select("path", "kind", "source_image_id", "companion").iter_rows():
        shown = CATEGORIES_OF_PATH[path_of_id[source]]  # removal: I loses b; paste: the target T gains b
        CATEGORIES_OF_PATH[path] = shown - {companion} if kind == "removal" else shown | {companion}
    FLAGGED_PAIRS.extend(demo.test_eval.pairs)
    split = carve_validation(demo)
    # --eval-home: other seeds' test splits replace the test set (validation sets with the test split's
    # rates); each fine-tune is scored on every one of them.
    evals = [(h, load_demo(Path(h)).test_eval) for h in filter(None, args.eval_home.split(","))]
    if evals:
        demo.test_eval = evals[0][1]
    evals = evals or [("", demo.test_eval)]
    if args.command == "ceiling":
        for name, path, ev in (("test", demo.base_path, demo.test_eval),) + (
            (("val", val_base, split.val_eval),) if val_base.exists() else ()
        ):
            row = {"kind": "ceiling", "set": name, **ceiling(load_checkpoint(path), ev)}
            log_result(log, row)
        return
    if args.command == "valbase_eval":
        if val_base.exists():
            m = evaluate_checkpoint(load_checkpoint(val_base), split.val_eval).metrics
            log_result(log, {"kind": "base_eval", "name": "val_base", **val_headline(m), "r10_i2t": m["recall"]["i2t"]["10"]})
        for eval_home, ev in evals:
            m = evaluate_checkpoint(load_checkpoint(demo.base_path), ev).metrics
            log_result(log, {"kind": "base_eval", "name": "demo", "base": demo.base_id, **headline(m),
                             "r10_i2t": m["recall"]["i2t"]["10"], **({"eval_home": eval_home} if eval_home else {})})
        return
    if args.command == "check":
        fs = assemble_finetune_set(demo.train.images, demo.train.captions, demo.cf_train_images, demo.cf_train_captions,
                                   counterfactual_ratio=0.34, use_paste=False)
        print("pipeline loss, research loss:", check_default_matches_pipeline(load_checkpoint(demo.base_path), fs))
        return
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in args.arms.split(","):
            v = replace(ARMS[arm], **overrides)
            if args.command == "screen":
                fs = assemble_finetune_set(split.fit_images, split.fit_captions, split.fit_cf_images,
                                           split.fit_cf_captions, counterfactual_ratio=v.counterfactual_ratio,
                                           use_paste=v.use_paste, use_removal=v.use_removal, seed=seed)
                bundle = load_checkpoint(val_base)
                seconds = finetune(bundle, fs, v, seed)
                m = val_headline(evaluate_checkpoint(bundle, split.val_eval).metrics)
            else:
                fs = assemble_finetune_set(demo.train.images, demo.train.captions, demo.cf_train_images,
                                           demo.cf_train_captions, counterfactual_ratio=v.counterfactual_ratio,
                                           use_paste=v.use_paste, use_removal=v.use_removal, seed=seed)
                base_path = work / args.base_name if args.base_name != "demo" else demo.base_path
                bundle = load_checkpoint(base_path)
                seconds = finetune(bundle, fs, v, seed)
                if args.save:
                    save_checkpoint(bundle, Path(args.save) / f"{arm}-seed{seed}")
                for eval_home, ev in evals:
                    m = headline(evaluate_checkpoint(bundle, ev).metrics)
                    log_result(log, {"kind": "test", "arm": arm, "variant": v.label(), "seed": seed,
                                     "base": demo.base_id if args.base_name == "demo" else args.base_name,
                                     "train_images": len(fs.image_paths), "seconds": round(seconds), **m,
                                     **({"eval_home": eval_home} if eval_home else {})})
                continue
            log_result(log, {"kind": args.command, "arm": arm, "variant": v.label(), "seed": seed,
                             "base": "val_base", "train_images": len(fs.image_paths), "seconds": round(seconds), **m})


def print_table(log: Path) -> None:
    """Markdown tables of the logged runs: gains over the matching base, means over seeds.

    Rows scored on --eval-home draws carry the draw's folder name; their base is the base scored
    on the same draw.
    """
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    bases = {(r["name"], r.get("eval_home", "")): r for r in rows if r["kind"] == "base_eval"}
    for kind, title in (("screen", "validation (train images held out)"), ("test", "test set or --eval-home draws")):
        runs = [r for r in rows if r["kind"] == kind]
        if not runs:
            continue
        print(f"\n### {title}\n")
        print("| base | draw | arm | variant | seeds | ODmAP i2t (gain) | ODmAP t2i (gain) | HR@10 | R@5 i2t (chg) "
              "| R@5 t2i (chg) | Δ_ctrl | s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        groups: dict[tuple, list[dict]] = {}
        for r in runs:
            groups.setdefault((r["base"], r.get("eval_home", ""), r["arm"], r["variant"]), []).append(r)
        for (base, draw, arm, variant), group in groups.items():
            ref = bases.get(("val_base" if kind == "screen" else base, draw)) or bases.get(("demo", draw))
            mean = {k: float(np.mean([g[k] for g in group])) for k in group[0] if isinstance(group[0][k], (int, float))}

            def cell(key: str) -> str:
                gain = "" if ref is None else f" ({mean[key] - ref[key]:+.3f})"
                return f"{mean[key]:.3f}{gain}"

            ctrl = f"{mean['delta_ctrl']:+.3f}" if "delta_ctrl" in mean else "–"
            print(f"| {base[:12]} | {Path(draw).name or 'test'} | {arm} | {variant} | "
                  f"{','.join(str(g['seed']) for g in group)} | {cell('odmap_i2t')} "
                  f"| {cell('odmap_t2i')} | {mean['hr']:.3f} | {cell('r5_i2t')} | {cell('r5_t2i')} | {ctrl} "
                  f"| {mean['seconds']:.0f} |")


if __name__ == "__main__":
    main()
