#!/usr/bin/env bash
# One install path for README, demo, tests and CI.
# Order matters: torch is pinned first (a local CPU build; an unpinned torch pulls GBs of CUDA wheels),
# then DeepSpeed without compiled ops, then the project with its test and tracking extras.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
source scripts/env.sh

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
STAMP=.venv/.reclora-installed
HASH=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  exit 0
fi
"$VPY" -m pip install --upgrade pip wheel setuptools >/dev/null
"$VPY" -m pip install "torch==${TORCH_VERSION:-2.13.0}"
DS_BUILD_OPS=0 "$VPY" -m pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION:-0.18.9}"
"$VPY" -m pip install -e ".[test,tracking]" "torch==${TORCH_VERSION:-2.13.0}"
echo "$HASH" > "$STAMP"
