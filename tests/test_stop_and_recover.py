"""Stopping `spur run` with real signals, and starting again after a killed run.

Real processes and real signals: SIGTERM at ingestion, in training and in a counterfactual
process pool must end the run within 10 s, mark its Dagster run CANCELED, leave no staging
folder and no new lineage row, and a stopped training resumes from its last epoch. A run
killed with SIGKILL cannot clean up: the next `spur run` marks it FAILED and removes its
staging folder.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import yaml

SPUR = str(Path(sys.executable).with_name("spur"))
STOP_WITHIN_S = 10.0

pytestmark = pytest.mark.slow


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPUR_", "DAGSTER_"))}
    env["SPUR_HOME"] = str(home)
    return env


class SpurProcess:
    """`spur run ARGS` in the background, its output in a file we can wait on."""

    def __init__(self, home: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.handle = log.open("w")
        self.process = subprocess.Popen(
            [SPUR, "run", *args], env={**_env(home), **(env or {})}, stdout=self.handle, stderr=subprocess.STDOUT, text=True
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 300.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            if self.process.poll() is not None:
                raise AssertionError(f"spur run ended (rc {self.process.returncode}) before {pattern!r}:\n{self.text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.text()[-3000:]}")

    def stop(self, signum: int) -> float:
        """Send ``signum``; seconds until the process ended."""
        sent = time.monotonic()
        self.process.send_signal(signum)
        self.process.wait(timeout=120)
        self.handle.close()
        return time.monotonic() - sent

    def finish(self, timeout: float = 600.0) -> int:
        code = self.process.wait(timeout=timeout)
        self.handle.close()
        return code


def _config(path: Path, ops: dict) -> str:
    path.write_text(yaml.safe_dump({"ops": {name: {"config": config} for name, config in ops.items()}}))
    return str(path)


def _runs(home: Path) -> list[tuple[str, str]]:
    """(run id, status) of every run in the home's Dagster instance, oldest first."""
    script = (
        "import dagster as dg\n"
        "for r in reversed(dg.DagsterInstance.get().get_runs()): print(r.run_id, r.status.value)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env={**_env(home), "DAGSTER_HOME": str(home / "dagster")},
        capture_output=True, text=True, check=True,
    ).stdout
    return [tuple(line.split()) for line in out.splitlines() if line.strip()]


def _lineage_rows(home: Path) -> list[tuple]:
    if not (home / "lineage.duckdb").exists():
        return []
    conn = duckdb.connect(str(home / "lineage.duckdb"), read_only=True)
    try:
        return conn.execute("select materialization_id, asset, partition from materializations order by 1").fetchall()
    finally:
        conn.close()


def _staging(home: Path) -> list[Path]:
    return sorted((home / "artifacts").glob("*/*/.staging-*")) if (home / "artifacts").exists() else []


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose (it waits only to be reaped by its parent)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


SMALL = {"builtin_n_train": 300, "builtin_n_test": 40, "workers": 1}
# ~10 steps an epoch, a few seconds each epoch on a quiet machine: time to signal mid-training.
SHORT_TRAINING = {"epochs": 12, "batch_size": 32, "captions_per_image": 1, "workers": 0}


def test_sigterm_at_ingestion_cancels_the_run_and_stores_nothing(tmp_path):
    home = tmp_path / "home"
    # The default built-in data (4,000 images) takes long enough to generate to be stopped in the middle.
    run = SpurProcess(home, tmp_path / "ingest.log", "--select", "raw_pairs")
    run.wait_for(r"generating the built-in dataset")
    time.sleep(1.0)
    took = run.stop(signal.SIGTERM)
    assert took < STOP_WITHIN_S, run.text()[-2000:]
    assert run.process.returncode == 130, run.text()[-2000:]
    assert "marked CANCELED" in run.text()
    assert [status for _, status in _runs(home)] == ["CANCELED"]
    assert _staging(home) == [] and _lineage_rows(home) == []


