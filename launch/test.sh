#!/usr/bin/env bash
# README command 2: build the environment if missing and run the whole test suite.
source "$(dirname "$0")/env.sh"
bash csrc/build.sh   # CPU library; CUDA library too where nvcc is installed (warnings are errors)

# Debian packages the tests run for real: redis-server (the Redis tier, on 127.0.0.1, stopped on exit) and
# prometheus (promtool checks and unit-tests configs/alerts.yaml; a real Prometheus scrapes a router in a test).
apt_install() {  # $1: command that must exist, $2: Debian package holding it
  command -v "$1" >/dev/null 2>&1 && return
  echo "[kvbridge] installing $2"
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "$2" >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "$2" >/dev/null; }
}
apt_install redis-server redis-server
apt_install promtool prometheus
REDIS_PORT=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --maxmemory 256mb \
  --maxmemory-policy allkeys-lru >/dev/null &
REDIS_PID=$!
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
trap 'kill "$REDIS_PID" 2>/dev/null; wait "$REDIS_PID" 2>/dev/null' EXIT
export KVBRIDGE_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
python -m pytest -q "$@"
