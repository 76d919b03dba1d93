"""Content-keyed cache of embeddings, so each image or caption is embedded once per checkpoint.

An embedding is stored under (checkpoint key, namespace, item key) and never expires: a
new checkpoint, a new image or an edited caption brings a new key, so stale entries are
simply never looked up again. To reclaim space, drop a whole checkpoint.

Layout under ``root`` (SPUR_HOME/cache/embeddings)::

    <sha256 of checkpoint key>/<image|text>/part-<time_ns>-<pid>-<rand>.safetensors

Each part is a plain safetensors file: one tensor ``embedding`` F32 [N, D], and metadata
``keys`` (JSON list of the N item keys, row order), ``checkpoint_key``, ``format``.
Safetensors rather than Parquet because its rows sit at fixed offsets: a lookup parses
the header (the keys) and memory-maps only the matching rows, whereas Parquet readers
decompress and decode the whole embedding column to return a few rows (measured, polars
scan + is_in with parallel="prefiltered": 1,000 keys of 100,000 x 512 took 0.9-1.4 s, a full
read 1.3-2.3 s; this layout takes 0.1-0.2 s, mostly parsing the 100,000 keys).

Parts are immutable and appear atomically (written under a hidden ``.part-*.tmp`` name in
the same folder, fsynced, then os.replace'd), so concurrent writers never clash and a
killed writer leaves only a hidden temp file, which readers ignore. A key may sit in
several parts (same value by construction); reads take the first part in name order.
A truncated or garbled part is reported, not recomputed over; flipped bits inside the
rows are not detected (a checksum would need every row read, which lookups avoid).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["NAMESPACES", "CachedRows", "EmbeddingCache", "cached_embed", "drop", "file_sha256", "stats", "text_key"]

NAMESPACES = ("image", "text")
FORMAT = "spur-embedding-cache/1"


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file's bytes: the item key of an image. Streams 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def text_key(text: str) -> str:
    """Hex sha256 of the exact UTF-8 bytes of ``text``: the item key of a caption.

    No Unicode normalisation: NFC and NFD spellings of the same caption are different
    keys. At worst that embeds a caption twice; normalising could serve one spelling's
    embedding for another that the tokenizer encodes differently.
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _checkpoint_folder(root: Path, checkpoint_key: str) -> Path:
    # Hashed: the caller's key may hold any character, and be of any length.
    return Path(root) / hashlib.sha256(checkpoint_key.encode("utf-8")).hexdigest()


def _parts(folder: Path) -> list[Path]:
    # The glob skips hidden temp files: a killed writer's leftovers are never read.
    return sorted(folder.glob("part-*.safetensors"))


