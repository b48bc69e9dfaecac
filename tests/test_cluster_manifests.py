"""Every manifest in cluster/ parses and carries what the runbooks in cluster/README.md rely on.

Token auth on every Ray process and client with the token read from a mounted secret file; no secret
value in any file; nothing exposed outside the cluster; the 02:00 schedules without overlap; GPU
resources; the storage root a bucket reached through the standard AWS variables (no ReadWriteMany
volume, no shared file system, S3 credentials a mounted file, only a bounded local cache); the MLflow
server's PostgreSQL backend, basic-auth app and s3:// artifact store.

Each rule is a function returning a list of problems. The tests run it on the real files (no
problems) and on a deliberately broken copy (a problem found), so no rule passes vacuously.

    .venv/bin/python -m pytest tests/test_cluster_manifests.py
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import itertools
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
LAUNCHER = "ray-cluster.yaml"
K8S_FILES = sorted(str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*.yaml") if p.name != LAUNCHER)
IMAGE = "ghcr.io/your-org/taskatlas:0.1.0"
NIGHTLY = "0 2 * * *"
NAMESPACE = "taskatlas"
RAY_TOKEN_SECRET = "taskatlas-ray-token"
# The storage root every cluster run is given (`--set storage_root=...`): a bucket, no shared volume.
STORAGE_ROOT = "s3://your-bucket/taskatlas/study"
STORAGE_CONFIGMAP = "taskatlas-storage"  # AWS_DEFAULT_REGION and, optionally, AWS_ENDPOINT_URL
S3_SECRET = "taskatlas-s3-credentials"  # key `credentials`: an AWS credentials file
AWS_KEY_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob"}
# Fields of RayCronJob's spec in KubeRay 1.6 (ray.io/v1); the CRD rejects or prunes any other.
RAYCRONJOB_FIELDS = {"schedule", "jobTemplate", "suspend"}
SECRETISH = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|CREDENTIAL|ACCESS_KEY|API_KEY", re.IGNORECASE)
URI_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/@:'\"]+:[^\s/@'\"]+@", re.IGNORECASE)
OBJECT_STORE = re.compile(r"^(s3|gs|wasbs|abfss)://[^/]+/")


# ---------------------------------------------------------------- loading and walking


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a repeated key, which PyYAML would silently overwrite (kubectl refuses it)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        repeated = {k for k in keys if keys.count(k) > 1}
        if repeated:
            raise yaml.constructor.ConstructorError(None, None, f"repeated keys {repeated}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


@functools.cache
def _cached_docs(rel: str) -> tuple[dict, ...]:
    return tuple(d for d in yaml.load_all((CLUSTER / rel).read_text(), Loader=_StrictLoader) if d is not None)


def _docs(rel: str) -> list[dict]:
    return copy.deepcopy(list(_cached_docs(rel)))


def _text(rel: str) -> str:
    return (CLUSTER / rel).read_text()


def _unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file as {section: {key: [values in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None or "=" not in line:
            raise ValueError(f"not a unit file line: {raw!r}")
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _dicts(obj) -> Iterator[dict]:
    if isinstance(obj, dict):
        yield obj
        for value in obj.values():
            yield from _dicts(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _dicts(value)


def _pod_specs(doc: dict) -> list[dict]:
    return [d for d in _dicts(doc) if isinstance(d.get("containers"), list)]


def _containers(pod: dict) -> list[dict]:
    return pod["containers"] + pod.get("initContainers", [])


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _command(container: dict) -> str:
    return " ".join(container.get("command", []) + container.get("args", []))


def _ray_cluster_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    kind = doc.get("kind")
    if kind == "RayCluster":
        return [spec]
    if kind == "RayJob":
        return [spec.get("rayClusterSpec", {})]
    if kind == "RayCronJob":
        return [spec.get("jobTemplate", {}).get("rayClusterSpec", {})]
    return []


def _is_ray_client(container: dict) -> bool:
    return bool(re.search(r"\bray job\b|\btaskatlas (submit|nightly|run)\b", _command(container)))


def _secret_behind(pod: dict, container: dict, path: str) -> str | None:
    """Name of the Secret whose volume, mounted in `container`, holds the file `path`."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        if not path.startswith(root + "/"):
            continue
        secret = volumes.get(mount["name"], {}).get("secret")
        if secret is None:
            return None
        items = secret.get("items")
        if items is not None and path[len(root) + 1 :] not in {i["path"] for i in items}:
            return None
        return secret.get("secretName")
    return None


def _gib(quantity: str) -> float:
    """A Kubernetes quantity (`50Gi`, `64G`, `512Mi`) in GiB."""
    units = {
        "Ki": 2**-20,
        "Mi": 2**-10,
        "Gi": 1,
        "Ti": 2**10,
        "K": 1e3 / 2**30,
        "M": 1e6 / 2**30,
        "G": 1e9 / 2**30,
    }
    match = re.fullmatch(r"([0-9.]+)([KMGT]i?)?", str(quantity))
    if not match:
        raise ValueError(f"not a quantity: {quantity!r}")
    return float(match[1]) * units.get(match[2] or "", 2**-30)


def _storage_roots(text: str) -> list[str]:
    """The storage roots given with `--set storage_root=` (a `...` placeholder in prose left out)."""
    found = re.findall(r"--set storage_root=([^\s`'\"]+)", text)
    return [root for root in found if "..." not in root]


