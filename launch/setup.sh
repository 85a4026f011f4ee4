#!/usr/bin/env bash
# Creates .venv and installs the project with its test extras.
# Without a GPU it installs the CPU build of torch (an unpinned torch would pull a multi-GB CUDA
# build); with one, the default CUDA build. Override with TORCH_SPEC / TORCH_INDEX_URL, e.g.
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash launch/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  TORCH_SPEC=${TORCH_SPEC:-"torch>=2.11,<2.15"}
else
  TORCH_SPEC=${TORCH_SPEC:-"torch==2.13.0"}
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "installing $TORCH_SPEC"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
  else
    "${PIP[@]}" "$TORCH_SPEC"
  fi
fi
"${PIP[@]}" -e ".[dev]"
.venv/bin/python -c "import torch, hydra, tokenizers; print('torch', torch.__version__, '| cuda', torch.cuda.is_available())"
