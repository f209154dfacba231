"""Asks a decode connector how full its slot pool is (the `stats` control message, no NIXL involved),
so the router can prefer decode instances with room."""
from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from pd import wire

_ctx = zmq.asyncio.Context.instance()


async def pool_free_fraction(address: str, timeout_s: float, secret: str | None = None) -> float | None:
    """Free slots / total, or None when the connector does not answer in time."""
    sock = _ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://{address}")
        await sock.send(wire.encode(wire.Stats(rid=1, secret=secret)))
        if not await sock.poll(int(timeout_s * 1000)):
            return None
        reply = wire.decode_reply(await sock.recv())
        return reply.free / reply.total if isinstance(reply, wire.PoolStatus) and reply.total else None
    except (zmq.ZMQError, wire.WireError, asyncio.CancelledError):
        return None
    finally:
        sock.close(0)