def _flag(args: list[str], name: str) -> str | None:
    """Value of `--name VALUE` or `--name=VALUE` in an argument list."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


# ---------------------------------------------------------------- rules: Kubernetes manifests


def _token_file_problems(pod: dict, container: dict, where: str) -> list[str]:
    env = _env(container)
    problems = []
    if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
        problems.append(f"{where}: RAY_AUTH_MODE is not 'token'")
    if "value" in env.get("RAY_AUTH_TOKEN", {}):
        problems.append(f"{where}: RAY_AUTH_TOKEN holds a literal token")
    path = str(env.get("RAY_AUTH_TOKEN_PATH", {}).get("value", ""))
    if _secret_behind(pod, container, path) != RAY_TOKEN_SECRET:
        problems.append(f"{where}: RAY_AUTH_TOKEN_PATH={path!r} is not a file of Secret {RAY_TOKEN_SECRET}")
    return problems


def ray_auth_problems(doc: dict) -> list[str]:
    """Ray containers and Ray clients run with token auth, the token read from the mounted Secret."""
    kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
    problems = []
    if kind in RAY_KINDS:
        for spec in _ray_cluster_specs(doc):
            auth = spec.get("authOptions", {})
            if auth.get("mode") != "token" or auth.get("secretName") != RAY_TOKEN_SECRET:
                problems.append(
                    f"{kind}/{name}: authOptions is not mode=token, secretName={RAY_TOKEN_SECRET}"
                )
        pods = _pod_specs(doc)
        if not pods:
            problems.append(f"{kind}/{name}: no pod templates")
        for pod in pods:
            for c in _containers(pod):
                problems += _token_file_problems(pod, c, f"{kind}/{name} container {c['name']}")
    else:
        for pod in _pod_specs(doc):
            for c in _containers(pod):
                if _is_ray_client(c):
                    problems += _token_file_problems(pod, c, f"{kind}/{name} container {c['name']}")
    return problems


def exposure_problems(doc: dict) -> list[str]:
    """Nothing reachable from outside the cluster: ClusterIP services only, no host ports."""
    kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
    problems = []
    if kind in {"Ingress", "Route", "Gateway", "HTTPRoute"}:
        problems.append(f"{kind}/{name}: exposes a service outside the cluster")
    if kind == "Service" and doc.get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
        problems.append(f"Service/{name}: type {doc['spec']['type']} is reachable from outside")
    for d in _dicts(doc):
        if d.get("serviceType", "ClusterIP") != "ClusterIP":
            problems.append(f"{kind}/{name}: serviceType {d['serviceType']}")
        if d.get("hostNetwork") or d.get("enableIngress") or "externalIPs" in d:
            problems.append(f"{kind}/{name}: hostNetwork, enableIngress or externalIPs")
        ports = d.get("ports")
        if isinstance(ports, list) and any(isinstance(p, dict) and "hostPort" in p for p in ports):
            problems.append(f"{kind}/{name}: hostPort")
    return problems


def secret_problems(doc: dict) -> list[str]:
    """No secret value in a manifest: Secrets are made by hand, consumed as files or secretKeyRef."""
    kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
    problems = []
    if kind == "Secret":
        problems.append(f"Secret/{name}: secrets are created by hand, never committed")
    for pod in _pod_specs(doc):
        for c in _containers(pod):
            where = f"{kind}/{name} container {c['name']}"
            if URI_WITH_PASSWORD.search(_command(c)) or "RAY_AUTH_TOKEN=" in _command(c):
                problems.append(f"{where}: a secret on the command line")
            if any("secretRef" in source for source in c.get("envFrom", [])):
                problems.append(f"{where}: envFrom a Secret")
            for var, e in _env(c).items():
                value = e.get("value")
                if value is not None and URI_WITH_PASSWORD.search(str(value)):
                    problems.append(f"{where}: {var} is a URI with a password in it")
                if not SECRETISH.search(var):
                    continue
                if var.endswith(("_PATH", "_FILE")):
                    if _secret_behind(pod, c, str(value)) is None:
                        problems.append(f"{where}: {var}={value!r} is not a file of a mounted Secret")
                elif value is not None or "secretKeyRef" not in e.get("valueFrom", {}):
                    problems.append(f"{where}: {var} is not taken from a Secret")
    for d in _dicts(doc):
        if SECRETISH.search(str(d.get("runtimeEnvYAML", ""))):
            problems.append(f"{kind}/{name}: a secret in runtimeEnvYAML")
    return problems


def namespace_problems(doc: dict) -> list[str]:
    if doc.get("metadata", {}).get("namespace") != NAMESPACE:
        return [f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: not in namespace {NAMESPACE}"]
    return []


def _gpus(container: dict, which: str) -> float:
    return float(container.get("resources", {}).get(which, {}).get("nvidia.com/gpu", 0))


def gpu_problems(doc: dict) -> list[str]:
    """A CPU head, GPU worker groups with nvidia.com/gpu limits and sane replica bounds."""
    kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
    problems = []
    ray_minor = importlib.metadata.version("ray").split(".")[:2]
    for spec in _ray_cluster_specs(doc):
        if str(spec.get("rayVersion", "")).split(".")[:2] != ray_minor:
            problems.append(f"{kind}/{name}: rayVersion {spec.get('rayVersion')} is not the pinned Ray")
        head = spec.get("headGroupSpec", {}).get("template", {}).get("spec", {"containers": []})
        if any(_gpus(c, "limits") or _gpus(c, "requests") for c in head["containers"]):
            problems.append(f"{kind}/{name}: the head requests GPUs")
        gpu_groups = []
        for group in spec.get("workerGroupSpecs", []):
            missing = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} - set(group)
            if missing:
                problems.append(f"{kind}/{name}: worker group lacks {sorted(missing)}")
                continue
            low, high = group["minReplicas"], group["maxReplicas"]
            if not 0 <= low <= group.get("replicas", low) <= high:
                problems.append(f"{kind}/{name}: group {group['groupName']} replicas out of bounds")
            containers = group["template"]["spec"]["containers"]
            for c in containers:
                if c.get("resources", {}).get("requests", {}).get("nvidia.com/gpu") not in (
                    None,
                    c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu"),
                ):
                    problems.append(f"{kind}/{name}: GPU requests differ from limits")
            if any(_gpus(c, "limits") >= 1 for c in containers):
                gpu_groups.append(group["groupName"])
        if not gpu_groups:
            problems.append(f"{kind}/{name}: no worker group limits nvidia.com/gpu")
        for pod in _pod_specs(spec):
            for c in pod["containers"]:
                if not {"cpu", "memory"} <= set(c.get("resources", {}).get("limits", {})):
                    problems.append(f"{kind}/{name} container {c['name']}: no cpu/memory limits")
    return problems


def rwx_problems(doc: dict) -> list[str]:
    """No ReadWriteMany volume anywhere (claim, claim template or volume) and no shared file system
    mounted into a pod: the storage root is a bucket."""
    kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
    problems = []
    for d in _dicts(doc):
        if "ReadWriteMany" in (d.get("accessModes") or []):
            problems.append(f"{kind}/{name}: a ReadWriteMany volume")
    for pod in _pod_specs(doc):
        for v in pod.get("volumes", []):
            if {"nfs", "efs", "cephfs", "glusterfs", "azureFile"} & set(v):
                problems.append(f"{kind}/{name}: volume {v['name']} is a shared file system")
    return problems


def _s3_env_problems(pod: dict, c: dict, where: str) -> list[str]:
    """The object store through the standard AWS variables: region and optional endpoint from the
    ConfigMap, credentials an AWS credentials file of the S3 Secret, never keys in variables."""
    env = _env(c)
    problems = []
    for var, optional in (("AWS_DEFAULT_REGION", False), ("AWS_ENDPOINT_URL", True)):
        ref = env.get(var, {}).get("valueFrom", {}).get("configMapKeyRef", {})
        if (
            ref.get("name") != STORAGE_CONFIGMAP
            or ref.get("key") != var
            or bool(ref.get("optional")) != optional
        ):
            problems.append(
                f"{where}: {var} is not key {var} of ConfigMap {STORAGE_CONFIGMAP}" + " (optional)" * optional
            )
    path = str(env.get("AWS_SHARED_CREDENTIALS_FILE", {}).get("value", ""))
    if _secret_behind(pod, c, path) != S3_SECRET:
        problems.append(f"{where}: AWS_SHARED_CREDENTIALS_FILE={path!r} is not a file of Secret {S3_SECRET}")
    if AWS_KEY_VARIABLES & set(env):
        problems.append(f"{where}: S3 keys in variables ({sorted(AWS_KEY_VARIABLES & set(env))}), not a file")
    return problems


def _entrypoint(doc: dict) -> str:
    spec = doc.get("spec", {})
    if doc.get("kind") == "RayJob":
        return str(spec.get("entrypoint", ""))
    if doc.get("kind") == "RayCronJob":
        return str(spec.get("jobTemplate", {}).get("entrypoint", ""))
    if doc.get("kind") == "CronJob":
        return " ".join(_command(c) for pod in _pod_specs(doc) for c in pod["containers"])
    return ""


def storage_problems(doc: dict) -> list[str]:
    """The storage root is the bucket: runs are given it, Ray pods mount no persistent or shared
    volume, reach S3 through the standard AWS variables, and keep only a bounded cache on an emptyDir."""
    kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
    problems = rwx_problems(doc)
    if kind in {"RayJob", "RayCronJob", "CronJob"} and _storage_roots(_entrypoint(doc)) != [STORAGE_ROOT]:
        problems.append(f"{kind}/{name}: the run is not given --set storage_root={STORAGE_ROOT}")
    for spec in _ray_cluster_specs(doc):
        for pod in _pod_specs(spec):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for v in volumes.values():
                if "persistentVolumeClaim" in v or "hostPath" in v:
                    problems.append(
                        f"{kind}/{name}: Ray pods mount volume {v['name']} (state belongs in the bucket)"
                    )
            for c in pod["containers"]:
                where = f"{kind}/{name} container {c['name']}"
                problems += _s3_env_problems(pod, c, where)
                env = _env(c)
                cache = str(env.get("TASKATLAS_CACHE", {}).get("value", ""))
                mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == cache), None)
                empty_dir = volumes.get(mount["name"], {}).get("emptyDir") if mount else None
                if empty_dir is None or "sizeLimit" not in empty_dir:
                    problems.append(f"{where}: TASKATLAS_CACHE={cache!r} is not an emptyDir with a sizeLimit")
                    continue
                bound = float(env.get("TASKATLAS_CACHE_GB", {}).get("value", "inf"))
                if not bound < _gib(empty_dir["sizeLimit"]):
                    problems.append(f"{where}: TASKATLAS_CACHE_GB={bound} does not fit the cache's sizeLimit")
    return problems


def raycronjob_problems(doc: dict) -> list[str]:
    """Nightly at 02:00; no field the CRD lacks; a run always ends before the next one starts."""
    spec = doc.get("spec", {})
    problems = []
    if spec.get("schedule") != NIGHTLY:
        problems.append(f"RayCronJob schedule {spec.get('schedule')!r} is not {NIGHTLY!r}")
    if set(spec) - RAYCRONJOB_FIELDS:
        problems.append(f"RayCronJob spec has fields its CRD lacks: {sorted(set(spec) - RAYCRONJOB_FIELDS)}")
    job = spec.get("jobTemplate", {})
    if not str(job.get("entrypoint", "")).startswith("taskatlas nightly -c "):
        problems.append("RayCronJob does not run `taskatlas nightly -c ...`")
    if not 0 < job.get("activeDeadlineSeconds", 0) < 24 * 3600:
        problems.append("RayCronJob runs are not bounded below a day, so two could overlap")
    return problems


def cronjob_problems(doc: dict) -> list[str]:
    """Nightly at 02:00, Forbid, deterministic submission id through the Jobs API."""
    spec = doc.get("spec", {})
    problems = []
    if spec.get("schedule") != NIGHTLY:
        problems.append(f"CronJob schedule {spec.get('schedule')!r} is not {NIGHTLY!r}")
    if spec.get("concurrencyPolicy") != "Forbid":
        problems.append(f"CronJob concurrencyPolicy {spec.get('concurrencyPolicy')!r} is not 'Forbid'")
    pods = _pod_specs(spec.get("jobTemplate", {}))
    script = " ".join(_command(c) for pod in pods for c in pod["containers"])
    if not re.search(r"--submission-id \"?\$id\"?", script) or not re.search(
        r"id=\"?taskatlas-nightly-\$\(date (-u )?\+%Y%m%d\)", script
    ):
        problems.append("CronJob does not submit with --submission-id taskatlas-nightly-$(date +%Y%m%d)")
    if "ray job submit" not in script or "taskatlas nightly -c " not in script:
        problems.append("CronJob does not `ray job submit` `taskatlas nightly -c ...`")
    return problems


def _mlflow_args_problems(args: list[str], hosts: set[str], where: str) -> list[str]:
    problems = []
    if _flag(args, "--app-name") != "basic-auth":
        problems.append(f"{where}: not the basic-auth app")
    if _flag(args, "--artifacts-destination") is None:
        problems.append(f"{where}: no --artifacts-destination")
    if "--backend-store-uri" in " ".join(args) or "--default-artifact-root" in " ".join(args):
        problems.append(f"{where}: the backend store is the entrypoint's MLFLOW_DB_URI, artifacts proxied")
    if _flag(args, "--host") not in hosts:
        problems.append(f"{where}: --host {_flag(args, '--host')} is not one of {sorted(hosts)}")
    workers = _flag(args, "--workers")
    if workers is None or not 1 <= int(workers) <= 8:
        problems.append(f"{where}: --workers {workers} (want 1..8)")
    return problems


def _mlflow_env_problems(env: dict[str, str], where: str) -> list[str]:
    problems = []
    uri = urllib.parse.urlsplit(env.get("MLFLOW_DB_URI", ""))
    if not uri.scheme.startswith("postgresql") or uri.password is not None:
        problems.append(f"{where}: MLFLOW_DB_URI is not a postgresql:// URI without a password")
    if env.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION") != "false":
        problems.append(f"{where}: MLFLOW_SERVER_ENABLE_JOB_EXECUTION is not 'false'")
    return problems


def mlflow_problems(docs: list[dict]) -> list[str]:
    """The MLflow Deployment: Postgres backend, basic-auth, artifact store, secrets as files, ClusterIP."""
    deployments = [
        d for d in docs if d.get("kind") == "Deployment" and d["metadata"]["name"] == "taskatlas-mlflow"
    ]
    if len(deployments) != 1:
        return ["no Deployment taskatlas-mlflow"]
    pod = deployments[0]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    where = "Deployment/taskatlas-mlflow"
    args = c.get("args", [])
    problems = _mlflow_args_problems(args, {"0.0.0.0", "127.0.0.1"}, where)
    if "cluster/mlflow/entrypoint.sh" not in " ".join(c.get("command", [])):
        problems.append(f"{where}: not started by cluster/mlflow/entrypoint.sh")
    if not (_flag(args, "--artifacts-destination") or "").startswith("s3://"):
        problems.append(f"{where}: the artifact destination is not an s3:// URI")
    env = {k: str(e.get("value", "")) for k, e in _env(c).items()}
    problems += _mlflow_env_problems(env, where)
    for var in ("MLFLOW_DB_PASSWORD_FILE", "MLFLOW_AUTH_CONFIG_PATH"):
        if _secret_behind(pod, c, env.get(var, "")) is None:
            problems.append(f"{where}: {var} is not a file of a mounted Secret")
    problems += _s3_env_problems(pod, c, where)  # for S3-compatible stores; IRSA needs none of it
    db_host = urllib.parse.urlsplit(env.get("MLFLOW_DB_URI", "")).hostname or ""
    postgres = [
        d
        for d in docs
        if d.get("kind") == "StatefulSet"
        and any(c["image"].startswith("postgres:") for p in _pod_specs(d) for c in p["containers"])
    ]
    if db_host.split(".")[0] not in {d["spec"].get("serviceName") for d in postgres}:
        problems.append(f"{where}: the database host {db_host!r} is not the Postgres StatefulSet's service")
    db_service = urllib.parse.urlsplit(env.get("MLFLOW_DB_URI", "")).hostname or ""
    services = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Service"}
    if db_service.split(".")[0] not in services:
        problems.append(f"{where}: no Service for the database host {db_service!r}")
    labels = deployments[0]["spec"]["template"]["metadata"]["labels"]
    port = int(_flag(args, "--port") or 0)
    fronted = [
        s
        for s in services.values()
        if s["spec"].get("selector", {}).items() <= labels.items()
        and port in {p["port"] for p in s["spec"]["ports"]}
    ]
    if not fronted:
        problems.append(f"{where}: no Service in front of port {port}")
    return problems


# ---------------------------------------------------------------- rules: launcher, units, crontab


def _docker_env(cfg: dict) -> dict[str, str]:
    env = {}
    for option in cfg.get("docker", {}).get("run_options", []):
        words = shlex.split(option)
        for flag, value in itertools.pairwise(words):
            if flag in ("--env", "-e"):
                key, _, val = value.partition("=")
                env[key] = val
    return env


def launcher_auth_problems(cfg: dict) -> list[str]:
    """Token auth in every container of the cluster, the token a file copied by file_mounts."""
    env = _docker_env(cfg)
    problems = []
    if env.get("RAY_AUTH_MODE") != "token":
        problems.append("launcher: docker run_options do not set RAY_AUTH_MODE=token")
    if "RAY_AUTH_TOKEN" in env:
        problems.append("launcher: a literal RAY_AUTH_TOKEN")
    path = env.get("RAY_AUTH_TOKEN_PATH", "")
    if not any(path.startswith(target.rstrip("/") + "/") for target in cfg.get("file_mounts", {})):
        problems.append(f"launcher: RAY_AUTH_TOKEN_PATH={path!r} is not inside a file_mounts target")
    return problems


def launcher_node_problems(cfg: dict) -> list[str]:
    """A CPU head, GPU worker types declaring their GPUs, worker bounds within max_workers."""
    types = cfg.get("available_node_types", {})
    head = types.get(cfg.get("head_node_type"), {}).get("resources", {})
    problems = []
    if not head.get("CPU") or head.get("GPU", 0) != 0:
        problems.append("launcher: the head type is not a CPU node (CPU > 0, GPU 0)")
    workers = {k: v for k, v in types.items() if k != cfg.get("head_node_type")}
    if not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers.values()):
        problems.append("launcher: no worker type declares GPU resources")
    for key, worker in workers.items():
        if (
            not 0
            <= worker.get("min_workers", 0)
            <= worker.get("max_workers", -1)
            <= cfg.get("max_workers", -1)
        ):
            problems.append(f"launcher: {key} min/max workers out of bounds")
    return problems


def launcher_network_problems(cfg: dict) -> list[str]:
    """Private nodes, pre-made security groups (Ray's default opens SSH to the world), local dashboard."""
    problems = []
    if cfg.get("provider", {}).get("use_internal_ips") is not True:
        problems.append("launcher: nodes get public IPs (use_internal_ips is not true)")
    for key, node in cfg.get("available_node_types", {}).items():
        config = node.get("node_config", {})
        if not config.get("SecurityGroupIds") or not config.get("SubnetIds"):
            problems.append(f"launcher: {key} has no SecurityGroupIds/SubnetIds of its own")
    if re.search(r"0\.0\.0\.0/0|::/0", json.dumps(cfg)):
        problems.append("launcher: a rule open to the whole internet")
    head_start = " ".join(cfg.get("head_start_ray_commands", []))
    if "--dashboard-host=127.0.0.1" not in head_start:
        problems.append("launcher: the dashboard does not listen on 127.0.0.1 only")
    return problems


def launcher_storage_problems(cfg: dict) -> list[str]:
    """No shared file system: the storage root is a bucket, reached with the instance profile and
    the standard AWS variables; the only local data is the bounded cache on each host."""
    env = _docker_env(cfg)
    problems = []
    text = json.dumps(cfg.get("initialization_commands", []) + cfg.get("setup_commands", []))
    if re.search(r"mount\b.*\b(nfs|efs)|\bnfs4?\b|efs\.", text):
        problems.append("launcher: a shared file system is mounted (the storage root is a bucket)")
    binds = [o.split()[1] for o in cfg.get("docker", {}).get("run_options", []) if o.startswith("-v ")]
    if any(b.split(":")[1] != env.get("TASKATLAS_CACHE") for b in binds):
        problems.append(f"launcher: bind mounts {binds} other than the cache TASKATLAS_CACHE")
    if not env.get("TASKATLAS_CACHE_GB") or not env.get("AWS_DEFAULT_REGION"):
        problems.append("launcher: no TASKATLAS_CACHE_GB or AWS_DEFAULT_REGION in docker run_options")
    if AWS_KEY_VARIABLES & set(env):
        problems.append("launcher: S3 keys in docker run_options")
    for key, node in cfg.get("available_node_types", {}).items():
        if key != cfg.get("head_node_type") and "IamInstanceProfile" not in node.get("node_config", {}):
            problems.append(f"launcher: {key} has no IamInstanceProfile to reach the bucket")
    return problems


def timer_problems(timer: dict[str, dict[str, list[str]]]) -> list[str]:
    t = timer.get("Timer", {})
    problems = []
    if t.get("OnCalendar") != ["*-*-* 02:00:00"]:
        problems.append(f"timer: OnCalendar {t.get('OnCalendar')} is not daily at 02:00")
    if t.get("Persistent", ["false"])[-1].lower() not in {"true", "yes", "1", "on"}:
        problems.append("timer: not Persistent")
    if t.get("Unit", [""])[-1] != "taskatlas-nightly.service":
        problems.append("timer: does not start taskatlas-nightly.service")
    if "timers.target" not in timer.get("Install", {}).get("WantedBy", []):
        problems.append("timer: not WantedBy timers.target")
    return problems


def _unit_env(service: dict[str, list[str]]) -> dict[str, str]:
    pairs = (word.split("=", 1) for line in service.get("Environment", []) for word in shlex.split(line))
    return dict(p for p in pairs if len(p) == 2)


def _credential_file_problems(service: dict[str, list[str]], var: str, where: str) -> list[str]:
    """`var` names a systemd credential (%d/NAME) loaded from an absolute path."""
    value = _unit_env(service).get(var, "")
    credentials = dict(c.split(":", 1) for c in service.get("LoadCredential", []))
    if not value.startswith("%d/") or not credentials.get(value[3:], "").startswith("/"):
        return [f"{where}: {var}={value!r} is not a LoadCredential file"]
    return []


def nightly_service_problems(unit: dict[str, dict[str, list[str]]]) -> list[str]:
    s = unit.get("Service", {})
    where = "taskatlas-nightly.service"
    problems = []
    if s.get("Type") != ["oneshot"]:
        problems.append(f"{where}: not Type=oneshot (overlapping runs)")
    if s.get("User", ["root"])[-1] in {"root", "0"}:
        problems.append(f"{where}: runs as root")
    if "taskatlas nightly -c " not in s.get("ExecStart", [""])[-1]:
        problems.append(f"{where}: does not run `taskatlas nightly -c ...`")
    env = _unit_env(s)
    if env.get("RAY_AUTH_MODE") != "token" or "RAY_AUTH_TOKEN" in env:
        problems.append(f"{where}: RAY_AUTH_MODE is not token, or a literal RAY_AUTH_TOKEN")
    return problems + _credential_file_problems(s, "RAY_AUTH_TOKEN_PATH", where)


def mlflow_service_problems(unit: dict[str, dict[str, list[str]]]) -> list[str]:
    s = unit.get("Service", {})
    where = "taskatlas-mlflow.service"
    args = shlex.split(s.get("ExecStart", [""])[-1])
    problems = _mlflow_args_problems(args, {"127.0.0.1"}, where)
    if not any(a.endswith("cluster/mlflow/entrypoint.sh") for a in args):
        problems.append(f"{where}: not started by cluster/mlflow/entrypoint.sh")
    if s.get("User", ["root"])[-1] in {"root", "0"}:
        problems.append(f"{where}: runs as root")
    problems += _mlflow_env_problems(_unit_env(s), where)
    for var in ("MLFLOW_DB_PASSWORD_FILE", "MLFLOW_AUTH_CONFIG_PATH"):
        problems += _credential_file_problems(s, var, where)
    return problems


def crontab_problems(text: str) -> list[str]:
    jobs = [
        line
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#") and not re.match(r"^\s*\w+\s*=", line)
    ]
    if len(jobs) != 1:
        return [f"crontab: {len(jobs)} job lines, want 1"]
    fields = jobs[0].split(None, 5)
    command = fields[5] if len(fields) == 6 else ""
    problems = []
    if " ".join(fields[:5]) != NIGHTLY:
        problems.append(f"crontab: schedule {' '.join(fields[:5])!r} is not {NIGHTLY!r}")
    if "flock -n " not in command:
        problems.append("crontab: no `flock -n` (runs could overlap)")
    if "taskatlas nightly -c " not in command:
        problems.append("crontab: does not run `taskatlas nightly -c ...`")
    if "RAY_AUTH_MODE=token" not in command or not re.search(r"RAY_AUTH_TOKEN_PATH=\S+", command):
        problems.append("crontab: no RAY_AUTH_MODE=token with RAY_AUTH_TOKEN_PATH")
    if "%" in command.replace("\\%", ""):
        problems.append("crontab: an unescaped % (cron turns it into a newline)")
    return problems


def text_problems(text: str, where: str) -> list[str]:
    """Plain-text checks for every file: no literal token, no URI with a password, auth never off."""
    problems = []
    if re.search(r"\bRAY_AUTH_TOKEN=", text):
        problems.append(f"{where}: a literal RAY_AUTH_TOKEN")
    if re.search(r"RAY_AUTH_MODE=\"?disabled", text):
        problems.append(f"{where}: token auth turned off")
    if URI_WITH_PASSWORD.search(text):
        problems.append(f"{where}: a URI with a password in it")
    return problems


# ---------------------------------------------------------------- the real files pass


def _all_files() -> list[str]:
    return sorted(str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*") if p.is_file())


def test_every_yaml_parses_and_names_itself():
    files = sorted(str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*.yaml"))
    assert LAUNCHER in files and len(files) >= 6, files
    for rel in K8S_FILES:
        docs = _docs(rel)
        assert docs, rel
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), rel
    kinds = {d["kind"] for rel in K8S_FILES for d in _docs(rel)}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "Deployment", "Service"} <= kinds


def test_readme_names_every_file():
    readme = _text("README.md")
    missing = [f for f in _all_files() if f != "README.md" and f not in readme and Path(f).name not in readme]
    assert missing == []


@pytest.mark.parametrize(
    "rule",
    [
        ray_auth_problems,
        exposure_problems,
        secret_problems,
        namespace_problems,
        gpu_problems,
        storage_problems,
    ],
)
@pytest.mark.parametrize("rel", K8S_FILES)
def test_kubernetes_manifests_pass(rel, rule):
    assert [p for doc in _docs(rel) for p in rule(doc)] == []


def test_every_cluster_run_uses_the_bucket_and_tracks_to_the_server():
    """The manifests and the runbooks give every run the same bucket as storage root and the MLflow
    server as tracking URI (configs/taskonomy-gpu.yaml keeps a local root for single machines)."""
    assert OBJECT_STORE.match(STORAGE_ROOT)
    roots = {rel: _storage_roots(_text(rel)) for rel in [*K8S_FILES, LAUNCHER, "README.md"]}
    assert {r for found in roots.values() for r in found} == {STORAGE_ROOT}
    runs = [d for rel in K8S_FILES for d in _docs(rel) if d["kind"] in {"RayJob", "RayCronJob", "CronJob"}]
    assert len(runs) == 3
    for doc in runs:
        assert "--set tracking_uri=http://taskatlas-mlflow.taskatlas.svc:5000" in _entrypoint(doc)
    assert roots[LAUNCHER] and roots["README.md"]
    assert not (CLUSTER / "kubernetes" / "storage.yaml").exists() or not any(
        d["kind"] == "PersistentVolumeClaim" for d in _docs("kubernetes/storage.yaml")
    )


def test_kuberay_cluster_specs_are_one_spec():
    specs = [s for rel in K8S_FILES for doc in _docs(rel) for s in _ray_cluster_specs(doc)]
    assert len(specs) == 3
    assert specs[0] == specs[1] == specs[2]


def test_nightly_schedules():
    docs = [d for rel in K8S_FILES for d in _docs(rel)]
    raycron = [d for d in docs if d["kind"] == "RayCronJob"]
    cron = [d for d in docs if d["kind"] == "CronJob"]
    assert len(raycron) == 1 and len(cron) == 1
    assert raycronjob_problems(raycron[0]) == []
    assert cronjob_problems(cron[0]) == []
    assert timer_problems(_unit(_text("systemd/taskatlas-nightly.timer"))) == []
    assert nightly_service_problems(_unit(_text("systemd/taskatlas-nightly.service"))) == []
    assert crontab_problems(_text("crontab.txt")) == []


def test_mlflow_server():
    assert mlflow_problems(_docs("kubernetes/mlflow.yaml")) == []
    assert mlflow_service_problems(_unit(_text("systemd/taskatlas-mlflow.service"))) == []


def test_launcher():
    cfg = _docs(LAUNCHER)[0]
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    jsonschema.validate(cfg, json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text()))
    assert launcher_auth_problems(cfg) + launcher_node_problems(cfg) + launcher_network_problems(cfg) == []
    assert launcher_storage_problems(cfg) == []


