"""Benchmarks 1-4 on the accelerator: CUDA (bf16 autocast) when there is one, else CPU; same tables.

    .venv/bin/python bench/benchmarks/gpu.py            # full sizes, 3 repetitions (for a GPU machine)
    .venv/bin/python bench/benchmarks/gpu.py --small    # smoke-test sizes, 1 repetition (runs anywhere, slowly on CPU)
    .venv/bin/python bench/benchmarks/gpu.py --real-size           # the real-size path on CUDA (bench/benchmarks/real_size.py)
    .venv/bin/python bench/benchmarks/gpu.py --real-size --small   # the same at smoke size (any device)

`--real-size` is the one prepared GPU script of the "Real scale" issue: COCO-layout 640x480 JPEGs
(5,000 train + 1,000 test by default) and a ViT-B/32-shaped save_pretrained folder through the whole
graph with `spur run`, bf16 autocast and TF32 on CUDA, decoding / inpainting workers = cores. It
prints bench/benchmarks/real_size.py's per-stage table (wall time, images/s, peak RSS, peak GPU memory per
step) and the GPU utilisation sampled by nvidia-smi every 0.5 s during the run (mean over samples
while a step held the GPU, and the peak). Sized to finish within 8 minutes on one H100/H200-class
GPU with 16 cores (inputs generated on all cores first; fine-tuning capped at 40 steps of batch 256).

Device: `devices.resolve_device("auto")` (CUDA, then MPS, then CPU). The sections pass it
through: the metric engine, full sort and torchmetrics compute on it (peak memory =
the CUDA allocator's peak); embeddings and training run under the project's
`autocast_for` (bf16 on CUDA); the torch and diffusers inpainting backends run on it
(OpenCV stays on CPU). Prints Markdown to stdout, in the format of bench/benchmarks/RESULTS.md
(tables only; the explanations are in RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.benchmarks.harness import load_average, machine_description, render_section, run_section, set_torch_threads  # noqa: E402

GPU_SECTIONS = ("metrics", "embedding", "training", "counterfactuals")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes and 1 repetition (a smoke run; minutes on CPU)")
    parser.add_argument("--reps", type=int, help="repetitions per figure (default 3, or 1 with --small)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(GPU_SECTIONS)}")
    parser.add_argument("--device", default="auto", help="device preference for resolve_device (default auto)")
    parser.add_argument("--real-size", action="store_true", help="the real-size pipeline run instead of sections 1-4")
    args = parser.parse_args(argv)
    if args.real_size:
        return real_size(args.small, args.device)

    import torch

    from spur_assets.core.runtime.devices import autocast_for, resolve_device

    device = resolve_device(args.device)
    device_name = str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        set_torch_threads(1)  # as bench/benchmarks/run: stable under a shared machine's load
    scale, reps = ("tiny", args.reps or 1) if args.small else ("full", args.reps or 3)
    only = [s.strip() for s in args.only.split(",")] if args.only else list(GPU_SECTIONS)
    autocast = "bf16 autocast" if type(autocast_for(device)).__name__ == "autocast" else "no autocast (fp32)"

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    machine = machine_description()
    sections = [run_section(name, scale, reps, str(device), log) for name in only]
    print(f"Device **{device_name}**, {autocast}; scale {scale}, {reps} repetition(s); "
          f"{time.perf_counter() - started:.0f} s; load average at end {load_average()[0]:.2f}; "
          f"torch {machine['torch']}; GPU: {machine['gpu']}.")
    print()
    for section in sections:
        print(render_section(section, with_notes=False).replace("## ", "### ", 1))
    return 0


def real_size(small: bool, device: str) -> int:
    """bench/benchmarks/real_size.py on `device` with GPU utilisation sampled by nvidia-smi (when there is one)."""
    import os
    import shutil
    import subprocess
    import tempfile

    from bench.benchmarks import real_size as real

    cores = os.cpu_count() or 1
    argv = ["--device", device, "--workers", str(cores), "--work", "/tmp/spur-gpu-real-size"]
    argv += ["--train", "200", "--test", "100", "--shape", "tiny", "--finetune-steps", "2"] if small else \
        ["--train", "5000", "--test", "1000", "--finetune-steps", "40", "--micro-batch", "256"]
    sampler, samples_path = None, Path(tempfile.mkstemp(prefix="nvidia-smi-", suffix=".csv")[1])
    if shutil.which("nvidia-smi"):
        sampler = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "500"],
            stdout=samples_path.open("w"), stderr=subprocess.DEVNULL,
        )
    try:
        status = real.main(argv)
    finally:
        if sampler is not None:
            sampler.terminate()
            sampler.wait()
    samples = []
    for line in samples_path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and all(p.replace(".", "").isdigit() for p in parts):
            samples.append((float(parts[0]), float(parts[1])))
    if samples:
        busy = [u for u, _ in samples if u > 0]
        print(f"\nGPU utilisation (nvidia-smi, {len(samples)} samples at 0.5 s): mean {sum(u for u, _ in samples) / len(samples):.0f}% "
              f"over the whole run, {sum(busy) / max(1, len(busy)):.0f}% over samples with the GPU in use, peak "
              f"{max(u for u, _ in samples):.0f}%; peak memory used {max(m for _, m in samples):,.0f} MiB.")
    else:
        print("\nGPU utilisation: no nvidia-smi on this machine (no GPU figures).")
    return status


if __name__ == "__main__":
    sys.exit(main())