class _Part:
    """A part's header: keys, shape and where the rows start. ValueError naming the file if unreadable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            file_size = path.stat().st_size
            with open(path, "rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                if size > file_size - 8:  # garbage length: do not try to read gigabytes
                    raise ValueError(f"header length {size} exceeds the file size {file_size}")
                header = json.loads(handle.read(size))
            meta, info = header["__metadata__"], header["embedding"]
            self.keys = json.loads(meta["keys"])
            self.checkpoint_key = meta["checkpoint_key"]
            self.rows, self.dim = info["shape"]
            start, end = info["data_offsets"]
            self.offset = 8 + size + start
            ok = (meta["format"] == FORMAT and info["dtype"] == "F32" and len(self.keys) == self.rows
                  and end - start == self.rows * self.dim * 4 and file_size == 8 + size + end)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            raise self.corrupt(f"unreadable header ({type(exc).__name__}: {exc})") from exc
        if not ok:
            raise self.corrupt("header does not match the file (truncated or not a cache part)")

    def corrupt(self, problem: str) -> ValueError:
        return ValueError(f"{self.path}: unreadable embedding cache part, {problem} -- delete this file "
                          f"(or drop the checkpoint); it is never recomputed over silently")

    def read(self, rows: list[int]) -> torch.Tensor:
        # memmap + fancy indexing reads just the pages holding these rows.
        table = np.memmap(self.path, dtype="<f4", mode="r", offset=self.offset, shape=(self.rows, self.dim))
        return torch.from_numpy(np.ascontiguousarray(table[rows], dtype=np.float32))


def _write_part(path: Path, checkpoint_key: str, keys: list[str], rows: torch.Tensor) -> None:
    """Write a safetensors file atomically: hidden temp name in the same folder, fsync, rename."""
    data = np.ascontiguousarray(rows.numpy(), dtype="<f4")
    meta = {"format": FORMAT, "checkpoint_key": checkpoint_key, "keys": json.dumps(keys)}
    header = json.dumps({"__metadata__": meta, "embedding": {
        "dtype": "F32", "shape": list(data.shape), "data_offsets": [0, data.nbytes]}}).encode()
    header += b" " * (-len(header) % 8)  # safetensors aligns the data on 8 bytes
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(struct.pack("<Q", len(header)) + header)
            handle.write(memoryview(data).cast("B"))  # no copy of a possibly large tensor
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _as_rows(embeddings: torch.Tensor, rows: int, what: str) -> torch.Tensor:
    if not (isinstance(embeddings, torch.Tensor) and embeddings.dtype == torch.float32 and embeddings.ndim == 2):
        raise ValueError(f"{what} must be a 2-D float32 tensor, got {getattr(embeddings, 'dtype', type(embeddings))}")
    if embeddings.shape[0] != rows:
        raise ValueError(f"{what} has {embeddings.shape[0]} rows for {rows} keys; expected one row per key, in order")
    return embeddings.detach().cpu().contiguous()


class EmbeddingCache:
    """The cached embeddings of one checkpoint under ``root``; see the module docstring for the layout."""

    def __init__(self, root: Path | str, checkpoint_key: str) -> None:
        if not checkpoint_key:
            raise ValueError("checkpoint_key is empty; pass the checkpoint's data version or content sha256")
        self.root = Path(root)
        self.checkpoint_key = checkpoint_key
        self.folder = _checkpoint_folder(self.root, checkpoint_key)

    def parts(self, namespace: str) -> list[Path]:
        """The committed part files of ``namespace``, in read order; hidden temp files excluded."""
        if namespace not in NAMESPACES:
            raise ValueError(f"namespace {namespace!r} is not one of {NAMESPACES}")
        return _parts(self.folder / namespace)

    def lookup(self, namespace: str, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached embeddings in the order of ``keys``: ([len(keys), D] float32, [len(keys)] bool "was cached").

        Rows of uncached keys are zero; D is 0 if none is cached. Reads each part's header
        and only the matching rows, and stops once every key is found. ValueError naming
        the file for a corrupt part, or for a part whose dimension differs from the first's.
        """
        positions: dict[str, list[int]] = {}
        for position, key in enumerate(keys):
            positions.setdefault(key, []).append(position)
        out, cached, first = torch.zeros((len(keys), 0)), torch.zeros(len(keys), dtype=torch.bool), None
        for path in self.parts(namespace):
            if not positions:
                break
            part = _Part(path)
            if first is None:
                first, out = part, torch.zeros((len(keys), part.dim))
            elif part.dim != first.dim:
                raise ValueError(f"{path}: embedding dimension {part.dim} differs from {first.dim} in {first.path} "
                                 f"-- one checkpoint key was used for two models; drop the checkpoint")
            rows, dest, src = [], [], []
            for row, key in enumerate(part.keys):
                if (where := positions.pop(key, None)) is not None:  # popped: the first part holding a key wins
                    dest += where
                    src += [len(rows)] * len(where)
                    rows.append(row)
            if rows:
                dest_t = torch.tensor(dest)  # explicit tensors: torch parses long index lists slowly
                out.index_copy_(0, dest_t, part.read(rows).index_select(0, torch.tensor(src)))
                cached[dest_t] = True
        return out, cached

    def store(self, namespace: str, keys: Sequence[str], embeddings: torch.Tensor) -> Path | None:
        """Write ``embeddings`` ([len(keys), D] float32, row i for keys[i]) as one new part; its path.

        Keys must be distinct. ValueError naming the first existing part if D differs from its
        dimension. Nothing is written (None) for no keys.
        """
        keys = list(keys)
        if not keys:
            return None
        if len(set(keys)) != len(keys):
            raise ValueError("store() got the same key twice; deduplicate before storing")
        rows = _as_rows(embeddings, len(keys), "embeddings")
        existing = self.parts(namespace)
        if existing and (dim := _Part(existing[0]).dim) != rows.shape[1]:
            raise ValueError(f"{existing[0]}: cached embeddings have dimension {dim}, the new ones "
                             f"{rows.shape[1]}, for checkpoint key {self.checkpoint_key!r} -- the key must "
                             f"change with the model; fix it or drop the checkpoint")
        folder = self.folder / namespace
        folder.mkdir(parents=True, exist_ok=True)
        # time_ns first: name order is write order, so "first part wins" means "oldest wins".
        path = folder / f"part-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
        _write_part(path, self.checkpoint_key, keys, rows)
        return path