def test_no_secret_or_disabled_auth_in_any_file():
    problems = [p for f in _all_files() if f != "README.md" for p in text_problems(_text(f), f)]
    assert problems == []


def test_one_image_everywhere_and_torch_installed_first():
    images = {
        c["image"] for rel in K8S_FILES for d in _docs(rel) for pod in _pod_specs(d) for c in _containers(pod)
    }
    images.add(_docs(LAUNCHER)[0]["docker"]["image"])
    assert {i for i in images if not i.startswith("postgres:")} == {IMAGE}
    lines = _text("Dockerfile").splitlines()
    torch_at = next(i for i, line in enumerate(lines) if "pip install" in line and "${TORCH}" in line)
    project_at = next(
        i for i, line in enumerate(lines) if "pip install" in line and '"/app[cluster]"' in line
    )
    assert torch_at < project_at  # with the cluster extra: psycopg2 and boto3 for the MLflow server


# ---------------------------------------------------------------- each rule can fail


def _first(docs: list[dict], kind: str) -> dict:
    return next(d for d in docs if d.get("kind") == kind)


def _head(doc: dict) -> dict:
    return _ray_cluster_specs(doc)[0]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _gpu_worker(doc: dict) -> dict:
    return _ray_cluster_specs(doc)[0]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def _set_env(container: dict, name: str, value: str) -> None:
    container["env"] = [e for e in container.get("env", []) if e["name"] != name] + [
        {"name": name, "value": value}
    ]


