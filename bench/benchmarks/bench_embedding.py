"""Benchmark 2: embedding throughput through the pipeline's data path vs the raw model forward.

Pipeline path = exactly what `evaluation.embed_eval_set` does for metric_report
(`MetricReportConfig.workers`, default 1): `embed_images(bundle, ImageFiles.of(paths,
ImagePreprocessing.of(bundle.image_processor)), batch_size=256, device=device, workers=1)`:
on CPU one decoding thread of this process decodes, resizes and crops the files 32 at a
time (2 steps ahead) while the calling thread normalises the uint8 batch and runs the forward
pass (on CUDA, DataLoader processes decode instead). Also
timed: the same with `workers=2` and `workers=0` (decoding on the calling thread, no
overlap); decoding alone (`load_images_uint8`); `embed_images` on already-decoded uint8
images; captions -> `embed_texts` (tokenize + forward); and metric_report's own passes, the files
decoded (the captions tokenized) once for three checkpoints that share the image processor and
tokenizer (`embed_images_many`, `embed_texts_many`, as `evaluation.embed_eval_sets` runs them for
base, control and fine-tuned), against the three models' raw forwards.
Raw forward = `get_image_features` / `get_text_features` on pre-decoded, pre-normalised
pixel tensors / pre-tokenized ids, same batches, same autocast: the limit.

Two settings: the built-in data with the demo's base model (64-px PNG scenes, the
2-layer 64-wide CLIP of `BaseCheckpointConfig`) and COCO-like inputs (640x480 JPEGs, a
CLIP shaped like ViT-B/32 at 224 px, random weights: speed does not depend on them).
"""

from __future__ import annotations

import copy
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from bench.benchmarks.coco_like import write_jpegs
from bench.benchmarks.harness import Figure, Section, median, ratios, repeat_interleaved, spread
from spur_assets.core.model.clip_model import (
    ClipBundle,
    clip_image_processor,
    embed_images,
    embed_images_many,
    embed_texts,
    embed_texts_many,
    load_images_uint8,
    new_small_clip,
    pixel_values_from_uint8,
    tokenize_captions,
    train_caption_tokenizer,
)
from spur_assets.core.runtime.devices import autocast_for
from spur_assets.core.data.image_stream import DECODE_ITEM_ROWS, DEFAULT_PREFETCH, ImageFiles, chunk_steps, stream_rows
from spur_assets.core.data.preprocessing import ImagePreprocessing

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

    from spur_assets.core.data.builtin_dataset import BuiltinDatasetSpec, generate_builtin_dataset
    from spur_assets.core.data.coco_ingest import read_manifest

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


def pipeline_images(bundle: ClipBundle, paths: list[str], device: str, workers: int = 1, progress=None) -> torch.Tensor:
    """embed_eval_set's image path for metric_report: the files streamed through `workers` decoders (threads on CPU)."""
    files = ImageFiles.of(paths, ImagePreprocessing.of(bundle.image_processor))
    return embed_images(bundle, files, batch_size=BATCH_SIZE, device=device, workers=workers, progress=progress)


def pipeline_images_processes(bundle: ClipBundle, paths: list[str], device: str) -> None:
    """The same pass with one DataLoader worker process decoding (what embedding did on CPU before, and does on CUDA)."""
    files = ImageFiles.of(paths, ImagePreprocessing.of(bundle.image_processor))
    steps = chunk_steps(len(files), BATCH_SIZE, first=DECODE_ITEM_ROWS)
    with torch.inference_mode(), autocast_for(torch.device(device)):
        for batch in stream_rows(files, steps, device, workers=1, threads=False):
            features = bundle.model.get_image_features(pixel_values=pixel_values_from_uint8(batch, bundle.image_processor))
            torch.nn.functional.normalize(features.pooler_output.float(), dim=-1).cpu()


REPORT_CHECKPOINTS = 3  # metric_report scores base, control and fine-tuned, which share the base's image processor


