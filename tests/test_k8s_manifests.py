"""The KubeRay manifests as `kubectl apply -k` would send them: every kustomization under cluster/k8s rendered
(a small renderer for the kustomize features these use, checked against `kubectl kustomize` where kubectl is
installed), then each RayJob/RayCluster validated against the OpenAPI v3 schema of the KubeRay v1.7.0 CRDs
(tests/data/kuberay-crds: the upstream schemas, trimmed without changing them) with unknown fields refused as
kubectl's strict field validation does, and the pod templates checked for what multi-node GPU training needs."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

K8S = REPO / "cluster" / "k8s"
CRD_SCHEMAS = REPO / "tests" / "data" / "kuberay-crds" / "kuberay-v1.7.0-schemas.json"
KUBERAY_KINDS = ("RayJob", "RayCluster")
GPUS_PER_NODE = 8


# ------------------------------------------------------------------------------------------------ renderer
class Unsupported(Exception):
    """A kustomize feature this renderer does not implement: refused, never approximated."""


SUPPORTED = {"apiVersion", "kind", "resources", "patches", "patchesJson6902", "patchesStrategicMerge", "images"}
SUPPORTED |= {"namePrefix", "nameSuffix"}


def render(root: Path) -> list[dict]:
    """The resources `kubectl kustomize root` emits, for: resources (files and kustomization folders),
    patches (JSON 6902 lists, or strategic-merge mappings, which for custom resources kustomize applies as JSON
    merge patches: mappings merge, lists are replaced, null deletes), patchesJson6902, patchesStrategicMerge,
    images (every containers/initContainers image, custom resources included) and namePrefix/nameSuffix (which,
    as in kustomize, rename the objects but not references to them inside custom resources)."""
    k = yaml.safe_load((root / "kustomization.yaml").read_text())
    extra = set(k) - SUPPORTED
    if extra:
        raise Unsupported(f"{root}: kustomization fields {sorted(extra)}")
    docs: list[dict] = []
    for entry in k.get("resources", []):
        path = (root / entry).resolve()
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    patches = list(k.get("patches", []))
    patches += [{"path": p} for p in k.get("patchesStrategicMerge", [])]
    patches += [{"target": p["target"], "path": p["path"]} for p in k.get("patchesJson6902", [])]
    for p in patches:
        body = yaml.safe_load(p["patch"] if "patch" in p else (root / p["path"]).read_text())
        target = p.get("target") or {"kind": body["kind"], "name": body["metadata"]["name"]}
        for i, doc in enumerate(docs):
            if _selected(doc, target):
                docs[i] = _json6902(doc, body) if isinstance(body, list) else _merge_patch(doc, body)
    for img in k.get("images", []):
        for doc in docs:
            _set_images(doc, img)
    for doc in docs:
        doc["metadata"]["name"] = k.get("namePrefix", "") + doc["metadata"]["name"] + k.get("nameSuffix", "")
    return docs


def _selected(doc: dict, target: dict) -> bool:
    extra = set(target) - {"kind", "name", "group", "version"}
    if extra:
        raise Unsupported(f"patch target selectors {sorted(extra)}")
    group, _, version = doc["apiVersion"].rpartition("/")
    have = {"kind": doc["kind"], "name": doc["metadata"]["name"], "group": group, "version": version}
    return all(re.fullmatch(str(v), have[key]) for key, v in target.items())


def _merge_patch(doc, patch):
    if not isinstance(patch, dict) or not isinstance(doc, dict):
        return copy.deepcopy(patch)
    if any(key.startswith("$") for key in patch):
        raise Unsupported(f"strategic merge directives {[key for key in patch if key.startswith('$')]}")
    out = dict(doc)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json6902(doc: dict, ops: list[dict]) -> dict:
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if kind not in ("add", "replace", "remove", "test"):
            raise Unsupported(f"JSON 6902 op {kind!r}")
        if isinstance(node, list):
            i = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(i, op["value"])
            elif kind == "replace":
                node[i] = op["value"]
            elif kind == "remove":
                del node[i]
            elif node[i] != op["value"]:
                raise ValueError(f"test failed at {op['path']}")
        else:
            if kind in ("replace", "remove", "test") and last not in node:
                raise KeyError(f"{op['path']}: no such field to {kind}")  # kustomize fails here too
            if kind in ("add", "replace"):
                node[last] = op["value"]
            elif kind == "remove":
                del node[last]
            elif node[last] != op["value"]:
                raise ValueError(f"test failed at {op['path']}")
    return doc


def _set_images(node, img: dict) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    name = re.split(r"[@]|:(?=[^/]*$)", c.get("image", ""))[0]
                    if name == img["name"]:
                        tag = (
                            f"@{img['digest']}" if img.get("digest") else f":{img['newTag']}" if "newTag" in img else ""
                        )
                        old_tag = c["image"][len(name) :]
                        c["image"] = img.get("newName", name) + (tag or old_tag)
            else:
                _set_images(value, img)
    elif isinstance(node, list):
        for v in node:
            _set_images(v, img)


def kustomizations() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def _name(root: Path) -> str:
    return str(root.relative_to(K8S))


# ------------------------------------------------------------------------------------------------ schema
def _closed(node):
    """Unknown fields are errors (kubectl's strict field validation): every object schema that lists its
    properties and neither allows others nor preserves unknown fields gets additionalProperties: false."""
    if isinstance(node, dict):
        out = {k: _closed(v) for k, v in node.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_closed(v) for v in node]
    return node


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.protocols.Validator]:
    data = json.loads(CRD_SCHEMAS.read_text())
    defs = _closed(data["$defs"])
    out = {}
    for kind in KUBERAY_KINDS:
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$defs": defs,
            **_closed(data["kinds"][kind]),
        }
        jsonschema.Draft202012Validator.check_schema(schema)
        out[kind] = jsonschema.Draft202012Validator(schema)
    return out


def schema_errors(doc: dict, validators) -> list[str]:
    v = validators[doc["kind"]]
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in v.iter_errors(doc)]


def _pod_templates(doc: dict):
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    yield "head", spec["headGroupSpec"]["template"]
    for g in spec["workerGroupSpecs"]:
        yield g["groupName"], g["template"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def pod_problems(doc: dict, rendered: list[dict]) -> list[str]:
    """Core Kubernetes consistency the CRD schema cannot express, and what reclora's pods need."""
    errors = []
    configmaps = {d["metadata"]["name"] for d in rendered if d["kind"] == "ConfigMap"}
    for group, template in _pod_templates(doc):
        pod = template["spec"]
        where = f"{doc['kind']}/{doc['metadata']['name']} {group}"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        if len(volumes) != len(pod.get("volumes", [])):
            errors.append(f"{where}: duplicate volume names")
        gpu = any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in pod["containers"])
        for c in pod["containers"]:
            env = _env(c)
            if len(env) != len(c.get("env", [])):
                errors.append(f"{where}: duplicate env names in {c['name']}")
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            errors += [f"{where}: mount {m} of undeclared volume {n}" for m, n in mounts.items() if n not in volumes]
            for ref in c.get("envFrom", []):
                name = ref.get("configMapRef", {}).get("name")
                if name and name not in configmaps:
                    errors.append(f"{where}: envFrom ConfigMap {name} is not among the rendered objects")
            shm = volumes.get(mounts.get("/dev/shm", ""), {}).get("emptyDir", {})
            if shm.get("medium") != "Memory" or not shm.get("sizeLimit"):
                errors.append(f"{where}: /dev/shm must be a sized emptyDir with medium Memory")
            hf_home = env.get("HF_HOME", {}).get("value")
            if not hf_home or hf_home not in mounts:
                errors.append(f"{where}: HF_HOME must be set and a volume mounted there (the model cache)")
            token = env.get("HF_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
            if not token.get("name") or token.get("optional") is not True:
                errors.append(f"{where}: HF_TOKEN must come from a Secret with optional: true")
            stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            if not stop or "ray stop" not in " ".join(stop):
                errors.append(f"{where}: no preStop hook running `ray stop`")
            if "NCCL_ASYNC_ERROR_HANDLING" in env:
                errors.append(f"{where}: NCCL_ASYNC_ERROR_HANDLING is deprecated: TORCH_NCCL_ASYNC_ERROR_HANDLING")
            if gpu and env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", {}).get("value") != "1":
                errors.append(f"{where}: GPU pods need TORCH_NCCL_ASYNC_ERROR_HANDLING=1")
    return errors


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("root", kustomizations(), ids=_name)
def test_rendered_manifests_match_the_kuberay_crds_and_pod_needs(root, validators):
    rendered = render(root)
    assert rendered, root
    errors = []
    for doc in rendered:
        if doc["kind"] in KUBERAY_KINDS:
            assert doc["apiVersion"] == "ray.io/v1", doc["kind"]
            errors += [f"{doc['kind']}: {e}" for e in schema_errors(doc, validators)]
            errors += pod_problems(doc, rendered)
        if doc["kind"] == "RayJob":
            spec = doc["spec"]
            if not spec.get("activeDeadlineSeconds"):
                errors.append("RayJob: no activeDeadlineSeconds (a hung attempt would hold the GPUs forever)")
            if not (spec.get("shutdownAfterJobFinishes") and spec.get("backoffLimit", 0) >= 1):
                errors.append("RayJob: must shut its cluster down and retry")
    assert not errors, f"{_name(root)}:\n" + "\n".join(errors)


def test_training_overlays_do_not_create_the_dev_cluster():
    """Only cluster/k8s/dev-raycluster makes the long-lived RayCluster; every job overlay makes a RayJob."""
    for root in kustomizations():
        kinds = {(d["kind"], d["metadata"]["name"]) for d in render(root)}
        if _name(root) == "dev-raycluster":
            assert ("RayCluster", "reclora-dev") in kinds and not any(k == "RayJob" for k, _ in kinds)
        elif _name(root).startswith(("overlays", "base")):
            assert not any(k == "RayCluster" for k, _ in kinds), _name(root)
            assert any(k == "RayJob" for k, _ in kinds), _name(root)


def test_multinode_overlay_matches_the_preset_hpz():
    """h100x8: GPU replicas x GPUs per node = trainer.num_workers, and the preset's hpZ is the GPUs per node."""
    from configs.loader import load_config

    job = next(d for d in render(K8S / "overlays" / "h100x8") if d["kind"] == "RayJob")
    gpu = next(g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    per_node = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    argv = job["spec"]["entrypoint"].split()
    cfg = load_config(str(REPO / argv[argv.index("--config") + 1]), [a for a in argv if "=" in a])
    assert per_node == GPUS_PER_NODE == cfg.trainer.zero_hpz_partition_size
    assert gpu["replicas"] * per_node == cfg.trainer.num_workers > per_node and cfg.trainer.use_gpu


@pytest.mark.parametrize(
    "mistake, where",
    [
        (lambda j: j["spec"].update(entrypoin=j["spec"].pop("entrypoint")), "entrypoin"),
        (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replica=2), "replica"),
        (lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "num-cpus"),
        (lambda j: j["spec"].update(activeDeadlineSeconds="1d"), "activeDeadlineSeconds"),
        (lambda j: _pod(j)["containers"][0].update(imagePullPolicyy="Always"), "imagePullPolicyy"),
        (lambda j: _pod(j)["containers"][0]["env"].append({"name": "X", "value": 1}), "value"),
        (lambda j: _pod(j)["volumes"][0].update(emptyDir={"medium": "Memory", "size": "1Gi"}), "size"),
        (lambda j: _pod(j)["containers"][0]["lifecycle"]["preStop"].update(exec={"cmd": ["ray", "stop"]}), "cmd"),
    ],
)
def test_schema_validation_fails_on_real_mistakes(validators, mistake, where):
    job = next(d for d in render(K8S / "overlays" / "h100x8") if d["kind"] == "RayJob")
    assert not schema_errors(job, validators)
    mistake(job)
    errors = schema_errors(job, validators)
    assert errors and any(where in e for e in errors), errors


def _pod(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]


def test_pod_checks_catch_a_missing_mount_and_the_old_nccl_name():
    rendered = render(K8S / "overlays" / "h100x8")
    job = next(d for d in rendered if d["kind"] == "RayJob")
    assert not pod_problems(job, rendered)
    pod = _pod(job)
    pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "hf-cache"]
    pod["containers"][0]["env"].append({"name": "NCCL_ASYNC_ERROR_HANDLING", "value": "1"})
    problems = "\n".join(pod_problems(job, rendered))
    assert "undeclared volume hf-cache" in problems and "deprecated" in problems
    # namePrefix renames the ConfigMap but not the reference inside the RayJob (a custom resource).
    renamed = copy.deepcopy(rendered)
    next(d for d in renamed if d["kind"] == "ConfigMap")["metadata"]["name"] = "exp-reclora-storage"
    assert "envFrom ConfigMap reclora-storage is not among" in "\n".join(pod_problems(job, renamed))


