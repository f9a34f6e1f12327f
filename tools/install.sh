#!/usr/bin/env bash
# One installer for both README commands: creates .venv and installs prism_mcore with everything it needs.
#
#   bash tools/install.sh            # CPU (Python 3.11, local torch 2.13.0 wheel) or GPU (Python 3.12 + CUDA torch)
#   PRISM_EXTRAS=gpu,sglang,dali bash tools/install.sh
#
# Megatron goes in last: pip skips its dependency-conflict report for a --no-deps install, so the CUDA-only
# requirements of megatron-bridge that we deliberately leave out are not reported as errors.
# Idempotent: a stamp in .venv records the hash of everything that decides the install; a second run with the same
# inputs only checks the stamp and exits. Megatron-Core and Megatron-Bridge go in with --no-deps (their declared
# dependencies are CUDA-only builds); on Python 3.11 also with --ignore-requires-python, for those two only.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${PRISM_VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${PRISM_EXTRAS:-dev}
TORCH_SPEC=${PRISM_TORCH:-torch==2.13.0}

py_minor=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
# A base interpreter that already has a CUDA build of torch (NGC images) keeps it, with its Transformer Engine and
# flash-attn: the venv then sees the system site-packages. (A CUDA build, not a visible GPU: docker build has none.)
system_torch=$("$PYTHON" -c 'import torch; print(int(torch.version.cuda is not None))' 2>/dev/null || echo 0)

stamp_inputs=$(cat setup.py requirements/megatron.txt tools/install.sh; echo "$py_minor $EXTRAS $TORCH_SPEC $system_torch")
stamp=$(printf '%s' "$stamp_inputs" | sha256sum | cut -c1-16)
if [ -f "$VENV/.prism_stamp" ] && [ "$(cat "$VENV/.prism_stamp")" = "$stamp" ]; then
  echo "[install] $VENV is up to date"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV with $PYTHON ($py_minor)"
  if [ "$system_torch" = 1 ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if [ "$system_torch" = 1 ]; then
  echo "[install] using the base interpreter's CUDA torch"
else
  echo "[install] $TORCH_SPEC"
  "${pip[@]}" "$TORCH_SPEC"
fi

echo "[install] prism_mcore[$EXTRAS] and its requirements"
"${pip[@]}" -e ".[${EXTRAS}]"

echo "[install] megatron-core / megatron-bridge (--no-deps)"
mg_flags=(--no-deps)
[ "$py_minor" = "3.11" ] && mg_flags+=(--ignore-requires-python)
"${pip[@]}" "${mg_flags[@]}" -r requirements/megatron.txt

echo "$stamp" > "$VENV/.prism_stamp"
# Versions from the installed distributions (megatron.core.__version__ appends the git hash of the working directory).
echo "[install] done: $("$VENV/bin/python" -W ignore -c 'from importlib.metadata import version as v; print(" | ".join(f"{p} {v(p)}" for p in ("torch", "megatron-core", "megatron-bridge", "transformers")))')"
