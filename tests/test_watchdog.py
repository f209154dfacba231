"""The watchdog `kvbridge up` runs: a role killed with -9 is back and healthy, a hung one (SIGSTOP, /health
silent) is killed and restarted, and one whose command always fails is given up on after its tries while
the others keep running. Roles here are small HTTP servers with a /health, started as ProcessHandles like
vLLM's (same process groups, logs and restarts), so no model is loaded."""
from __future__ import annotations

import os
import signal
import socket
import sys
import urllib.request

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from launch.polling import wait_for
from launch.process_handle import ProcessHandle
from launch.watchdog import RestartPolicy, Watchdog

SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""
FAST = RestartPolicy(max_restarts=3, window_s=60, backoff_s=0.2, max_backoff_s=1, unhealthy_after=2, start_timeout_s=20)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _role(name: str, tmp_path, cmd: list[str] | None = None) -> ProcessHandle:
    port = _port()
    return ProcessHandle(name, cmd or [sys.executable, "-c", SERVER, str(port)], f"http://127.0.0.1:{port}/health",
                         None, tmp_path)


def _answers(p: ProcessHandle) -> bool:
    try:
        with urllib.request.urlopen(p.health_url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture
def roles(tmp_path):
    started = []

    def start(*procs: ProcessHandle) -> list[ProcessHandle]:
        for p in procs:
            p.start()
            started.append(p)
        return list(procs)
    yield start
    for p in started:
        if p.proc.poll() is None:
            os.killpg(p.proc.pid, signal.SIGCONT)
        p.stop(5)


def _run_until(dog: Watchdog, predicate, timeout: float = 30):
    def step():
        dog.tick()
        return predicate()
    return wait_for(step, timeout, interval=0.2)


def test_a_killed_role_is_restarted_and_serves_again(tmp_path, roles, caplog):
    victim, other = roles(_role("decode-0", tmp_path), _role("prefill-0", tmp_path))
    wait_for(lambda: _answers(victim) and _answers(other), 20)
    dog = Watchdog([victim, other], FAST)
    first_pid = victim.proc.pid
    victim.kill9()
    _run_until(dog, lambda: victim.proc.pid != first_pid and _answers(victim))
    assert dog.restarts == {"decode-0": 1, "prefill-0": 0} and _answers(other)
    assert "decode-0 exited with code -9; restarting in 0.2 s (restart 1" in caplog.text


def test_a_hung_role_is_killed_and_restarted(tmp_path, roles):
    (victim,) = roles(_role("decode-0", tmp_path))
    wait_for(lambda: _answers(victim), 20)
    dog = Watchdog([victim], FAST)
    first_pid = victim.proc.pid
    os.killpg(first_pid, signal.SIGSTOP)   # alive but silent
    _run_until(dog, lambda: victim.proc.pid != first_pid and _answers(victim))
    assert dog.restarts["decode-0"] == 1


def test_a_role_that_always_fails_is_given_up_and_the_rest_keeps_serving(tmp_path, roles, caplog):
    broken, other = roles(_role("prefill-1", tmp_path, [sys.executable, "-c", "import sys; sys.exit(3)"]),
                          _role("prefill-0", tmp_path))
    wait_for(lambda: _answers(other), 20)
    restarts_before = REGISTRY.get_sample_value("kvbridge_supervisor_restarts_total", {"role": "prefill-1"}) or 0
    dog = Watchdog([broken, other], FAST)
    _run_until(dog, lambda: dog.given_up == ["prefill-1"])
    assert dog.restarts == {"prefill-1": FAST.max_restarts, "prefill-0": 0}
    assert _answers(other)
    assert "prefill-1 exited with code 3; giving up on it after 3 restarts" in caplog.text
    # what `kvbridge up` serves on the deployment's metrics_port (and `kvbridge status` shows)
    exported = {(s.name, s.labels.get("role")): s.value for fam in text_string_to_metric_families(
        generate_latest(REGISTRY).decode()) for s in fam.samples}
    assert exported[("kvbridge_supervisor_restarts_total", "prefill-1")] - restarts_before == FAST.max_restarts
    assert exported[("kvbridge_supervisor_given_up", "prefill-1")] == 1
    assert exported[("kvbridge_supervisor_given_up", "prefill-0")] == 0


def test_a_router_answering_503_is_alive(tmp_path, roles, monkeypatch):
    """No decode up makes the router's /health 503; that must not get the router restarted."""
    from launch import watchdog as wd

    class Degraded(wd.RouterServer):
        def __init__(self, inner: ProcessHandle) -> None:   # a role that answers /health with 503
            self.__dict__.update(inner.__dict__)
    code = SERVER.replace('200 if self.path == "/health" else 404', '503')
    router = Degraded(_role("router", tmp_path, None))
    router.cmd = [sys.executable, "-c", code, router.health_url.split(":")[2].split("/")[0]]
    roles(router)
    wait_for(lambda: wd._answers_http(router.health_url), 20)
    dog = Watchdog([router], FAST)
    for _ in range(FAST.unhealthy_after + 2):
        dog.tick()
    assert router.proc.poll() is None and dog.restarts == {"router": 0} and not router.is_ready()
