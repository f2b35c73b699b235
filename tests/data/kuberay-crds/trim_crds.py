"""Trim the KubeRay CRDs to the schemas tests/test_k8s_manifests.py validates against.

    python tests/data/kuberay-crds/trim_crds.py OUT.json ray.io_rayjobs.yaml ray.io_rayclusters.yaml

Keeps each CRD's `v1` openAPIV3Schema without `status` and without `description` texts, and stores every
subschema that occurs more than once (the PodTemplateSpec and its parts, repeated per group) once under
`$defs`, referenced with `$ref`. Expanding the references gives back exactly the stripped upstream schema;
the script checks that before it writes.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import yaml

SUB_MAP = ("properties", "patternProperties")  # field name -> schema
SUB_ONE = ("items", "additionalProperties", "not")  # a schema (when a mapping)
SUB_LIST = ("anyOf", "allOf", "oneOf")  # a list of schemas


def load(path: str) -> tuple[str, dict]:
    with open(path) as f:
        crd = yaml.safe_load(f)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = version["schema"]["openAPIV3Schema"]
    schema["properties"].pop("status", None)
    return crd["spec"]["names"]["kind"], strip(schema)


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(x) for x in node]
    return node


def children(schema: dict):
    for k in SUB_MAP:
        yield from (schema.get(k) or {}).values()
    for k in SUB_ONE:
        if isinstance(schema.get(k), dict):
            yield schema[k]
    for k in SUB_LIST:
        yield from schema.get(k) or []


def canon(node) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def trim(kinds: dict[str, dict]) -> dict:
    counts: Counter = Counter()

    def count(s: dict) -> None:
        counts[canon(s)] += 1
        for c in children(s):
            count(c)

    for s in kinds.values():
        count(s)
    defs: dict[str, dict] = {}
    names: dict[str, str] = {}

    def dedupe(s: dict, top: bool = False) -> dict:
        c = canon(s)
        if not top and counts[c] >= 2 and len(c) > 800:
            if c not in names:
                names[c] = f"s{len(names)}"
                defs[names[c]] = rewrite(s)
            return {"$ref": f"#/$defs/{names[c]}"}
        return rewrite(s)

    def rewrite(s: dict) -> dict:
        r = dict(s)
        for k in SUB_MAP:
            if k in r:
                r[k] = {name: dedupe(v) for name, v in r[k].items()}
        for k in SUB_ONE:
            if isinstance(r.get(k), dict):
                r[k] = dedupe(r[k])
        for k in SUB_LIST:
            if k in r:
                r[k] = [dedupe(v) for v in r[k]]
        return r

    return {"kinds": {k: dedupe(v, top=True) for k, v in kinds.items()}, "$defs": defs}


def expand(node, defs: dict):
    """The trimmed schema with every $ref replaced by its definition (the upstream schema, stripped)."""
    if isinstance(node, dict):
        if set(node) == {"$ref"}:
            return expand(defs[node["$ref"].rsplit("/", 1)[1]], defs)
        return {k: expand(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [expand(x, defs) for x in node]
    return node


def main(out: str, paths: list[str]) -> None:
    kinds = dict(load(p) for p in paths)
    result = trim(kinds)
    for kind, schema in kinds.items():
        assert expand(result["kinds"][kind], result["$defs"]) == schema, kind
    with open(out, "w") as f:
        json.dump(result, f, sort_keys=True, indent=0, separators=(",", ":"))
        f.write("\n")
    print(f"{out}: {', '.join(kinds)}; {len(result['$defs'])} shared subschemas")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