def report_checkpoints(bundle: ClipBundle) -> list[ClipBundle]:
    """The base and two copies with other weights and the same processor: metric_report's three checkpoints."""
    twins = [bundle]
    for seed in range(1, REPORT_CHECKPOINTS):
        twin = copy.deepcopy(bundle)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in twin.model.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
        twins.append(twin)
    return twins


def report_pass(bundles: list[ClipBundle], paths: list[str], device: str, workers: int = 1) -> list[torch.Tensor]:
    """metric_report's image pass (`evaluation.embed_eval_sets`): the files decoded once for all checkpoints."""
    files = ImageFiles.of(paths, ImagePreprocessing.of(bundles[0].image_processor))
    return embed_images_many(bundles, files, batch_size=BATCH_SIZE, device=device, workers=workers)


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


def _timed(function, cpu: list[float] | None = None) -> float:
    """Wall seconds of function(); with `cpu`, also appends this process's CPU seconds (all its threads)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    function()
    if cpu is not None:
        cpu.append(time.process_time() - cpu_started)
    return time.perf_counter() - started


def measure_setting(bundle: ClipBundle, paths: list[str], captions: list[str], size: int, reps: int, device: str, log) -> dict:
    """Seconds per repetition for every path of one setting (images and captions).

    Also "first_batch": seconds from the call to the first embedded batch of the workers=1
    pipeline (decoding the first step's files + one forward), from its progress calls.
    """
    model = bundle.model.to(device).eval()
    twins = report_checkpoints(bundle)
    for twin in twins:
        twin.model.to(device).eval()
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
    pipeline_images(bundle, paths[:16], device, workers=1)
    embed_texts(bundle, captions[:8], batch_size=BATCH_SIZE, device=device)
    first_batch: list[float] = []
    cores_used: list[float] = []  # (this process's + any child's CPU seconds) / wall seconds, workers=1 pipeline
    worker_seconds: list[float] = []  # CPU seconds of child processes in that pipeline (DataLoader workers on CUDA)
    # CPU seconds of the single-threaded stages: unlike wall time they barely move with other jobs'
    # load, so they estimate what the overlap could give on idle cores.
    cpu: dict[str, list[float]] = {"raw_forward": [], "decode_only": [], "embed_from_uint8": []}

    def pipeline_one_worker() -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # DataLoader workers (CUDA) are children, reaped at the end
        started, cpu_started = time.perf_counter(), time.process_time()
        marks: list[float] = []
        pipeline_images(bundle, paths, device, workers=1, progress=lambda done, total: marks.append(time.perf_counter()))
        sync()
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        worker_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
        first_batch.append(marks[0] - started)
        cores_used.append((time.process_time() - cpu_started + worker_cpu) / wall)
        worker_seconds.append(worker_cpu)
        return wall

    runs = {
        "pipeline": pipeline_one_worker,
        "raw_forward": lambda: _timed(lambda: raw_image_forward(model, pixel_batches, device), cpu["raw_forward"]),
        "pipeline_2_workers": lambda: _timed(lambda: (pipeline_images(bundle, paths, device, workers=2), sync())),
        "pipeline_0_workers": lambda: _timed(lambda: (pipeline_images(bundle, paths, device, workers=0), sync())),
        "pipeline_process": lambda: _timed(lambda: (pipeline_images_processes(bundle, paths, device), sync())),
        "decode_only": lambda: _timed(lambda: load_images_uint8(paths, size), cpu["decode_only"]),
        "embed_from_uint8": lambda: _timed(lambda: (embed_images(bundle, decoded, batch_size=BATCH_SIZE, device=device), sync()), cpu["embed_from_uint8"]),
        "report_pass": lambda: _timed(lambda: (report_pass(twins, paths, device), sync())),
        "raw_forward_report": lambda: _timed(lambda: [raw_image_forward(t.model, pixel_batches, device) for t in twins]),
        "text_pipeline": lambda: _timed(lambda: (embed_texts(bundle, captions, batch_size=BATCH_SIZE, device=device), sync())),
        "report_text_pass": lambda: _timed(lambda: (embed_texts_many(twins, captions, batch_size=BATCH_SIZE, device=device), sync())),
        "text_raw_forward_report": lambda: _timed(lambda: [raw_text_forward(t.model, token_batches, device) for t in twins]),
        "text_raw_forward": lambda: _timed(lambda: raw_text_forward(model, token_batches, device)),
    }
    seconds = repeat_interleaved(runs, reps, log)
    seconds["first_batch"] = first_batch
    seconds["cores_used"] = cores_used
    seconds["cpu"] = {**cpu, "worker": worker_seconds}
    return seconds


def _figures(label: str, n_images: int, n_captions: int, seconds: dict) -> tuple[list[Figure], dict]:
    raw_s = seconds["raw_forward"]
    image_ratio = ratios(raw_s, seconds["pipeline"])  # throughput ratio = time ratio inverted
    two_ratio = ratios(raw_s, seconds["pipeline_2_workers"])
    zero_ratio = ratios(raw_s, seconds["pipeline_0_workers"])
    uint8_ratio = ratios(raw_s, seconds["embed_from_uint8"])
    overlap = ratios(seconds["pipeline_0_workers"], seconds["pipeline"])  # speed-up of workers=1 over workers=0
    # a decoding thread against a DataLoader worker process, both one decoder (absent in runs before threads)
    process_ratio = ratios(raw_s, seconds["pipeline_process"]) if "pipeline_process" in seconds else None
    thread_vs_process = ratios(seconds["pipeline_process"], seconds["pipeline"]) if process_ratio else None
    text_ratio = ratios(seconds["text_raw_forward"], seconds["text_pipeline"])
    # metric_report's pass over its three checkpoints against their three raw forwards (absent in older runs)
    report_ratio = ratios(seconds["raw_forward_report"], seconds["report_pass"]) if "report_pass" in seconds else None
    report_text_ratio = (
        ratios(seconds["text_raw_forward_report"], seconds["report_text_pass"]) if "report_text_pass" in seconds else None
    )
    pipe, raw, decode, from_uint8 = (median(seconds[k]) for k in ("pipeline", "raw_forward", "decode_only", "embed_from_uint8"))
    steps = -(-n_images // BATCH_SIZE)
    shares = {
        "decode": decode / pipe,
        "to_float": max(0.0, from_uint8 - raw) / pipe,
        "forward": raw / pipe,
        "exposed": max(0.0, pipe - from_uint8) / pipe,  # data path not hidden behind the model
    }
    summary = {
        "image_ratio": median(image_ratio),
        "two_workers_ratio": median(two_ratio),
        "zero_workers_ratio": median(zero_ratio),
        "uint8_ratio": median(uint8_ratio),
        "overlap_speedup": median(overlap),
        "text_ratio": median(text_ratio),
        "report_ratio": median(report_ratio) if report_ratio else None,
        "report_text_ratio": median(report_text_ratio) if report_text_ratio else None,
        "first_batch_s": median(seconds["first_batch"]),
        "cores_used": median(seconds["cores_used"]),
        "pipeline_s": pipe,
        "raw_s": raw,
        "decode_s": decode,
        "from_uint8_s": from_uint8,
        "zero_workers_s": median(seconds["pipeline_0_workers"]),
        "steps": steps,
        "decode_ms_per_image": 1000 * decode / n_images,
        "forward_ms_per_image": 1000 * raw / n_images,
        # Best case with one worker on an idle core, from CPU seconds (load-independent): the longer
        # of model and decoding, plus the first step's decoding, which nothing overlaps; worker
        # start-up and the hand-over of batches not counted.
        "ceiling_one_worker": _ceiling(seconds["cpu"], steps, 1),
        "ceiling_two_workers": _ceiling(seconds["cpu"], steps, 2),
        "decode_cpu_ms_per_image": 1000 * median(seconds["cpu"]["decode_only"]) / n_images,
        "forward_cpu_ms_per_image": 1000 * median(seconds["cpu"]["raw_forward"]) / n_images,
        "worker_cpu_ms_per_image": 1000 * median(seconds["cpu"]["worker"]) / n_images,
        **shares,
    }
    rate = lambda key: f"{n_images / median(seconds[key]):,.0f} img/s"  # noqa: E731
    raw_rate = f"raw forward {n_images / raw:,.0f} img/s"
    figures = [
        Figure(
            f"{label}: images/s, pipeline path (`ImageFiles`, `workers=1`, as metric_report)",
            rate("pipeline"),
            raw_rate,
            f"{summary['image_ratio']:.2f}",
            f">= {TARGET}",
            summary["image_ratio"] >= TARGET,
            f"spread {spread(image_ratio)}; CPU it got: {summary['cores_used']:.2f} cores (process CPU s / wall s); "
            f"first batch out after {summary['first_batch_s']:.2f} s; decode alone "
            f"{shares['decode']:.0%} of the path's time (overlapped), uint8->float + wrapper {shares['to_float']:.0%}, "
            f"forward {shares['forward']:.0%}, data path not hidden {shares['exposed']:.0%}",
        ),
        *(
            [Figure(
                f"{label}: images/s per checkpoint, metric_report's pass: {REPORT_CHECKPOINTS} checkpoints sharing an "
                "image processor, each file decoded once for all (`embed_images_many`, `workers=1`)",
                f"{REPORT_CHECKPOINTS * n_images / median(seconds['report_pass']):,.0f} img/s",
                f"raw forward {REPORT_CHECKPOINTS * n_images / median(seconds['raw_forward_report']):,.0f} img/s "
                f"({REPORT_CHECKPOINTS} models)",
                f"{summary['report_ratio']:.2f}",
                f">= {TARGET}",
                summary["report_ratio"] >= TARGET,
                f"spread {spread(report_ratio)}; one decode per {REPORT_CHECKPOINTS} forwards: what metric_report "
                "runs for base, control and fine-tuned",
            )]
            if report_ratio
            else []
        ),
        Figure(
            f"{label}: images/s, `workers=2`",
            rate("pipeline_2_workers"),
            raw_rate,
            f"{summary['two_workers_ratio']:.2f}",
            f">= {TARGET}",
            summary["two_workers_ratio"] >= TARGET,
            f"spread {spread(two_ratio)}; forward + 2 decoding threads = 3 busy threads on {_cores()} cores",
        ),
        Figure(
            f"{label}: images/s, `workers=0` (decode on the calling thread, no overlap)",
            rate("pipeline_0_workers"),
            raw_rate,
            f"{summary['zero_workers_ratio']:.2f}",
            "",
            None,
            f"spread {spread(zero_ratio)}; `workers=1` is {summary['overlap_speedup']:.2f}x this (spread {spread(overlap)})",
        ),
        *(
            [Figure(
                f"{label}: images/s, one DataLoader worker process decoding instead of a thread (CUDA's path)",
                rate("pipeline_process"),
                raw_rate,
                f"{median(process_ratio):.2f}",
                "",
                None,
                f"spread {spread(process_ratio)}; the thread path is {median(thread_vs_process):.2f}x this "
                f"(spread {spread(thread_vs_process)})",
            )]
            if process_ratio
            else []
        ),
        Figure(
            f"{label}: images/s, `embed_images` on decoded uint8 (no file reading)",
            rate("embed_from_uint8"),
            raw_rate,
            f"{summary['uint8_ratio']:.2f}",
            "",
            None,
            f"spread {spread(uint8_ratio)}; the ceiling for any data path; decoding alone "
            f"{n_images / decode:,.0f} img/s ({summary['decode_ms_per_image']:.2f} ms/image on one thread)",
        ),
        Figure(
            f"{label}: captions/s, `embed_texts`",
            f"{n_captions / median(seconds['text_pipeline']):,.0f} cap/s",
            f"raw forward {n_captions / median(seconds['text_raw_forward']):,.0f} cap/s",
            f"{summary['text_ratio']:.2f}",
            f">= {TARGET}",
            summary["text_ratio"] >= TARGET,
            f"spread {spread(text_ratio)}; the rest is tokenization",
        ),
        *(
            [Figure(
                f"{label}: captions/s per checkpoint, metric_report's pass: {REPORT_CHECKPOINTS} checkpoints sharing a "
                "tokenizer, each caption tokenized once for all (`embed_texts_many`)",
                f"{REPORT_CHECKPOINTS * n_captions / median(seconds['report_text_pass']):,.0f} cap/s",
                f"raw forward {REPORT_CHECKPOINTS * n_captions / median(seconds['text_raw_forward_report']):,.0f} cap/s "
                f"({REPORT_CHECKPOINTS} models)",
                f"{summary['report_text_ratio']:.2f}",
                f">= {TARGET}",
                summary["report_text_ratio"] >= TARGET,
                f"spread {spread(report_text_ratio)}; one tokenization per {REPORT_CHECKPOINTS} forwards",
            )]
            if report_text_ratio
            else []
        ),
    ]
    return figures, summary


def _ceiling(cpu: dict, steps: int, workers: int) -> float:
    """raw / best-case pipeline time with `workers` decoding processes on idle cores, from CPU seconds."""
    raw, decode, model = (median(cpu[k]) for k in ("raw_forward", "decode_only", "embed_from_uint8"))
    model = max(model, raw)
    head = decode / steps  # the first step's files, decoded before any forward can start
    return raw / (head + max(model, decode / workers) * (steps - 1) / steps + model / steps)


def _cores() -> int:
    return os.cpu_count() or 1


def run(scale: str = "full", reps: int = 3, device: str = "cpu", log=print) -> Section:
    """Both settings; ratios = raw-forward time / pipeline time per repetition (throughput ratio)."""
    size = SCALES[scale]
    raw: dict = {}
    counts: dict = {}
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-embedding-") as tmp:
        root = Path(tmp)
        paths, captions = builtin_inputs(root, size["builtin_images"])
        log(f"  built-in: {len(paths)} images, {len(captions)} captions")
        raw["builtin"] = measure_setting(builtin_model(captions), paths, captions, 64, reps, device, log)
        counts["builtin"] = (len(paths), len(captions))

        paths = write_jpegs(root / "coco", size["coco_images"])
        captions = coco_captions(5 * len(paths))
        log(f"  COCO-like: {len(paths)} JPEGs 640x480, {len(captions)} captions, model {size['coco_model']}")
        raw["coco"] = measure_setting(coco_model(captions, size["coco_model"]), paths, captions, 224, reps, device, log)
        counts["coco"] = (len(paths), len(captions))
    return build_section(raw, counts, size["coco_model"], load_start, os.getloadavg()[0], torch.get_num_threads())


def build_section(raw: dict, counts: dict, coco_shape: str, load_start: float, load_end: float, threads: int) -> Section:
    """Figures and notes from the measured seconds (`raw[setting]` as `measure_setting` returns them).

    Separate from `run` so a section can be rendered again from a saved RESULTS.json.
    """
    figures: list[Figure] = []
    summary: dict = {}
    for setting, label in (("builtin", "built-in 64-px PNG, demo base model"), ("coco", f"COCO-like 640x480 JPEG, {coco_shape} at 224 px")):
        rows, summary[setting] = _figures(label, *counts[setting], raw[setting])
        figures += rows
    raw = {**raw, "counts": counts}

    b, c = summary["builtin"], summary["coco"]
    cores = _cores()
    summary.update(torch_threads=threads, cores=cores, load_1min=[round(load_start, 2), round(load_end, 2)])
    builtin_cpu = raw["builtin"]["cpu"]
    # What-ifs from the same CPU seconds: the demo's own 500-image test set (2 steps of 256), and a
    # first decode step of 32 files instead of 256 (the rest unchanged).
    demo_ceiling = _ceiling(builtin_cpu, 2, 1)
    raw_cpu, decode_cpu, model_cpu = (median(builtin_cpu[k]) for k in ("raw_forward", "decode_only", "embed_from_uint8"))
    small_head = {
        w: raw_cpu / (decode_cpu * 32 / counts["builtin"][0] + max(max(model_cpu, raw_cpu), decode_cpu / w)) for w in (1, 2)
    }
    summary["builtin"].update(demo_ceiling=demo_ceiling, small_head_ceiling=small_head)
    # COCO 2017 val: 5,000 images, 20 steps of 256.
    coco_val_ceiling = _ceiling(raw["coco"]["cpu"], 20, 1)
    summary["coco"].update(val_ceiling=coco_val_ceiling)

    def where(name: str, x: dict) -> str:
        return (
            f"{name}: pipeline {x['pipeline_s']:.2f} s against raw forward {x['raw_s']:.2f} s, {x['steps']} step(s) of "
            f"up to 256; `embed_images` on decoded uint8 takes {x['from_uint8_s']:.2f} s (normalisation and wrapper "
            f"{x['to_float']:.0%} of the path), so {x['exposed']:.0%} of the path is data path the forward did not "
            f"hide; the first batch came out after {x['first_batch_s']:.2f} s (the first step's files decoded, "
            f"its forward)."
        )

    slower = [(name, x) for name, x in (("built-in", b), ("COCO-like", c)) if round(x["overlap_speedup"], 2) < 0.97]
    notes = [
        "**Method.** Pipeline = `embed_images(bundle, ImageFiles.of(paths, ImagePreprocessing.of(bundle.image_processor)), "
        "batch_size=256, device=device, workers=1)`, exactly what `evaluation.embed_eval_set` runs for `metric_report` "
        "(`MetricReportConfig.workers` = 1): on CPU one decoding thread of this process opens, decodes, resizes and "
        f"crops the files in items of 32 ({DEFAULT_PREFETCH} steps ahead) while the calling thread normalises each "
        "step and runs the forward; the steps ramp up from 32 files to 256. Pillow and NumPy release the GIL while "
        "they decode and copy, and while the thread runs the interpreter's switch interval is 0.2 ms instead of 5 ms "
        "(`threads.prompt_gil_handover`), so the forward gets the GIL back between its operators at once. "
        "`workers=2`: two decoding threads. `workers=0`: each step decoded on the calling thread, then embedded (no "
        "overlap). On CUDA the same call decodes in DataLoader processes instead (not measured here). Decode alone = "
        "`load_images_uint8(paths, size)` on the calling thread (the same `ImagePreprocessing` as "
        "`.of(bundle.image_processor)`). `embed_images` on decoded uint8 = the pipeline without files (normalisation, "
        "forward, L2 normalise, copy to CPU). Raw = `get_image_features` / `get_text_features` on tensors prepared "
        "beforehand (decoded, normalised, tokenized), same batches. `embed_texts` tokenizes the next batch in a second "
        "thread while the model embeds this one. Every path is timed once per repetition, interleaved; ratio = raw "
        "time / path time per repetition (a throughput ratio), median reported. Shares are medians of separately timed "
        "stages over the pipeline's median time; with overlap they do not add up. Decode alone, embed from uint8 and "
        "raw forward also record CPU seconds, used for the idle-core estimates below.",
        "**The machine.** "
        f"{cores} cores shared with other developers' jobs; 1-minute load average {load_start:.2f} when this section "
        f"started, {load_end:.2f} when it ended. torch runs {threads} intra-op thread(s) in this process "
        "(`bench/benchmarks/harness.py` `set_torch_threads`, `--threads`, default 1 for sections 1-5). The raw forward "
        "needs one core; the pipeline needs that core plus the decoding thread's, so it reaches the raw speed only "
        "where a second core is free: at a load average near 1 from other jobs on 2 cores it is not, and the decoding "
        "then takes time from the forward instead of running beside it. The wall-time figures here are the "
        "scheduler's as much as the code's. CPU seconds, used for the estimates below, move less with the load.",
        "**Where the rest goes.** " + where("Built-in", b) + " " + where("COCO-like", c)
        + f" Per image, on CPU seconds: decoding a 64-px PNG {b['decode_cpu_ms_per_image']:.2f} ms against "
        f"{b['forward_cpu_ms_per_image']:.2f} ms of the demo model's forward; a 640x480 JPEG "
        f"{c['decode_cpu_ms_per_image']:.1f} ms against {c['forward_cpu_ms_per_image']:.0f} ms for the ViT-B/32-sized "
        f"forward. At COCO size this run has {c['steps']} step(s) "
        + (
            "(fewer files than one batch), so little can overlap, and decoding is a few percent of the path. "
            if c["steps"] == 1
            else "and decoding is a few percent of the forward. "
        )
        + "For captions, tokenization (one `tokenizer(...)` call per batch, overlapped with the previous batch's "
        "forward) is the whole difference.",
        "**What the overlap buys.** Measured, `workers=1` against `workers=0`: "
        f"{b['overlap_speedup']:.2f}x on the built-in data, {c['overlap_speedup']:.2f}x at COCO size"
        + (
            f"; slower on the {' and '.join(name for name, _ in slower)} data in this run (within 3% counts as no "
            "change): with no idle core the decoding thread takes CPU from the forward instead of running beside it. "
            if slower
            else ". "
        )
        + "Estimated from CPU seconds for idle cores: the first step's files are decoded before any forward, then "
        "each step costs the longer of forward and decoding, so "
        "raw / (decode/steps + max(model, decode/workers) x (steps-1)/steps + model/steps) = "
        f"{b['ceiling_one_worker']:.2f} with one decoder and {b['ceiling_two_workers']:.2f} with two on the built-in "
        f"set ({b['steps']} equal step(s); the ramp from 32 files shrinks the head further: "
        f"{small_head[1]:.2f} with one), {demo_ceiling:.2f} on the demo's own 500-image test set (2 steps); "
        f"{c['ceiling_one_worker']:.2f} on the COCO-like files ({c['steps']} step(s)) and {coco_val_ceiling:.2f} for "
        "a 5,000-image COCO val set (20 steps). Measured, `workers=2` gave "
        f"{b['two_workers_ratio']:.2f} (built-in) and {c['two_workers_ratio']:.2f} (COCO-like) against "
        f"{b['image_ratio']:.2f} / {c['image_ratio']:.2f} with one.",
        "**What limits the 64-px path.** "
        f"Decoding a 64-px PNG costs {b['decode_cpu_ms_per_image'] / b['forward_cpu_ms_per_image']:.0%} of the demo "
        f"model's forward on it in CPU seconds ({b['decode_cpu_ms_per_image']:.2f} vs {b['forward_cpu_ms_per_image']:.2f} "
        "ms), so the path needs "
        f"{1 + b['decode_cpu_ms_per_image'] / b['forward_cpu_ms_per_image']:.2f} cores to run at the raw forward's speed. "
        f"In this run it got {b['cores_used']:.2f} cores on average (this process's CPU seconds, decoding thread "
        "included, over wall seconds)"
        + (
            f", and `embed_images` on already-decoded pixels ran at {b['uint8_ratio']:.2f} of the raw forward "
            "(normalisation and wrapper; a cap on any data path)"
            if b["uint8_ratio"] < 0.95
            else ""
        )
        + ". What would close the rest for one checkpoint: a core of its own for the decoder (not granted on a shared "
        "2-core machine). What `metric_report` does instead: it scores base, control and fine-tuned, which keep the "
        "base's image processor, in one pass that decodes each file once and runs the three forwards on it "
        "(`evaluation.embed_eval_sets`), so a third of the decoding per forward"
        + (
            f": {b['report_ratio']:.2f} of the three raw forwards on the built-in data, {c['report_ratio']:.2f} at COCO "
            "size (rows 'metric_report's pass'). "
            if b.get("report_ratio") is not None and c.get("report_ratio") is not None
            else ". "
        )
        + "At COCO size the forward is "
        f"{c['forward_cpu_ms_per_image'] / max(c['decode_cpu_ms_per_image'], 1e-9):.0f}x the decoding per image, so "
        "decoding is a few percent of the path whatever the workers.",
    ]
    return Section(2, "Embedding throughput: pipeline data path vs raw forward", figures, notes, {"seconds": raw, "summary": summary})