PROBE = """apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../base
namePrefix: exp-
images:
  - {name: ghcr.io/reclora/reclora, newName: registry.example.com/reclora, newTag: "0.2.0"}
patches:
  - target: {kind: RayJob, name: reclora-train}
    patch: |-
      - {op: add, path: /spec/rayClusterSpec/workerGroupSpecs/0/template/spec/nodeSelector, value: {a: b}}
      - {op: remove, path: /spec/rayClusterSpec/workerGroupSpecs/1}
  - patch: |-
      apiVersion: ray.io/v1
      kind: RayJob
      metadata: {name: reclora-train}
      spec:
        backoffLimit: 1
        ttlSecondsAfterFinished: null
        rayClusterSpec: {headGroupSpec: {rayStartParams: {num-cpus: "1"}}}
"""


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl not installed: the renderer is checked where it is"
)
def test_renderer_matches_kubectl_kustomize(tmp_path):
    """Every kustomization here, plus a probe overlay using each supported feature, renders exactly as
    `kubectl kustomize` does (order aside)."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    (tree / "overlays" / "probe").mkdir()
    (tree / "overlays" / "probe" / "kustomization.yaml").write_text(PROBE)
    roots = sorted(p.parent for p in tree.rglob("kustomization.yaml"))
    assert len(roots) == len(kustomizations()) + 1

    def key(d):
        return (d["kind"], d["metadata"]["name"])

    for root in roots:
        out = subprocess.run(["kubectl", "kustomize", str(root)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        theirs = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=key)
        ours = sorted(render(root), key=key)
        assert ours == theirs, root.relative_to(tree)
    probe = {key(d): d for d in render(tree / "overlays" / "probe")}
    job = probe[("RayJob", "exp-reclora-train")]
    assert job["spec"]["backoffLimit"] == 1 and "ttlSecondsAfterFinished" not in job["spec"]
    assert {c["image"] for _, t in _pod_templates(job) for c in t["spec"]["containers"]} == {
        "registry.example.com/reclora:0.2.0"
    }


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(Unsupported, match="commonLabels"):
        render(tmp_path)


def test_image_is_the_official_ray_image_of_the_pinned_version():
    docker = (REPO / "cluster" / "Dockerfile").read_text()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_pin = next(re.match(r"ray\[[^\]]*\]==(\S+)", d).group(1) for d in deps if d.startswith("ray["))
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", docker, re.M))
    base = re.search(r"^FROM (\S+)", docker, re.M).group(1)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray_pin)}-py311-cu12\d", base), base
    py = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert py == ">=3.11"
