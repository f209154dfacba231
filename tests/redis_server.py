"""A real redis-server (Debian package) for the Redis tier's tests, started and killed by PID."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import redis

from tests.servers import free_port


class RedisServer:
    def __init__(self, maxmemory: str = "64mb", port: int | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed: bash launch/test.sh installs the Debian package")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "no", "--maxmemory", maxmemory,
                                      "--maxmemory-policy", "allkeys-lru"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        end = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > end or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def redis_url_from_env() -> str | None:
    """launch/test.sh starts one server for the whole run and exports its URL."""
    return os.environ.get("KVBRIDGE_TEST_REDIS_URL")
