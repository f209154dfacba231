"""The launcher's children go down with it, whatever ends it (launch/supervisor.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from launch.polling import wait_for

LAUNCHER = textwrap.dedent("""
    import sys, time
    from launch.process_handle import ProcessHandle
    from launch.supervisor import Supervisor
    with Supervisor() as sup:
        sup.start(ProcessHandle("sleeper", ["sleep", "120"], "http://127.0.0.1:9/health", None, sys.argv[1]))
        print(sup.processes[0].proc.pid, flush=True)
        time.sleep(120)
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"  # a zombie is gone, only not yet reaped


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_launcher_ended_by_a_signal_stops_its_children(tmp_path, sig):
    """SIGHUP: the terminal or SSH session that ran `kvbridge up` closed."""
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = int(launcher.stdout.readline())
    try:
        assert alive(child)
        launcher.send_signal(sig)
        assert launcher.wait(30) == 128 + sig
        wait_for(lambda: not alive(child), 10, 0.05, "the launcher's child stopped")
    finally:
        launcher.kill()
        launcher.wait()
        if alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("error", [TimeoutError("not healthy after 600s: ['router']"),
                                   RuntimeError("decode-0 exited with code 1 while starting; see x.log")])
def test_kvbridge_up_ends_a_failed_start_with_what_happened_not_a_traceback(monkeypatch, error):
    import launch.deployment
    from launch.cli import main

    def fail(*_, **__):
        raise error
    monkeypatch.setattr(launch.deployment, "run_deployment", fail)
    with pytest.raises(SystemExit) as e:
        main(["up", "configs/deployment.yaml", "--log-dir", "/tmp/kvb-logs"])
    assert str(e.value) == f"kvbridge up configs/deployment.yaml: {error} (role logs in /tmp/kvb-logs)"


def test_a_launcher_started_under_nohup_survives_its_session_ending(tmp_path):
    """nohup sets SIGHUP to ignore: a logout must not stop the deployment it was asked to keep running."""
    launcher = subprocess.Popen(["nohup", sys.executable, "-c", LAUNCHER, str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = int(launcher.stdout.readline())
    try:
        launcher.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            launcher.wait(1)
        assert alive(child)
    finally:
        launcher.terminate()
        assert launcher.wait(30) == 128 + signal.SIGTERM
        wait_for(lambda: not alive(child), 10, 0.05, "the launcher's child stopped")
