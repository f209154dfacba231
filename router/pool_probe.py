"""The router's control messages to a decode connector (no NIXL involved): `stats`, to prefer decode
instances with room; `cancel`, to free a transfer whose request is gone; `prefill_answered`, so a transfer
whose producer cannot reach the connector is given up early; `trace`, for /debug/requests.
They travel on the router's long-lived channels (router/control_channel.py)."""
from __future__ import annotations

import asyncio
import logging
from typing import NamedTuple

from router.control_channel import ControlChannels
from transfer import wire

log = logging.getLogger("kvbridge.router")


class PoolShare(NamedTuple):
    free: float  # free slots / total
    resting: float  # slots of ended leases waiting until no late write can land in them / total
    ranks: int  # the node's TP ranks


async def pool_status(control: ControlChannels, address: str, timeout_s: float) -> PoolShare | None:
    """A decode connector's slot pool as shares, or None when it does not answer in time."""
    reply = await control.ask(address, wire.Stats(rid=1), timeout_s)
    if not isinstance(reply, wire.PoolStatus):
        return None
    if not reply.total:
        return PoolShare(0.0, 0.0, reply.ranks)
    return PoolShare(reply.free / reply.total, reply.quarantined / reply.total, reply.ranks)


async def cancel_transfer(control: ControlChannels, addresses: list[str], transfer_id: str, timeout_s: float) -> bool:
    """Every rank of the decode node drops the transfer (each rank's endpoint keeps its own book)."""
    answers = await asyncio.gather(*(control.ask(a, wire.Cancel(rid=1, transfer_id=transfer_id), timeout_s)
                                     for a in addresses))
    return all(a is not None for a in answers)


def prefill_answered(control: ControlChannels, addresses: list[str], transfer_id: str, prefill: str,
                     timeout_s: float, after_s: float, unless: asyncio.Event) -> None:
    """Tell every rank of the decode connector the prefill node `prefill` (its name and up-period) answered: a
    producer it has not heard from by then cannot reach it, and its request stops waiting after the connector's
    `no_show_s` instead of `load_timeout_s` (its handshake grace on a first contact with that node). Sent `after_s`
    from now, and only if `unless` (the decode leg no longer waits for KV) is not set by then, so a transfer whose
    decode leg answered or ended by then costs no message; not awaited: a rank that cannot take it within
    `timeout_s` is down."""
    loop = asyncio.get_running_loop()
    answered_at = loop.time()

    def send() -> None:
        if unless.is_set():
            return
        # the connector dates the answer back: a producer's word that came after it, while this waited, is life
        ago = min(wire.MAX_ANSWER_AGE_S, loop.time() - answered_at)
        for a in addresses:
            try:
                control.tell(a, wire.PrefillAnswered(rid=1, transfer_id=transfer_id, answered_s_ago=ago,
                                                     prefill=prefill), timeout_s)
            except Exception as e:  # a notice that cannot go (no socket to be had) must not fail the router
                log.warning("could not tell the decode connector at %s that transfer %s's prefill answered: %s",
                            a, transfer_id, e)
    if not unless.is_set():
        loop.call_later(after_s, send)


async def transfer_trace(control: ControlChannels, address: str, transfer_id: str, timeout_s: float) -> dict | None:
    """The decode connector's state history for a transfer, or None when it has none or does not answer."""
    reply = await control.ask(address, wire.TraceQuery(rid=1, transfer_id=transfer_id), timeout_s)
    if not isinstance(reply, wire.TransferTrace) or not reply.found:
        return None
    return {"state": reply.state, "reason": reply.reason, "ms": reply.ms}
