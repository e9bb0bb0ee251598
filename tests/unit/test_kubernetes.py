"""The Kubernetes manifests in deploy/kubernetes/: valid against Kubernetes' schemas (offline,
with kubernetes-validate), locked down, a grace period above the worker's shutdown, the worker
id from the pod's name, the DSN from a Secret, probes on the worker's health server, only
options the worker has, and a KEDA ScaledObject whose query is the project's own."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml

from noetl_pgworker.cli import main
from noetl_pgworker.queries import parse_queries, read_sql_file
from noetl_pgworker.worker import STOP_STEP_TIMEOUT, STOP_WRITE_MIN

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "deploy" / "kubernetes"
#: The oldest Kubernetes release still commonly run, and the newest the validator knows.
K8S_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]


def documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in documents() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def worker() -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = one("Deployment", "noetl-pgworker")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def builtin_resources() -> list[dict[str, Any]]:
    return [d for d in documents() if not d["apiVersion"].startswith(("keda.sh/", "kustomize."))]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    resources = builtin_resources()
    assert {d["kind"] for d in resources} == {"Deployment", "Job"}
    for doc in resources:
        # strict: a misspelt or misplaced field is an error, not ignored
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_broken_manifest_is_caught() -> None:
    deployment, _ = worker()
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFs"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_pods_are_locked_down_and_run_as_the_images_user() -> None:
    user = re.search(r"^USER (\d+):(\d+)$", (REPO / "Containerfile").read_text(), re.MULTILINE)
    assert user is not None
    for doc in builtin_resources():
        pod = doc["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == int(user[1])
        assert pod["securityContext"]["runAsGroup"] == int(user[2])
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"] == {"drop": ["ALL"]}
            assert "memory" in container["resources"]["limits"]


def test_the_worker_gets_its_id_dsn_and_writable_directories() -> None:
    deployment, container = worker()
    env = env_of(container)
    assert env["NOETL_PGWORKER_WORKER_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["NOETL_PGWORKER_DSN"] == {"secretKeyRef": {"name": "noetl-pgworker", "key": "dsn"}}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    # Everything the worker writes on a read-only root: $TMPDIR and the spool directory.
    for path in (env["TMPDIR"], env["NOETL_PGWORKER_SPOOL_DIR"]):
        assert "emptyDir" in volumes[mounts[path]], path


def test_the_grace_period_outlives_the_workers_graceful_stop() -> None:
    deployment, container = worker()
    shutdown = float(env_of(container)["NOETL_PGWORKER_SHUTDOWN_TIMEOUT"])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # commands, then their outcomes' write (at least STOP_WRITE_MIN), then the other steps
    assert grace >= shutdown + STOP_WRITE_MIN + 2 * STOP_STEP_TIMEOUT + 10, (grace, shutdown)


def test_the_probes_reach_the_workers_health_server() -> None:
    _, container = worker()
    env = env_of(container)
    (port,) = container["ports"]
    assert port["containerPort"] == int(env["NOETL_PGWORKER_METRICS_PORT"])
    assert env["NOETL_PGWORKER_METRICS_HOST"] == "0.0.0.0"  # the kubelet probes the pod's IP
    probes = {k: container[k]["httpGet"] for k in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"] == {"path": "/healthz", "port": port["name"]}
    assert probes["readinessProbe"] == {"path": "/readyz", "port": port["name"]}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_every_variable_and_argument_is_one_the_worker_has() -> None:
    start = main.commands["start"]
    envvars: set[str] = set()
    for param in start.params:
        names = param.envvar if isinstance(param.envvar, list) else [param.envvar]
        envvars.update(n for n in names if n)
    for doc in builtin_resources():
        for container in doc["spec"]["template"]["spec"]["containers"]:
            for name in env_of(container):
                assert name in envvars or not name.startswith("NOETL_PGWORKER_"), name
            # the arguments parse as the worker's CLI would (no database is touched)
            command = main.commands[container["args"][0]]
            assert isinstance(command, click.Command)
            command.make_context(container["args"][0], list(container["args"][1:]))


def test_the_scaled_object_scales_the_worker_on_the_projects_query() -> None:
    deployment, container = worker()
    scaled = one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    meta = trigger["metadata"]
    # KEDA reads the connection string from the target container's environment.
    assert meta["connectionFromEnv"] in env_of(container)
    kinds = env_of(container)["NOETL_PGWORKER_TOOL_KINDS"]
    template = parse_queries(read_sql_file("queries.sql"))["scaler_commands"]
    assert meta["query"] == template.replace("%(tool_kinds)s", f"'{kinds}'")
    concurrency = int(env_of(container)["NOETL_PGWORKER_CONCURRENCY"])
    assert float(meta["targetQueryValue"]) == concurrency  # a pod per `concurrency` commands
    assert scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]


def test_the_kustomization_lists_the_workers_resources() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        assert (MANIFESTS / name).is_file(), name
    assert set(kustomization["resources"]) == {"deployment.yaml", "scaledobject.yaml"}
