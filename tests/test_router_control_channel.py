"""The router's long-lived control channel to a decode connector: many questions in flight on one socket each get
their own answer, a connector restarted on the same address is asked again, and silence is None."""
from __future__ import annotations

import asyncio
import threading
import time

import zmq

from router.control_channel import ControlChannels
from transfer import wire
from transfer.control_auth import Authenticator, Credential


def connector(port: int, batch: int, stop: threading.Event) -> threading.Thread:
    """A fake connector that collects `batch` trace questions, then answers them in reverse order, each with its
    own transfer id as the state; it binds `port` and serves until `stop`."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    for _ in range(200):  # ZMQ closes the previous connector's socket in its I/O thread, a moment later
        try:
            sock.bind(f"tcp://127.0.0.1:{port}")
            break
        except zmq.ZMQError:
            time.sleep(0.05)
    else:
        raise AssertionError(f"port {port} still taken after 10 s")
    auth = Authenticator(None)

    def serve() -> None:
        held = []
        while not stop.is_set():
            if not sock.poll(50):
                continue
            ident, raw = sock.recv_multipart()
            opened = auth.open(raw)
            held.append((ident, opened, wire.decode_request(opened.body)))
            if len(held) == batch:
                for ident, opened, req in reversed(held):
                    reply = wire.TransferTrace(rid=req.rid, found=True, state=req.transfer_id)
                    sock.send_multipart([ident, auth.seal_reply(opened, wire.encode(reply))])
                held.clear()
        sock.close(0)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def free_port() -> int:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sock.close(0)
    return port


async def ask_many(channels: ControlChannels, address: str, ids: list[str], timeout_s: float = 10
                   ) -> list[str | None]:
    replies = await asyncio.gather(*(channels.ask(address, wire.TraceQuery(rid=1, transfer_id=t), timeout_s)
                                     for t in ids))
    return [r.state if isinstance(r, wire.TransferTrace) else None for r in replies]


async def test_questions_in_flight_together_each_get_their_own_answer():
    port, stop = free_port(), threading.Event()
    thread = connector(port, 8, stop)
    channels = ControlChannels(Credential("router", None))
    try:
        ids = [f"t{i}" for i in range(8)]
        assert await ask_many(channels, f"127.0.0.1:{port}", ids) == ids
    finally:
        channels.close()
        stop.set()
        thread.join()


async def test_a_connector_restarted_on_its_address_is_asked_again():
    port = free_port()
    address = f"127.0.0.1:{port}"
    channels = ControlChannels(Credential("router", None))
    try:
        for run in range(2):
            stop = threading.Event()
            thread = connector(port, 1, stop)
            # a question sent before the router's socket noticed the old connection close goes down with it
            # (None after its timeout); one of the next gets through on the new connection
            for _ in range(5):
                answers = await ask_many(channels, address, [f"run{run}"], timeout_s=3)
                if answers != [None]:
                    break
            assert answers == [f"run{run}"]
            stop.set()
            thread.join()
    finally:
        channels.close()


async def test_no_answer_is_none():
    channels = ControlChannels(Credential("router", None))
    try:
        assert await channels.ask(f"127.0.0.1:{free_port()}", wire.Stats(rid=1), 0.2) is None
    finally:
        channels.close()


async def test_once_closed_no_channel_is_opened_again():
    """A notice whose timer fires while the router stops (router/pool_probe.py) must not open a socket that
    nothing would close."""
    port, stop = free_port(), threading.Event()
    thread = connector(port, 1, stop)
    channels = ControlChannels(Credential("router", None))
    try:
        assert await ask_many(channels, f"127.0.0.1:{port}", ["t0"]) == ["t0"]
        channels.close()
        channels.tell(f"127.0.0.1:{port}", wire.PrefillAnswered(rid=1, transfer_id="t1"), 0.2)
        assert await channels.ask(f"127.0.0.1:{port}", wire.Stats(rid=1), 0.2) is None
        assert channels._channels == {}
    finally:
        channels.close()
        stop.set()
        thread.join()
