"""Benchmark 1: the metric engine (chunked top-k, then AP@k) against torchmetrics and a full-sort implementation.

All three score the same image->text AP@10 on the same embeddings (5 captions per image,
COCO 5k test size at full scale): the engine is `retrieval_metrics.topk_gallery` +
`average_precision_at_k`; the straightforward reference builds the whole similarity
matrix and sorts every row; torchmetrics' `RetrievalMAP(top_k=10)` takes the whole
matrix flattened with a query index per entry. Each measurement runs in its own process
(time and peak memory of the measured block only; embeddings are made before it).

torchmetrics defines AP@k differently from docs/definitions.md#odmapk-image-to-text: it divides by the number of
relevant items found in the top k, not by min(k, |R|), and it drops relevant items whose
score is <= 0. The embeddings here have positive similarities (as CLIP's do), and the
check converts between the two definitions with the engine's own hit counts
(AP_design = AP_torchmetrics * hits / min(k, |R|)).

Memory stays bounded at 100k x 500k: the engine's peak is about chunk_size x n_gallery x 4
bytes whatever the number of queries, so the peak is measured on row slices (1,024 and
2,048 query rows against the full 500k gallery); both slices must show the same peak.
torchmetrics (about 10 GB and 100 s per run at full size) runs at most 2 repetitions.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.benchmarks.harness import Figure, Section, measure_in_child, median, peak_memory, ratios, spread

K = 10
CAPTIONS_PER_IMAGE = 5
SCALES = {
    # n_images x 5 captions for the three-way comparison; big_* for the bounded-memory check.
    "tiny": dict(n_images=200, dim=64, big_gallery=4_000, big_rows=(128, 512), chunk_size=128),
    "quick": dict(n_images=1_000, dim=512, big_gallery=50_000, big_rows=(1_024, 2_048), chunk_size=1_024),
    "full": dict(n_images=5_000, dim=512, big_gallery=500_000, big_rows=(1_024, 2_048), chunk_size=1_024),
}
FULL_QUERIES, FULL_GALLERY = 100_000, 500_000
TORCHMETRICS_REPS = 2  # each full-size run holds ~10 GB for ~100 s; two are enough for its ratio


# --------------------------------------------------------------------------- data


def coco_like_embeddings(n_images: int, dim: int, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_emb [n, dim], caption_emb [5n, dim], caption_image [5n]) shaped like CLIP on COCO.

    L2-normalised rows sharing a common direction, so every similarity is positive (CLIP's
    image-text cosines sit around 0.2-0.4) and image->text mAP@10 is about 0.4. Caption rows
    are shuffled, so an image's captions are not adjacent in the gallery.
    """
    generator = torch.Generator().manual_seed(seed)
    common = torch.nn.functional.normalize(torch.randn(dim, generator=generator), dim=0)
    images = torch.nn.functional.normalize(0.7 * common + torch.randn(n_images, dim, generator=generator) / dim**0.5, dim=1)
    caption_image = torch.randperm(n_images * CAPTIONS_PER_IMAGE, generator=generator) % n_images
    noise = torch.randn(n_images * CAPTIONS_PER_IMAGE, dim, generator=generator) / dim**0.5
    captions = torch.nn.functional.normalize(0.7 * common + 0.2 * images[caption_image] + noise, dim=1)
    return images.to(device), captions.to(device), caption_image.to(device)


def random_unit_rows(n: int, dim: int, seed: int, device: str = "cpu", block: int = 65_536) -> torch.Tensor:
    """n L2-normalised random rows, made block by block so set-up never holds two copies."""
    out = torch.empty((n, dim), dtype=torch.float32, device=device)
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n, block):
        rows = torch.randn(min(block, n - start), dim, generator=generator)
        out[start : start + rows.shape[0]] = torch.nn.functional.normalize(rows, dim=1).to(device)
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- the three implementations (child processes)