def _mlflow_container(docs: list[dict]) -> dict:
    return _first(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def _submitter(doc: dict) -> dict:
    return doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0]


BROKEN_DOCS: list[tuple[str, str, Callable[[list[dict]], object], Callable[[list[dict]], list[str]]]] = [
    (
        "head auth disabled",
        "kuberay/raycluster.yaml",
        lambda docs: _set_env(_head(docs[0]), "RAY_AUTH_MODE", "disabled"),
        lambda docs: ray_auth_problems(docs[0]),
    ),
    (
        "worker token file not mounted",
        "kuberay/raycluster.yaml",
        lambda docs: _gpu_worker(docs[0])["volumeMounts"].pop(0),
        lambda docs: ray_auth_problems(docs[0]),
    ),
    (
        "a ReadWriteMany claim is back",
        "kubernetes/storage.yaml",
        lambda docs: docs.append(
            {
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": "taskatlas-runs", "namespace": NAMESPACE},
                "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Ti"}}},
            }
        ),
        lambda docs: storage_problems(docs[-1]),
    ),
    (
        "Ray workers mount a claim",
        "kuberay/rayjob.yaml",
        lambda docs: _ray_cluster_specs(docs[0])[0]["workerGroupSpecs"][0]["template"]["spec"][
            "volumes"
        ].append({"name": "runs", "persistentVolumeClaim": {"claimName": "taskatlas-runs"}}),
        lambda docs: storage_problems(docs[0]),
    ),
    (
        "Ray head on an NFS share",
        "kuberay/raycluster.yaml",
        lambda docs: _ray_cluster_specs(docs[0])[0]["headGroupSpec"]["template"]["spec"]["volumes"].append(
            {"name": "runs", "nfs": {"server": "fs.example", "path": "/"}}
        ),
        lambda docs: storage_problems(docs[0]),
    ),
    (
        "RayJob on a local storage root",
        "kuberay/rayjob.yaml",
        lambda docs: docs[0]["spec"].update(
            entrypoint=docs[0]["spec"]["entrypoint"].replace(STORAGE_ROOT, "/mnt/taskatlas")
        ),
        lambda docs: storage_problems(docs[0]),
    ),
    (
        "CronJob run without the bucket",
        "kubernetes/nightly-cronjob.yaml",
        lambda docs: _pod_specs(docs[0])[0]["containers"][0].update(
            args=[
                a.replace(f"--set storage_root={STORAGE_ROOT}", "")
                for a in _pod_specs(docs[0])[0]["containers"][0]["args"]
            ]
        ),
        lambda docs: storage_problems(docs[0]),
    ),
    (
        "S3 keys as variables",
        "kuberay/raycronjob.yaml",
        lambda docs: _gpu_worker(docs[0])["env"].append(
            {
                "name": "AWS_SECRET_ACCESS_KEY",
                "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": "secret"}},
            }
        ),
        lambda docs: storage_problems(docs[0]),
    ),
    (
        "S3 credentials file not from the Secret",
        "kuberay/raycluster.yaml",
        lambda docs: _set_env(_head(docs[0]), "AWS_SHARED_CREDENTIALS_FILE", "/home/ray/.aws/credentials"),
        lambda docs: storage_problems(docs[0]),
    ),
    (
        "no S3 endpoint setting",
        "kuberay/rayjob.yaml",
        lambda docs: _gpu_worker(docs[0]).update(
            env=[e for e in _gpu_worker(docs[0])["env"] if e["name"] != "AWS_ENDPOINT_URL"]
        ),
        lambda docs: storage_problems(docs[0]),
    ),
    (
        "unbounded local cache",
        "kuberay/raycluster.yaml",
        lambda docs: _set_env(_gpu_worker(docs[0]), "TASKATLAS_CACHE_GB", "500"),
        lambda docs: storage_problems(docs[0]),
    ),
    (
        "no authOptions",
        "kuberay/raycronjob.yaml",
        lambda docs: _ray_cluster_specs(docs[0])[0].pop("authOptions"),
        lambda docs: ray_auth_problems(docs[0]),
    ),
    (
        "submitter without token",
        "kuberay/rayjob.yaml",
        lambda docs: _submitter(docs[0]).pop("env"),
        lambda docs: ray_auth_problems(docs[0]),
    ),
    (
        "CronJob client without token",
        "kubernetes/nightly-cronjob.yaml",
        lambda docs: _pod_specs(docs[0])[0]["containers"][0].pop("volumeMounts"),
        lambda docs: ray_auth_problems(docs[0]),
    ),
    (
        "literal token in env",
        "kuberay/rayjob.yaml",
        lambda docs: _set_env(_head(docs[0]), "RAY_AUTH_TOKEN", "0123456789abcdef"),
        lambda docs: secret_problems(docs[0]),
    ),
    (
        "Secret with data committed",
        "kubernetes/mlflow.yaml",
        lambda docs: docs.append(
            {"kind": "Secret", "metadata": {"name": "x"}, "stringData": {"password": "x"}}
        ),
        lambda docs: secret_problems(docs[-1]),
    ),
    (
        "database password in the URI",
        "kubernetes/mlflow.yaml",
        lambda docs: _set_env(
            _mlflow_container(docs), "MLFLOW_DB_URI", "postgresql://mlflow:hunter2@db:5432/mlflow"
        ),
        lambda docs: secret_problems(_first(docs, "Deployment")),
    ),
    (
        "password file not from a Secret",
        "kubernetes/mlflow.yaml",
        lambda docs: _set_env(_mlflow_container(docs), "MLFLOW_DB_PASSWORD_FILE", "/tmp/password"),
        lambda docs: secret_problems(_first(docs, "Deployment")),
    ),
    (
        "MLflow behind a LoadBalancer",
        "kubernetes/mlflow.yaml",
        lambda docs: _first(docs, "Service")["spec"].update(type="LoadBalancer"),
        lambda docs: exposure_problems(_first(docs, "Service")),
    ),
    (
        "Ray head on a NodePort",
        "kuberay/raycluster.yaml",
        lambda docs: docs[0]["spec"]["headGroupSpec"].update(serviceType="NodePort"),
        lambda docs: exposure_problems(docs[0]),
    ),
    (
        "GPU worker without a GPU limit",
        "kuberay/rayjob.yaml",
        lambda docs: _gpu_worker(docs[0])["resources"]["limits"].pop("nvidia.com/gpu"),
        lambda docs: gpu_problems(docs[0]),
    ),
    (
        "replicas above maxReplicas",
        "kuberay/raycluster.yaml",
        lambda docs: _ray_cluster_specs(docs[0])[0]["workerGroupSpecs"][0].update(replicas=9),
        lambda docs: gpu_problems(docs[0]),
    ),
    (
        "RayCronJob at 03:00",
        "kuberay/raycronjob.yaml",
        lambda docs: docs[0]["spec"].update(schedule="0 3 * * *"),
        lambda docs: raycronjob_problems(docs[0]),
    ),
    (
        "RayCronJob with a field its CRD lacks",
        "kuberay/raycronjob.yaml",
        lambda docs: docs[0]["spec"].update(concurrencyPolicy="Forbid"),
        lambda docs: raycronjob_problems(docs[0]),
    ),
    (
        "RayCronJob runs unbounded",
        "kuberay/raycronjob.yaml",
        lambda docs: docs[0]["spec"]["jobTemplate"].pop("activeDeadlineSeconds"),
        lambda docs: raycronjob_problems(docs[0]),
    ),
    (
        "CronJob allows overlap",
        "kubernetes/nightly-cronjob.yaml",
        lambda docs: docs[0]["spec"].update(concurrencyPolicy="Allow"),
        lambda docs: cronjob_problems(docs[0]),
    ),
    (
        "CronJob submission id not deterministic",
        "kubernetes/nightly-cronjob.yaml",
        lambda docs: _pod_specs(docs[0])[0]["containers"][0].update(
            args=["ray job submit -- taskatlas nightly -c x"]
        ),
        lambda docs: cronjob_problems(docs[0]),
    ),
    (
        "MLflow without basic-auth",
        "kubernetes/mlflow.yaml",
        lambda docs: _mlflow_container(docs)["args"].remove("basic-auth"),
        lambda docs: mlflow_problems(docs),
    ),
    (
        "MLflow artifacts on the pod's disk",
        "kubernetes/mlflow.yaml",
        lambda docs: _mlflow_container(docs).update(
            args=[
                a if not a.startswith("s3://") else "/tmp/artifacts" for a in _mlflow_container(docs)["args"]
            ]
        ),
        lambda docs: mlflow_problems(docs),
    ),
    (
        "MLflow artifacts on GCS",
        "kubernetes/mlflow.yaml",
        lambda docs: _mlflow_container(docs).update(
            args=[a.replace("s3://", "gs://") for a in _mlflow_container(docs)["args"]]
        ),
        lambda docs: mlflow_problems(docs),
    ),
    (
        "MLflow with S3 keys in variables",
        "kubernetes/mlflow.yaml",
        lambda docs: _mlflow_container(docs)["env"].append(
            {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": "id"}}}
        ),
        lambda docs: mlflow_problems(docs),
    ),
    (
        "MLflow database host is not the Postgres StatefulSet",
        "kubernetes/mlflow.yaml",
        lambda docs: docs.remove(_first(docs, "StatefulSet")),
        lambda docs: mlflow_problems(docs),
    ),
    (
        "MLflow on SQLite",
        "kubernetes/mlflow.yaml",
        lambda docs: _set_env(_mlflow_container(docs), "MLFLOW_DB_URI", "sqlite:////tmp/mlflow.db"),
        lambda docs: mlflow_problems(docs),
    ),
    (
        "MLflow job execution on",
        "kubernetes/mlflow.yaml",
        lambda docs: _set_env(_mlflow_container(docs), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true"),
        lambda docs: mlflow_problems(docs),
    ),
    (
        "object in the default namespace",
        "kubernetes/mlflow.yaml",
        lambda docs: docs[0]["metadata"].pop("namespace"),
        lambda docs: namespace_problems(docs[0]),
    ),
    (
        "launcher without token auth",
        LAUNCHER,
        lambda docs: docs[0]["docker"].update(run_options=["--ulimit nofile=65536:65536"]),
        lambda docs: launcher_auth_problems(docs[0]),
    ),
    (
        "launcher token outside file_mounts",
        LAUNCHER,
        lambda docs: docs[0].update(file_mounts={}),
        lambda docs: launcher_auth_problems(docs[0]),
    ),
    (
        "launcher without GPU workers",
        LAUNCHER,
        lambda docs: [t["resources"].update(GPU=0) for t in docs[0]["available_node_types"].values()],
        lambda docs: launcher_node_problems(docs[0]),
    ),
    (
        "launcher worker max above cluster max",
        LAUNCHER,
        lambda docs: docs[0].update(max_workers=1),
        lambda docs: launcher_node_problems(docs[0]),
    ),
    (
        "launcher with Ray's default security group",
        LAUNCHER,
        lambda docs: docs[0]["available_node_types"]["worker.gpu1"]["node_config"].pop("SecurityGroupIds"),
        lambda docs: launcher_network_problems(docs[0]),
    ),
    (
        "launcher opens a port to the world",
        LAUNCHER,
        lambda docs: docs[0]["provider"].update(
            security_group={"IpPermissions": [{"IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
        ),
        lambda docs: launcher_network_problems(docs[0]),
    ),
    (
        "launcher mounts EFS again",
        LAUNCHER,
        lambda docs: docs[0]["initialization_commands"].append(
            "sudo mount -t nfs4 fs-1.efs.us-west-2.amazonaws.com:/ /mnt/taskatlas"
        ),
        lambda docs: launcher_storage_problems(docs[0]),
    ),
    (
        "launcher binds a host folder as storage root",
        LAUNCHER,
        lambda docs: docs[0]["docker"]["run_options"].append("-v /mnt/taskatlas:/mnt/taskatlas"),
        lambda docs: launcher_storage_problems(docs[0]),
    ),
    (
        "launcher worker without an instance profile",
        LAUNCHER,
        lambda docs: docs[0]["available_node_types"]["worker.gpu1"]["node_config"].pop("IamInstanceProfile"),
        lambda docs: launcher_storage_problems(docs[0]),
    ),
    (
        "launcher dashboard on every interface",
        LAUNCHER,
        lambda docs: docs[0].update(
            head_start_ray_commands=[
                c.replace("127.0.0.1", "0.0.0.0") for c in docs[0]["head_start_ray_commands"]
            ]
        ),
        lambda docs: launcher_network_problems(docs[0]),
    ),
]


@pytest.mark.parametrize(
    ("rel", "mutate", "rule"), [c[1:] for c in BROKEN_DOCS], ids=[c[0] for c in BROKEN_DOCS]
)
def test_rules_catch_broken_manifests(rel, mutate, rule):
    docs = _docs(rel)
    assert rule(docs) == [], "the real file already fails this rule"
    mutate(docs)
    assert rule(docs) != []


BROKEN_TEXT: list[tuple[str, str, str, str, Callable[[str], list[str]]]] = [
    (
        "timer daily at midnight",
        "systemd/taskatlas-nightly.timer",
        "02:00:00",
        "00:00:00",
        lambda t: timer_problems(_unit(t)),
    ),
    (
        "timer not persistent",
        "systemd/taskatlas-nightly.timer",
        "Persistent=true",
        "Persistent=false",
        lambda t: timer_problems(_unit(t)),
    ),
    (
        "service as root",
        "systemd/taskatlas-nightly.service",
        "User=taskatlas",
        "User=root",
        lambda t: nightly_service_problems(_unit(t)),
    ),
    (
        "service token not a credential",
        "systemd/taskatlas-nightly.service",
        "LoadCredential=ray_auth_token:",
        "LoadCredential=other:",
        lambda t: nightly_service_problems(_unit(t)),
    ),
    (
        "MLflow service on all interfaces",
        "systemd/taskatlas-mlflow.service",
        "--host 127.0.0.1",
        "--host 0.0.0.0",
        lambda t: mlflow_service_problems(_unit(t)),
    ),
    ("crontab without flock", "crontab.txt", "flock -n ", "", crontab_problems),
    ("crontab at 03:00", "crontab.txt", "0 2 * * *", "0 3 * * *", crontab_problems),
    (
        "literal token in a unit",
        "systemd/taskatlas-nightly.service",
        "RAY_AUTH_TOKEN_PATH=%d/ray_auth_token",
        "RAY_AUTH_TOKEN=abc",
        lambda t: text_problems(t, "unit"),
    ),
    (
        "password in a URI",
        "systemd/taskatlas-mlflow.service",
        "postgresql://mlflow@",
        "postgresql://mlflow:pw@",
        lambda t: text_problems(t, "unit"),
    ),
]


@pytest.mark.parametrize(
    ("rel", "old", "new", "rule"), [c[1:] for c in BROKEN_TEXT], ids=[c[0] for c in BROKEN_TEXT]
)
def test_rules_catch_broken_units_and_crontab(rel, old, new, rule):
    text = _text(rel)
    assert old in text and rule(text) == []
    assert rule(text.replace(old, new)) != []


# ---------------------------------------------------------------- the two scripts, run


def _fake_command(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    full_env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": sys.executable, **env}
    return subprocess.run(args, env=full_env, capture_output=True, text=True, timeout=30, cwd=tmp_path)


def test_mlflow_entrypoint_reads_the_password_file(tmp_path):
    _fake_command(
        tmp_path,
        "mlflow",
        'printf "%s\\n" "$MLFLOW_BACKEND_STORE_URI" "$*" "$MLFLOW_SERVER_ENABLE_JOB_EXECUTION"\n',
    )
    (tmp_path / "password").write_text("p@ss:w/rd%1\n")
    (tmp_path / "basic_auth.ini").write_text("[mlflow]\n")
    env = {
        "MLFLOW_DB_URI": "postgresql://mlflow@db.example:5432/mlflow",
        "MLFLOW_DB_PASSWORD_FILE": str(tmp_path / "password"),
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
    }
    script = str(CLUSTER / "mlflow" / "entrypoint.sh")
    done = _run(["/bin/sh", script, "--app-name", "basic-auth", "--port", "5000"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    uri, args, job_execution = done.stdout.splitlines()
    assert (
        uri == "postgresql+psycopg2://mlflow:p%40ss%3Aw%2Frd%251@db.example:5432/mlflow"
    )  # the image's driver
    assert urllib.parse.unquote(urllib.parse.urlsplit(uri).password) == "p@ss:w/rd%1"
    assert args == "server --app-name basic-auth --port 5000"  # the password is not on the command line
    assert job_execution == "false"

    with_password = {**env, "MLFLOW_DB_URI": "postgresql://mlflow:inline@db.example:5432/mlflow"}
    assert _run(["/bin/sh", script], with_password, tmp_path).returncode != 0
    (tmp_path / "password").write_text("\n")
    assert _run(["/bin/sh", script], env, tmp_path).returncode != 0


@pytest.mark.parametrize("earlier", ["none", "succeeded", "failed"])
def test_nightly_cronjob_submits_each_day_once(tmp_path, earlier):
    container = _pod_specs(_first(_docs("kubernetes/nightly-cronjob.yaml"), "CronJob"))[0]["containers"][0]
    log = tmp_path / "ray.log"
    _fake_command(
        tmp_path,
        "ray",
        f'echo "$*" >> {log}\n'
        'case "$*" in\n'
        '  "job status"*) [ "$EARLIER" = none ] && exit 1; echo "Job \'x\' $EARLIER" ;;\n'
        "esac\n",
    )
    env = {name: str(e["value"]) for name, e in _env(container).items()}
    done = _run([*container["command"], *container["args"]], {**env, "EARLIER": earlier}, tmp_path)
    calls = log.read_text().splitlines()
    submits = [c for c in calls if c.startswith("job submit")]
    if earlier == "none":
        day = datetime.now(timezone.utc).strftime("%Y%m%d")
        assert done.returncode == 0, done.stderr
        assert submits == [
            f"job submit --address {env['RAY_JOBS_ADDRESS']} --submission-id taskatlas-nightly-{day} "
            f"-- taskatlas nightly -c /app/configs/taskonomy-gpu.yaml --set storage_root={STORAGE_ROOT}"
            " --set tracking_uri=http://taskatlas-mlflow.taskatlas.svc:5000"
        ]
    else:  # a retried pod: the day's job exists, so follow it and report its outcome
        assert submits == []
        assert any(c.startswith("job logs") and "--follow" in c for c in calls)
        assert (done.returncode == 0) == (earlier == "succeeded")
