"""What each authenticated sender may tell a consumer endpoint.

The router asks (pool stats, cancel, trace) and nothing else; a producer speaks only for itself: it
introduces only its own id, allocates and withdraws only under its own incarnation (or one the consumer has
not met: an ALLOC is then refused for want of a handshake, a Withdraw finds no lease of it), and renews,
releases or replaces only its own leases. A frame that passed authentication and breaks one of these is refused with the reason.
"""
from __future__ import annotations

from transfer import wire
from transfer.producer_registry import ProducerRegistry
from transfer.slot_pool import SlotPool

ROUTER_MESSAGES = frozenset({"stats", "cancel", "prefill_answered", "trace"})
PRODUCER_MESSAGES = frozenset({"hello", "alloc", "renew", "release", "withdraw", "progress", "pending", "stats"})


def forbidden(sender: str, msg: wire.Message, producers: ProducerRegistry, pool: SlotPool) -> str:
    """Why this authenticated sender may not send this message ('' when it may); a producer's message
    counts as a sign that it is alive (`producers.touch`)."""
    if sender == "router":
        return "" if msg.type in ROUTER_MESSAGES else f"the router does not send {msg.type}"
    kind, _, pid = sender.partition("/")
    if kind != "producer" or msg.type not in PRODUCER_MESSAGES:
        return f"{kind or sender} may not send {msg.type}"
    producers.touch(pid)
    if isinstance(msg, wire.Hello) and msg.producer_id != pid:
        return f"credential of producer {pid} cannot introduce producer {msg.producer_id}"
    if isinstance(msg, (wire.Alloc, wire.Withdraw)) and producers.owner(msg.incarnation) not in (None, pid):
        return f"incarnation {msg.incarnation[:12]} belongs to another producer"
    if isinstance(msg, (wire.Alloc, wire.Renew, wire.Release, wire.Progress)):  # an ALLOC would replace the lease
        lease = pool.live(msg.transfer_id)
        if isinstance(msg, wire.Release) and (lease is None or lease.epoch != msg.epoch):
            # the lease it names has ended (replaced by a new attempt, cancelled): releasing it would shorten its
            # quarantine, which only the producer that may still write there can do
            lease = pool.resting(msg.transfer_id, msg.epoch) or lease
        if lease is not None and producers.owner(lease.producer) != pid:
            return f"the lease on {msg.transfer_id} belongs to another producer"
    return ""
