"""Images streamed from their files to the model: no split is ever held in memory.

Training, fine-tuning and embedding take their images as an `ImageSource`: either a uint8
tensor [N, 3, H, W] already prepared (small in-memory sets, tests) or `ImageFiles`, the
paths of N files plus the checkpoint's own preprocessing (core/data/preprocessing.py). A consumer
plans which image rows each step needs (a training batch with its hard negatives, a slice of
an embedding pass) and `stream_rows` delivers them step by step:

- with `workers` > 0, a `torch.utils.data.DataLoader` over the planned steps, cut into items
  of at most 32 files: worker processes open, decode, resize and crop the files while the
  model computes the previous step, about `prefetch` steps ahead; the items are put back
  together into steps in order; on CUDA the batches land in pinned memory and are copied
  with `non_blocking=True`;
- with `workers` > 0 and `threads`, the same items decoded by that many threads of this
  process (Pillow and NumPy release the GIL while they decode, resize and copy): no process
  to start and no shared-memory copy of each batch, which on a CPU whose cores the model also
  uses is what the overlap costs (embedding on CPU takes this path);
- with `workers` = 0, the same decoding on the calling thread (no extra process).

Batches travel as uint8 and are normalised on the device (`preprocessing.pixel_values`): a
quarter of the bytes of float32 through the workers' shared memory and over PCIe, and the
same numbers as normalising in the worker. Peak memory is bounded by the step size times
(prefetch + 1), whatever the number of images. The steps come out in plan order
and decoding is deterministic, so results do not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from spur_assets.core.data.preprocessing import ImagePreprocessing, decode_image_uint8
from spur_assets.core.runtime.threads import prompt_gil_handover, rebalance_threads

# A training split whose prepared pixels fit in this many MiB is decoded once and kept in memory
# for the run (every epoch reads every image again); a larger one streams. Memory stays bounded by
# this budget or by the stream's buffers, whichever is larger, never by the number of images.
DEFAULT_IN_MEMORY_MB = 256
DEFAULT_PREFETCH = 2  # steps decoded ahead per worker: enough to hide decode jitter, little memory
# Files per DataLoader item. A step is decoded as several items and put back together here, so
# the first forward waits for 32 files, not a whole step, and workers share a step between them.
DECODE_ITEM_ROWS = 32


@dataclass(frozen=True)
class ImageFiles:
    """N image files, prepared as one checkpoint's image processor prepares them.

    Plain picklable data: DataLoader worker processes receive a copy. `max_pixels` refuses
    files larger than that many pixels before decoding them (see preprocessing).
    """

    paths: tuple[str, ...]
    preprocessing: ImagePreprocessing
    max_pixels: int | None = None

    @classmethod
    def of(cls, paths: Sequence[str], preprocessing: ImagePreprocessing, max_pixels: int | None = None) -> ImageFiles:
        """The files at `paths` (in that order) under `preprocessing`."""
        return cls(tuple(str(p) for p in paths), preprocessing, max_pixels)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of every prepared image."""
        height, width = self.preprocessing.output_size
        return (3, height, width)

    def load(self, rows: Sequence[int]) -> torch.Tensor:
        """The images at `rows` as one uint8 tensor [len(rows), 3, H, W], in that order."""
        out = torch.empty((len(rows), *self.image_shape), dtype=torch.uint8)
        for position, row in enumerate(rows):
            out[position] = torch.from_numpy(decode_image_uint8(self.paths[int(row)], self.preprocessing, self.max_pixels))
        return out

    def fingerprint(self) -> str:
        """sha256 over the paths, each file's size and modification time, and the preprocessing.

        Cheap (no file is read), so a resumed training run can tell its inputs changed.
        """
        digest = hashlib.sha256(self.preprocessing.fingerprint().encode())
        for path in self.paths:
            try:
                stat = os.stat(path)
                digest.update(json.dumps([path, stat.st_size, stat.st_mtime_ns]).encode())
            except OSError:
                digest.update(json.dumps([path, None]).encode())
        return digest.hexdigest()


ImageSource = Union[torch.Tensor, ImageFiles]


def source_length(images: ImageSource) -> int:
    """Number of images in a source."""
    return len(images) if isinstance(images, ImageFiles) else int(images.shape[0])


def source_image_shape(images: ImageSource) -> tuple[int, ...]:
    """(3, H, W) of a source's prepared images."""
    return images.image_shape if isinstance(images, ImageFiles) else tuple(images.shape[1:])


class _PlannedSteps(Dataset):
    """Item i: the uint8 images of step i of a plan (a list of row lists)."""

    def __init__(self, files: ImageFiles, steps: Sequence[Sequence[int]]):
        self.files = files
        self.steps = [np.asarray(rows, dtype=np.int64) for rows in steps]

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.files.load(self.steps[index].tolist())


