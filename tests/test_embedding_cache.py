"""The embedding cache: exact round trips, compute only what is missing, safe under concurrent and killed writers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from spur_assets.core.model.embedding_cache import (
    EmbeddingCache,
    cached_embed,
    drop,
    file_sha256,
    stats,
    text_key,
)

REPO = Path(__file__).resolve().parents[1]


def _emb(keys, dim=8, salt=""):
    """A deterministic embedding per key, so any process can say what a key's row must be."""
    rows = []
    for key in keys:
        seed = int(hashlib.sha256(f"{salt}|{key}".encode()).hexdigest()[:15], 16)
        rows.append(torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
    return torch.stack(rows) if rows else torch.empty((0, dim))


def _bits(tensor):
    return tensor.contiguous().view(torch.int32)


class _Recorder:
    """A compute function that records its calls and embeds the keys at the positions it gets."""

    def __init__(self, keys, dim=8, salt=""):
        self.keys, self.dim, self.salt, self.calls = keys, dim, salt, []

    def __call__(self, positions):
        self.calls.append(list(positions))
        return _emb([self.keys[p] for p in positions], self.dim, self.salt)


def _never(positions):
    raise AssertionError(f"compute must not be called, got positions {positions}")


def test_round_trip_is_bit_identical_and_a_plain_safetensors_file(tmp_path):
    special = torch.tensor([-0.0, 0.0, float("inf"), float("-inf"), 1e-45, 3.4028235e38, -1.1754944e-38, 1 / 3])
    nan_payload = torch.tensor([0x7FC00001, 0x7F800123], dtype=torch.int32).view(torch.float32)
    rows = torch.cat([special, nan_payload, torch.randn(6)]).reshape(2, 8)
    EmbeddingCache(tmp_path, "ck").store("image", ["a", "b"], rows)

    out, cached = EmbeddingCache(tmp_path, "ck").lookup("image", ["b", "zz", "a"])  # a fresh reader
    assert cached.tolist() == [True, False, True]
    assert out.dtype == torch.float32
    assert torch.equal(_bits(out[0]), _bits(rows[1]))
    assert torch.equal(_bits(out[2]), _bits(rows[0]))

    (part,) = EmbeddingCache(tmp_path, "ck").parts("image")
    with safe_open(part, "pt") as handle:  # other tools can read a part
        assert torch.equal(_bits(handle.get_tensor("embedding")), _bits(rows))
        assert handle.metadata()["checkpoint_key"] == "ck"


def test_partial_hits_compute_only_missing_positions_in_order_with_duplicates_once(tmp_path):
    cache = EmbeddingCache(tmp_path, "ck")
    cache.store("text", ["a", "b"], _emb(["a", "b"]))
    keys = ["c", "a", "d", "c", "b", "e", "d"]
    compute = _Recorder(keys)

    out, info = cached_embed(cache, "text", keys, compute)

    assert compute.calls == [[0, 2, 5]]  # c, d, e: first occurrences, in order; c and d only once
    assert info == {"hits": 2, "computed": 3}
    assert torch.equal(_bits(out), _bits(_emb(keys)))
    assert len(cache.parts("text")) == 2  # the computed rows went into one new part


def test_second_call_computes_nothing(tmp_path):
    cache = EmbeddingCache(tmp_path, "ck")
    keys = [text_key(f"caption {i}") for i in range(20)] * 2
    first, info = cached_embed(cache, "text", keys, _Recorder(keys))
    assert info == {"hits": 0, "computed": 20}

    again, info = cached_embed(EmbeddingCache(tmp_path, "ck"), "text", keys, _never)

    assert info == {"hits": 40, "computed": 0}
    assert torch.equal(_bits(again), _bits(first))
    assert len(cache.parts("text")) == 1  # nothing missing: no new part


def test_checkpoints_and_namespaces_are_isolated(tmp_path):
    a, b = EmbeddingCache(tmp_path, "ckpt-a"), EmbeddingCache(tmp_path, "ckpt-b")
    a.store("image", ["k"], _emb(["k"], salt="a-image"))
    a.store("text", ["k"], _emb(["k"], salt="a-text"))
    b.store("image", ["k"], _emb(["k"], salt="b-image"))

    assert torch.equal(a.lookup("image", ["k"])[0], _emb(["k"], salt="a-image"))
    assert torch.equal(a.lookup("text", ["k"])[0], _emb(["k"], salt="a-text"))
    assert torch.equal(b.lookup("image", ["k"])[0], _emb(["k"], salt="b-image"))
    assert b.lookup("text", ["k"])[1].tolist() == [False]
    with pytest.raises(ValueError, match="namespace 'video'"):
        a.lookup("video", ["k"])


def test_duplicate_key_across_parts_reads_the_first_part(tmp_path):
    cache = EmbeddingCache(tmp_path, "ck")
    cache.store("image", ["k", "x"], _emb(["k", "x"], salt="old"))
    cache.store("image", ["k"], _emb(["k"], salt="new"))  # cannot happen by construction; shows the order

    assert torch.equal(cache.lookup("image", ["k"])[0], _emb(["k"], salt="old"))
    assert stats(tmp_path)["checkpoints"]["ck"]["entries"] == 2  # k counted once


_WRITER = """
import sys, time
from pathlib import Path
from spur_assets.core.model.embedding_cache import EmbeddingCache, cached_embed
from tests.test_embedding_cache import _emb

root, me, first, last = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
(root.parent / f"ready-{me}").touch()
deadline = time.time() + 120
while len(list(root.parent.glob("ready-*"))) < 2 and time.time() < deadline:
    time.sleep(0.01)
cache = EmbeddingCache(root, "shared-checkpoint")
keys = [f"key-{i}" for i in range(first, last)]
for start in range(0, len(keys), 10):
    chunk = keys[start:start + 10]
    cached_embed(cache, "image", chunk, lambda positions: _emb([chunk[p] for p in positions], 64))
"""


@pytest.mark.slow
def test_two_writer_processes_lose_nothing_and_corrupt_nothing(tmp_path):
    root = tmp_path / "cache"
    ranges = [(0, 600), (300, 900)]  # half of each writer's keys are the other's too
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(i), str(lo), str(hi)], cwd=REPO)
        for i, (lo, hi) in enumerate(ranges)
    ]
    keys = [f"key-{i}" for i in range(900)]
    expected = _emb(keys, 64)
    reader, reads = EmbeddingCache(root, "shared-checkpoint"), 0
    while any(w.poll() is None for w in writers):  # read while they write: never a half-written part
        out, cached = reader.lookup("image", keys)
        if cached.any():  # before the first part, D is unknown (0)
            assert torch.equal(_bits(out[cached]), _bits(expected[cached]))
            reads += 1
    assert [w.wait() for w in writers] == [0, 0]

    out, cached = reader.lookup("image", keys)
    assert bool(cached.all()), [k for k, c in zip(keys, cached.tolist()) if not c]
    assert torch.equal(_bits(out), _bits(expected))
    assert len(reader.parts("image")) >= 90  # 60 chunks each, the overlap stored by one or both
    assert reads > 0


