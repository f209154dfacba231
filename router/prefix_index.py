"""Which prompt prefixes each node holds, as the router believes it: its own approximate index.

Why an approximate index of our own rather than the store's chunk-key events: the store's keys are
seeded with the KV layout and a fingerprint of the weights, which only a node's worker knows, and are
chained over token ids, which the router does not have without a tokenizer (it forwards text). So the
router keys prompts by their text, in chunks of `chunk_chars`, chained with blake2b exactly as the
store chains token chunks (a key names the whole prefix up to its chunk; never Python's `hash()`, so
keys are stable across processes and restarts). Each node's entry is an LRU bounded by that node's
capacity, which is what the node's own store does: a prefix the router sent away enough other prompts
since stops attracting requests, as the node has evicted it too.

It is corrected from the nodes' replies (`usage.prompt_tokens_details.cached_tokens`): a node that
held less than predicted loses the chunks it did not have and every chunk it used less recently than
those (an LRU store evicts in that order); a node that held more (after a router restart, or a prefix
another router put there) gains the chunks it reported. A prefix held by a Redis tier shared by the prefill nodes
(`shared`) counts for every prefill node.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

SHARED = "*shared*"  # the index of a store tier every prefill node reads (Redis)


def prompt_text(body: dict) -> str:
    """The prompt as one string whose prefixes are the prefixes of the conversation: a completion's prompt,
    or a chat's messages one after the other (role and content, separated by control characters)."""
    if "messages" in body:
        parts = []
        for m in body.get("messages") or []:
            content = m.get("content") if isinstance(m, dict) else m
            text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
            parts.append(f"{m.get('role', '') if isinstance(m, dict) else ''}\x00{text}\x01")
        return "".join(parts)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def prefix_keys(text: str, chunk_chars: int, seed: str = "") -> list[str]:
    """Hex keys of every whole `chunk_chars` chunk of `text`, each chained over the one before it."""
    if chunk_chars <= 0:
        raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
    keys, prev = [], hashlib.blake2b(f"kvbridge-prefix-v1|{seed}".encode(), digest_size=16).digest()
    data = text.encode("utf-8", errors="surrogatepass")
    for start in range(0, len(data) - chunk_chars + 1, chunk_chars):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(data[start:start + chunk_chars])
        prev = h.digest()
        keys.append(prev.hex())
    return keys


class NodeIndex:
    """One node's held chunk keys, least recently used first, at most `capacity` of them."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: OrderedDict[str, None] = OrderedDict()
        self.evicted = 0

    def held(self, keys: list[str]) -> int:
        """How many leading chunks of `keys` this node holds."""
        n = 0
        for k in keys:
            if k not in self.keys:
                break
            n += 1
        return n

    def add(self, keys: list[str]) -> None:
        for k in keys:
            self.keys[k] = None
            self.keys.move_to_end(k)
        self._trim()

    def drop(self, keys: list[str]) -> None:
        for k in keys:
            self.keys.pop(k, None)

    def drop_older_than(self, key: str) -> int:
        """Drop `key` and every key used less recently: an LRU store that evicted `key` evicted those first."""
        if key not in self.keys:
            return 0
        n = 0
        while self.keys:
            k, _ = self.keys.popitem(last=False)
            n += 1
            if k == key:
                break
        return n

    def _trim(self) -> None:
        while len(self.keys) > self.capacity:
            self.keys.popitem(last=False)
            self.evicted += 1


class PrefixIndex:
    """Every node's NodeIndex by name, plus SHARED; nodes appear on first use and leave with `forget`."""

    def __init__(self, chunk_chars: int, capacity_chunks: int, shared_capacity_chunks: int) -> None:
        self.chunk_chars, self.capacity, self.shared_capacity = chunk_chars, capacity_chunks, shared_capacity_chunks
        self.nodes: dict[str, NodeIndex] = {}

    def keys(self, body: dict) -> list[str]:
        return prefix_keys(prompt_text(body), self.chunk_chars)

    def node(self, name: str) -> NodeIndex:
        if name not in self.nodes:
            self.nodes[name] = NodeIndex(self.shared_capacity if name == SHARED else self.capacity)
        return self.nodes[name]

    def held(self, name: str, keys: list[str]) -> int:
        return self.nodes[name].held(keys) if name in self.nodes else 0

    def record(self, name: str, keys: list[str]) -> None:
        """`name` has just computed (or loaded) these chunks: it holds them now, most recently used."""
        self.node(name).add(keys)

    def correct(self, name: str, keys: list[str], predicted: int, observed: int) -> str | None:
        """Fold a reply's observed hit (in chunks) into the node's entry; says what changed, if anything."""
        if observed == predicted:
            return None
        node = self.node(name)
        if observed > predicted:
            node.add(keys[:observed])
            return f"{name} held {observed - predicted} chunk(s) more than indexed: learned"
        missing = keys[observed:predicted]
        dropped = node.drop_older_than(missing[0])
        node.drop(missing)
        node.add(keys[:observed])  # those it did hold, and has just used
        return f"{name} held {observed} of {predicted} predicted chunk(s): dropped {dropped} indexed chunk(s) it evicted"

    def forget(self, name: str) -> None:
        """The node restarted or left: nothing it held is known any more."""
        self.nodes.pop(name, None)

    def snapshot(self) -> dict:
        return {n: {"chunks": len(ix.keys), "capacity": ix.capacity, "evicted": ix.evicted}
                for n, ix in self.nodes.items()}
