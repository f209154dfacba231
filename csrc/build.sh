#!/usr/bin/env bash
# Builds csrc into pd/native/ (or the directory given as $1): the CPU library always; the CUDA library
# when nvcc is present, with warnings as errors (so the CUDA source cannot rot even on machines without a
# GPU), SASS for sm_80/90/100/120 and PTX for compute_80, which newer GPUs compile when they load it.
# The package's install (setup.py) runs this; so does launch/env.sh when the libraries are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-pd/native}"
mkdir -p "$OUT"
g++ -O3 -std=c++17 -Wall -Wextra -Werror -fPIC -shared -fopenmp csrc/kv_copy_cpu.cpp -o "$OUT/libkvb_copy_cpu.so"
if command -v nvcc >/dev/null 2>&1; then
  ARCHS=()
  for sm in 80 90 100 120; do
    # an older nvcc lacks the newest targets: build what it knows, PTX covers the rest
    if nvcc --list-gpu-arch 2>/dev/null | grep -qx "compute_$sm"; then
      ARCHS+=(-gencode "arch=compute_$sm,code=sm_$sm")
    fi
  done
  nvcc -O3 -std=c++17 --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror,-fPIC -shared \
    "${ARCHS[@]}" -gencode arch=compute_80,code=compute_80 \
    csrc/kv_copy.cu -o "$OUT/libkvb_copy_cuda.so"
fi
