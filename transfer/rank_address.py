"""Where each TP rank of a decode node listens, from the one address the router and the prefill node know.

Its own module, free of heavy imports, because both the connector (pd/) and the router reach it.
"""
from __future__ import annotations


def host_port_error(address: str) -> str:
    """Why `address` is not host:port with a port 1-65535 ('' when it is). A push target is checked with this
    where its request is (transfer/push_token.py), so a bad one is refused for that request alone instead
    of failing, in `rank_address`, the engine of a TP rank > 0."""
    host, _, port = address.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        return f"push target {address!r} is not host:port with a port 1-65535"
    return ""


def rank_address(address: str, rank: int) -> str:
    """Where TP rank `rank` of a decode node takes pushes: every rank is its own process with its own
    endpoint on the node's handshake port + rank; the router only ever names the node (rank 0)."""
    if rank == 0:
        return address
    why = host_port_error(address)
    if why:
        raise ValueError(why)
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + rank}"
