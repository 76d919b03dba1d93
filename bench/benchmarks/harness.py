"""Benchmark harness: repeated timings, peak memory in fresh processes, and the RESULTS.md writer.

    .venv/bin/python -m bench.benchmarks.harness [--quick] [--only metrics,embedding,...] [--out bench/benchmarks/RESULTS.md]

(`bench/benchmarks/run` is the same with the repository's venv.) Every section module
(`bench_metrics`, `bench_embedding`, `bench_training`, `bench_counterfactuals`,
`bench_cooccurrence`, `bench_demo`) exposes `run(scale, reps, device, log) -> Section`;
this module runs them in order, then `bench/benchmarks/gpu.py --small` on CPU, and writes one
Markdown file with the machine, every figure and the reference it is compared with.

Conventions the sections share:
- Ratios are taken per repetition, with the measured thing and its reference run back to
  back (interleaved), and the median ratio is reported: the machine is shared, so a load
  spike hits both sides of one ratio rather than one side of the median.
- Peak memory is measured in a fresh child process per measurement (`measure_in_child`):
  the child resets the kernel's peak-RSS mark (/proc/self/clear_refs) right before the
  measured block and reads VmHWM after it, so set-up data does not count and one
  measurement's peak cannot hide another's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO_ROOT / "bench" / "benchmarks"
RESULT_MARKER = "BENCH_RESULT "
SECTIONS = ("metrics", "embedding", "training", "counterfactuals", "cooccurrence", "demo")
SCALES = ("tiny", "quick", "full")


# --------------------------------------------------------------------------- results


@dataclass
class Figure:
    """One measured figure next to the reference it is compared with (one table row)."""

    what: str
    value: str
    reference: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None  # None: no target
    note: str = ""


@dataclass
class Section:
    """One benchmark's figures plus the paragraphs that explain them (Markdown)."""

    number: int
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)  # every repetition, for the JSON beside RESULTS.md
    seconds: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (nan when empty)."""
    return float(statistics.median(values)) if values else float("nan")


def spread(values: Sequence[float], digits: int = 2) -> str:
    """'min–max' of the repetitions, for the table's note column."""
    if len(values) < 2:
        return ""
    return f"{min(values):.{digits}f}–{max(values):.{digits}f}"


def verdict(met: bool | None) -> str:
    return {None: "", True: "met", False: "**missed**"}[met]


def repeat_interleaved(runs: dict[str, Callable[[], float]], reps: int, log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Call each of `runs` once per repetition, in turn (A B A B ...); collect what each returns (seconds)."""
    out: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(reps):
        for name, run in runs.items():
            out[name].append(float(run()))
            if log:
                log(f"  rep {rep + 1}/{reps} {name}: {out[name][-1]:.3f}")
    return out


def ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-repetition ratios numerator[i] / denominator[i]."""
    return [a / b for a, b in zip(numerator, denominator, strict=True) if b > 0]


# --------------------------------------------------------------------------- memory


def _status_mb(field_name: str) -> float:
    text = Path("/proc/self/status").read_text()
    found = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) / 1024 if found else float("nan")


def rss_mb() -> float:
    """Resident set size of this process now, MiB."""
    return _status_mb("VmRSS")


