#!/usr/bin/env bash
# Start a decode node (vLLM kv_consumer) from a role config. Usage: launch/decode.sh [configs/decode.yaml]
source "$(dirname "$0")/env.sh"
exec python -m launch.cli serve "${1:-configs/decode.yaml}"
