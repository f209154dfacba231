#!/usr/bin/env bash
# README command 2: build the environment if missing and run the whole test suite.
source "$(dirname "$0")/env.sh"
exec python -m pytest -q "$@"
