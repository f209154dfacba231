"""What the scheduler tells the workers each engine step (the tasks of pd/scheduler_side.py, read by pd/worker_side.py),
and what a worker answers after a step that ended nothing.

vLLM builds one `BridgeMetadata` per step in the scheduler process and hands it to every worker; on a decode
node with nothing to move it is built and read on every token, so it says so in one field (`quiet`) that the
worker's hooks look at before anything else. The answers are frozen sets: vLLM only reads them, and a constant
shared by every such step must stay empty.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorTransferResults

from transfer.identity import TransferSpec


@dataclass
class OutgoingTask:
    """Chunks leaving this node's blocks as their tokens get computed: pushed to `consumer` (when
    set) and kept in the store from chunk `store_from` on (`store_keys` holds every whole chunk's key)."""
    req_id: str
    spec: TransferSpec | None
    consumer: str | None
    num_tokens: int
    block_ids: list[int] = field(default_factory=list)
    ready_tokens: int = 0
    store_keys: list[str] = field(default_factory=list)
    store_from: int = 0


@dataclass
class StoreLoadTask:
    """Chunks `first_chunk`.. of a request to fill from the store (keys in order), leaving its first
    `skip_blocks` blocks (vLLM's own prefix-cache hit) alone."""
    req_id: str
    keys: list[str]
    first_chunk: int
    block_ids: list[int]
    skip_blocks: int


@dataclass
class LoadTask:
    """A decode request's KV to receive: transfer `spec`, read by `claims` engine requests, into `block_ids`
    from block `skip_blocks` on (the blocks before are vLLM's own prefix-cache hit)."""
    req_id: str
    spec: TransferSpec
    claims: int
    block_ids: list[int]
    skip_blocks: int


@dataclass
class BridgeMetadata(KVConnectorMetadata):
    outgoing: list[OutgoingTask] = field(default_factory=list)
    loads: list[LoadTask] = field(default_factory=list)
    store_loads: list[StoreLoadTask] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)   # request ids whose transfer must stop now
    discards: list[str] = field(default_factory=list)  # transfer keys whose decode request ended unserved
    pending: list[tuple[str, str]] = field(default_factory=list)  # (key, consumer) of pushes still in our queue
    idle: bool = False                                # nothing computed this step: worker may wait briefly
    # (asked | cached, seconds) per store lookup since the last step: the scheduler runs in its own process,
    # so the worker, whose metrics endpoint is the node's, records them
    lookup_times: list[tuple[str, float]] = field(default_factory=list)
    quiet: bool = False  # every list above is empty: the worker's hooks have nothing to do this step


# steps with nothing for the worker, built once (never changed: their lists stay empty)
QUIET, QUIET_IDLE = BridgeMetadata(quiet=True), BridgeMetadata(idle=True, quiet=True)
NOTHING = KVConnectorTransferResults(frozenset(), frozenset(), frozenset())  # a worker step that ended nothing
