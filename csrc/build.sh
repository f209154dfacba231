#!/usr/bin/env bash
# Builds csrc into build/: the CPU library always; the CUDA library when nvcc is present
# (warnings are errors, so the CUDA source cannot rot even on machines without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
g++ -O3 -std=c++17 -Wall -Wextra -Werror -fPIC -shared -fopenmp csrc/kv_copy_cpu.cpp -o build/libkvb_copy_cpu.so
if command -v nvcc >/dev/null 2>&1; then
  nvcc -O3 -std=c++17 --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror,-fPIC -shared \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    csrc/kv_copy.cu -o build/libkvb_copy_cuda.so
fi
