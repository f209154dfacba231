#!/usr/bin/env bash
# README command 2: build the environment if missing and run the whole test suite.
source "$(dirname "$0")/env.sh"
bash csrc/build.sh   # CPU library; CUDA library too where nvcc is installed (warnings are errors)
exec python -m pytest -q "$@"
