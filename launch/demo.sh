#!/usr/bin/env bash
# README command 1: build the environment if missing, generate the tiny model, start prefill + decode +
# router, send real requests (one streamed), print answers and transfer figures, shut everything down.
exec "$(dirname "$0")/local.sh" configs/deployment.yaml --demo
