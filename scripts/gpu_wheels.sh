#!/usr/bin/env bash
# Wheels for bench/gpu_check.py on a GPU machine that has torch, transformers and peft but no DeepSpeed and no
# package registry. Run here (where the registry is reachable), carry the folder to the device run, and let
# `python bench/gpu_check.py --install-wheels .gpu_wheels` install what is missing there (pip --no-index).
#
#   bash scripts/gpu_wheels.sh [DIR]        # default DIR: .gpu_wheels (git-ignored)
#
# Into DIR:
#   deepspeed==<the version in .venv>, built with DS_BUILD_OPS=0 (a pure-Python wheel: ops JIT-compile on use;
#     the trainer uses none), reused from the pip wheel cache when setup_env.sh already built it;
#   DeepSpeed's small requirements a torch + transformers + peft machine may lack: hjson, py-cpuinfo, einops
#     (pure Python), ninja, msgpack (binary), and the project's typed-config stack: pydantic, annotated-types,
#     typing-inspection, typing-extensions (pure Python), pydantic-core (binary). Binary wheels are fetched for
#     every CPython in GPU_PYVERS (default "3.10 3.11 3.12 3.13"), manylinux x86_64; versions are the .venv's.
#   pyarrow only when GPU_PYARROW_PY names the device's CPython (e.g. 3.11): about 55 MB, and a device run carries
#     at most 64 MiB. Not needed by gpu_check.py: recdata imports pyarrow at import time, and where it is missing
#     gpu_check.py stands stubs in for it (it reads no Parquet) and says so in its environment record.
# numpy, psutil, packaging, tqdm, pyyaml, safetensors, fsspec come with torch / transformers / peft.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
DIR=${1:-.gpu_wheels}
PY=.venv/bin/python
mkdir -p "$DIR"
ver() { $PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
GPU_PYVERS=${GPU_PYVERS:-"3.10 3.11 3.12 3.13"}
GPU_PYARROW_PY=${GPU_PYARROW_PY:-none}

# DeepSpeed: the wheel setup_env.sh built (pip's wheel cache), else build it the same way.
DS=$(ver deepspeed)
cached=$(find "${PIP_CACHE_DIR:-.cache/pip}/wheels" -name "deepspeed-$DS-py3-none-any.whl" 2>/dev/null | head -1 || true)
if [ -n "$cached" ]; then
  cp "$cached" "$DIR/"
else
  DS_BUILD_OPS=0 $PY -m pip wheel --no-deps --no-build-isolation "deepspeed==$DS" -w "$DIR"
fi

# Pure-Python requirements, pinned to the .venv's versions.
pure=()
for p in hjson py-cpuinfo einops pydantic annotated-types typing-inspection typing-extensions; do
  pure+=("$p==$(ver "$p")")
done
$PY -m pip download --no-deps --only-binary=:all: -d "$DIR" "${pure[@]}"

# Binary requirements for each CPython the GPU machine may run.
binary=("ninja==$(ver ninja)" "msgpack==$(ver msgpack)" "pydantic-core==$(ver pydantic-core)")
platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
for v in $GPU_PYVERS; do
  $PY -m pip download --no-deps --only-binary=:all: "${platforms[@]}" --python-version "$v" \
    --implementation cp -d "$DIR" "${binary[@]}" || echo "warning: no wheels for CPython $v" >&2
done
if [ "$GPU_PYARROW_PY" != "none" ]; then
  $PY -m pip download --no-deps --only-binary=:all: "${platforms[@]}" --python-version "$GPU_PYARROW_PY" \
    --implementation cp -d "$DIR" "pyarrow==$(ver pyarrow)"
fi

ls -la "$DIR"
size=$(du -sm "$DIR" | cut -f1)
echo "$DIR: ${size} MiB"
if [ "$size" -ge 64 ]; then
  echo "warning: over the 64 MiB a device run carries; set GPU_PYVERS / GPU_PYARROW_PY to the device's Python" >&2
fi