def test_parts_written_at_the_same_instant_by_the_same_pid_do_not_collide(tmp_path, monkeypatch):
    # Two hosts sharing SPUR_HOME can have equal clocks and pids; a name must still be unique.
    import spur_assets.core.model.embedding_cache as module

    monkeypatch.setattr(module.time, "time_ns", lambda: 1_700_000_000_000_000_000)
    monkeypatch.setattr(module.os, "getpid", lambda: 7)
    cache = EmbeddingCache(tmp_path, "ck")
    cache.store("image", ["a"], _emb(["a"]))
    cache.store("image", ["b"], _emb(["b"]))

    assert len(cache.parts("image")) == 2
    assert torch.equal(cache.lookup("image", ["a", "b"])[0], _emb(["a", "b"]))


_KILLED_WRITER = """
import os, sys, time
from pathlib import Path
import torch
from spur_assets.core.model.embedding_cache import EmbeddingCache

def stall(fd):  # the bytes are written; be killed before the rename
    Path(sys.argv[2]).touch()
    time.sleep(600)

os.fsync = stall
EmbeddingCache(Path(sys.argv[1]), "ck").store("image", ["a", "b"], torch.ones(2, 8))
"""


@pytest.mark.slow
def test_killed_writer_leaves_only_an_ignored_hidden_temp_file(tmp_path):
    root, stalled = tmp_path / "cache", tmp_path / "stalled"
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(root), str(stalled)], cwd=REPO)
    deadline = time.time() + 120
    while not stalled.exists() and writer.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert stalled.exists(), "the writer never reached fsync"
    writer.kill()
    writer.wait()

    cache = EmbeddingCache(root, "ck")
    folder = cache.folder / "image"
    leftovers = [p.name for p in folder.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".part-") and leftovers[0].endswith(".tmp")
    assert cache.parts("image") == []
    assert cache.lookup("image", ["a", "b"])[1].tolist() == [False, False]
    assert stats(root)["entries"] == 0

    out, info = cached_embed(cache, "image", ["a", "b"], _Recorder(["a", "b"]))
    assert info == {"hits": 0, "computed": 2}
    assert torch.equal(cache.lookup("image", ["a", "b"])[0], _emb(["a", "b"]))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "huge header length"])
