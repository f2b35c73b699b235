# Sourced by every entry point (Makefile, .ci/run, setup). Keeps caches inside the workspace, not $HOME,
# and sets the known-trap switches for this stack.
_RECLORA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PIP_CACHE_DIR="$_RECLORA_ROOT/.cache/pip"
export TORCH_EXTENSIONS_DIR="$_RECLORA_ROOT/.cache/torch_extensions"
export HF_HOME="$_RECLORA_ROOT/.cache/hf"
export TRITON_CACHE_DIR="$_RECLORA_ROOT/.cache/triton"
export MPLCONFIGDIR="$_RECLORA_ROOT/.cache/matplotlib"
# Ray keeps its session (logs, spilled objects) in the workspace, unless the path is too long for the
# Unix sockets it creates there (108 bytes, including Ray's own ~70-character session suffix).
if [ -z "${RAY_TMPDIR:-}" ]; then
  if [ ${#_RECLORA_ROOT} -le 24 ]; then export RAY_TMPDIR="$_RECLORA_ROOT/.cache/ray"; else export RAY_TMPDIR="/tmp/ray-reclora-$(id -u)"; fi
fi
mkdir -p "$RAY_TMPDIR" 2>/dev/null || true
# HF_HUB_OFFLINE is not set here: users load hub ids (model.name_or_path=org/name). Tests and CI set it
# (tests/conftest.py, .ci/run), so the suite never reaches for the hub.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_MODE=disabled
export RAY_USAGE_STATS_ENABLED=0
export DS_BUILD_OPS=0
export TOKENIZERS_PARALLELISM=false
