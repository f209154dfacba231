"""One control request on a fresh socket: for peers that talk to a consumer endpoint now and then
(the router's pool probes, cancels and traces; tools and tests asking for pool status).

A fresh DEALER socket per request means no state survives between calls: a consumer that restarted
is simply asked again. The producer's long-lived link (`consumer_link.py`) does not use this.
"""
from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from transfer import wire
from transfer.control_auth import AuthError, Credential


class ControlRequestError(RuntimeError):
    """The consumer did not answer in time, or answered with an error or an unexpected message."""


async def ask(address: str, msg: wire.Message, timeout_s: float, cred: Credential | None = None,
              context: zmq.asyncio.Context | None = None) -> wire.ReplyMessage | None:
    """Send `msg` to the endpoint at host:port, signed as `cred` (the router, unsigned by default); its
    decoded reply, or None when none came in time (or the reply was not an authentic, valid message).
    `context`: the ZMQ context to connect from (default: the process's); its I/O thread makes the connection,
    in the network namespace that thread started in."""
    cred = cred or Credential("router", None)
    sock = (context or zmq.asyncio.Context.instance()).socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://{address}")
        frame, nonce = cred.seal(wire.encode(msg))
        await sock.send(frame)
        if not await sock.poll(int(timeout_s * 1000)):
            return None
        return wire.decode_reply(cred.open_reply(await sock.recv(), nonce))
    except (zmq.ZMQError, wire.WireError, AuthError):
        return None
    finally:
        sock.close(0)


def fetch_pool_status(address: str, secret: bytes | None = None, timeout_s: float = 5.0) -> wire.PoolStatus:
    """Blocking `stats` query to a consumer endpoint, as the router, for tools and tests (not for an
    event loop)."""
    reply = asyncio.run(ask(address, wire.Stats(rid=1), timeout_s, Credential("router", secret)))
    if reply is None:
        raise ControlRequestError(f"consumer {address} did not answer stats within {timeout_s}s")
    if not isinstance(reply, wire.PoolStatus):
        raise ControlRequestError(f"consumer {address}: {getattr(reply, 'code', reply.type)}: "
                                  f"{getattr(reply, 'message', '')}")
    return reply