def test_corrupt_part_raises_a_clear_error_and_is_not_recomputed(tmp_path, damage):
    cache = EmbeddingCache(tmp_path, "ck")
    part = cache.store("image", ["a", "b"], _emb(["a", "b"]))
    data = part.read_bytes()
    part.write_bytes(
        {"truncated": data[:-5], "garbage": os.urandom(len(data)), "huge header length": b"\xff" * 8 + data[8:]}[
            damage
        ]
    )
    compute = _Recorder(["a", "c"])

    with pytest.raises(ValueError, match=rf"{part.name}.*delete this file \(or drop the checkpoint\)"):
        cached_embed(cache, "image", ["a", "c"], compute)
    assert compute.calls == []
    assert cache.parts("image") == [part]  # nothing written over or beside it


def test_dimension_mismatch_names_the_part_and_both_dimensions(tmp_path):
    cache = EmbeddingCache(tmp_path, "ck")
    part = cache.store("image", ["a"], _emb(["a"], dim=4))

    with pytest.raises(ValueError, match=rf"{part.name}: cached embeddings have dimension 4, the new ones 8"):
        cached_embed(cache, "image", ["a", "b"], _Recorder(["a", "b"], dim=8))
    assert cache.parts("image") == [part]

    # A part of another dimension slipped in (a reused checkpoint key): reads name both files.
    other = EmbeddingCache(tmp_path, "other").store("image", ["b"], _emb(["b"], dim=8))
    moved = part.with_name(part.name.replace("part-", "part-9"))
    other.rename(moved)
    with pytest.raises(ValueError, match=rf"{moved.name}: embedding dimension 8 differs from 4 in .*{part.name}"):
        cache.lookup("image", ["a", "b"])


def test_compute_result_must_be_float32_with_one_row_per_position(tmp_path):
    cache = EmbeddingCache(tmp_path, "ck")
    with pytest.raises(ValueError, match="2-D float32"):
        cached_embed(cache, "text", ["a"], lambda positions: torch.zeros((1, 4), dtype=torch.float64))
    with pytest.raises(ValueError, match="2 rows for 1 keys"):
        cached_embed(cache, "text", ["a"], lambda positions: torch.zeros((2, 4)))
    assert cache.parts("text") == []


def test_drop_removes_only_that_checkpoint_and_stats_report_sizes(tmp_path):
    a, b = EmbeddingCache(tmp_path, "ckpt-a"), EmbeddingCache(tmp_path, "ckpt/b with any chars")
    a.store("image", ["1", "2"], _emb(["1", "2"]))
    a.store("text", ["1"], _emb(["1"]))
    b.store("image", ["1", "2", "3"], _emb(["1", "2", "3"]))
    before = stats(tmp_path)
    part_bytes = {c.checkpoint_key: sum(p.stat().st_size for ns in ("image", "text") for p in c.parts(ns)) for c in (a, b)}
    assert before["checkpoints"] == {
        "ckpt-a": {"entries": 3, "bytes": part_bytes["ckpt-a"], "parts": 2},
        "ckpt/b with any chars": {"entries": 3, "bytes": part_bytes["ckpt/b with any chars"], "parts": 1},
    }
    assert before["entries"] == 6 and before["bytes"] == sum(part_bytes.values())

    assert drop(tmp_path, "ckpt-a") is True

    assert a.lookup("image", ["1", "2"])[1].tolist() == [False, False]
    assert a.lookup("text", ["1"])[1].tolist() == [False]
    assert torch.equal(b.lookup("image", ["1", "2", "3"])[0], _emb(["1", "2", "3"]))
    assert list(stats(tmp_path)["checkpoints"]) == ["ckpt/b with any chars"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [b.folder.name]  # no hidden leftovers
    assert drop(tmp_path, "ckpt-a") is False


def test_file_sha256_equals_hashlib_over_a_multi_mib_file(tmp_path):
    data = os.urandom(3 * (1 << 20) + 12345)  # several chunks and a partial last one
    path = tmp_path / "image.jpg"
    path.write_bytes(data)

    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(path)) == hashlib.sha256(data).hexdigest()


def test_text_key_is_on_the_exact_utf8_bytes_without_normalisation(tmp_path):
    composed = unicodedata.normalize("NFC", "a café by the sea")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed

    assert text_key(composed) == hashlib.sha256(composed.encode("utf-8")).hexdigest()
    assert text_key(decomposed) == hashlib.sha256(decomposed.encode("utf-8")).hexdigest()
    assert text_key(composed) != text_key(decomposed)
    keys = [text_key(composed), text_key(decomposed)]
    assert cached_embed(EmbeddingCache(tmp_path, "ck"), "text", keys, _Recorder(keys))[1]["computed"] == 2
