#!/usr/bin/env bash
# Wheels of the Python packages a bare GPU image with PyTorch lacks (the lent H200 machine: Python
# 3.12, torch 2.11 + triton, no registry access), into .whl/ (git-ignored), to carry there:
#   bash launch/gpu_wheels.sh          # here, where pip reaches a package index
# then on the GPU machine, from the repo root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py --out gpu_check.json
# All are pure Python (a few MB). Transformer Engine is not among them: its core wheel is 276 MB
# (transformer_engine_cu13 2.20) and its PyTorch extension is built from source against the
# machine's torch and CUDA; install it there with `pip install transformer-engine[pytorch]`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 webdataset==1.0.2 braceexpand==0.1.7 \
  fla-core==0.6.0 flash-linear-attention==0.6.0
# hydra's parser runtime is published as a source archive only: build its (pure Python) wheel here.
"$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -1 .whl
