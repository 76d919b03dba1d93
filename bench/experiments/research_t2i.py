"""Research for issue #16 item 6: a text->image gain over the *step-matched* originals-only control.

Target: t2i ODmAP@10 of a fine-tuning recipe minus that of its control >= +0.03 with the paired
bootstrap 95 % CI above 0 on the built-in test split, and R@5 (both directions) not below the
control's by more than 0.01. The control is what the pipeline's `control_checkpoint` trains: the
same base, recipe (lr, batch, warm-up, weight decay, captions per image) and seed, on the original
train images only, for exactly as many optimizer steps as the candidate took (as many epochs as
reach that, the schedule spanning those steps). It is trained with the core's `TrainingPlan.control`, as
the asset does; candidates are trained with bench/experiments/research_mitigate.py's variant loss (whose
default arm reproduces the pipeline's loss).

Protocol (bench/experiments/RESEARCH.md section 6): recipes are chosen on *validation draws*, the test splits
of other built-in seeds (homes built by `spur run --config` up to synthetic_counterfactuals with
builtin_seed 1..4), scored with fine-tunes of the seed-0 base trained on the seed-0 train split.
The chosen recipe and its control are then scored once on the test split of each whole-pipeline
seed (homes with raw_pairs, base_checkpoint, synthetic_counterfactuals of builtin seed N).

    R="nice -n 10 .venv/bin/python bench/experiments/research_t2i.py --threads 1 --work W"
    $R run --home H0 --eval-home H1,H2,H3,H4 --arms default,pw4_paste --tag val
    $R ceiling --home H0 --eval-home H1,H2,H3,H4 --checkpoint W/ckpt/val/H0/control-... --tag val
    $R run --home H5 --arms default --tag test          # once per test seed home
    $R run --home H0 --arms default --tag test --ckpt-tag val   # seed 0: re-score the screen's models
    $R pool --tag test --arms default                   # per-seed rows and the pooled CI
    $R table --tag val

Everything is logged as JSON lines to W/results.jsonl; per-query scores go to W/perquery/*.npz so
`pool` can bootstrap (candidate - control) over several seeds' queries at once, with
spur_assets.core.metrics.attribution.paired_bootstrap_gain (strata = draw x pair; with the same number
of pairs per draw its macro mean is the mean of the per-draw gains, logged next to it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import research_mitigate as rmit  # noqa: E402  (bench/experiments/ is not a package)

from spur_assets.core.metrics.attribution import attributable_gains, paired_bootstrap_gain  # noqa: E402
from spur_assets.core.model.clip_model import (  # noqa: E402
    load_checkpoint,
    load_images_uint8,
    processor_image_size,
    save_checkpoint,
)
from spur_assets.core.metrics.evaluation import EvalSet, build_eval_index, embed_eval_set, evaluate_checkpoint  # noqa: E402
from spur_assets.core.counterfactuals.finetune_data import assemble_finetune_set, originals_only  # noqa: E402
from spur_assets.core.model.finetuning import TrainingPlan  # noqa: E402
from spur_assets.core.model.recipes import BUILTIN_BASE_RECIPE  # noqa: E402
from spur_assets.core.model.training import epoch_batches, paired_epoch_batches  # noqa: E402

# Metrics whose per-query scores are kept and compared (names of evaluation's per_query).
METRICS = ("odmap_t2i", "odmap_i2t", "recall_t2i_5", "recall_i2t_5", "hr")
TARGET = {"t2i_gain": 0.03, "r5_drop": 0.01}

# Arms of this study on top of research_mitigate's (all at the pipeline's fine-tuning rate 5e-3).
PW4 = dict(paired=True, mask_family=True, hn_weight=4.0, all_b_captions=True, lr=5e-3)
ARMS: dict[str, rmit.Variant] = {
    "default": rmit.Variant(**PW4),  # the pipeline's finetuned_checkpoint recipe
    "pw4_paste": rmit.Variant(**PW4, use_paste=True),  # + paste images T+b (b shown without its anchor)
    "pw4_w16": rmit.Variant(**{**PW4, "hn_weight": 16.0}),  # heavier hard negatives, both directions
    "pw4_anchor16": rmit.Variant(**{**PW4, "hn_weight": 16.0}, anchor_hard="t2i"),  # every a-without-b image
    "pw4_ep6": rmit.Variant(**PW4, epochs=6),  # longer (the control gets the same steps)
    "pw4_r02": rmit.Variant(**PW4, counterfactual_ratio=0.2),  # fewer counterfactuals, more originals per step
    "pw4_pairhard": rmit.Variant(**PW4, pair_hard_t2i=True),  # b-caption: every same-pair removal image a hard negative
}


def prepare(home: Path) -> rmit.Demo:
    """Load a home and fill research_mitigate's module tables (as its main() does) for the anchor/pair arms."""
    demo = rmit.load_demo(home)
    rmit.COMPANION_OF_PATH.clear()
    rmit.CATEGORIES_OF_PATH.clear()
    rmit.FLAGGED_PAIRS.clear()
    removals = demo.cf_train_images.filter(pl.col("kind") == "removal")
    rmit.COMPANION_OF_PATH.update(zip(removals["path"].to_list(), removals["companion"].to_list()))
    cats_of_image = {i: frozenset(g["category"].to_list()) for (i,), g in demo.train.instances.group_by("image_id")}
    for image_id, path in demo.train.images.select("image_id", "path").iter_rows():
        rmit.CATEGORIES_OF_PATH[path] = cats_of_image.get(image_id, frozenset())
    path_of_id = dict(demo.train.images.select("image_id", "path").iter_rows())
    for path, kind, source, companion in demo.cf_train_images.select("path", "kind", "source_image_id", "companion").iter_rows():
        shown = rmit.CATEGORIES_OF_PATH[path_of_id[source]]
        rmit.CATEGORIES_OF_PATH[path] = shown - {companion} if kind == "removal" else shown | {companion}
    rmit.FLAGGED_PAIRS.extend(demo.test_eval.pairs)
    return demo


