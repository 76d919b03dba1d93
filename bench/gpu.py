"""Benchmarks 1-4 on the accelerator: CUDA (bf16 autocast) when there is one, else CPU; same tables.

    .venv/bin/python bench/gpu.py            # full sizes, 3 repetitions (for a GPU machine)
    .venv/bin/python bench/gpu.py --small    # smoke-test sizes, 1 repetition (runs anywhere, slowly on CPU)

Device: `devices.resolve_device("auto")` (CUDA, then MPS, then CPU). The sections pass it
through: the metric engine, full sort and torchmetrics compute on it (peak memory =
the CUDA allocator's peak); embeddings and training run under the project's
`autocast_for` (bf16 on CUDA); the torch and diffusers inpainting backends run on it
(OpenCV stays on CPU). Prints Markdown to stdout, in the format of bench/RESULTS.md
(tables only; the explanations are in RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import load_average, machine_description, render_section, run_section, set_torch_threads  # noqa: E402

GPU_SECTIONS = ("metrics", "embedding", "training", "counterfactuals")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes and 1 repetition (a smoke run; minutes on CPU)")
    parser.add_argument("--reps", type=int, help="repetitions per figure (default 3, or 1 with --small)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(GPU_SECTIONS)}")
    parser.add_argument("--device", default="auto", help="device preference for resolve_device (default auto)")
    args = parser.parse_args(argv)

    import torch

    from spur_assets.core.devices import autocast_for, resolve_device

    device = resolve_device(args.device)
    device_name = str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        set_torch_threads(1)  # as bench/run: stable under a shared machine's load
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


if __name__ == "__main__":
    sys.exit(main())