def stream_rows(
    images: ImageSource,
    steps: Sequence[Sequence[int] | torch.Tensor],
    device: torch.device | str = "cpu",
    workers: int = 0,
    prefetch: int = DEFAULT_PREFETCH,
    threads: bool = False,
) -> Iterator[torch.Tensor]:
    """The uint8 images of each planned step, in plan order, on `device`.

    `steps[i]` lists the image rows step i needs (any order, repeats allowed). A tensor
    source is indexed directly. `ImageFiles` are decoded by `workers` DataLoader processes
    (0 = on this thread; with `threads`, `workers` threads of this process instead) in items
    of at most DECODE_ITEM_ROWS files, about `prefetch` steps ahead in all, and put back
    together into steps here; on CUDA through pinned memory with non-blocking copies. The
    steps are the same whichever way they are decoded. A file that cannot be read raises
    OSError naming it. Between steps torch's threads may follow the machine's load
    (core/runtime/threads.py, rebalance_threads).
    """
    target = torch.device(device)
    plan = [torch.as_tensor(rows, dtype=torch.long).cpu() for rows in steps]
    if not isinstance(images, ImageFiles):
        for rows in plan:
            rebalance_threads()
            yield images[rows].to(target, non_blocking=True)
        return
    if workers < 0:
        raise ValueError(f"stream_rows: workers={workers} must be >= 0 (0 decodes on the calling thread).")
    if workers == 0:
        for rows in plan:
            rebalance_threads()
            yield images.load(rows.tolist()).to(target)
        return
    items = [rows[start : start + DECODE_ITEM_ROWS].tolist() for rows in plan for start in range(0, max(1, len(rows)), DECODE_ITEM_ROWS)]
    items_per_step = max(1, -(-max((len(rows) for rows in plan), default=1) // DECODE_ITEM_ROWS))
    if threads:
        yield from _stream_with_threads(images, plan, items, target, workers, max(1, prefetch) * items_per_step)
        return
    loader = DataLoader(
        _PlannedSteps(images, items),
        batch_size=None,  # each item is already a block of images
        shuffle=False,
        num_workers=workers,
        # Items in flight per worker, so that about `prefetch` whole steps are decoded ahead in all.
        prefetch_factor=max(2, -(-prefetch * items_per_step // workers)),
        pin_memory=target.type == "cuda",
        persistent_workers=False,
    )
    decoded = iter(loader)
    for rows in plan:
        parts = [next(decoded) for _ in range(max(1, -(-len(rows) // DECODE_ITEM_ROWS)))]
        batch = parts[0] if len(parts) == 1 else torch.cat(parts)
        rebalance_threads()
        yield batch.to(target, non_blocking=True)


def _stream_with_threads(
    images: ImageFiles, plan: list[torch.Tensor], items: list[list[int]], target: torch.device, workers: int, ahead: int
) -> Iterator[torch.Tensor]:
    """stream_rows' steps decoded by `workers` threads, at most `ahead` items in flight, in plan order."""
    pending: deque[Future] = deque()
    upcoming = iter(items)
    with prompt_gil_handover(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spur-decode") as pool:
        try:

            def top_up() -> None:
                while len(pending) < ahead:
                    rows = next(upcoming, None)
                    if rows is None:
                        return
                    pending.append(pool.submit(images.load, rows))

            top_up()
            for rows in plan:
                parts = []
                for _ in range(max(1, -(-len(rows) // DECODE_ITEM_ROWS))):
                    parts.append(pending.popleft().result())
                    top_up()
                batch = parts[0] if len(parts) == 1 else torch.cat(parts)
                if target.type == "cuda":
                    batch = batch.pin_memory()
                rebalance_threads()
                yield batch.to(target, non_blocking=True)
        finally:
            # A consumer that stops early (an error, a closed generator) leaves no decoding behind.
            for future in pending:
                future.cancel()


def decoded_in_memory(images: ImageSource, budget_mb: float) -> ImageSource:
    """`images` decoded once into a uint8 tensor when their prepared pixels fit in `budget_mb` MiB.

    For a consumer that reads every image many times (training: every epoch). A tensor source,
    a budget <= 0, or files whose pixels exceed the budget come back unchanged, to be streamed.
    The files are decoded on the calling thread straight into the tensor (no worker process,
    no shared-memory copies: the memory this adds is the pixels themselves), with the same
    decoding as streaming, so results do not change, only the time: on the built-in 64-px
    data a training epoch from memory ran at 1.3x the streamed speed on 2 cores, where a
    decoding process competes with torch's threads for the same cores.
    """
    if not isinstance(images, ImageFiles) or budget_mb <= 0:
        return images
    channels, height, width = images.image_shape
    if len(images) * channels * height * width > budget_mb * 2**20:
        return images
    out = torch.empty((len(images), channels, height, width), dtype=torch.uint8)
    for row, path in enumerate(images.paths):
        out[row] = torch.from_numpy(decode_image_uint8(path, images.preprocessing, images.max_pixels))
    return out


def chunk_steps(n_rows: int, size: int, first: int | None = None) -> list[list[int]]:
    """Rows 0..n_rows-1 cut into consecutive steps of at most `size` (an embedding pass's plan).

    With `first`, the steps ramp up: `first` rows, then twice as many, and so on up to `size`.
    A streamed pass then starts its first forward after `first` files are decoded rather than
    a whole step, and the decoding of the next steps overlaps it. Per-image results do not
    depend on how rows are grouped into steps (see embed_images).
    """
    if size < 1:
        raise ValueError(f"chunk_steps: size={size} must be >= 1.")
    if first is not None and first < 1:
        raise ValueError(f"chunk_steps: first={first} must be >= 1.")
    steps: list[list[int]] = []
    start, step = 0, min(size, first) if first is not None else size
    while start < n_rows:
        steps.append(list(range(start, min(start + step, n_rows))))
        start += step
        step = min(size, step * 2)
    return steps
