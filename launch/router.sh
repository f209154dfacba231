#!/usr/bin/env bash
# Start the OpenAI-compatible router. Usage: launch/router.sh [configs/router.yaml]
source "$(dirname "$0")/env.sh"
exec python -m router.app --config "${1:-configs/router.yaml}"
