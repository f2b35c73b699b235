"""Kubernetes manifests and the container image recipe, checked without a cluster or a Docker engine."""

from __future__ import annotations

import re
import shlex
import tomllib

import yaml

from configs.loader import load_config
from tests.conftest import REPO

K8S = REPO / "cluster" / "k8s"

SCHEMA = {"RayJob": None, "RayCluster": None}  # schemas: tests/test_k8s_manifests.py (the KubeRay CRDs)


def _docs():
    out = []
    for f in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                out.append((f, doc))
    return out


def _pod_specs(doc):
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    yield spec["headGroupSpec"]["template"]["spec"]
    for g in spec["workerGroupSpecs"]:
        yield g["template"]["spec"]


def _pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for d in deps:
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^;\s]+)", d)
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


def test_gpu_groups_shm_tolerations_and_autoscaling():
    job = next(d for _, d in _docs() if d["kind"] == "RayJob")
    gpu = next(g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    c = gpu["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" in c["resources"]["limits"]
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
    assert any(v["mountPath"] == "/dev/shm" for v in c["volumeMounts"])
    shm = next(v for v in gpu["template"]["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["backoffLimit"] >= 1


def test_credentials_only_from_secrets():
    for f, doc in _docs():
        text = yaml.safe_dump(doc)
        assert not re.search(r"AKIA[0-9A-Z]{12,}", text), f
        if doc.get("kind") in SCHEMA:
            for pod in _pod_specs(doc):
                for c in pod["containers"]:
                    for e in c.get("env", []):
                        if "SECRET" in e["name"] or "ACCESS_KEY" in e["name"]:
                            assert "secretKeyRef" in e.get("valueFrom", {}), (f, e["name"])
                            assert "value" not in e


def test_entrypoint_configs_exist_and_validate():

    entrypoints = []
    for f, doc in _docs():
        if doc.get("kind") == "RayJob":
            entrypoints.append(doc["spec"]["entrypoint"])
        for p in doc.get("patches", []) if doc.get("kind") == "Kustomization" else []:
            for op in yaml.safe_load(p["patch"]):
                if op["path"].endswith("/entrypoint"):
                    entrypoints.append(op["value"])
    assert entrypoints
    for ep in entrypoints:
        argv = shlex.split(ep)
        assert argv[:2] == ["python", "trainer/main.py"], ep
        cfg_path = argv[argv.index("--config") + 1]
        assert (REPO / cfg_path).exists(), cfg_path
        overrides = [a for a in argv[argv.index("--config") + 2 :] if "=" in a]
        load_config(str(REPO / cfg_path), overrides)


def test_image_versions_match_pyproject():
    pins = _pins()
    docker = (REPO / "cluster" / "Dockerfile").read_text()
    for pkg in ("torch", "deepspeed", "transformers", "peft", "ray"):
        found = re.findall(rf"\b{pkg}(?:\[[^\]]*\])?==([0-9][^\s\"']*)", docker)
        assert found, f"Dockerfile does not pin {pkg}"
        assert set(found) == {pins[pkg]}, (pkg, found, pins[pkg])
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for _, doc in _docs():
        if doc.get("kind") in SCHEMA:
            spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
            assert spec["rayVersion"] == pins["ray"]
            for pod in _pod_specs(doc):
                for c in pod["containers"]:
                    assert c["image"].endswith(f":{version}"), c["image"]
    # Every COPY source exists in the repository.
    for line in docker.splitlines():
        if line.startswith("COPY "):
            for src in [a for a in line.split()[1:-1] if not a.startswith("--")]:  # --chown=...
                assert (REPO / src).exists(), src
    # Every package the project installs is copied (`pip install .` of a tree without one fails).
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    copied = {line.split()[-2] for line in docker.splitlines() if line.startswith("COPY ")}
    for pattern in packages["include"]:
        assert pattern.rstrip("*") in copied, f"Dockerfile does not COPY {pattern.rstrip('*')}"
