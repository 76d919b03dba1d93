"""The package's definitions: one build for the UI, `spur run` and Kubernetes; the executor is chosen."""

import dagster as dg

import definitions as root_definitions
from spur_assets.cli import load_definitions
import pytest

from spur_assets.definitions import build_definitions, defs, executor_from_environment


def test_the_root_file_serves_the_package_definitions():
    assert root_definitions.defs is defs
    dg.Definitions.validate_loadable(defs)


def test_local_runs_execute_their_steps_in_the_run_process():
    # automated runs (sensors, automation conditions) and `spur run` alike: no process per step
    for built in (defs, load_definitions(), build_definitions()):
        job = built.resolve_implicit_global_asset_job_def()
        assert job.executor_def.name == "in_process"


def test_spur_run_reads_settings_from_the_environment_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("SPUR_HOME", str(tmp_path / "elsewhere"))
    assert str(load_definitions().resources["settings"].home) == str(tmp_path / "elsewhere")


def test_spur_executor_chooses_a_process_per_step_and_refuses_unknown_names():
    assert executor_from_environment({}).name == "in_process"
    assert executor_from_environment({"SPUR_EXECUTOR": "multiprocess"}).name == "multiprocess"
    with pytest.raises(ValueError, match="SPUR_EXECUTOR='threads'"):
        executor_from_environment({"SPUR_EXECUTOR": "threads"})