def test_killed_and_stopped_training_resume_and_the_dead_run_is_failed(tmp_path):
    home = tmp_path / "home"
    config = _config(tmp_path / "run.yaml", {"raw_pairs": SMALL, "base_checkpoint": SHORT_TRAINING})
    assert SpurProcess(home, tmp_path / "raw.log", "--select", "raw_pairs", "--config", config).finish() == 0
    stored = _lineage_rows(home)

    # SIGKILL in training: nothing can clean up, the run stays STARTED and its staging folder stays.
    killed = SpurProcess(home, tmp_path / "killed.log", "--select", "base_checkpoint", "--config", config)
    killed.wait_for(r"epoch 3 step")
    killed.stop(signal.SIGKILL)
    assert killed.process.returncode == -signal.SIGKILL
    assert [status for _, status in _runs(home)][-1] == "STARTED"
    assert len(_staging(home)) == 1
    assert (home / "work" / "base_checkpoint").is_dir()

    # The next start marks it FAILED, removes its staging, and training resumes after the saved epochs.
    stopped = SpurProcess(home, tmp_path / "stopped.log", "--select", "base_checkpoint", "--config", config)
    first_epoch = int(stopped.wait_for(r"epoch (\d+) step").group(1))
    assert first_epoch >= 3, stopped.text()[-2000:]
    assert "marked FAILURE" in stopped.text()
    assert [status for _, status in _runs(home)][-2] == "FAILURE"
    stopped.wait_for(rf"epoch {first_epoch + 2} step")
    # SIGTERM in training: a clean stop within 10 s, the run CANCELED, nothing new stored
    took = stopped.stop(signal.SIGTERM)
    assert took < STOP_WITHIN_S and stopped.process.returncode == 130, stopped.text()[-2000:]
    assert [status for _, status in _runs(home)][-1] == "CANCELED"
    assert _staging(home) == [] and _lineage_rows(home) == stored

    # ... and the next run resumes again, finishes, and cleans its work folder.
    resumed = SpurProcess(home, tmp_path / "resumed.log", "--select", "base_checkpoint", "--config", config)
    assert resumed.finish() == 0, resumed.text()[-2000:]
    assert int(re.search(r"epoch (\d+) step", resumed.text()).group(1)) >= first_epoch + 2
    assert [status for _, status in _runs(home)][-1] == "SUCCESS"
    assert [row[1] for row in _lineage_rows(home)].count("base_checkpoint") == 1
    assert not any((home / "work" / "base_checkpoint").iterdir())


def test_sigterm_in_a_counterfactual_pool_ends_its_workers(tmp_path):
    home = tmp_path / "home"
    config = _config(
        tmp_path / "run.yaml",
        {
            "raw_pairs": {**SMALL, "builtin_n_train": 1500},
            "spurious_features": {"min_support": 5},
            "batch_counterfactuals": {"workers": 2},
        },
    )
    prepared = SpurProcess(home, tmp_path / "prep.log", "--select", "raw_pairs,spurious_features", "--config", config)
    assert prepared.finish() == 0, prepared.text()[-2000:]
    stored = _lineage_rows(home)
    run = SpurProcess(home, tmp_path / "cf.log", "--select", "batch_counterfactuals", "--config", config)
    run.wait_for(r"flagged pairs")
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while time.monotonic() < deadline and len(workers) < 2:  # the pool's spawned processes
        workers = [p for p in _children(run.process.pid) if "spawn_main" in _cmdline(p)]  # not the resource tracker
        time.sleep(0.2)
    assert len(workers) >= 2, run.text()[-2000:]
    took = run.stop(signal.SIGTERM)
    assert took < STOP_WITHIN_S and run.process.returncode == 130, run.text()[-2000:]
    gone_by = time.monotonic() + 5.0  # terminated and joined before spur run exits; allow for reaping
    while time.monotonic() < gone_by and any(_alive(p) for p in workers):
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)]
    assert [status for _, status in _runs(home)][-1] == "CANCELED"
    assert _staging(home) == [] and _lineage_rows(home) == stored


def test_the_dead_run_sensor_fails_daemon_runs_whose_process_is_gone(tmp_path):
    # A run the daemon launched and the OOM killer ended: tagged with its process by its first
    # step, STARTED forever without the sensor. A run whose process lives is left alone.
    import socket

    import dagster as dg
    from dagster._core.test_utils import create_run_for_test

    from spur_assets.pipeline.recovery import HOST_TAG, PID_TAG, dead_run_sensor
    from spur_assets.pipeline.resources import SpurSettings

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    home = tmp_path / "home"
    staging = home / "artifacts" / "base_checkpoint" / "_" / f".staging-abc.pid{gone.pid}"
    staging.mkdir(parents=True)
    with dg.instance_for_test() as instance:
        host = socket.gethostname()
        dead = create_run_for_test(instance, status=dg.DagsterRunStatus.STARTED, tags={PID_TAG: str(gone.pid), HOST_TAG: host})
        alive = create_run_for_test(instance, status=dg.DagsterRunStatus.STARTED, tags={PID_TAG: str(os.getpid()), HOST_TAG: host})
        context = dg.build_sensor_context(instance=instance, resources={"settings": SpurSettings(home=str(home))})
        result = dead_run_sensor(context)
        assert instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(alive.run_id).status == dg.DagsterRunStatus.STARTED
        assert not staging.exists() and "marked FAILURE" in result.skip_message
        assert "no run with a dead process" in dead_run_sensor(context).skip_message


def test_every_step_tags_its_run_with_the_process_executing_it(tmp_path):
    import dagster as dg

    from spur_assets.definitions import resources_for
    from spur_assets.pipeline.ingest import batches, raw_pairs
    from spur_assets.pipeline.recovery import PID_TAG
    from spur_assets.pipeline.resources import SpurSettings

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(batches.name, ["builtin"])
        result = dg.materialize(
            [raw_pairs], partition_key="builtin", instance=instance,
            resources=resources_for(SpurSettings(home=str(tmp_path / "home"), device="cpu")),
            run_config={"ops": {"raw_pairs": {"config": {"builtin_n_train": 40, "builtin_n_test": 10, "workers": 1}}}},
        )
        assert result.success
        assert instance.get_run_by_id(result.run_id).tags[PID_TAG] == str(os.getpid())
