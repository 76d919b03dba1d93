"""What a step needs from Kubernetes when each step runs in its own pod (dagster_k8s.k8s_job_executor).

The training assets carry `GPU_STEP_TAGS` as op tags. Off Kubernetes the tags do nothing; under
the k8s_job_executor the step pod asks for one NVIDIA GPU (`nvidia.com/gpu`, the device plugin's
resource name), tolerates the usual GPU-node taint, and gets a memory-backed /dev/shm, which
torch and NCCL use between processes and which a container otherwise caps at 64 MiB.
More GPUs for one run: raise the limit for that step with the executor's
`per_step_k8s_config` and set `nproc_per_node` to match (docs/cluster.md,
deploy/k8s/run_config_finetune_4gpu.yaml).
"""

from __future__ import annotations

K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_RESOURCE = "nvidia.com/gpu"
SHM_VOLUME = "dshm"


def gpu_step_tags(gpus: int = 1, shm_size: str = "8Gi") -> dict[str, dict]:
    """Op tags (`dagster-k8s/config`) for a step pod with `gpus` GPUs and a `shm_size` /dev/shm.

    The value is dagster-k8s's user-defined k8s config: container_config and pod_spec_config in
    the Kubernetes Python client's snake_case field names. Raises ValueError when gpus < 1.
    """
    if gpus < 1:
        raise ValueError(f"gpu_step_tags: gpus={gpus} must be >= 1; a CPU-only step needs no GPU tags.")
    return {
        K8S_CONFIG_TAG: {
            "container_config": {
                # Extended resources are requested by their limit; the request defaults to it.
                "resources": {"limits": {GPU_RESOURCE: str(gpus)}},
                "volume_mounts": [{"name": SHM_VOLUME, "mount_path": "/dev/shm"}],
            },
            "pod_spec_config": {
                "volumes": [{"name": SHM_VOLUME, "empty_dir": {"medium": "Memory", "size_limit": shm_size}}],
                "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
            },
        }
    }


GPU_STEP_TAGS = gpu_step_tags()
