# Sourced by every entry point (Makefile, .ci/run, setup). Keeps caches inside the workspace, not $HOME,
# and sets the known-trap switches for this stack.
_RECLORA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PIP_CACHE_DIR="$_RECLORA_ROOT/.cache/pip"
export TORCH_EXTENSIONS_DIR="$_RECLORA_ROOT/.cache/torch_extensions"
export HF_HOME="$_RECLORA_ROOT/.cache/hf"
export TRITON_CACHE_DIR="$_RECLORA_ROOT/.cache/triton"
export MPLCONFIGDIR="$_RECLORA_ROOT/.cache/matplotlib"
export RAY_TMPDIR="${RAY_TMPDIR:-/tmp/ray_reclora}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_MODE=disabled
export RAY_USAGE_STATS_ENABLED=0
export DS_BUILD_OPS=0
export TOKENIZERS_PARALLELISM=false
