"""The Kubernetes configuration, checked as far as it can be without a cluster.

References: Dagster's own instance-config validation, dagster-k8s's config schemas and Job
builder (the code the executor runs to make a step pod), and the Kubernetes client's models for
the manifests. No cluster, Helm binary or image build is involved; those steps are in
docs/cluster.md and untested here.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import dagster as dg
import kubernetes.client as k8s
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster_k8s import DagsterK8sJobConfig, K8sRunLauncher, construct_dagster_k8s_job
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import UserDefinedDagsterK8sConfig, get_user_defined_k8s_config

from spur_assets.pipeline.cluster import GPU_RESOURCE, K8S_CONFIG_TAG, gpu_step_tags
from spur_assets.pipeline.pipes import PIPES_SUBPROCESS_KEY, TRAIN_WORKER_MODULE, pipes_subprocess_client, torchrun_command

REPO = Path(__file__).resolve().parents[1]
K8S_DIR = REPO / "deploy" / "k8s"
GPU_ASSETS = ("base_checkpoint", "finetuned_checkpoint", "control_checkpoint")


def _yaml(name: str):
    return yaml.safe_load((K8S_DIR / name).read_text())


def _strict_k8s(type_name: str, data, where: str = "") -> None:
    """Fail on any key the Kubernetes API type does not have (the client's deserializer ignores them)."""
    if type_name.startswith("list["):
        for index, item in enumerate(data):
            _strict_k8s(type_name[5:-1], item, f"{where}[{index}]")
        return
    if type_name.startswith("dict[") or type_name in ("str", "int", "bool", "object", "float"):
        return
    model = getattr(k8s, type_name)
    by_json_name = {json_name: attr for attr, json_name in model.attribute_map.items()}
    unknown = sorted(set(data) - set(by_json_name))
    assert not unknown, f"{where}: {type_name} has no field(s) {unknown}"
    for key, value in data.items():
        _strict_k8s(model.openapi_types[by_json_name[key]], value, f"{where}.{key}")


def _load_k8s_definitions():
    spec = importlib.util.spec_from_file_location("spur_k8s_definitions", K8S_DIR / "definitions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.defs


def _step_job(tags_config: UserDefinedDagsterK8sConfig):
    """The Kubernetes Job dagster-k8s builds for a step with this user-defined config, on top of the
    launcher settings in dagster.yaml (the same volumes every run pod gets)."""
    launcher = _yaml("dagster.yaml")["run_launcher"]["config"]
    job_config = DagsterK8sJobConfig(
        job_image="registry.example/spur-assets:0.1.0",
        dagster_home=launcher["dagster_home"],
        image_pull_policy=launcher["image_pull_policy"],
        instance_config_map=launcher["instance_config_map"],
        postgres_password_secret=launcher["postgres_password_secret"],
        volume_mounts=launcher["volume_mounts"],
        volumes=launcher["volumes"],
        env_vars=launcher["env_vars"],
    )
    return construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_step"], "dagster-step-test",
                                     user_defined_k8s_config=tags_config)


# --------------------------------------------------------------------------- instance and Helm values


def test_instance_yaml_passes_dagster_and_dagster_k8s_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "not-a-secret")
    shutil.copy(K8S_DIR / "dagster.yaml", tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))
    assert (config["run_launcher"]["module"], config["run_launcher"]["class"]) == ("dagster_k8s", "K8sRunLauncher")
    assert "postgres" in config["storage"]  # SQLite cannot be shared by pods
    launcher = process_config(K8sRunLauncher.config_type(), config["run_launcher"]["config"])
    assert launcher.success, launcher.errors
    # A misspelt field is refused by the same check (so the check above is not vacuous).
    misspelt = dict(config["run_launcher"]["config"], volume_mount=[])
    assert not process_config(K8sRunLauncher.config_type(), misspelt).success
    # SPUR_HOME is the shared volume's mount path, and the volume is the RWX claim.
    env = dict(item.split("=", 1) for item in config["run_launcher"]["config"]["env_vars"])
    mount = config["run_launcher"]["config"]["volume_mounts"][0]
    assert env["SPUR_HOME"] == mount["mount_path"] == "/spur"
    claim = config["run_launcher"]["config"]["volumes"][0]["persistent_volume_claim"]["claim_name"]
    assert claim == _yaml("spur-home-pvc.yaml")["metadata"]["name"]