def measure_engine(n_images: int, dim: int, chunk_size: int, out_npy: str = "", seed: int = 0, device: str = "cpu") -> dict:
    """The engine: chunked top-k of the gallery, then AP@k against CSR relevant sets."""
    from spur_assets.core.metrics.retrieval_metrics import RelevantSets, average_precision_at_k, topk_gallery

    images, captions, caption_image = coco_like_embeddings(n_images, dim, seed, device)
    order = torch.argsort(caption_image.cpu(), stable=True)
    relevant = RelevantSets(offsets=torch.arange(0, order.numel() + 1, CAPTIONS_PER_IMAGE), indices=order)
    _sync(device)
    with peak_memory(device) as memory:
        started = time.perf_counter()
        topk = topk_gallery(images, captions, K, chunk_size)
        ap = average_precision_at_k(topk, relevant, K)
        _sync(device)
        seconds = time.perf_counter() - started
    hits = (caption_image[topk] == torch.arange(n_images, device=topk.device).unsqueeze(1)).sum(dim=1)
    if out_npy:
        np.save(out_npy, np.stack([ap.cpu().numpy(), hits.cpu().numpy().astype(np.float64)]))
    return {"seconds": seconds, "mean_ap": float(ap.mean()), **memory}


def measure_full_sort(n_images: int, dim: int, out_npy: str = "", seed: int = 0, device: str = "cpu") -> dict:
    """The straightforward way: the whole similarity matrix, every row sorted, AP@k from the first k."""
    images, captions, caption_image = coco_like_embeddings(n_images, dim, seed, device)
    _sync(device)
    with peak_memory(device) as memory:
        started = time.perf_counter()
        similarity = images @ captions.T
        ranked = torch.argsort(similarity, dim=1, descending=True, stable=True)[:, :K]
        relevant = (caption_image[ranked] == torch.arange(n_images, device=ranked.device).unsqueeze(1)).double()
        precision = torch.cumsum(relevant, dim=1) / torch.arange(1, K + 1, device=ranked.device, dtype=torch.float64)
        ap = (relevant * precision).sum(dim=1) / min(K, CAPTIONS_PER_IMAGE)
        _sync(device)
        seconds = time.perf_counter() - started
    if out_npy:
        np.save(out_npy, ap.cpu().numpy())
    return {"seconds": seconds, "mean_ap": float(ap.mean()), **memory}


def measure_torchmetrics(n_images: int, dim: int, out_npy: str = "", seed: int = 0, device: str = "cpu") -> dict:
    """torchmetrics RetrievalMAP(top_k=k) on the flattened similarity matrix, one value per query kept."""
    from torchmetrics.retrieval import RetrievalMAP

    images, captions, caption_image = coco_like_embeddings(n_images, dim, seed, device)
    metric = RetrievalMAP(top_k=K, aggregation=lambda values, dim=None: values).to(device)
    _sync(device)
    with peak_memory(device) as memory:
        started = time.perf_counter()
        similarity = images @ captions.T
        target = caption_image.unsqueeze(0) == torch.arange(n_images, device=similarity.device).unsqueeze(1)
        indexes = torch.arange(n_images, device=similarity.device).repeat_interleave(captions.shape[0])
        metric.update(similarity.flatten(), target.flatten(), indexes=indexes)
        ap = metric.compute()
        _sync(device)
        seconds = time.perf_counter() - started
    if out_npy:
        np.save(out_npy, ap.double().cpu().numpy())
    return {"seconds": seconds, "mean_ap": float(ap.mean()), **memory}


def measure_topk_peak(n_rows: int, n_gallery: int, dim: int, chunk_size: int, seed: int = 0, device: str = "cpu") -> dict:
    """Peak memory and time of topk_gallery for n_rows queries against n_gallery rows (the bounding step)."""
    from spur_assets.core.metrics.retrieval_metrics import topk_gallery

    gallery = random_unit_rows(n_gallery, dim, seed, device)
    queries = random_unit_rows(n_rows, dim, seed + 1, device)
    _sync(device)
    with peak_memory(device) as memory:
        started = time.perf_counter()
        topk = topk_gallery(queries, gallery, K, chunk_size)
        _sync(device)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": int(topk.shape[0]), "gallery_mb": gallery.numel() * 4 / 2**20, **memory}


# --------------------------------------------------------------------------- the section


