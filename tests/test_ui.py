"""The real UI: `dagster dev` (webserver + daemon) started as a user starts it, driven over GraphQL and in Chromium.

One `dagster dev` serves the whole module, on a fresh SPUR_HOME, inbox and DAGSTER_HOME:
(a) a materialization launched through GraphQL the way the UI's Materialize button does;
(b) a batch dropped into the inbox reaches an updated report, with no click, whose lineage names it;
(c) headless Chromium (Debian's, driven by Playwright) shows the asset graph; the screenshot is saved.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from spur_assets.core.data.builtin_dataset import BuiltinDatasetSpec, generate_builtin_dataset
from spur_assets.core.data.inbox import READY_MARKER
from spur_assets.core.records.artifacts import process_alive
from spur_assets.core.records.lineage import LineageStore

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DAGSTER = str(Path(sys.executable).with_name("dagster"))
CHROMIUM = os.environ.get("SPUR_CHROMIUM", "/usr/bin/chromium")
# Flags for a closed network: without the background-networking ones Chromium keeps dialling Google.
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ASSETS = [
    "raw_pairs", "spurious_features", "base_checkpoint", "batch_counterfactuals", "synthetic_counterfactuals",
    "finetuned_checkpoint", "control_checkpoint", "metric_report", "counterfactual_dataset",
]
REPORT_WAIT_S = float(os.environ.get("SPUR_UI_REPORT_WAIT_S", 1500))  # sensor -> raw_pairs -> ... -> metric_report, 2 cores
# Small batches, so the automated chain (default configs) takes minutes, not the demo's quarter hour.
UI_BATCH = BuiltinDatasetSpec(seed=11, n_train=160, n_test=60)
INBOX_BATCH = BuiltinDatasetSpec(seed=12, n_train=160, n_test=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DagsterDev:
    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.inbox = root / "inbox"
        self.dagster_home = root / "dagster_home"
        self.log_path = root / "dagster-dev.log"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.timings: dict[str, float] = {}

    def start(self) -> None:
        for folder in (self.home, self.inbox, self.dagster_home):
            folder.mkdir(parents=True)
        (self.dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SPUR_", "DAGSTER_"))}
        env.update(SPUR_HOME=str(self.home), SPUR_INBOX=str(self.inbox), SPUR_DEVICE="cpu",
                   DAGSTER_HOME=str(self.dagster_home))
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [DAGSTER, "dev", "-w", "workspace.yaml", "-p", str(self.port)],  # no -h: 127.0.0.1 is the default
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"dagster dev exited: {self.log_tail()}"
            try:
                status = self.graphql("{ workspaceOrError { ... on Workspace { locationEntries { name "
                                      "locationOrLoadError { __typename } } } } }")
                entries = status["workspaceOrError"]["locationEntries"]
                if entries and entries[0]["locationOrLoadError"] and entries[0]["locationOrLoadError"]["__typename"] == "RepositoryLocation":
                    return
                if entries and entries[0]["locationOrLoadError"] and entries[0]["locationOrLoadError"]["__typename"] == "PythonError":
                    raise AssertionError(f"definitions failed to load: {self.log_tail()}")
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"dagster dev did not serve the workspace in 240 s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # what Ctrl-C does: dagster dev stops its children
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:  # runs still going (a training step) belong to the same process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()

    def log_tail(self, chars: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql", data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = json.loads(response.read())
        assert "errors" not in payload, payload["errors"]
        return payload["data"]


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    server = DagsterDev(tmp_path_factory.mktemp("dagster-dev"))
    server.start()
    yield server
    server.stop()
    print(f"\n[ui] wait times (s): {json.dumps(server.timings)}; log: {server.log_path}")


def _repository_selector() -> dict:
    return {"repositoryLocationName": "spur_assets", "repositoryName": "__repository__"}


LAUNCH = """
mutation LaunchPipelineExecution($executionParams: ExecutionParams!) {
  launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message stack }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
  }
}"""

RUN_STATUS = "query($runId: ID!) { runOrError(runId: $runId) { ... on Run { status } } }"


def _wait_for_run(dev: DagsterDev, run_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = dev.graphql(RUN_STATUS, {"runId": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(2)
    raise AssertionError(f"run {run_id} not finished in {timeout_s} s: {dev.log_tail()}")


def test_a_graphql_launch_like_the_materialize_button(dev, tmp_path):
    manifest = generate_builtin_dataset(tmp_path / "ui-batch", UI_BATCH)
    # the launchpad's "Add partition" and then Materialize with run config, as the UI sends them
    added = dev.graphql(
        """mutation($selector: RepositorySelector!, $name: String!, $key: String!) {
             addDynamicPartition(repositorySelector: $selector, partitionsDefName: $name, partitionKey: $key) {
               __typename } }""",
        {"selector": _repository_selector(), "name": "batches", "key": "ui-batch"},
    )
    assert added["addDynamicPartition"]["__typename"] == "AddDynamicPartitionSuccess"
    started = time.monotonic()
    launched = dev.graphql(LAUNCH, {"executionParams": {
        "selector": {**_repository_selector(), "pipelineName": "__ASSET_JOB", "assetSelection": [{"path": ["raw_pairs"]}],
                     "assetCheckSelection": []},
        "mode": "default",
        "runConfigData": {"ops": {"raw_pairs": {"config": {"manifest": str(manifest)}}}},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "ui-batch"}]},
    }})["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    assert _wait_for_run(dev, run_id, 600) == "SUCCESS", dev.log_tail()
    dev.timings["graphql_launch_to_success"] = round(time.monotonic() - started, 1)

    row = LineageStore(dev.home).latest("raw_pairs", "ui-batch")
    assert row is not None and row["run_id"] == run_id
    materialized = dev.graphql(
        """query { assetNodeOrError(assetKey: {path: ["raw_pairs"]}) { ... on AssetNode {
             assetMaterializations(partitions: ["ui-batch"]) { runId metadataEntries { label } } } } }"""
    )["assetNodeOrError"]["assetMaterializations"]
    assert materialized[0]["runId"] == run_id
    labels = {e["label"] for e in materialized[0]["metadataEntries"]}
    assert {"images", "captions", "per_category", "contact_sheet", "materialization_id"} <= labels


def test_b_inbox_batch_reaches_the_report_without_a_click(dev, tmp_path):
    staged = tmp_path / "staging"
    generate_builtin_dataset(staged, INBOX_BATCH)
    target = dev.inbox / "batch-b"
    # copied without READY: never read, however long it waits (a half-copied batch)
    shutil.copytree(staged, target)
    time.sleep(12)  # > two sensor intervals
    store = LineageStore(dev.home)
    assert store.latest("raw_pairs", "batch-b") is None
    dropped = time.monotonic()
    (target / READY_MARKER).write_text("")

    taken = report = None
    deadline = dropped + REPORT_WAIT_S
    while time.monotonic() < deadline and report is None:
        if taken is None and store.latest("raw_pairs", "batch-b") is not None:
            taken = time.monotonic() - dropped
        latest = store.latest("metric_report")
        if latest is not None:
            chain = store.ancestry(latest["materialization_id"])
            batches = set(chain.filter(chain["asset"] == "raw_pairs")["partition"].to_list())
            if "batch-b" in batches:
                report = latest
                dev.timings["ready_to_raw_pairs"] = round(taken, 1)
                dev.timings["ready_to_report"] = round(time.monotonic() - dropped, 1)
                break
        failed = dev.graphql('{ runsOrError(filter: {statuses: [FAILURE]}) { ... on Runs { results { runId } } } }')
        assert not failed["runsOrError"]["results"], f"a run failed: {dev.log_tail()}"
        time.sleep(5)
    assert report is not None, f"no report naming batch-b within {REPORT_WAIT_S} s; log: {dev.log_tail()}"

    # the report read both batches, and the checkpoint it scored was trained on both
    chain = store.ancestry(report["materialization_id"])
    assert set(chain.filter(chain["asset"] == "raw_pairs")["partition"].to_list()) == {"ui-batch", "batch-b"}
    inputs = store.query("batches_and_counterfactuals_of_checkpoint",
                         {"materialization_id": store.latest("finetuned_checkpoint")["materialization_id"]})
    assert {"ui-batch", "batch-b"} <= set(inputs.filter(inputs["asset"] == "raw_pairs")["batch"].to_list())
    assert (dev.home / "reports" / "latest" / "report.json").is_file()

    # runs were launched by the sensor and the automation sensor, not by hand
    runs = dev.graphql("{ runsOrError { ... on Runs { results { runId status tags { key value } } } } }")
    origins = {t["value"] for r in runs["runsOrError"]["results"] for t in r["tags"] if t["key"] in ("dagster/sensor_name",)}
    assert {"inbox_sensor", "spur_automation"} <= origins, origins


def test_c_asset_graph_in_chromium(dev, tmp_path):
    from playwright.sync_api import sync_playwright

    screenshot = tmp_path / "asset-graph.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1800, "height": 1000})
            page.goto(f"{dev.url}/asset-groups", wait_until="networkidle", timeout=120_000)
            skip = page.get_by_role("button", name="Skip")  # first-visit newsletter dialog
            if skip.count():
                skip.click()
            page.get_by_text("Global asset lineage").wait_for(timeout=60_000)
            for group in ("ingest", "expose", "counterfactuals", "mitigate", "report"):
                page.get_by_text(group, exact=True).first.wait_for(timeout=60_000)
            page.keyboard.press("Alt+KeyE")  # the graph's "Expand all groups"
            page.wait_for_timeout(2500)
            shown = page.locator("body").inner_text().splitlines()  # node labels are ordinary text
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    labels = {" ".join((text or "").split()) for text in shown}
    for asset in ASSETS:
        # long names are middle-truncated in the nodes ("syntheti…rfactuals")
        assert any(_matches_node_label(asset, label) for label in labels), (asset, sorted(labels))
    assert screenshot.stat().st_size > 20_000
    keep = os.environ.get("SPUR_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(keep) / screenshot.name)
    print(f"\n[ui] screenshot: {screenshot}")


def _matches_node_label(asset: str, label: str) -> bool:
    for word in label.split(" "):
        if word == asset:
            return True
        if "…" in word:
            head, tail = word.split("…", 1)
            if head and tail and asset.startswith(head) and asset.endswith(tail):
                return True
    return False


RUN_LOG_MESSAGES = """query($runId: ID!) { logsForRun(runId: $runId) { ... on EventConnection {
  events { __typename ... on MessageEvent { message } } } } }"""
TERMINATE = """mutation($runId: String!) { terminateRun(runId: $runId, terminatePolicy: SAFE_TERMINATE) {
  __typename ... on PythonError { message } ... on TerminateRunFailure { message } } }"""


def test_d_a_run_terminated_in_the_ui_stops_within_10_s_and_stores_nothing(dev):
    # A long training launched like the Materialize button, then the run page's Terminate.
    store = LineageStore(dev.home)
    before = store.latest("base_checkpoint")
    training = {"epochs": 400, "batch_size": 32, "captions_per_image": 1, "workers": 0}
    launched = dev.graphql(LAUNCH, {"executionParams": {
        "selector": {**_repository_selector(), "pipelineName": "__ASSET_JOB", "assetSelection": [{"path": ["base_checkpoint"]}],
                     "assetCheckSelection": []},
        "mode": "default",
        "runConfigData": {"ops": {"base_checkpoint": {"config": training}}},
    }})["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + 300
    while True:  # until the training loop reports its second epoch: the step is deep in torch
        events = dev.graphql(RUN_LOG_MESSAGES, {"runId": run_id})["logsForRun"]["events"]
        if any("epoch 2 " in (e.get("message") or "") for e in events):
            break
        assert time.monotonic() < deadline, f"training did not reach epoch 2: {dev.log_tail()}"
        time.sleep(1)
    asked = time.monotonic()
    terminated = dev.graphql(TERMINATE, {"runId": run_id})["terminateRun"]
    assert terminated["__typename"] == "TerminateRunSuccess", terminated
    while (status := dev.graphql(RUN_STATUS, {"runId": run_id})["runOrError"]["status"]) not in ("CANCELED", "FAILURE", "SUCCESS"):
        assert time.monotonic() - asked < 60, f"run still {status} 60 s after Terminate: {dev.log_tail()}"
        time.sleep(0.5)
    took = time.monotonic() - asked
    dev.timings["terminate_to_canceled"] = round(took, 1)
    assert status == "CANCELED" and took < 10, (status, took, dev.log_tail())
    # its staging folder is gone and lineage still names the earlier checkpoint; a staging folder
    # of another asset may remain only while the run writing it (the automation's) is alive
    artifacts = dev.home / "artifacts"
    assert not list(artifacts.glob("base_checkpoint/*/.staging-*"))
    orphans = [f for f in artifacts.glob("*/*/.staging-*")
               if f.exists() and not (".pid" in f.name and process_alive(int(f.name.rpartition(".pid")[2])))]
    assert not orphans, orphans
    after = store.latest("base_checkpoint")
    assert (after and after["materialization_id"]) == (before and before["materialization_id"])
