"""How a producer pushes: its identity, staging size, lease timing and where its memory lives."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from transfer.device_fence import Fence
from transfer.ucx_error_handling import UcxErrorHandling


@dataclass
class ProducerSettings:
    producer_id: str = "prefill"  # node and rank; unique in a deployment (the worker makes it so)
    staging_chunks: int = 16
    lease_ttl_s: float = 5.0
    write_margin_s: float = 1.0
    alloc_timeout_s: float = 5.0
    staging_wait_s: float = 2.0
    rpc_timeout_s: float = 2.0
    checksum: bool = False
    secret: bytes | None = None  # deployment secret: control messages are signed with a key derived from it
    device: str = "cpu"
    ucx_error_handling: UcxErrorHandling = "peer"  # ucx_error_handling.py
    fence: Callable[[], Fence] | None = None  # recorded after each gather; default: per `device`
