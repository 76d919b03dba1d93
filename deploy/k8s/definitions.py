"""The spur-assets Definitions for Kubernetes: the same assets, every step in its own pod.

Loaded by the user-code deployment (`dagster api grpc -f deploy/k8s/definitions.py`, see
values.yaml). It takes the root definitions.py unchanged and adds `dagster_k8s.k8s_job_executor`,
so each step becomes a Kubernetes Job; the training assets' op tags (spur_assets/pipeline/
cluster.py) ask for a GPU there. Asset code does not change.
"""

import dagster as dg
from dagster_k8s import k8s_job_executor

from spur_assets.cli import load_definitions
from spur_assets.pipeline.pipes import PIPES_SUBPROCESS_KEY, pipes_subprocess_client

local = load_definitions()
# finetuned_checkpoint starts torchrun through this resource; supply it if the root file does not.
extra_resources = {} if PIPES_SUBPROCESS_KEY in (local.resources or {}) else {PIPES_SUBPROCESS_KEY: pipes_subprocess_client()}

defs = dg.Definitions.merge(local, dg.Definitions(executor=k8s_job_executor, resources=extra_resources))
