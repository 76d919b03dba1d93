"""Issue #14, fuzzed: mutated batches end accepted exactly or in a DatasetError, never anything else.

A hypothesis-driven mutator (tests/hostile_corpus.py, ``mutate``) damages the valid fixture batch in
memory -- JSON values replaced by random JSON (huge integers, NaN/Infinity, lone surrogates, NULs,
nested lists), JSON structure deleted or duplicated, image bytes truncated, flipped or swapped,
manifest lines changed -- writes it out and reads it with ``load_batch`` in the isolated worker
(crashes and hangs become findings, not a dead pytest). One example in 25 also runs the
whole ``raw_pairs`` materialization into a home holding the valid batch and checks that a refusal
changed nothing stored.

Every example is judged and every violation collected (no shrinking: an example is 1-3 mutations
already); ``test_fuzz_found_no_violation`` then fails with one example per kind of violation, so a
run shows all the kinds at once instead of the first.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests import hostile_corpus as hc

FUZZ_BATCH = "fuzz"
FULL_RUN_ONE_IN = 25

VIOLATIONS: list[tuple[str, str]] = []  # (kind, report)
OUTCOMES: Counter = Counter()
EXAMPLES = {"count": 0, "full": 0}


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    env = hc.build_env(base, hc.shared_worker(base / "worker-logs"))
    return env, hc.MemoryBatch.read(env.pristine), base


class HypothesisChooser(hc.Chooser):
    def __init__(self, data) -> None:
        self.data = data

    def integer(self, low: int, high: int) -> int:
        return self.data.draw(st.integers(low, high))


def _kind(problem: str) -> str:
    """A violation's kind: its text without numbers, paths and quoted values."""
    text = re.sub(r"/\S+", "PATH", problem.split("\n")[0])
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'X'", text)
    return re.sub(r"\d+", "N", text)[:120]


def _full_run_problems(env, base, batch: hc.MemoryBatch, manifest, mode) -> tuple[hc.Outcome, list[str]]:
    home = base / "example-home"
    if home.exists():
        shutil.rmtree(home)
    hc.new_home(env, home)
    before = env.template_snapshot
    outcome = env.worker.ingest(home, manifest, FUZZ_BATCH, on_bad_record=mode)
    after = hc.snapshot(home, reference=before)
    if outcome.crashed:
        return outcome, [f"crash: {outcome.crashed}"]
    problems = []
    if outcome.peak_rss_mb > hc.PEAK_RSS_LIMIT_MB:
        problems.append(f"peak RSS {outcome.peak_rss_mb:.0f} MB")
    if not outcome.accepted:
        if not outcome.dataset_error:
            problems.append(f"raw_pairs: not a DatasetError: {outcome.error_cls}: {hc.first_line(outcome.error_message)}")
        problems += [f"raw_pairs: a refused batch changed stored data: {d}" for d in hc.snapshot_difference(before, after)]
        return outcome, problems
    problems += [f"raw_pairs: {p}" for p in hc.kept_problems(before, after, FUZZ_BATCH, manifest)]
    expected = hc.expected_from_memory(batch)
    if mode == "fail" and expected is not None:
        captions = {r["caption_id"]: (r["image_id"], r["caption"]) for r in after.batch_rows("raw_captions", FUZZ_BATCH)}
        if captions != expected["captions"]:
            problems.append("raw_pairs: fail mode accepted, but raw_captions is not exactly the JSON's captions")
    return outcome, problems


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # violations are collected, not shrunk (see the module docstring)
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
def test_mutated_batches_are_accepted_exactly_or_refused_cleanly(fuzz_env, data):
    env, pristine, base = fuzz_env
    batch = pristine.copy()
    chooser = HypothesisChooser(data)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        hc.mutate(batch, chooser)
    mode = data.draw(st.sampled_from(["fail", "quarantine"]), label="mode")
    full = EXAMPLES["count"] % FULL_RUN_ONE_IN == FULL_RUN_ONE_IN // 2  # a fixed subset: every 25th example
    manifest = batch.write(base / "example")
    EXAMPLES["count"] += 1
    if full:
        EXAMPLES["full"] += 1
        outcome, problems = _full_run_problems(env, base, batch, manifest, mode)
    else:
        outcome = env.worker.load(manifest, FUZZ_BATCH, on_bad_record=mode)
        problems = hc.fuzz_tables_problems(batch, mode, outcome)
    OUTCOMES[("raw_pairs " if full else "load_batch ") + hc.outcome_key(outcome)] += 1
    for problem in problems:
        report = f"[{mode}{', raw_pairs' if full else ''}] mutations {batch.touched} -> {problem}"
        VIOLATIONS.append((_kind(problem), report[:1500]))


def test_fuzz_found_no_violation():
    assert EXAMPLES["count"] >= 300, EXAMPLES
    assert EXAMPLES["full"] >= 3, EXAMPLES  # the whole-pipeline subset really ran
    statistics = ", ".join(f"{k}: {v}" for k, v in OUTCOMES.most_common())
    print(f"\nfuzz: {EXAMPLES}; outcomes: {statistics}")
    kinds: dict[str, list[str]] = {}
    for kind, report in VIOLATIONS:
        kinds.setdefault(kind, []).append(report)
    summary = "\n\n".join(f"{len(reports)} x {kind}\n  e.g. {reports[0]}" for kind, reports in kinds.items())
    assert not VIOLATIONS, f"{len(VIOLATIONS)} violations of {EXAMPLES['count']} examples ({statistics}):\n\n{summary}"