def test_helm_values_serve_the_k8s_definitions_with_the_shared_volume():
    values = _yaml("values.yaml")
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    args = deployment["dagsterApiGrpcArgs"]
    served = Path(args[args.index("--python-file") + 1])
    workdir = Path(args[args.index("--working-directory") + 1])
    assert (REPO / served.relative_to(workdir)) == K8S_DIR / "definitions.py"
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True  # runs inherit env and volumes
    env = {item["name"]: item["value"] for item in deployment["env"]}
    (mount,) = deployment["volumeMounts"]
    (volume,) = deployment["volumes"]
    assert env["SPUR_HOME"] == mount["mountPath"] and mount["name"] == volume["name"]
    pvc = _yaml("spur-home-pvc.yaml")
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for item in deployment["env"]:
        _strict_k8s("V1EnvVar", item, "env")
    _strict_k8s("V1VolumeMount", mount, "volumeMounts")
    _strict_k8s("V1Volume", volume, "volumes")
    _strict_k8s("V1ResourceRequirements", deployment["resources"], "resources")
    _strict_k8s("V1PersistentVolumeClaimSpec", pvc["spec"], "spur-home-pvc.yaml spec")
    with pytest.raises(AssertionError, match="no field"):
        _strict_k8s("V1Volume", {"name": "x", "persistentVolumeClam": {}}, "typo")
    # Helm's `--version` and the Dockerfile's pins follow the dagster version the project pins.
    pinned = re.search(r"^dagster==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert f"--version {pinned}" in (K8S_DIR / "values.yaml").read_text()


# --------------------------------------------------------------------------- definitions and op tags


def test_k8s_definitions_build_with_the_k8s_job_executor_and_the_pipes_client():
    defs = _load_k8s_definitions()
    dg.Definitions.validate_loadable(defs)
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == "k8s"
    assert isinstance(defs.resources[PIPES_SUBPROCESS_KEY], dg.PipesSubprocessClient)
    # The documented 4-GPU run config is valid for this job: executor override and asset config.
    run_config = _yaml("run_config_finetune_4gpu.yaml")
    assert dg.validate_run_config(job, run_config)
    bad = json.loads(json.dumps(run_config))
    bad["ops"]["finetuned_checkpoint"]["config"]["dist_backend"] = "mpi"
    with pytest.raises(dg.DagsterInvalidConfigError):
        dg.validate_run_config(job, bad)


def test_training_steps_ask_for_a_gpu_and_shared_memory_and_other_steps_do_not():
    defs = _load_k8s_definitions()
    for key in defs.resolve_all_asset_keys():
        node = defs.resolve_assets_def(key).node_def
        name = key.to_user_string()
        if name not in GPU_ASSETS:
            assert K8S_CONFIG_TAG not in node.tags, name
            continue
        job = _step_job(get_user_defined_k8s_config(node.tags))
        pod = job.spec.template.spec
        (container,) = pod.containers
        assert container.resources.limits == {GPU_RESOURCE: "1"}, name
        mounts = {m.mount_path: m.name for m in container.volume_mounts}
        assert mounts["/spur"] == "spur-home" and mounts["/dev/shm"] == "dshm", name  # launcher volume kept
        shm = next(v for v in pod.volumes if v.name == "dshm")
        assert shm.empty_dir.medium == "Memory"
        assert any(t.key == GPU_RESOURCE and t.effect == "NoSchedule" for t in pod.tolerations)


def test_per_step_override_scales_finetuning_to_four_gpus():
    """The executor merges the op tags' config with per_step_k8s_config (in this order); the merge
    here is dagster-k8s's own, as in k8s_job_executor._get_container_context."""
    tags = get_user_defined_k8s_config({K8S_CONFIG_TAG: json.dumps(gpu_step_tags()[K8S_CONFIG_TAG])})
    override = _yaml("run_config_finetune_4gpu.yaml")["execution"]["config"]["per_step_k8s_config"]["finetuned_checkpoint"]
    merged = K8sContainerContext(run_k8s_config=tags).merge(
        K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(override))
    )
    pod = _step_job(merged.run_k8s_config).spec.template.spec
    assert pod.containers[0].resources.limits == {GPU_RESOURCE: "4"}
    assert "/dev/shm" in {m.mount_path for m in pod.containers[0].volume_mounts}
    ops = _yaml("run_config_finetune_4gpu.yaml")["ops"]["finetuned_checkpoint"]["config"]
    assert ops["nproc_per_node"] == 4 and ops["dist_backend"] == "nccl"
    with pytest.raises(ValueError, match="gpus=0"):
        gpu_step_tags(0)


def test_pipes_client_starts_torchrun_on_the_worker_module():
    client = pipes_subprocess_client({"NCCL_DEBUG": "INFO"})
    assert isinstance(client, dg.PipesSubprocessClient) and client.forward_termination
    assert client.env == {"NCCL_DEBUG": "INFO"}
    command = torchrun_command(TRAIN_WORKER_MODULE, ["/spur/work/job"], nproc_per_node=4)
    assert command == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                       "-m", "spur_assets.train_worker", "/spur/work/job"]
    # Both modules the command names resolve in this environment.
    assert importlib.util.find_spec("torch.distributed.run") is not None
    assert importlib.util.find_spec(TRAIN_WORKER_MODULE) is not None
    with pytest.raises(ValueError, match="nproc_per_node=0"):
        torchrun_command(TRAIN_WORKER_MODULE, [], nproc_per_node=0)
