"""kvbridge's transfer engine alone across two namespace "hosts": a Producer in one, a ConsumerEndpoint in the
other, NIXL's UCX over TCP on their link (the transport a placed deployment gets, launch/placement.py).

Each process runs under `ip netns exec` (its interpreter started through a wrapper): UCX finds the host's
devices in /sys, which only `ip netns exec` shows as the namespace's own (entering the namespace from Python does
not). Per transfer the producer stages every chunk at once (a prompt whose KV is
all computed) and the time is ALLOC -> the consumer seeing every chunk land, the whole control path included;
bytes over that time is the transfer's rate, set beside raw TCP on the same link by bench/hosts_bench.py.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.exposed_bench import CHUNK_TOKENS, LAYOUT, TOKEN_HASH, _filler
from launch.netns import Network
from launch.placement import transport_env
from transfer.ucx_error_handling import UcxErrorHandling

CONSUMER_PORT = 5650
WAIT_S = 60.0  # a transfer not complete by then is reported, not waited for


def _consumer(conn, env: dict, address: str, secret: bytes, num_slots: int, ucx: UcxErrorHandling) -> None:
    os.environ.update(env)
    from transfer.consumer_endpoint import ConsumerEndpoint
    from transfer.consumer_settings import ConsumerSettings
    from transfer.device_fence import COMPLETED
    from transfer.receive_book import Arrival
    ep = ConsumerEndpoint(LAYOUT, ConsumerSettings(chunk_tokens=CHUNK_TOKENS, num_slots=num_slots, host=address,
                                                   port=CONSUMER_PORT, secret=secret, ucx_error_handling=ucx))
    conn.send(ep.address)
    while (msg := conn.recv()) is not None:
        key, num_tokens = msg
        ep.book.expect(key, num_tokens, TOKEN_HASH)
        conn.send("expecting")
        deadline = time.monotonic() + WAIT_S
        while ep.book.status(key)[0] not in (Arrival.COMPLETE, Arrival.ENDED) and time.monotonic() < deadline:
            ep.wait_arrivals(0.02)
        if ep.book.status(key)[0] != Arrival.COMPLETE:
            conn.send((0.0, f"transfer {key} not complete after {WAIT_S:.0f}s: {ep.book.status(key)}"))
            continue
        done = time.time()
        lease, why = ep.book.claim(key)
        ep.book.finish(key, lease, {"transfer_id": key, "state": "SCATTERED"}, COMPLETED)
        conn.send((done, why))
    ep.close()


def _producer(conn, env: dict, secret: bytes, ucx: UcxErrorHandling) -> None:
    os.environ.update(env)
    from transfer.identity import TransferSpec
    from transfer.producer import Producer, ProducerSettings
    producer = Producer(LAYOUT, CHUNK_TOKENS, ProducerSettings(producer_id=f"hosts-bench-{uuid.uuid4().hex[:8]}",
                                                               secret=secret, staging_chunks=64,
                                                               ucx_error_handling=ucx))
    nbytes = LAYOUT.chunk_bytes(CHUNK_TOKENS)
    while (msg := conn.recv()) is not None:
        key, chunks, target = msg
        start = time.time()
        handle = producer.begin(TransferSpec(key, chunks * CHUNK_TOKENS, TOKEN_HASH, 0), target)
        ok = all(producer.stage(handle, c, _filler(c, nbytes)) for c in range(chunks))
        conn.send((start, ok))
    producer.close()


def _interpreter_in(namespace: str, folder: Path) -> str:
    """A wrapper that starts this interpreter inside `namespace`, for multiprocessing's spawn."""
    wrapper = folder / f"python-in-{namespace}"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {namespace} {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def transfer_gbps(net: Network, src: str, dst: str, nbytes: int, repeats: int, ucx: UcxErrorHandling = "peer") -> float:
    """Median GB/s of `repeats` transfers of about `nbytes` from host `src` to host `dst` (one warm-up first), both
    agents with UCX error handling `ucx`."""
    chunks = max(1, nbytes // LAYOUT.chunk_bytes(CHUNK_TOKENS))
    secret, ctx = secrets.token_bytes(32), mp.get_context("spawn")
    (cp, cc), (pp, pc) = ctx.Pipe(), ctx.Pipe()
    consumer = ctx.Process(target=_consumer, daemon=True,
                           args=(cc, transport_env(net, dst), net.hosts[dst].address, secret, chunks, ucx))
    producer = ctx.Process(target=_producer, args=(pc, transport_env(net, src), secret, ucx), daemon=True)
    folder = Path(tempfile.mkdtemp(prefix="hosts-transfer-"))
    try:
        for proc, host in ((consumer, dst), (producer, src)):
            ctx.set_executable(_interpreter_in(net.hosts[host].namespace, folder))
            proc.start()
    finally:
        ctx.set_executable(sys.executable)
    rates: list[float] = []
    try:
        if not cp.poll(WAIT_S):
            raise RuntimeError(f"the consumer in {dst} did not start within {WAIT_S:.0f}s")
        target = cp.recv()
        for i in range(repeats + 1):  # the first opens the link (handshake, UCX connection): not counted
            key = f"h-{uuid.uuid4().hex}"
            cp.send((key, chunks * CHUNK_TOKENS))
            cp.recv()
            pp.send((key, chunks, target))
            start, ok = pp.recv()
            done, why = cp.recv()
            assert ok and not why, why or "a chunk was not staged"
            if i:
                rates.append(chunks * LAYOUT.chunk_bytes(CHUNK_TOKENS) / (done - start) / 1e9)
    finally:
        for conn in (cp, pp):
            with contextlib.suppress(OSError):  # a child that died already: its error is the one to see
                conn.send(None)
        for proc in (consumer, producer):
            proc.join(10)
        shutil.rmtree(folder)  # only now: a shell reads its script after the exec that start() waited for
    return statistics.median(rates)
