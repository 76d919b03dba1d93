"""The spur-assets Definitions for Kubernetes: the same assets, every step in its own pod.

Loaded by the user-code deployment (`dagster api grpc -f deploy/k8s/definitions.py`, see
values.yaml). It builds the package's definitions (spur_assets/definitions.py) with
`dagster_k8s.k8s_job_executor` instead of the local in-process one, so each step becomes a
Kubernetes Job; the training assets' op tags (spur_assets/pipeline/cluster.py) ask for a GPU
there. Asset code does not change.
"""

from dagster_k8s import k8s_job_executor

from spur_assets.definitions import build_definitions

defs = build_definitions(executor=k8s_job_executor)
