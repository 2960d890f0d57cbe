#!/usr/bin/env bash
# The test command: sets everything up (scripts/setup.sh), builds the kernel
# core with CMake (the CUDA sources too when nvcc is present, GPU or not) and
# runs ctest, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
PY=.venv/bin/python
[ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"

echo "[test] CMake: kernel core (+ CUDA compile check) and ctest"
cmake_args=(-S . -B build-cmake -G Ninja
  -DTORCH_INCLUDE_DIRS="$($PY -c 'import torch.utils.cpp_extension as c; print(";".join(c.include_paths()))')")
if [ -x /usr/local/cuda/bin/nvcc ]; then cmake_args+=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc); fi
cmake "${cmake_args[@]}" >/dev/null
cmake --build build-cmake -j 2
ctest --test-dir build-cmake --output-on-failure

echo "[test] pytest"
$PY -m pytest -q "$@"