@contextlib.contextmanager
def peak_memory(device: str = "cpu") -> Iterator[dict]:
    """Measure the peak memory of the with-block: fills {"rss_before_mb", "peak_mb", "peak_extra_mb", "method"}.

    On CPU the kernel's high-water mark is reset first (Linux /proc/self/clear_refs "5"),
    so the peak is that of the block alone; where the reset is refused, ru_maxrss (the
    process's lifetime peak) is used and "method" says so. On CUDA: the allocator's peak
    (torch.cuda.max_memory_allocated) over the block.
    """
    result: dict = {}
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        yield result
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        result.update(rss_before_mb=before, peak_mb=peak, peak_extra_mb=peak - before, method="cuda allocator peak")
        return
    before = rss_mb()
    method = "VmHWM after reset"
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        method = "ru_maxrss (lifetime peak; reset refused)"
    yield result
    if method.startswith("VmHWM"):
        peak = _status_mb("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.update(rss_before_mb=before, peak_mb=peak, peak_extra_mb=peak - before, method=method)


def measure_in_child(module: str, function: str, kwargs: dict, timeout_s: float = 1800) -> dict:
    """Run bench.benchmarks.<module>.<function>(**kwargs) in a fresh Python process; return the dict it returns.

    The child prints its result as one JSON line after RESULT_MARKER. A failed child raises
    RuntimeError with its stderr tail, naming the measurement. With BENCH_IN_PROCESS=1 in the
    environment (the smoke test) the function runs here instead: same code, no isolation.
    """
    if os.environ.get("BENCH_IN_PROCESS") == "1":
        return getattr(importlib.import_module(f"bench.benchmarks.{module}"), function)(**kwargs)
    command = [sys.executable, "-m", "bench.benchmarks.harness", "--child", module, function, json.dumps(kwargs)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    raise RuntimeError(
        f"benchmark child bench.benchmarks.{module}.{function}({kwargs}) exited {done.returncode} without a result; "
        f"stderr tail:\n{done.stderr[-3000:]}"
    )


def set_torch_threads(count: int) -> None:
    """Pin torch's intra-op threads here and in every child process started after this call."""
    import torch

    torch.set_num_threads(count)
    os.environ["BENCH_TORCH_THREADS"] = str(count)


def _run_child(module: str, function: str, kwargs_json: str) -> None:
    if os.environ.get("BENCH_TORCH_THREADS"):
        set_torch_threads(int(os.environ["BENCH_TORCH_THREADS"]))
    target = getattr(importlib.import_module(f"bench.benchmarks.{module}"), function)
    result = target(**json.loads(kwargs_json))
    print(RESULT_MARKER + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the machine


def load_average() -> tuple[float, float, float]:
    return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]


def machine_description() -> dict:
    """What the figures were measured on: CPU, cores, memory, versions, GPU presence."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = float("nan")
    try:
        memory_gib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
    except (OSError, AttributeError):
        pass
    import numpy
    import polars
    import torch

    gpu = "none"
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": f"{torch.__version__} ({torch.get_num_threads()} intra-op threads)",
        "numpy": numpy.__version__,
        "polars": polars.__version__,
        "gpu": gpu,
    }


# --------------------------------------------------------------------------- Markdown


def figures_table(figures: Sequence[Figure]) -> str:
    """The Markdown table of a section's figures."""
    lines = [
        "| figure | measured | reference (same run) | ratio | target | | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        cells = [f.what, f.value, f.reference, f.ratio, f.target, verdict(f.met), f.note]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def render_section(section: Section, with_notes: bool = True) -> str:
    parts = [f"## {section.number}. {section.title}", ""]
    parts.append(
        f"_{section.seconds:.0f} s; load average before {section.load_before[0]:.2f}, after {section.load_after[0]:.2f}._"
    )
    parts += ["", figures_table(section.figures), ""]
    for note in section.notes if with_notes else ():
        parts += [note, ""]
    return "\n".join(parts)


def render_results(sections: Sequence[Section], machine: dict, header: dict, preamble: Sequence[str], appendix: Sequence[str]) -> str:
    """The whole RESULTS.md."""
    lines = ["# Benchmarks", ""]
    lines += list(preamble)
    lines += ["", "## Machine and run", ""]
    lines += ["| | |", "|---|---|"]
    for key, value in {**machine, **header}.items():
        lines.append(f"| {key} | {value} |")
    lines.append("")
    missed = [(s, f) for s in sections for f in s.figures if f.met is False]
    lines += ["## Summary", ""]
    lines += ["| section | figure | measured | ratio | target | |", "|---|---|---|---|---|---|"]
    for s in sections:
        for f in s.figures:
            if f.target or f.what.startswith("**"):
                lines.append(f"| {s.number} | {f.what} | {f.value} | {f.ratio} | {f.target} | {verdict(f.met)} |")
    lines.append("")
    if missed:
        lines.append(
            f"{len(missed)} figure(s) miss their target; each stays in its table with the reason next to it."
        )
        lines.append("")
    for section in sections:
        lines.append(render_section(section))
    lines += list(appendix)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- main


def _section_module(name: str):
    return importlib.import_module(f"bench.benchmarks.bench_{name}")


def run_section(name: str, scale: str, reps: int, device: str, log: Callable[[str], None]) -> Section:
    """Run one section module with load averages and its own wall time recorded."""
    before = load_average()
    started = time.perf_counter()
    log(f"[bench] {name}: scale {scale}, {reps if name != 'demo' else 1} repetition(s), device {device}")
    try:
        section = _section_module(name).run(scale=scale, reps=reps, device=device, log=log)
    except Exception as error:  # one broken benchmark must not lose the others' figures
        number = SECTIONS.index(name) + 1 if name in SECTIONS else 0
        message = f"{type(error).__name__}: {error}"
        log(f"[bench] {name}: FAILED: {message}")
        section = Section(number, f"{name} (failed)", [Figure("run", "failed", note=message.splitlines()[0][:300])], [f"```\n{message[-2000:]}\n```"])
    section.seconds = time.perf_counter() - started
    section.load_before, section.load_after = before, load_average()
    log(f"[bench] {name}: done in {section.seconds:.0f} s")
    return section


def gpu_script_output(log: Callable[[str], None], timeout_s: float = 600) -> str:
    """Run bench/benchmarks/gpu.py --small here (CPU when there is no GPU) and return its stdout."""
    log("[bench] gpu.py --small (the GPU script on this machine's device)")
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / "gpu.py"), "--small"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s
    )
    if done.returncode != 0:
        return f"bench/benchmarks/gpu.py --small failed (exit {done.returncode}):\n\n```\n{done.stderr[-3000:]}\n```\n"
    log(f"[bench] gpu.py done in {time.perf_counter() - started:.0f} s")
    return done.stdout


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every benchmark and write bench/benchmarks/RESULTS.md.")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and 2 repetitions (development; not for RESULTS.md)")
    parser.add_argument("--scale", choices=SCALES, help="override: tiny | quick | full")
    parser.add_argument("--reps", type=int, help="repetitions per figure (default 3; 2 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for sections 1-5 (default 1; see RESULTS.md)")
    parser.add_argument("--only", help=f"comma-separated sections out of {','.join(SECTIONS)}")
    parser.add_argument("--no-gpu-script", action="store_true", help="skip running bench/benchmarks/gpu.py --small")
    parser.add_argument("--out", default=str(BENCH_DIR / "RESULTS.md"), help="where the Markdown goes")
    parser.add_argument("--child", nargs=3, metavar=("MODULE", "FUNCTION", "KWARGS_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _run_child(*args.child)
        return 0

    # Quiet progress bars of diffusers / huggingface_hub in the logs.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    set_torch_threads(args.threads)
    scale = args.scale or ("quick" if args.quick else "full")
    reps = args.reps or (2 if args.quick else 3)
    only = [s.strip() for s in args.only.split(",")] if args.only else list(SECTIONS)
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started_at = datetime.now(timezone.utc)
    started = time.perf_counter()
    load_start = load_average()
    machine = machine_description()
    sections = [run_section(name, scale, reps, "cpu", log) for name in only]
    appendix: list[str] = []
    if not args.no_gpu_script:
        appendix += ["## GPU script, CPU run", "", gpu_script_output(log)]
    total = time.perf_counter() - started
    header = {
        "date (UTC)": started_at.strftime("%Y-%m-%d %H:%M"),
        "command": "bench/benchmarks/run" + (f" {' '.join(argv or sys.argv[1:])}" if (argv or sys.argv[1:]) else ""),
        "scale": f"{scale}, {reps} repetitions per figure (median reported; ratios per repetition, interleaved)",
        "torch threads": f"{args.threads} intra-op thread(s) in sections 1-5 (the demo, section 6, runs with torch's default)",
        "load average (1/5/15 min) at start": " / ".join(f"{x:.2f}" for x in load_start),
        "load average at end": " / ".join(f"{x:.2f}" for x in load_average()),
        "bench/benchmarks/run wall time": f"{total / 60:.1f} min",
        "GPU": "none lent to this session: sections 1–4 ran on CPU; bench/benchmarks/gpu.py is ready for a CUDA machine",
    }
    preamble = [
        "Written by `bench/benchmarks/run` (one run; every figure below comes from it). Ratios are what we",
        "track: the machine is shared with other jobs, so absolute times move with the load",
        "average reported per section. Each ratio is taken per repetition with the figure and",
        "its reference measured back to back, then the median is reported.",
    ]
    Path(args.out).write_text(render_results(sections, machine, header, preamble, appendix))
    raw = {s.title: s.raw for s in sections}
    Path(args.out).with_suffix(".json").write_text(json.dumps({"machine": machine, "header": header, "sections": raw}, indent=1, default=str))
    log(f"[bench] wrote {args.out} in {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
