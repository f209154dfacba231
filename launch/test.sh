#!/usr/bin/env bash
# README command 2: build the environment if missing and run the whole test suite.
source "$(dirname "$0")/env.sh"
bash csrc/build.sh   # CPU library; CUDA library too where nvcc is installed (warnings are errors)

# The Redis tier is tested against a real redis-server (Debian package) on 127.0.0.1, stopped on exit.
if ! command -v redis-server >/dev/null 2>&1; then
  echo "[kvbridge] installing redis-server"
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q redis-server >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q redis-server >/dev/null; }
fi
REDIS_PORT=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --maxmemory 256mb \
  --maxmemory-policy allkeys-lru >/dev/null &
REDIS_PID=$!
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
trap 'kill "$REDIS_PID" 2>/dev/null; wait "$REDIS_PID" 2>/dev/null' EXIT
export KVBRIDGE_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
python -m pytest -q "$@"
