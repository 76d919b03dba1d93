"""Benchmark 5: co-occurrence statistics on a COCO-sized instance table, and how the time grows at 10x.

COCO train2017 has 118,287 images, 860,001 instances and 80 categories; an image shows
2.9 distinct categories on average, and "person" is in about 45% of images. The generated
table matches those counts (categories per image 1 + Poisson(1.9), Zipf-like category
frequencies with person first, instances spread over an image's categories), with an
injected spurious pair so the flagging rule has something to find. Timed:
`image_categories_from_instances` + `pair_statistics` (what spurious_features runs per
source), on the table already in memory.
"""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import torch

from bench.benchmarks.harness import Figure, Section, median, ratios, repeat_interleaved, spread
from spur_assets.core.counterfactuals.cooccurrence import image_categories_from_instances, pair_statistics

COCO_IMAGES, COCO_INSTANCES, N_CATEGORIES = 118_287, 860_001, 80
SCALES = {
    "tiny": dict(images=2_000, factor=10),
    "quick": dict(images=30_000, factor=10),
    "full": dict(images=COCO_IMAGES, factor=10),
}


def coco_sized_instances(n_images: int, seed: int = 0) -> pl.DataFrame:
    """(image_id, category) instance rows with COCO's per-image statistics, n_images images."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, N_CATEGORIES + 1) ** 1.1
    weights[0] = weights[1:].sum() * 0.25  # person: in ~45% of images
    weights /= weights.sum()
    per_image = 1 + rng.poisson(2.2, n_images)  # draws repeat, leaving ~2.9 distinct
    owner = np.repeat(np.arange(n_images), per_image)
    category = rng.choice(N_CATEGORIES, size=owner.size, p=weights)
    # The injected pair: most images with category 20 also get category 21.
    with_anchor = owner[category == 20]
    take = rng.random(with_anchor.size) < 0.85
    owner = np.concatenate([owner, with_anchor[take]])
    category = np.concatenate([category, np.full(int(take.sum()), 21)])
    # Spread the instance budget over each image's (image, category) slots.
    per_slot = COCO_INSTANCES / COCO_IMAGES / (owner.size / n_images)
    instances_per_slot = 1 + rng.poisson(per_slot - 1, owner.size)
    owner = np.repeat(owner, instances_per_slot)
    category = np.repeat(category, instances_per_slot)
    names = np.array([f"category_{i:02d}" if i else "person" for i in range(N_CATEGORIES)])
    return pl.DataFrame({"image_id": owner.astype(np.int64), "category": names[category]})


def spurious_pair_time(instances: pl.DataFrame, n_images: int) -> tuple[float, int]:
    """Seconds for image categories + pair statistics; rows of the result."""
    started = time.perf_counter()
    stats = pair_statistics(image_categories_from_instances(instances), n_images, "instances")
    return time.perf_counter() - started, stats.height


def indicator_pair_counts(instances: pl.DataFrame) -> tuple[float, dict[tuple[str, str], int]]:
    """Reference: n_both for every ordered pair as X^T X of the image x category indicator matrix (torch).

    Returns (seconds, {(anchor, companion): n_both}) for pairs seen together at least once.
    """
    started = time.perf_counter()
    names = instances["category"].unique().sort().to_list()
    coded = instances.select(
        (pl.col("image_id").rank("dense") - 1).cast(pl.Int64).alias("row"),
        pl.col("category").cast(pl.Enum(names)).to_physical().cast(pl.Int64).alias("column"),
    )
    rows = torch.from_numpy(coded["row"].to_numpy(writable=True))
    columns = torch.from_numpy(coded["column"].to_numpy(writable=True))
    indicator = torch.zeros((int(rows.max()) + 1, len(names)), dtype=torch.float32)
    indicator[rows, columns] = 1.0
    both = (indicator.T @ indicator).round().to(torch.int64)  # exact: counts < 2^24
    both.fill_diagonal_(0)
    seconds = time.perf_counter() - started
    anchor, companion = torch.nonzero(both, as_tuple=True)
    counts = {(names[a], names[c]): int(both[a, c]) for a, c in zip(anchor.tolist(), companion.tolist(), strict=True)}
    return seconds, counts


def run(scale: str = "full", reps: int = 3, device: str = "cpu", log=print) -> Section:
    """COCO size and factor x COCO size, interleaved; growth = t(10x) / t(1x) per repetition."""
    size = SCALES[scale]
    factor = size["factor"]
    n_small, n_big = size["images"], size["images"] * factor
    small, big = coco_sized_instances(n_small), coco_sized_instances(n_big, seed=1)
    categories_per_image = small.unique().height / n_small
    log(f"  {n_small:,} images / {small.height:,} instances; {n_big:,} / {big.height:,}")
    stats: dict[str, pl.DataFrame] = {}
    reference: dict[str, dict] = {}

    stages: dict[str, list[tuple[float, float]]] = {"1x": [], "big": []}

    def polars_time(frame: pl.DataFrame, n: int, name: str) -> float:
        started = time.perf_counter()
        image_categories = image_categories_from_instances(frame)
        unique_done = time.perf_counter()
        stats[name] = pair_statistics(image_categories, n, "instances")
        ended = time.perf_counter()
        stages[name].append((unique_done - started, ended - unique_done))
        return ended - started

    def indicator_time(frame: pl.DataFrame, name: str) -> float:
        seconds, reference[name] = indicator_pair_counts(frame)
        return seconds

    polars_time(small, n_small, "1x")  # warm-up: Polars' thread pool, first allocations
    seconds = repeat_interleaved(
        {
            "1x": lambda: polars_time(small, n_small, "1x"),
            f"{factor}x": lambda: polars_time(big, n_big, "big"),
            "indicator 1x": lambda: indicator_time(small, "1x"),
            f"indicator {factor}x": lambda: indicator_time(big, "big"),
        },
        reps,
        log,
    )
    growth = ratios(seconds[f"{factor}x"], seconds["1x"])
    indicator_growth = ratios(seconds[f"indicator {factor}x"], seconds["indicator 1x"])
    speedup = ratios(seconds[f"{factor}x"], seconds[f"indicator {factor}x"])
    mismatches = 0
    for name in ("1x", "big"):
        counted = {(a, c): n for a, c, n in stats[name].select("anchor", "companion", "n_both").iter_rows()}
        mismatches += len(set(counted.items()) ^ set(reference[name].items()))
    flagged = stats["1x"].filter(pl.col("flagged")).select("anchor", "companion").rows()
    figures = [
        Figure(
            f"pair statistics, {n_small:,} images / {small.height:,} instances",
            f"{median(seconds['1x']):.2f} s",
            f"indicator-matrix counts {median(seconds['indicator 1x']):.2f} s",
            f"{median(ratios(seconds['1x'], seconds['indicator 1x'])):.1f}x the reference's time",
            "",
            None,
            f"{categories_per_image:.2f} categories per image; {stats['1x'].height:,} ordered pairs; flagged {flagged}",
        ),
        Figure(
            f"the same at {factor}x ({n_big:,} images / {big.height:,} instances)",
            f"{median(seconds[f'{factor}x']):.2f} s",
            f"1x: {median(seconds['1x']):.2f} s",
            f"{median(growth):.1f}x the time for {factor}x the data",
            f"about {factor}x if linear",
            None,
            f"spread {spread(growth, 1)}; the reference grows {median(indicator_growth):.1f}x",
        ),
        Figure(
            f"indicator-matrix counts at {factor}x (reference)",
            f"{median(seconds[f'indicator {factor}x']):.2f} s",
            f"pair statistics {median(seconds[f'{factor}x']):.2f} s",
            f"{median(speedup):.1f}x faster",
            "same n_both",
            mismatches == 0,
            f"{mismatches} pair counts differ between the two, at 1x and {factor}x",
        ),
    ]
    unique_growth = median([b[0] for b in stages["big"]]) / median([a[0] for a in stages["1x"][1:]])
    join_growth = median([b[1] for b in stages["big"]]) / median([a[1] for a in stages["1x"][1:]])
    superlinear = median(growth) > 1.3 * factor
    notes = [
        "**Method.** The instance table is generated in memory with COCO train2017's counts (about 860k "
        "instances, 2.9 categories per image, person in about half the images), image_id and category as "
        "strings as raw_instances stores them. Timed: `image_categories_from_instances` (unique image x "
        "category) + `pair_statistics` (self-join on image_id, group by the two category strings, counts, "
        "lift, flags, sort). Reference, same tables: n_both as X^T X of the image x category indicator matrix "
        "(torch, float32, exact below 2^24), including the conversion from the Polars table.",
        f"**Growth.** At {factor}x the data the unique step took {unique_growth:.1f}x and the self-join + "
        f"group-by {join_growth:.1f}x as long. The join emits one row per ordered category pair per image "
        "(about 9 per image here), so the work is linear in images for COCO-like data"
        + (
            (
                "; both this and the reference grow faster than that "
                f"({median(growth):.0f}x and {median(indicator_growth):.0f}x), so the extra is not Polars' doing: "
                "most likely the 1x tables still fit in the CPU's last-level cache and the 10x ones do not, on "
                "a machine whose memory bandwidth is shared with other jobs. "
            )
            if superlinear and median(indicator_growth) > 1.3 * factor
            else (
                "; this grows faster than that while the reference does not, so the string-keyed unique and "
                "group-by over tens of millions of rows are what scales badly. "
                if superlinear else ", and the measured growth is close to linear. "
            )
        )
        + (
            f"**Plan (pipeline code, not changed here):** compute `n_both` in `cooccurrence.pair_statistics` "
            f"from the image x category indicator matrix (80 categories for COCO), or at least key the join and "
            f"group-by on categorical codes instead of strings; the reference row shows that this is "
            f"{median(speedup):.1f}x faster at {factor}x and gives the same counts."
            if median(speedup) > 1.5 else
            f"The indicator-matrix reference is not meaningfully faster here ({median(speedup):.1f}x at "
            f"{factor}x), so nothing needs changing at this size."
        ),
    ]
    raw = {"seconds": seconds, "mismatches": mismatches, "stages": stages}
    return Section(5, "Co-occurrence statistics at COCO size and 10x", figures, notes, raw)
