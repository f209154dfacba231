#!/usr/bin/env bash
# A whole local deployment (1 prefill, 1 decode, router) on the generated tiny model; Ctrl-C stops it all.
# Usage: launch/local.sh [configs/deployment.yaml] [--demo]
source "$(dirname "$0")/env.sh"
python -m launch.cli make-tiny-model .kvbridge/models/tiny >/dev/null
exec python -m launch.cli up "${1:-configs/deployment.yaml}" "${@:2}"
