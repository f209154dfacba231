#!/usr/bin/env bash
# Start a prefill node (vLLM kv_producer) from a role config. Usage: launch/prefill.sh [configs/prefill.yaml]
source "$(dirname "$0")/env.sh"
exec python -m launch.cli serve "${1:-configs/prefill.yaml}"
