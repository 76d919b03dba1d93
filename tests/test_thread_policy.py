"""The thread policy: one number (SPUR_THREADS, default the cores this process may use) bounds the
threads a step keeps busy, its decoding workers included. Checked on a running training process."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import subprocess
import sys
import threading

from spur_assets.core.runtime.threads import ThreadGovernor, ThreadPolicy, available_cpus, cgroup_cpu_limit
from tests.test_stop_and_recover import SHORT_TRAINING, SMALL, SpurProcess, _config


def test_split_gives_torch_what_the_decoding_workers_leave():
    assert ThreadPolicy(4).split(1) == (3, 1)
    assert ThreadPolicy(2).split(1) == (1, 1)
    assert ThreadPolicy(2).split(0) == (2, 0)
    assert ThreadPolicy(1).split(3) == (1, 0)  # one thread: decoding moves onto the training thread
    assert ThreadPolicy(8).split(3) == (5, 3)
    assert ThreadPolicy(2).pool_size(8) == 2 and ThreadPolicy(8).pool_size(3) == 3
    with pytest.raises(ValueError):
        ThreadPolicy.from_setting(-1)


def test_default_is_the_cores_this_process_may_use():
    assert ThreadPolicy.from_setting(0).total == available_cpus() <= len(os.sched_getaffinity(0))
    assert ThreadPolicy.from_setting(0).adaptive  # not set by hand: follows the load
    assert ThreadPolicy.from_setting(3) == ThreadPolicy(3, adaptive=False)


SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"


def _foreign_spinners(count: int, seconds: float) -> list[int]:
    """Busy processes that are not this process's descendants (started through a shell that exits)."""
    pids = []
    for _ in range(count):
        out = subprocess.run(
            ["sh", "-c", f'"{sys.executable}" -c "$0" >/dev/null 2>&1 & echo $!', SPIN.format(seconds=seconds)],
            capture_output=True, text=True, check=True,
        ).stdout
        pids.append(int(out.strip()))
    return pids


def _measure(governor: ThreadGovernor, seconds: float = 2.0) -> int | None:
    governor.rebalance()  # first sample
    time.sleep(seconds)
    return governor.rebalance()


def _free_cores(seconds: float = 1.5) -> float:
    governor = ThreadGovernor(ceiling=1, interval_s=0)
    governor.free_cores()
    time.sleep(seconds)
    return governor.free_cores()


@pytest.fixture
def torch_threads():
    import torch

    before = torch.get_num_threads()
    yield torch
    torch.set_num_threads(before)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to share")
def test_the_governor_gives_torch_the_cores_other_processes_leave(torch_threads):
    # other load on a shared machine (or a parallel test worker) only lowers the reading further
    cores = len(os.sched_getaffinity(0))
    torch_threads.set_num_threads(cores)
    pids = _foreign_spinners(cores - 1, seconds=30)
    try:
        time.sleep(0.5)
        assert _measure(ThreadGovernor(ceiling=cores, interval_s=0)) == 1
        assert torch_threads.get_num_threads() == 1
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to share")
def test_the_governor_does_not_count_this_process_as_another(torch_threads):
    # The training thread itself keeps a core busy: that is not someone else's load. Counted as
    # another's, it would take a whole core off every reading; other load on the machine moves
    # readings taken back to back alike, and a reading disturbed anyway is taken again.
    def spinning_minus_quiet() -> float:
        quiet = _free_cores()
        stop = threading.Event()
        spinner = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)], daemon=True)
        spinner.start()
        try:
            return _free_cores() - quiet
        finally:
            stop.set()
            spinner.join()

    differences = []
    for _ in range(3):
        differences.append(spinning_minus_quiet())
        if differences[-1] > -0.4:
            break
    assert differences[-1] > -0.4, differences


def test_the_governor_respects_its_ceiling_and_its_interval(torch_threads):
    governor = ThreadGovernor(ceiling=1, interval_s=60)
    assert governor.rebalance() is None  # first sample only
    assert governor.rebalance() is None  # the interval has not passed
    governor.interval_s = 0
    time.sleep(0.5)
    assert governor.rebalance() == 1 and torch_threads.get_num_threads() == 1


def test_cgroup_quota_is_read_for_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1) == 3.0
    assert cgroup_cpu_limit(tmp_path / "nothing") is None


def _cpu_ticks(pid: int) -> dict[tuple[int, int], int]:
    """utime + stime (clock ticks) of every thread of ``pid`` and of its child processes."""
    ticks: dict[tuple[int, int], int] = {}
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for process in pids:
        for task in Path(f"/proc/{process}/task").glob("*"):
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks[(process, int(task.name))] = int(fields[11]) + int(fields[12])
    return ticks


def _busy_threads(pid: int, window_s: float = 3.0, share: float = 0.1) -> int:
    """Threads (of the process and its children) that ran at least ``share`` of a ``window_s`` window."""
    before = _cpu_ticks(pid)
    time.sleep(window_s)
    after = _cpu_ticks(pid)
    hz = os.sysconf("SC_CLK_TCK")
    return sum(1 for key, ticks in after.items() if (ticks - before.get(key, 0)) / hz >= share * window_s)


@pytest.mark.slow
def test_a_training_process_keeps_no_more_threads_busy_than_the_policy(tmp_path):
    # Without the policy, torch keeps one thread per core busy (2 here): checked, this then fails.
    # (A streamed variant with SPUR_THREADS=2 and a decoding worker was dropped: its decoder stays
    # under the busy threshold on 64-px images, so it passed with or without the policy.)
    threads = 1
    home = tmp_path / "home"
    config = _config(tmp_path / "run.yaml", {"raw_pairs": SMALL, "base_checkpoint": {**SHORT_TRAINING, "epochs": 40}})
    assert SpurProcess(home, tmp_path / "raw.log", "--select", "raw_pairs", "--config", config).finish() == 0
    run = SpurProcess(
        home, tmp_path / "train.log", "--select", "base_checkpoint", "--config", config, env={"SPUR_THREADS": str(threads)}
    )
    try:
        run.wait_for(r"epoch 2 step")
        busiest = max(_busy_threads(run.process.pid) for _ in range(3))
    finally:
        run.stop(signal.SIGTERM)
    assert 1 <= busiest <= threads, f"{busiest} busy threads with SPUR_THREADS={threads}"


def test_the_gil_handover_is_short_while_a_helper_runs_and_restored_after():
    import sys
    import threading

    from spur_assets.core.runtime.threads import HELPER_SWITCH_INTERVAL_S, prompt_gil_handover

    before = sys.getswitchinterval()
    short = pytest.approx(min(before, HELPER_SWITCH_INTERVAL_S), rel=1e-3)  # CPython stores it in microseconds
    seen: list[float] = []
    with prompt_gil_handover():
        assert sys.getswitchinterval() == short
        inner = threading.Thread(target=lambda: seen.append(_nested_interval(prompt_gil_handover)))
        inner.start()
        inner.join()
        # a second holder that ended does not restore it while the first still holds it
        assert sys.getswitchinterval() == short
    assert seen == [short]
    assert sys.getswitchinterval() == before


def _nested_interval(handover) -> float:
    import sys

    with handover():
        return sys.getswitchinterval()