class CachedRows:
    """One lookup of ``keys`` in a cache: what it holds, and which rows are still to embed.

    `cached_embed` in two halves, for callers that compute the missing rows of several caches
    in one pass (metric_report decodes each image once for all its checkpoints):
    ``to_compute`` lists the positions in ``keys`` of the first occurrence of each uncached
    key; ``complete(rows)`` stores those rows ([len(to_compute), D] float32, in that order) as
    one new part and returns the embeddings of all ``keys`` in order.
    """

    def __init__(self, cache: EmbeddingCache, namespace: str, keys: Sequence[str]) -> None:
        self.cache, self.namespace, self.keys = cache, namespace, list(keys)
        self.out, self.cached = cache.lookup(namespace, self.keys)
        self.missing: dict[str, list[int]] = {}  # key -> its positions, in order of first occurrence
        for position, (key, hit) in enumerate(zip(self.keys, self.cached.tolist())):
            if not hit:
                self.missing.setdefault(key, []).append(position)

    @property
    def to_compute(self) -> list[int]:
        return [where[0] for where in self.missing.values()]

    @property
    def stats(self) -> dict:
        """``hits`` = positions served from the cache, ``computed`` = rows to compute (or computed)."""
        return {"hits": int(self.cached.sum()), "computed": len(self.missing)}

    def complete(self, computed: torch.Tensor | None = None) -> torch.Tensor:
        """Store the computed rows (None when nothing was missing) and return [len(keys), D] in order."""
        if not self.missing:
            return self.out
        if computed is None:
            raise ValueError(f"{len(self.missing)} key(s) are not cached; pass their embeddings")
        rows = _as_rows(computed, len(self.missing), "compute(...) result")
        self.cache.store(self.namespace, list(self.missing), rows)  # raises on a dimension mismatch with the cache
        out = self.out
        if out.shape[1] != rows.shape[1]:  # nothing was cached, so D was unknown
            out = torch.zeros((len(self.keys), rows.shape[1]))
        dest = torch.tensor([p for where in self.missing.values() for p in where])
        src = torch.tensor([i for i, where in enumerate(self.missing.values()) for _ in where])
        out.index_copy_(0, dest, rows.index_select(0, src))
        return out


def cached_embed(
    cache: EmbeddingCache,
    namespace: str,
    keys: Sequence[str],
    compute: Callable[[list[int]], torch.Tensor],
) -> tuple[torch.Tensor, dict]:
    """Embeddings [len(keys), D] float32 in the order of ``keys``, computing only what is not cached.

    ``compute(positions)`` is called once (not at all if everything is cached) with the
    positions in ``keys`` of the first occurrence of each uncached key, and must return
    [len(positions), D] float32 rows in that order; they are stored as one new part.
    Stats: ``hits`` = positions served from the cache, ``computed`` = rows computed.
    No keys: an empty [0, 0] tensor.
    """
    lookup = CachedRows(cache, namespace, keys)
    computed = compute(lookup.to_compute) if lookup.missing else None
    return lookup.complete(computed), lookup.stats


def drop(root: Path | str, checkpoint_key: str) -> bool:
    """Delete every cached embedding of ``checkpoint_key``; False if it had none.

    The folder is renamed to a hidden name first, so readers see all of it or none of it.
    A write of that checkpoint racing the drop may fail; rerun it.
    """
    folder = _checkpoint_folder(Path(root), checkpoint_key)
    if not folder.exists():
        return False
    trash = folder.with_name(f".dropped-{folder.name}-{uuid.uuid4().hex[:8]}")
    os.replace(folder, trash)
    shutil.rmtree(trash)
    return True


def stats(root: Path | str) -> dict:
    """Sizes of the cache: {"entries", "bytes", "checkpoints": {checkpoint key: {"entries", "bytes", "parts"}}}.

    ``entries`` counts distinct (namespace, key) pairs, so duplicates across parts count once;
    ``bytes`` is the size of the committed part files. Reads only the part headers.
    """
    out: dict = {"entries": 0, "bytes": 0, "checkpoints": {}}
    # Hidden names are folders being dropped.
    for folder in sorted(f for f in Path(root).glob("[!.]*") if f.is_dir()):
        entry, name = {"entries": 0, "bytes": 0, "parts": 0}, folder.name
        for namespace in NAMESPACES:
            parts = [_Part(path) for path in _parts(folder / namespace)]
            entry["entries"] += len({key for part in parts for key in part.keys})
            entry["bytes"] += sum(part.path.stat().st_size for part in parts)
            entry["parts"] += len(parts)
            name = parts[0].checkpoint_key if parts else name
        out["checkpoints"][name] = entry
        out["entries"] += entry["entries"]
        out["bytes"] += entry["bytes"]
    return out
