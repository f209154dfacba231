"""UCX's error handling is a setting of the connector (transfer/ucx_error_handling.py says what each mode gives up).

`peer` stays the default; `none` is asked for by name and reaches the NIXL agent; a value that is neither is
refused before any agent exists. In both modes, and with a producer in one and its consumer in the other, a write
of host memory lands byte for byte, and a write to a consumer process killed on this host fails as a peer gone
instead of hanging. Pushes through a killed and a frozen consumer in both modes: test_dead_consumer.py."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from pd.connector_config import ConnectorConfig, ConnectorConfigError
from transfer.nixl_agent import CMA_SEG_SIZE, NixlAgent, TransferError, zeroed_buffer

NBYTES = 1 << 20


def test_peer_is_the_default_and_none_is_accepted():
    assert ConnectorConfig.from_extra({}).ucx_error_handling == "peer"
    assert ConnectorConfig.from_extra({"ucx_error_handling": "none"}).ucx_error_handling == "none"


def test_another_value_is_refused_naming_the_field_and_the_choices():
    with pytest.raises(ConnectorConfigError, match="ucx_error_handling.*'peer' or 'none'"):
        ConnectorConfig.from_extra({"ucx_error_handling": "off"})
    with pytest.raises(ValueError, match=r"one of \('peer', 'none'\), got 'off'"):
        NixlAgent("refused", "off")


def _consumer(conn, mode: str) -> None:
    """Registers NBYTES, sends its address, drives UCX until asked for the bytes (sent back), forever."""
    agent = NixlAgent("ucx-mode-consumer", mode)
    buf = zeroed_buffer(NBYTES, "cpu")
    region = agent.register(buf)
    conn.send((agent.error_handling, agent.metadata(), region.addr, region.mem_type, region.dev_id))
    while True:
        if conn.poll(0.0005) and conn.recv() == "bytes":
            conn.send(buf.clone())
        agent.notifications()


def _write(agent: NixlAgent, local, remote: str, addr: int, mem: str, dev: int) -> str:
    """One NBYTES write with a notice: its final state, or 'raised' when NIXL refused to post it."""
    try:
        handle = agent.write(local, [(0, addr, NBYTES)], remote, mem, dev, b"notice")
    except TransferError as e:
        assert e.peer_gone, e
        return "raised"
    deadline, state = time.monotonic() + 10, "PROC"
    while state == "PROC" and time.monotonic() < deadline:
        state = agent.poll(handle)
    agent.release(handle)
    return state


@pytest.mark.parametrize("mode,consumer_mode", [("peer", "peer"), ("none", "none"),
                                                ("peer", "none"), ("none", "peer")])
def test_a_write_lands_and_one_to_a_killed_consumer_fails(mode, consumer_mode):
    """Mixed modes too: a deployment that changes the setting restarts its nodes one at a time."""
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_consumer, args=(child, consumer_mode), daemon=True)
    proc.start()
    try:
        got, meta, addr, mem, dev = conn.recv()
        agent = NixlAgent(f"ucx-mode-producer-{mode}-{consumer_mode}", mode)
        assert (agent.error_handling, got) == (mode, consumer_mode)
        src = zeroed_buffer(NBYTES, "cpu").random_(0, 256)
        local, remote = agent.register(src), agent.add_remote(meta)
        assert _write(agent, local, remote, addr, mem, dev) == "DONE"
        conn.send("bytes")
        assert torch.equal(conn.recv(), src)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert _write(agent, local, remote, addr, mem, dev) in ("raised", "ERR")  # not DONE, not hanging
    finally:
        proc.kill()
        proc.join(10)


def test_agents_ask_ucx_for_one_copy_segment_per_write_unless_the_operator_set_one(monkeypatch):
    monkeypatch.setenv("UCX_CMA_SEG_SIZE", "")  # recorded, so the test's end puts the environment back
    monkeypatch.delenv("UCX_CMA_SEG_SIZE")
    NixlAgent("seg-default")
    assert os.environ["UCX_CMA_SEG_SIZE"] == CMA_SEG_SIZE
    monkeypatch.setenv("UCX_CMA_SEG_SIZE", "1m")
    NixlAgent("seg-operator")
    assert os.environ["UCX_CMA_SEG_SIZE"] == "1m"
