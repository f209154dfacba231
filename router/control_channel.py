"""The router's control requests to decode connectors, on one long-lived DEALER socket per connector.

The router asks a connector something on most requests (the transfer's receive time, to learn the link
rate; a cancel when an answer is not whole) and on every health check. A fresh socket per question
(transfer/control_request.py) costs a TCP connect, a ZMTP handshake and a teardown each time, which under
load was a large share of the router's CPU. One socket per address is kept instead: ZMQ reconnects it by
itself to a connector restarted on the same address, and each reply is matched to its request by the
nonce the frame carries (transfer/control_auth.py), so many questions can be in flight on it at once.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import zmq
import zmq.asyncio

from router.background import Background
from transfer import wire
from transfer.control_auth import UNSIGNED_NONCE, AuthError, Credential, parse

log = logging.getLogger("kvbridge.router")


class _Channel:
    def __init__(self, address: str, cred: Credential) -> None:
        self.cred, self.address = cred, address
        self.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # no queue for a connector that is down: its questions time out
        try:
            self.sock.connect(f"tcp://{address}")
        except zmq.ZMQError:
            self.sock.close(0)
            raise
        self.waiting: dict[bytes, asyncio.Future[bytes]] = {}
        self.reader: asyncio.Task | None = None
        self.sending = Background()  # tells that a connection did not take at once

    async def ask(self, msg: wire.Message, timeout_s: float) -> wire.ReplyMessage | None:
        frame, nonce = self.cred.seal(wire.encode(msg))
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting[nonce] = got
        self._keep_reading()
        try:
            async with asyncio.timeout(timeout_s):
                await self.sock.send(frame)
                raw = await got
            return wire.decode_reply(self.cred.open_reply(raw, nonce))
        except (TimeoutError, zmq.ZMQError, wire.WireError, AuthError):
            return None
        finally:
            self.waiting.pop(nonce, None)

    def tell(self, msg: wire.Message, timeout_s: float) -> None:
        """Send `msg` without waiting for its reply (read and dropped when it comes). A connection that takes
        the frame at once (the usual case) costs no task and no timer; otherwise the send is retried in the
        background for up to `timeout_s` and then dropped (the connector is down)."""
        frame, _ = self.cred.seal(wire.encode(msg))
        self._keep_reading()
        sent = self.sock.send(frame)
        if not sent.done():
            self.sending.keep(self._send_within(sent, timeout_s))
        elif sent.exception() is not None:
            log.debug("control message to %s not sent: %s", self.address, sent.exception())

    async def _send_within(self, sent: asyncio.Future, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await sent
        except (TimeoutError, zmq.ZMQError) as e:  # a timeout cancelled the send it awaited
            log.debug("control message to %s not sent within %g s: %s", self.address, timeout_s, e)

    def _keep_reading(self) -> None:
        if self.reader is None or self.reader.done():
            self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        """Hands each reply to the request that carried its nonce. A refusal (the connector could not open a
        frame of ours) names no request; every frame here is sealed alike, so each waiting one gets it."""
        while True:
            try:
                raw = await self.sock.recv()
            except zmq.ZMQError:  # closed
                return
            try:
                nonce = parse(raw)[2]
            except AuthError:
                continue
            waiters = list(self.waiting.values()) if nonce == UNSIGNED_NONCE else [self.waiting.get(nonce)]
            for w in waiters:
                if w is not None and not w.done():
                    w.set_result(raw)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        self.sending.cancel()
        self.sock.close(0)


class ControlChannels:
    """One channel per connector address, opened on first use, signed as `cred`. With `in_use`, only to an
    address it says a node uses now: a removed node's channel, once dropped, is not opened again by a late
    question about it (a background cancel, a health check still under way), which would keep reconnecting."""

    def __init__(self, cred: Credential, in_use: Callable[[str], bool] | None = None) -> None:
        self.cred = cred
        self._in_use = in_use
        self._closed = False  # after close(), no channel is opened again (a late notice, a background cancel)
        self._channels: dict[str, _Channel] = {}

    async def ask(self, address: str, msg: wire.Message, timeout_s: float) -> wire.ReplyMessage | None:
        """The decoded reply to `msg`, or None when none came in time (or it was not an authentic, valid one, or
        ZMQ cannot connect to `address` at all, or no node uses it)."""
        channel = self._channel(address)
        return None if channel is None else await channel.ask(msg, timeout_s)

    def tell(self, address: str, msg: wire.Message, timeout_s: float) -> None:
        """`msg` sent without waiting for the connector's reply (see `_Channel.tell`)."""
        channel = self._channel(address)
        if channel is not None:
            channel.tell(msg, timeout_s)

    def _channel(self, address: str) -> _Channel | None:
        channel = self._channels.get(address)
        if channel is None and not self._closed:
            if self._in_use is not None and not self._in_use(address):
                log.debug("no control message to %s: no node uses that connector now", address)
                return None
            try:
                channel = self._channels[address] = _Channel(address, self.cred)
            except zmq.ZMQError as e:
                log.warning("cannot open a control channel to %s: %s", address, e)
        return channel

    def drop(self, address: str) -> None:
        """Close the channel to a connector no node uses any more (its socket would keep reconnecting)."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            channel.close()

    def close(self) -> None:
        self._closed = True
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