def candidate_steps(fs, v: rmit.Variant, seed: int) -> int:
    """Optimizer steps research_mitigate.finetune takes for this set and variant (its batches, all epochs)."""
    caption_image = torch.as_tensor(fs.caption_image, dtype=torch.long)
    if v.paired:
        links = rmit.hard_links(fs, rmit.COMPANION_OF_PATH or None)
        return sum(len(paired_epoch_batches(caption_image, links, v.batch_size, v.captions_per_image, seed, e))
                   for e in range(v.epochs))
    return sum(len(epoch_batches(caption_image, v.batch_size, v.captions_per_image, seed, e)) for e in range(v.epochs))


def train_control(demo: rmit.Demo, v: rmit.Variant, steps: int, seed: int, out: Path) -> dict:
    """The pipeline's control_checkpoint: originals only, v's recipe, `steps` optimizer steps; cached in `out`."""
    info = out / "control.json"
    if info.exists():
        return json.loads(info.read_text())
    bundle = load_checkpoint(demo.base_path)
    recipe = BUILTIN_BASE_RECIPE.with_(lr=v.lr, batch_size=v.batch_size, warmup_steps=v.warmup_steps,
                                       captions_per_image=v.captions_per_image)
    plan = TrainingPlan.control(originals_only(demo.train.images, demo.train.captions), recipe, seed, steps)
    images = load_images_uint8(plan.rows.image_paths, processor_image_size(bundle.image_processor), workers=1)
    started = time.monotonic()
    plan.run(bundle, "cpu", images=images)
    seconds = time.monotonic() - started
    save_checkpoint(bundle, out)
    row = {"steps": steps, "epochs": plan.config.epochs, "lr": v.lr, "seconds": round(seconds)}
    info.write_text(json.dumps(row))
    return row


def headline(m: dict) -> dict:
    return {"odmap_i2t": m["odmap"]["i2t"]["10"], "odmap_t2i": m["odmap"]["t2i"]["10"], "r5_i2t": m["recall"]["i2t"]["5"],
            "r5_t2i": m["recall"]["t2i"]["5"], "hr": m["hr"]["10"], "delta_ctrl": m["delta_ctrl"]}


