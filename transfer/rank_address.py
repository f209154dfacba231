"""Where each TP rank of a decode node listens, from the one address the router and the prefill node know.

Its own module, free of heavy imports, because both the connector (pd/) and the router reach it.
"""
from __future__ import annotations


def rank_address(address: str, rank: int) -> str:
    """Where TP rank `rank` of a decode node takes pushes: every rank is its own process with its own
    endpoint on the node's handshake port + rank; the router only ever names the node (rank 0)."""
    if rank == 0:
        return address
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"push target {address!r} is not host:port")
    return f"{host}:{int(port) + rank}"
