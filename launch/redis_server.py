"""A real redis-server (Debian package) on a free port, for the store's Redis tier in tests and benches;
started and killed by PID (it has no children and nothing to say on /health)."""
from __future__ import annotations

import shutil
import subprocess

import redis

from launch.local_servers import free_port
from launch.polling import wait_for


class RedisServer:
    def __init__(self, maxmemory: str = "64mb", port: int | None = None) -> None:
        """Started and answering PING on return; `port` restarts a stopped server at its old address."""
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
        try:
            wait_for(lambda: self._answers(client), 10, interval=0.05, what=f"redis-server on port {self.port}")
        except (TimeoutError, RuntimeError):
            self.stop()
            raise
        finally:
            client.close()

    def _answers(self, client: redis.Redis) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {self.proc.returncode} on port {self.port}")
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
