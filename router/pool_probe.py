"""The router's control messages to a decode connector (no NIXL involved): `stats`, to prefer decode
instances with room; `cancel`, to free a transfer whose request is gone; `trace`, for /debug/requests."""
from __future__ import annotations

from transfer import wire
from transfer.control_auth import Credential
from transfer.control_request import ask


async def pool_free_fraction(address: str, timeout_s: float, cred: Credential | None = None) -> float | None:
    """Free slots / total, or None when the connector does not answer in time."""
    reply = await ask(address, wire.Stats(rid=1), timeout_s, cred)
    return reply.free / reply.total if isinstance(reply, wire.PoolStatus) and reply.total else None


async def cancel_transfer(address: str, transfer_id: str, timeout_s: float, cred: Credential | None = None) -> bool:
    return await ask(address, wire.Cancel(rid=1, transfer_id=transfer_id), timeout_s, cred) is not None


async def transfer_trace(address: str, transfer_id: str, timeout_s: float, cred: Credential | None = None
                         ) -> dict | None:
    """The decode connector's state history for a transfer, or None when it has none or does not answer."""
    reply = await ask(address, wire.TraceQuery(rid=1, transfer_id=transfer_id), timeout_s, cred)
    if not isinstance(reply, wire.TransferTrace) or not reply.found:
        return None
    return {"state": reply.state, "reason": reply.reason, "ms": reply.ms}