def slug(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def score(work: Path, tag: str, draw: str, name: str, bundle, ev: EvalSet, cache: dict) -> object:
    """evaluate_checkpoint, its per-query scores kept as WORK/perquery/TAG/DRAW/NAME.npz."""
    result = evaluate_checkpoint(bundle, ev)
    folder = work / "perquery" / tag / draw
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for metric in METRICS:
        q = result.per_query[metric]
        arrays[metric] = q.values
        arrays[f"{metric}__strata"] = q.strata if q.strata is not None else np.array([], dtype=str)
    np.savez(folder / f"{name}.npz", **arrays)
    cache[(draw, name)] = result
    return result


def gains_row(evals: dict, of: str, against: tuple[str, ...]) -> dict:
    g = attributable_gains(evals, of=of, against=against)
    return {metric: {cmp: {"gain": v["gain"], "ci95": v["ci95"], "sd": v["sd"]} for cmp, v in by.items()}
            for metric, by in g.items() if metric in METRICS}


def cmd_run(args, work: Path, log: Path, overrides: dict) -> None:
    demo = prepare(Path(args.home))
    draws = [(Path(h).name, rmit.load_demo(Path(h)).test_eval) for h in filter(None, args.eval_home.split(","))]
    draws = draws or [(f"test-{Path(args.home).name}", demo.test_eval)]
    cache: dict = {}
    base_bundle = load_checkpoint(demo.base_path)
    for draw, ev in draws:
        score(work, args.tag, draw, "base", base_bundle, ev, cache)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in args.arms.split(","):
            v = replace(ARMS.get(arm) or rmit.ARMS[arm], **overrides)
            fs = assemble_finetune_set(demo.train.images, demo.train.captions, demo.cf_train_images,
                                       demo.cf_train_captions, counterfactual_ratio=v.counterfactual_ratio,
                                       use_paste=v.use_paste, use_removal=v.use_removal, seed=seed)
            steps = candidate_steps(fs, v, seed)
            # Checkpoints are keyed by home, arm and seed only: `--ckpt-tag val` on the seed-0 home reuses the
            # validation screen's fine-tunes (the same base, train split, recipe and seed) instead of retraining.
            ckpt = work / "ckpt" / (args.ckpt_tag or args.tag) / Path(args.home).name
            if (ckpt / f"{arm}-seed{seed}").exists():
                bundle, seconds = load_checkpoint(ckpt / f"{arm}-seed{seed}"), float("nan")
            else:
                bundle = load_checkpoint(demo.base_path)
                seconds = rmit.finetune(bundle, fs, v, seed)
                save_checkpoint(bundle, ckpt / f"{arm}-seed{seed}")
            # One control per (base, recipe fields the control uses, steps, seed): shared by arms that match.
            key = f"{demo.base_id}-{v.lr}-{v.batch_size}-{v.warmup_steps}-{v.captions_per_image}-{steps}-{seed}"
            control_dir = ckpt / f"control-{slug(key)}"
            control_info = train_control(demo, v, steps, seed, control_dir)
            control = load_checkpoint(control_dir)
            for draw, ev in draws:
                score(work, args.tag, draw, f"{arm}-seed{seed}", bundle, ev, cache)
                if (draw, control_dir.name) not in cache:
                    score(work, args.tag, draw, control_dir.name, control, ev, cache)
                evals = {"candidate": cache[(draw, f"{arm}-seed{seed}")], "control": cache[(draw, control_dir.name)],
                         "base": cache[(draw, "base")]}
                rmit.log_result(log, {
                    "kind": "run", "tag": args.tag, "home": str(args.home), "draw": draw, "arm": arm,
                    "variant": v.label(), "seed": seed, "train_images": len(fs.image_paths), "steps": steps,
                    "seconds": None if math.isnan(seconds) else round(seconds), "control": control_dir.name,
                    "control_info": control_info,
                    "candidate_m": headline(evals["candidate"].metrics), "control_m": headline(evals["control"].metrics),
                    "base_m": headline(evals["base"].metrics),
                    "gains": gains_row(evals, "candidate", ("control", "base")),
                    "control_gains": gains_row(evals, "control", ("base",)),
                })


def t2i_ceiling(bundle, ev: EvalSet) -> dict:
    """t2i ODmAP@10 (RR@10 of I for each b-caption) with groups of confusers deleted from the gallery.

    Groups, per query of pair (a, b): I^-b itself; every removal image; every image showing a
    without b (removal images and anchor-only originals: what the a->b shortcut confuses with I);
    every image not showing b (a perfect b detector). Ties go to the lower gallery row, as the report.
    Also how many images of each kind outrank I on average.
    """
    index = build_eval_index(ev)
    emb = embed_eval_set(bundle, index)
    gallery = torch.cat([emb.images, emb.removals])
    sims = emb.captions[index.t2i_caption_row] @ gallery.T
    n = index.n_images
    # objects shown by every gallery row: originals from image_objects, removal q = its source minus b
    shown = torch.cat([index.image_objects, index.image_objects[torch.tensor(index.removal_image_row)]]).clone()
    for q, name in enumerate(index.removal_pair):
        shown[n + q, index.categories.index(index.pair_of(name)[1])] = False
    is_removal = torch.arange(gallery.shape[0]) >= n
    out: dict = {}
    groups = {}
    for q in range(len(index.t2i_caption_row)):
        a, b = index.pair_of(index.t2i_pair[q])
        a_col, b_col = index.categories.index(a), index.categories.index(b)
        own = torch.zeros(gallery.shape[0], dtype=torch.bool)
        own[index.t2i_hard_negative[q]] = True
        groups.setdefault("I^-b", []).append(own)
        groups.setdefault("every removal image", []).append(is_removal)
        groups.setdefault("every image with a, without b", []).append(shown[:, a_col] & ~shown[:, b_col])
        groups.setdefault("every image without b", []).append(~shown[:, b_col])
    target = torch.tensor(index.t2i_target)
    rows = torch.arange(sims.shape[0])
    target_score = sims[rows, target]
    above = sims > target_score[:, None]
    above[rows, target] = False
    for mode in [None, *groups]:
        rr = []
        for q in range(sims.shape[0]):
            s = sims[q].clone()
            if mode is not None:
                drop = groups[mode][q].clone()
                drop[index.t2i_target[q]] = False
                s[drop] = -math.inf
            order = torch.sort(s, descending=True, stable=True).indices[:10]
            hit = (order == index.t2i_target[q]).nonzero()
            rr.append(1.0 / (int(hit[0, 0]) + 1) if len(hit) else 0.0)
        out[f"t2i {mode or 'as scored'}"] = rmit.rm.grouped_mean(torch.tensor(rr), index.t2i_pair)["macro"]
        if mode is not None:
            mask = torch.stack(groups[mode])
            out[f"mean above I: {mode}"] = float((above & mask).sum(1).float().mean())
    out["mean above I: all"] = float(above.sum(1).float().mean())
    out["mean above I: images with b"] = float((above & ~torch.stack(groups["every image without b"])).sum(1).float().mean())
    out["queries"] = int(sims.shape[0])
    return out


def cmd_ceiling(args, work: Path, log: Path) -> None:
    draws = [(Path(h).name, rmit.load_demo(Path(h)).test_eval) for h in filter(None, args.eval_home.split(","))]
    if not draws:
        demo = rmit.load_demo(Path(args.home))
        draws = [(f"test-{Path(args.home).name}", demo.test_eval)]
    for path in args.checkpoint.split(","):
        bundle = load_checkpoint(Path(path))
        for draw, ev in draws:
            rmit.log_result(log, {"kind": "ceiling", "tag": args.tag, "checkpoint": Path(path).name, "draw": draw,
                                  **t2i_ceiling(bundle, ev)})


def cmd_pool(args, work: Path, log: Path) -> None:
    """Per-draw rows of (candidate - control) and the bootstrap over all draws' queries together."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    for arm in args.arms.split(","):
        runs = [r for r in rows if r["kind"] == "run" and r["tag"] == args.tag and r["arm"] == arm]
        if args.seeds:
            runs = [r for r in runs if r["seed"] in {int(s) for s in args.seeds.split(",")}]
        if not runs:
            continue
        pooled = {}
        for metric in METRICS:
            cand, ctrl, strata = [], [], []
            for r in runs:
                folder = work / "perquery" / args.tag / r["draw"]
                c = np.load(folder / f"{arm}-seed{r['seed']}.npz", allow_pickle=False)
                k = np.load(folder / f"{r['control']}.npz", allow_pickle=False)
                cand.append(c[metric])
                ctrl.append(k[metric])
                s = c[f"{metric}__strata"]
                strata.append(np.array([f"{r['draw']}|{r['seed']}|{x}" for x in s]) if s.size else
                              np.array([f"{r['draw']}|{r['seed']}"] * len(c[metric])))
            macro = metric in ("odmap_t2i", "odmap_i2t", "hr")
            boot = paired_bootstrap_gain(np.concatenate(ctrl), np.concatenate(cand), np.concatenate(strata),
                                         resamples=2000, seed=0, macro=macro)
            key = {"recall_t2i_5": "r5_t2i", "recall_i2t_5": "r5_i2t"}.get(metric, metric)
            per_draw_mean = float(np.mean([r["candidate_m"][key] - r["control_m"][key] for r in runs]))
            pooled[metric] = {**boot, "mean_of_draw_gains": per_draw_mean}
        t2i, r5t, r5i = pooled["odmap_t2i"], pooled["recall_t2i_5"], pooled["recall_i2t_5"]
        met = (t2i["mean_of_draw_gains"] >= TARGET["t2i_gain"] and t2i["ci95"][0] > 0
               and r5t["mean_of_draw_gains"] >= -TARGET["r5_drop"] and r5i["mean_of_draw_gains"] >= -TARGET["r5_drop"])
        rmit.log_result(log, {"kind": "pool", "tag": args.tag, "arm": arm, "draws": [r["draw"] for r in runs],
                              "seeds": [r["seed"] for r in runs], "pooled_vs_control": pooled, "target_met": met})


def cmd_table(args, log: Path) -> None:
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    print("| draw | arm | seed | steps | t2i cand / ctrl / base | t2i cand−ctrl [95% CI] | t2i ctrl−base | "
          "i2t cand−ctrl | R@5 t2i cand−ctrl | R@5 i2t cand−ctrl | HR@10 cand / ctrl | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] != "run" or r["tag"] != args.tag:
            continue
        c, k, b, g = r["candidate_m"], r["control_m"], r["base_m"], r["gains"]
        t = g["odmap_t2i"]["candidate-control"]
        print(f"| {r['draw']} | {r['arm']} | {r['seed']} | {r['steps']} | {c['odmap_t2i']:.3f} / {k['odmap_t2i']:.3f} / "
              f"{b['odmap_t2i']:.3f} | {t['gain']:+.3f} [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}] | "
              f"{k['odmap_t2i'] - b['odmap_t2i']:+.3f} | {c['odmap_i2t'] - k['odmap_i2t']:+.3f} | "
              f"{c['r5_t2i'] - k['r5_t2i']:+.3f} | {c['r5_i2t'] - k['r5_i2t']:+.3f} | {c['hr']:.3f} / {k['hr']:.3f} | "
              f"{r['seconds'] if r['seconds'] is not None else 'reused'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "ceiling", "pool", "table"])
    parser.add_argument("--home", default="", help="home with raw_pairs, base_checkpoint, synthetic_counterfactuals")
    parser.add_argument("--eval-home", default="", help="validation draws: score on these homes' test splits instead")
    parser.add_argument("--work", required=True, help="folder for checkpoints, per-query scores and the log")
    parser.add_argument("--tag", default="val", help="label of this set of runs (e.g. val, test)")
    parser.add_argument("--arms", default="default")
    parser.add_argument("--seeds", default="0", help="fine-tuning seeds (pool: filter)")
    parser.add_argument("--set", default="", help="Variant overrides for every arm, e.g. epochs=6")
    parser.add_argument("--ckpt-tag", default="", help="for `run`: reuse (or write) checkpoints under WORK/ckpt/CKPT_TAG "
                        "instead of WORK/ckpt/TAG")
    parser.add_argument("--checkpoint", default="", help="for `ceiling`: checkpoint folders, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    log = work / "results.jsonl"
    overrides = {}
    for item in filter(None, args.set.split(",")):
        key, value = item.split("=")
        overrides[key] = value == "True" if value in ("True", "False") else json.loads(value)
    if args.command == "run":
        cmd_run(args, work, log, overrides)
    elif args.command == "ceiling":
        cmd_ceiling(args, work, log)
    elif args.command == "pool":
        cmd_pool(args, work, log)
    else:
        cmd_table(args, log)


if __name__ == "__main__":
    main()