def run(scale: str = "full", reps: int = 3, device: str = "cpu", log=print) -> Section:
    """Three-way AP@10 comparison (time, peak memory, agreement) and the bounded-memory check."""
    size = SCALES[scale]
    n_images, dim, chunk = size["n_images"], size["dim"], size["chunk_size"]
    common = {"n_images": n_images, "dim": dim, "device": device}
    runs: dict[str, list[dict]] = {"engine": [], "full_sort": [], "torchmetrics": []}
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        outputs = {name: str(Path(tmp) / f"{name}.npy") for name in runs}
        for rep in range(reps):
            runs["engine"].append(measure_in_child("bench_metrics", "measure_engine", {**common, "chunk_size": chunk, "out_npy": outputs["engine"]}))
            runs["full_sort"].append(measure_in_child("bench_metrics", "measure_full_sort", {**common, "out_npy": outputs["full_sort"]}))
            if rep < TORCHMETRICS_REPS:
                runs["torchmetrics"].append(measure_in_child("bench_metrics", "measure_torchmetrics", {**common, "out_npy": outputs["torchmetrics"]}))
            log(
                f"  rep {rep + 1}/{reps}: engine {runs['engine'][-1]['seconds']:.2f} s, full sort "
                f"{runs['full_sort'][-1]['seconds']:.2f} s"
                + (f", torchmetrics {runs['torchmetrics'][-1]['seconds']:.2f} s" if rep < TORCHMETRICS_REPS else "")
            )
        engine_ap, hits = np.load(outputs["engine"])
        full_sort_ap = np.load(outputs["full_sort"])
        torchmetrics_ap = np.load(outputs["torchmetrics"])
    # torchmetrics' AP@k divides by the hits in the top k; ours (docs/definitions.md) by min(k, |R|).
    torchmetrics_as_design = torchmetrics_ap * hits / min(K, CAPTIONS_PER_IMAGE)
    diff_full_sort = float(np.abs(engine_ap - full_sort_ap).max())
    diff_torchmetrics = float(np.abs(engine_ap - torchmetrics_as_design).max())

    seconds = {name: [r["seconds"] for r in rows] for name, rows in runs.items()}
    peaks = {name: median([r["peak_extra_mb"] for r in rows]) for name, rows in runs.items()}
    vs_full_sort = ratios(seconds["engine"], seconds["full_sort"])
    vs_torchmetrics = ratios(seconds["engine"][: len(seconds["torchmetrics"])], seconds["torchmetrics"])
    shape = f"{n_images:,} images x {n_images * CAPTIONS_PER_IMAGE:,} captions, dim {dim}"

    big_rows = []
    for rows in size["big_rows"]:
        big_rows.append(measure_in_child(
            "bench_metrics", "measure_topk_peak",
            {"n_rows": rows, "n_gallery": size["big_gallery"], "dim": dim, "chunk_size": chunk, "device": device},
        ))
        log(f"  top-k {rows:,} x {size['big_gallery']:,}: {big_rows[-1]['seconds']:.1f} s, peak +{big_rows[-1]['peak_extra_mb']:.0f} MiB")
    bound_mb = chunk * size["big_gallery"] * 4 / 2**20
    last = big_rows[-1]
    full_matrix_gb = FULL_QUERIES * FULL_GALLERY * 4 / 1e9
    per_row_s = last["seconds"] / last["rows"]

    figures = [
        Figure(
            f"AP@10 i2t, {shape}: time",
            f"{median(seconds['engine']):.2f} s (engine)",
            f"full sort {median(seconds['full_sort']):.2f} s; torchmetrics {median(seconds['torchmetrics']):.2f} s",
            f"{median(vs_full_sort):.2f}x full sort; {median(vs_torchmetrics):.3f}x torchmetrics",
            "",
            None,
            f"engine time / reference time per repetition; spreads {spread(vs_full_sort)} and {spread(vs_torchmetrics, 3)} "
            f"({len(seconds['torchmetrics'])} torchmetrics repetitions)",
        ),
        Figure(
            "AP@10 i2t: peak extra memory",
            f"{peaks['engine']:.0f} MiB (engine)",
            f"full sort {peaks['full_sort']:.0f} MiB; torchmetrics {peaks['torchmetrics']:.0f} MiB",
            # At tiny sizes a reference's extra memory can measure 0 MiB: no ratio then, not a crash.
            (f"{peaks['engine'] / peaks['full_sort']:.2f}x" if peaks["full_sort"] > 0 else "n/a") + "; "
            + (f"{peaks['engine'] / peaks['torchmetrics']:.3f}x" if peaks["torchmetrics"] > 0 else "n/a"),
            "",
            None,
            f"over the embeddings already in memory; {runs['engine'][0]['method']}",
        ),
        Figure(
            "AP@10 i2t: agreement (max abs difference per query)",
            f"{diff_full_sort:.1e} vs full sort",
            f"{diff_torchmetrics:.1e} vs torchmetrics (its definition converted)",
            "",
            "0 up to float rounding",
            diff_full_sort < 1e-9 and diff_torchmetrics < 1e-6,
            f"mAP@10 = {float(engine_ap.mean()):.4f} over {engine_ap.size:,} queries",
        ),
    ]
    for rows, result in zip(size["big_rows"], big_rows, strict=True):
        figures.append(Figure(
            f"top-k, {rows:,} query rows x {size['big_gallery']:,} gallery, chunk {chunk}: peak extra memory",
            f"{result['peak_extra_mb']:,.0f} MiB in {result['seconds']:.1f} s",
            f"bound chunk x gallery x 4 B = {bound_mb:,.0f} MiB",
            f"{result['peak_extra_mb'] / bound_mb:.2f}x the bound",
            "flat in the number of queries",
            None,
            f"gallery itself {result['gallery_mb']:,.0f} MiB, held before the block",
        ))
    flat = abs(big_rows[-1]["peak_extra_mb"] - big_rows[0]["peak_extra_mb"]) <= 0.1 * bound_mb
    figures.append(Figure(
        f"top-k at {FULL_QUERIES:,} x {FULL_GALLERY:,} (COCO-scale bound)",
        f"peak {big_rows[-1]['peak_extra_mb']:,.0f} MiB (as measured on the slices)" if flat else "peak not flat across slices",
        f"full matrix would need {full_matrix_gb:,.0f} GB (float32)",
        f"{big_rows[-1]['peak_extra_mb'] / 1024 / full_matrix_gb:.4f}x",
        "bounded",
        flat if scale != "tiny" else None,
        f"time extrapolated from the {last['rows']:,}-row slice: {per_row_s * FULL_QUERIES / 60:.0f} min on this CPU"
        if size["big_gallery"] == FULL_GALLERY else f"slice gallery {size['big_gallery']:,} at this scale",
    ))

    faster = median(vs_full_sort) < 1 and median(vs_torchmetrics) < 1
    leaner = peaks["engine"] < min(peaks["full_sort"], peaks["torchmetrics"])
    peak_vs_bound = big_rows[-1]["peak_extra_mb"] / bound_mb
    notes = [
        f"**Method.** Engine = `topk_gallery` ({chunk:,} query rows at a time, float32 matmul, `torch.topk` "
        "with ties broken by index) + `average_precision_at_k`. Full sort = `images @ captions.T`, `argsort` "
        "of every row, AP@10 from the first 10. torchmetrics = `RetrievalMAP(top_k=10)` over the flattened "
        "matrix with a query index per entry (building those inputs is inside its time: its API needs them). "
        "Each measurement is a fresh process; the timed block starts with the embeddings in memory.",
        f"**Why the engine {'is faster and leaner' if faster and leaner else 'compares as it does'}.** The full "
        f"sort orders all {n_images * CAPTIONS_PER_IMAGE:,} captions of every row to keep 10 (O(n log n) per "
        "row, plus an int64 index matrix twice the size of the float32 similarities); torchmetrics also holds "
        "the whole matrix, sorts one int64 query index per similarity and loops over queries in Python. The "
        f"engine keeps the top 11 of each row of a {chunk:,}-row block (O(n) per row) and never holds more "
        "than one block of similarities."
        + ("" if faster else " Here it was not faster than every reference: see the ratios; with small "
           "galleries the per-block overhead (tie checks, CSR relevance) weighs more than the sort it saves."),
        f"**100k x 500k.** Memory does not depend on the number of queries: each block of {chunk:,} rows is "
        f"ranked and dropped before the next, so the {size['big_rows'][0]:,}- and {size['big_rows'][-1]:,}-row "
        f"slices {'show the same peak' if flat else 'should show the same peak (they did not here: see the table)'}, "
        f"{peak_vs_bound:.2f}x the `chunk_size x n_gallery x 4 B` bound the README documents (about 2 GB at "
        "1,024 x 500k; the rest is the top-k's working memory). Ranking all 100,000 rows would only take "
        "longer (extrapolated in the table), not more memory; it was not run in full to keep bench/benchmarks/run short.",
    ]
    raw = {"runs": runs, "big": big_rows, "diff_full_sort": diff_full_sort, "diff_torchmetrics": diff_torchmetrics}
    return Section(1, "Metric engine vs torchmetrics and a full sort", figures, notes, raw)
