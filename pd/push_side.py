"""The producer's half of the worker: which chunks leave, and when in the forward.

Before the forward (`begin`), each push's chunks that this forward completes are opened: a staging slot each
(only slots free now: never a wait for one inside the forward). vLLM calls `save_kv_layer` after each attention
layer; at the end of each group of layers (`layer_groups` of them) that group's bytes of every open chunk are
gathered into its slot and handed to the push thread, which writes them while later layers compute; the last
group carries each chunk's notice (transfer/staged_chunk.py). After the forward (`after_forward`), whatever the
layers did not hand over is, and every other ready chunk (no free slot before the forward, a store-only chunk,
`layer_groups` 1) is gathered whole, as each prefill chunk's KV comes to exist.

Only layers the forward has finished are read: a layer's KV for this step is in the cache by the time
vLLM calls `save_kv_layer` for it, and on a GPU the gather is queued on the engine's stream after it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from prometheus_client import Counter

from pd.paged_kv import PagedKV
from pd.prefix_store import PROMPT_TOKENS, PrefixStore
from pd.step_metadata import OutgoingTask
from transfer.producer import Producer
from transfer.rank_address import rank_address
from transfer.staged_chunk import HELD

STAGED = Counter("kvbridge_producer_chunks_staged_total", "Chunks handed to the push thread, by how: 'layers' (during "
                 "the forward, a group of layers at a time) or 'whole' (after the forward)", ["how"])


@dataclass
class _OpenChunk:
    """A chunk the current forward completes, handed over a group of layers at a time."""
    handle: str
    chunk: int
    slot: int
    block_ids: list[int]
    store_key: str | None
    next_layer: int = 0  # layers below this are handed over
    ended: bool = False  # its transfer ended: nothing more goes into the slot


class PushSide:
    def __init__(self, kv: PagedKV, producer: Producer, store: PrefixStore | None, blocks_per_chunk: int,
                 layer_names: list[str], layer_groups: int) -> None:
        self.kv, self.producer, self.store = kv, producer, store
        self.blocks_per_chunk = blocks_per_chunk
        self.chunk_tokens = producer.geometry.chunk_tokens
        self.num_layers = n = len(layer_names)
        per_group = -(-n // max(1, min(layer_groups, n)))
        # layer name -> the layer count handed over once it computed, for the last layer of each group
        self._group_ends = {name: i + 1 for i, name in enumerate(layer_names) if (i + 1) % per_group == 0 or i == n - 1}
        self.layerwise = layer_groups > 1
        self._out: dict[str, tuple[str | None, int]] = {}  # req_id -> (transfer handle if pushing, next chunk)
        self._open: list[_OpenChunk] = []
        self._scratch: torch.Tensor | None = None  # one chunk, for saving chunks that are not pushed
        self.last_staged: dict[str, float] = {}  # push handle -> when its last chunk was staged

    def begin(self, outgoing: list[OutgoingTask]) -> bool:
        """Before the forward: start new pushes, open the chunks this forward completes. True when there are
        open chunks, so `layer_done` has work."""
        for task in outgoing:
            if task.req_id not in self._out:
                target = rank_address(task.consumer, self.kv.layout.tp_rank) if task.consumer else None
                handle = self.producer.begin(task.spec, target) or None if target is not None else None
                self._out[task.req_id] = (handle, 0)
            if self.layerwise:
                self._open_chunks(task)
        return bool(self._open)

    def _open_chunks(self, task: OutgoingTask) -> None:
        handle, nxt = self._out[task.req_id]
        if handle is None:
            return
        while self._ready(task, nxt):
            key = self._store_key(task, nxt)
            slot = self.producer.open(handle, nxt, wait=False)
            if slot is None or (slot == HELD and key is not None):
                break  # no free slot, or the transfer ended: the chunks from here go after the forward
            if slot != HELD:
                lo, hi = self.producer.geometry.block_range(task.num_tokens, nxt)
                self._open.append(_OpenChunk(handle, nxt, slot, task.block_ids[lo:hi], key))
            nxt += 1
        self._out[task.req_id] = (handle, nxt)

    def layer_done(self, layer_name: str) -> None:
        """vLLM computed `layer_name`'s attention: at a group's end, that group of every open chunk leaves."""
        end = self._group_ends.get(layer_name)
        if end is not None:
            for oc in self._open:
                self._hand_over(oc, end)

    def _hand_over(self, oc: _OpenChunk, end: int, after_forward: bool = False) -> None:
        if oc.ended or oc.next_layer >= end:
            return
        how = "whole" if after_forward and oc.next_layer == 0 else "layers"  # none of it left during the forward
        view, ready_at = self.producer.staging.view(oc.slot), time.time()
        nbytes = self.kv.gather(oc.block_ids, view, (oc.next_layer, end))
        start, stop = self.kv.layer_span(len(oc.block_ids), (oc.next_layer, end))
        last = end == self.num_layers
        if last and oc.store_key is not None:
            self._save(oc.store_key, view[:nbytes])
            oc.store_key = None
        oc.ended = not self.producer.stage_part(oc.handle, oc.chunk, oc.slot, start, stop, last, ready_at)
        oc.next_layer = end
        if last and not oc.ended:
            STAGED.labels(how).inc()

    def after_forward(self, outgoing: list[OutgoingTask]) -> None:
        """After the forward: the rest of each open chunk, then every other chunk whose tokens now exist."""
        for oc in self._open:
            self._hand_over(oc, self.num_layers, after_forward=True)  # layers vLLM did not report
            if oc.ended and oc.store_key is not None:
                self._keep(oc.block_ids, oc.store_key)  # its push ended mid-forward: the store still gets it
        self._open = []
        for task in outgoing:
            self._send_ready_chunks(task)

    def _ready(self, task: OutgoingTask, chunk: int) -> bool:
        n_chunks = self.producer.geometry.n_chunks(task.num_tokens)
        return chunk < n_chunks and min((chunk + 1) * self.chunk_tokens, task.num_tokens) <= task.ready_tokens

    def _store_key(self, task: OutgoingTask, chunk: int) -> str | None:
        return task.store_keys[chunk] if task.store_from <= chunk < len(task.store_keys) else None

    def _send_ready_chunks(self, task: OutgoingTask) -> None:
        if task.req_id not in self._out:
            return  # aborted
        tid, nxt = self._out[task.req_id]
        while self._ready(task, nxt):
            lo, hi = self.producer.geometry.block_range(task.num_tokens, nxt)
            ids, key, kept = task.block_ids[lo:hi], self._store_key(task, nxt), False

            def fill(view: torch.Tensor, ids: list[int] = ids, key: str | None = key) -> int:
                nonlocal kept
                n = self.kv.gather(ids, view)
                if key is not None:
                    self._save(key, view[:n])
                    kept = True
                return n
            if tid is not None and not self.producer.stage(tid, nxt, fill):
                tid = None  # the transfer ended (failed or aborted); the consumer falls back by policy
            elif tid is not None:
                STAGED.labels("whole").inc()
            if key is not None and not kept:
                self._keep(ids, key)
            nxt += 1
        n_chunks = self.producer.geometry.n_chunks(task.num_tokens)
        if tid is not None and nxt == n_chunks:
            self.last_staged[tid] = time.monotonic()  # the prompt's last forward has run
        if nxt < n_chunks:  # kept even when nothing more leaves: a request we forgot would be pushed anew
            self._out[task.req_id] = (tid, nxt)
        else:
            self._out.pop(task.req_id, None)

    def _keep(self, block_ids: list[int], key: str) -> None:
        """Store a chunk that is not pushed, through a scratch chunk."""
        if self._scratch is None:
            self._scratch = torch.empty(self.kv.chunk_nbytes(self.blocks_per_chunk), dtype=torch.uint8,
                                        device=self.kv.device)
        n = self.kv.gather(block_ids, self._scratch)
        self._save(key, self._scratch[:n])

    def _save(self, key: str, chunk: torch.Tensor) -> None:
        """Keep one whole chunk in the store (on a GPU, copied on the engine's stream after its gather)."""
        self.store.put(key, chunk)
        PROMPT_TOKENS.labels("saved").inc(self.chunk_tokens)

    def abort(self, req_id: str) -> None:
        out = self._out.pop(req_id, None)
        if out is not None and out[0] is not None:
            self.producer.abort(out[0])
