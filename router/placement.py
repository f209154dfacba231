"""Where a request runs: which decode node, and whether its prompt is prefilled on a prefill node and the KV
moved (remote) or prefilled on the decode node itself (local), from a cost model in seconds.

For every decode node d (and, for remote, every prefill node p) the model estimates how soon the prompt's
KV would be ready on d:
  local  = load(d) + queue(d) + compute(held by d .. tokens) x local_penalty
  remote = load(d) + overhead + queue(p) + shared load + compute(held by p .. tokens)
           + (tokens - held by d) x kv bytes per token / link rate
and either, for the tokens of its prefix a prefill node is computing for us right now and this node does not
hold, adds their compute again x `duplicate_weight` (a round of chats sharing a system prompt then queues
behind the node computing it instead of computing it once per node).
`held` comes from the router's prefix index (router/prefix_index.py); `compute` grows faster than the tokens
(router/prefill_cost.py); `queue` is the compute of the prompts the router has in flight on that node;
`load(d)` the requests already on d. The rates are learned (router/learned_rates.py). With
`policy: prefix_aware` every up node is a candidate; with the other policies the candidates are the nodes that policy picks, and the model only decides local or remote.
`mode` pins the choice (always remote, never remote) while still choosing among nodes. Each decision keeps
its candidates and scores for /debug/requests/{id} and is counted by reason in the metrics.
"""
from __future__ import annotations

import math
from collections import Counter

from router.learned_rates import LearnedRates
from router.metrics import PLACEMENT, PLACEMENT_SETTING, PREFIX_HIT_TOKENS, child
from router.placement_config import Mode, PlacementConfig
from router.placement_decision import Candidate, Decision
from router.prefix_index import SHARED, PrefixIndex, prompt_text
from router.registry import Backend, Registry
from router.usage import cached_tokens

MODE_CODE = {"auto": 0, "always": 1, "never": 2}
SHORT_LEG_TOKENS = 64


class Placement:
    def __init__(self, cfg: PlacementConfig, registry: Registry, prefix_aware: bool) -> None:
        self.cfg, self.registry, self.prefix_aware = cfg, registry, prefix_aware
        self.index = PrefixIndex(cfg.chunk_chars, cfg.node_capacity_chunks, cfg.shared_capacity_chunks)
        self.rates = LearnedRates(cfg.chars_per_token, cfg.prefill_tokens_per_s, cfg.request_s,
                                  cfg.shared_load_tokens_per_s, cfg.link_bytes_per_s)
        self.pending: dict[str, float] = {}  # node -> prompt tokens it is computing for us now
        self.pending_s: dict[str, float] = {}  # node -> their predicted compute
        self.pending_requests: dict[str, int] = {}  # node -> prompts it is computing for us now
        self._inflight: dict[str, Counter[str]] = {}  # node -> prefix keys of the prompts it is computing for us
        self._downs: dict[str, int] = {}  # node -> its `downs` when its index was last trusted
        self.set_mode(cfg.mode)

    def set_mode(self, mode: Mode) -> None:
        self.mode = mode
        PLACEMENT_SETTING.labels("mode").set(MODE_CODE[mode])
        child(PLACEMENT_SETTING, "break_even_tokens").set(self.break_even_tokens())

    def break_even_tokens(self) -> float:
        """Below this many uncached prompt tokens an idle decode node prefills sooner than a prefill node plus
        the transfer (inf: local always sooner at these rates): the positive root of
        (penalty - 1) x compute(0 .. n) - n x kv bytes per token / link rate = remote overhead."""
        extra = self.cfg.local_penalty - 1
        quad = extra * self.rates.prefill.context_s / 2
        lin = extra * self.rates.prefill.per_token_s - self.cfg.kv_bytes_per_token / self.rates.link_bytes_per_s.value
        overhead = self.cfg.remote_overhead_s
        root = math.sqrt(lin * lin + 4 * quad * overhead)
        if lin > 0:  # the same root, without the cancellation of -lin + root when quad is tiny
            return 2 * overhead / (lin + root)
        return (root - lin) / (2 * quad) if quad > 0 else math.inf

    def decide(self, body: dict, exclude: set[str], forced_local: str | None = None) -> Decision | None:
        """The decode node and prefill node (None: local) for this request; None when no decode node is up.
        `forced_local` names why this request must be prefilled on its decode node (echo, beam search...)."""
        decodes = self._nodes("decode", exclude)
        if not decodes:
            return None
        text = prompt_text(body)
        keys = self.index.keys(body)
        tokens = self.rates.tokens(len(text))
        prefills = [] if forced_local or self.mode == "never" or not any(d.kv_address for d in decodes) \
            else self._nodes("prefill", set())
        cands = []
        for d in decodes:
            cands.append(self._local(d, keys, tokens))
            if d.kv_address:
                cands += [self._remote(d, p, keys, tokens) for p in prefills]
        remote = [c for c in cands if c.prefill]
        pool = remote if self.mode == "always" and remote else cands
        # KV pushed to a decode node without a free slot would wait for one: that is a last resort
        best = min(pool, key=lambda c: (c.prefill is not None and c.decode.pool_free == 0, c.cost_s,
                                        c.decode.outstanding))
        decision = Decision(best.decode, best.prefill, "", "", keys, len(text), tokens, best, cands)
        decision.predicted = {n: self.index.held(n, keys) for n in {best.decode.name, SHARED}
                              | ({best.prefill.name} if best.prefill else set())}
        decision.reason, decision.why = self._reason(best, cands, forced_local, bool(prefills))
        child(PLACEMENT, decision.where, decision.reason).inc()
        return decision

    def _nodes(self, kind: str, exclude: set[str]) -> list[Backend]:
        for b in self.registry.backends[kind]:
            if self._downs.get(b.name, 0) != b.downs:  # down since: assumed restarted, re-learned from its replies
                self._downs[b.name] = b.downs
                self.index.forget(b.name)
        if self.prefix_aware:
            return self.registry.candidates(kind, exclude)
        picked = self.registry.pick(kind, exclude)
        return [picked] if picked else []

    def _held_tokens(self, name: str, keys: list[str], tokens: float) -> float:
        return min(tokens, self.index.held(name, keys) * self.cfg.chunk_chars / self.rates.chars_per_token.value)

    def _queue_s(self, node: str) -> float:
        """What the node computes for us before this prompt: its queued prompts' compute, and a forward pass's
        fixed cost per queued prompt (on a small model that cost, not the tokens, is most of a short prompt's
        time)."""
        return self.pending_s.get(node, 0.0) + self.pending_requests.get(node, 0) * self.rates.request_s.value

    def _base(self, d: Backend) -> float:
        return d.outstanding * self.cfg.decode_load_s

    def _local(self, d: Backend, keys: list[str], tokens: float) -> Candidate:
        held = self._held_tokens(d.name, keys, tokens)
        parts = {"load_s": self._base(d), "queue_s": self._queue_s(d.name),
                 "compute_s": self.rates.prefill.seconds(tokens, held) * self.cfg.local_penalty,
                 "duplicate_s": self._duplicate_s(d.name, keys, tokens, held), "held_tokens": held}
        return Candidate(d, None, sum(v for k, v in parts.items() if k.endswith("_s")), parts)

    def _remote(self, d: Backend, p: Backend, keys: list[str], tokens: float) -> Candidate:
        own = self._held_tokens(p.name, keys, tokens)
        shared = self._held_tokens(SHARED, keys, tokens) if self.cfg.shared_store else 0.0
        held = max(own, shared)
        on_decode = self._held_tokens(d.name, keys, tokens)
        parts = {"load_s": self._base(d), "overhead_s": self.cfg.remote_overhead_s,
                 "queue_s": self._queue_s(p.name),
                 "shared_load_s": max(0.0, shared - own) / self.rates.shared_load_tokens_per_s.value,
                 "compute_s": self.rates.prefill.seconds(tokens, held),
                 "duplicate_s": self._duplicate_s(p.name, keys, tokens, held),
                 "transfer_s": (tokens - on_decode) * self.cfg.kv_bytes_per_token / self.rates.link_bytes_per_s.value,
                 "held_tokens": held, "decode_held_tokens": on_decode}
        return Candidate(d, p, sum(v for k, v in parts.items() if k.endswith("_s")), parts)

    def _duplicate_s(self, node: str, keys: list[str], tokens: float, held: float) -> float:
        """The compute of the prompt's leading tokens that another node is computing for us now, not held here."""
        lead = max((_leading(c, keys) for n, c in self._inflight.items() if n != node), default=0)
        twice = min(tokens, lead * self.cfg.chunk_chars / self.rates.chars_per_token.value)
        return self.rates.prefill.seconds(twice, held) * self.cfg.duplicate_weight

    def _reason(self, best: Candidate, cands: list[Candidate], forced_local: str | None,
                had_prefills: bool) -> tuple[str, str]:
        """A short reason for the metrics' label and a sentence for /debug."""
        others = [c for c in cands if (c.prefill is None) != (best.prefill is None)]
        alt = min(others, key=lambda c: c.cost_s) if others else None
        vs = f"; best {'remote' if alt.prefill else 'local'} {alt.cost_s:.4f} s" if alt else ""
        won = (f"remote on {best.decode.name} via {best.prefill.name}" if best.prefill
               else f"local on {best.decode.name}")
        held = best.parts["held_tokens"]
        if forced_local:
            return f"aggregated_{forced_local}", f"{forced_local} needs the prompt's forward pass on the decode node"
        if best.prefill is None and self.mode == "never":
            return "pinned_local", f"mode never: {won}"
        if best.prefill is None and not had_prefills:
            return "no_prefill", f"no prefill node up: {won}"
        if self.mode == "always" and best.prefill is not None:
            reason = "pinned_remote_prefix" if held > 0 else "pinned_remote"
            return reason, f"mode always: {won} at {best.cost_s:.4f} s, {held:.0f} prompt tokens held there"
        if best.prefill is None:
            reason = "decode_holds_prefix" if held > 0 else "short_prompt"
        else:
            reason = "prefill_holds_prefix" if held > 0 else "remote_cheaper"
        return reason, f"{won} at {best.cost_s:.4f} s ({held:.0f} prompt tokens held there){vs}"

    def prefill_eta_s(self, d: Decision) -> float:
        """How long the decision's prefill leg is expected to take, in the terms the leg's own time is learned
        in (`prefill_done`): the node's queue, the prompt's fixed cost, the shared tier's load and the compute of
        what the node does not hold."""
        parts = d.chosen.parts
        return self.rates.request_s.value + sum(parts.get(k, 0.0) for k in ("queue_s", "shared_load_s", "compute_s"))

    # What completed requests teach the model.

    def dispatched(self, d: Decision) -> None:
        """The prompt is on its way to the node that computes it: counted in that node's queue, and indexed
        there from now on (a second request for the same prefix belongs there too; the reply corrects it)."""
        node = (d.prefill or d.decode).name
        self.pending[node] = self.pending.get(node, 0) + d.miss_tokens
        self.pending_s[node] = self.pending_s.get(node, 0.0) + d.chosen.parts["compute_s"]
        self.pending_requests[node] = self.pending_requests.get(node, 0) + 1
        if d.prefill is not None:  # a local prefill's end is not seen (only its answer's), so it is not counted
            self._inflight.setdefault(node, Counter()).update(d.keys)
        self.index.record(node, d.keys)
        if d.prefill is not None and self.cfg.shared_store:
            self.index.record(SHARED, d.keys)

    def computed(self, d: Decision) -> None:
        """The computing node is done with the prompt (or gave up): out of its queue. For a local prefill that
        is when the answer ends: the router sees nothing of the decode node's prefill but the answer."""
        node = (d.prefill or d.decode).name
        self.pending_requests[node] = max(0, self.pending_requests.get(node, 0) - 1)
        if self.pending_requests[node]:
            self.pending[node] = max(0.0, self.pending.get(node, 0) - d.miss_tokens)
            self.pending_s[node] = max(0.0, self.pending_s.get(node, 0.0) - d.chosen.parts["compute_s"])
        else:  # exactly empty: sums of floats taken apart again in another order leave a residue
            self.pending[node] = self.pending_s[node] = 0.0
        if d.prefill is not None and node in self._inflight:
            self._inflight[node].subtract(d.keys)
            self._inflight[node] = +self._inflight[node]  # keys of no prompt in flight any more leave

    def prefill_done(self, d: Decision, leg_s: float, usage: dict | None, was_idle: bool) -> str | None:
        """A prefill leg answered: learn chars per token and the prefill rate, fold the node's reported prefix
        hit into the index, and record that it (and the shared tier) holds the prompt, just used. Says what
        the correction changed, if anything."""
        p, note = d.prefill, None
        prompt_tokens = (usage or {}).get("prompt_tokens")
        cached = cached_tokens(usage)
        if isinstance(prompt_tokens, int) and prompt_tokens > 0:
            if self.cfg.learn:
                self.rates.chars_per_token.observe(d.chars / prompt_tokens)
            if isinstance(cached, int):
                note, from_shared = self._correct(d, prompt_tokens, cached)
                miss = prompt_tokens - cached
            else:  # vLLM reports cached tokens only when started with --enable-prompt-tokens-details
                miss, from_shared = max(0.0, prompt_tokens - d.chosen.parts.get("held_tokens", 0.0)), 0
            if self.cfg.learn and was_idle and leg_s > 0:
                self._learn_leg(leg_s, prompt_tokens, miss, from_shared)
        self.index.record(p.name, d.keys)
        if self.cfg.shared_store:
            self.index.record(SHARED, d.keys)
        return note

    def _correct(self, d: Decision, prompt_tokens: int, cached: int) -> tuple[str | None, int]:
        """Fold a node's reported prefix hit into the index; (what changed, the hit's tokens if only the shared
        tier held the prefix, else 0)."""
        p, note = d.prefill, None
        observed = min(len(d.keys), int(cached * d.chars / prompt_tokens) // self.cfg.chunk_chars)
        own, shared = d.predicted.get(p.name, 0), d.predicted.get(SHARED, 0) if self.cfg.shared_store else 0
        child(PREFIX_HIT_TOKENS, "predicted").inc(max(own, shared) * self.cfg.chunk_chars / self.rates.chars_per_token.value)
        child(PREFIX_HIT_TOKENS, "reported").inc(cached)
        # vLLM and the store hit whole blocks or chunks, and recompute the last token: a hit this close to the
        # prediction is the prediction
        slack = math.ceil(self.cfg.reply_slack_tokens * d.chars / prompt_tokens / self.cfg.chunk_chars)
        if abs(observed - own) > slack:
            note = self.index.correct(p.name, d.keys, own, observed)
        if shared > observed + slack:  # the shared tier did not have what it was believed to
            note = self.index.correct(SHARED, d.keys, shared, observed) or note
        return note, cached if own == 0 and shared > 0 and cached > 0 else 0

    def _learn_leg(self, leg_s: float, tokens: float, miss: float, from_shared: int) -> None:
        """An idle prefill leg's time teaches the rates: the shared tier's load rate when only it held the
        prefix, a prompt's fixed cost from short prompts, the prefill compute's cost from longer ones."""
        held = tokens - miss
        if from_shared:
            rest = self.rates.prefill.seconds(tokens, held)
            self.rates.shared_load_tokens_per_s.observe(from_shared / (leg_s - rest) if leg_s > rest else 0)
        elif miss < SHORT_LEG_TOKENS:  # a short prompt's leg is mostly the fixed cost
            self.rates.request_s.observe(leg_s - self.rates.prefill.seconds(tokens, held))
        elif leg_s > self.rates.request_s.value:
            self.rates.prefill.observe(tokens, held, leg_s - self.rates.request_s.value)
            child(PLACEMENT_SETTING, "break_even_tokens").set(self.break_even_tokens())

    def served(self, d: Decision) -> None:
        """A complete answer: the decode node's prefix cache holds the prompt now."""
        self.index.record(d.decode.name, d.keys)

    def transfer_done(self, d: Decision, receive_ms: float) -> None:
        """The decode connector took `receive_ms` from the first chunk to the last: learn the link rate."""
        if not self.cfg.learn or receive_ms <= 0:
            return
        moved = d.tokens - d.chosen.parts.get("decode_held_tokens", 0.0)
        self.rates.link_bytes_per_s.observe(moved * self.cfg.kv_bytes_per_token / (receive_ms / 1000))
        child(PLACEMENT_SETTING, "break_even_tokens").set(self.break_even_tokens())

    def snapshot(self) -> dict:
        even = self.break_even_tokens()
        return {"mode": self.mode, "prefix_aware": self.prefix_aware,
                "break_even_tokens": None if math.isinf(even) else round(even, 1),
                "rates": self.rates.snapshot(), "pending_tokens": {k: round(v, 1) for k, v in self.pending.items()},
                "pending_s": {k: round(v, 4) for k, v in self.pending_s.items()},
                "index": self.index.snapshot()}


def _leading(inflight: Counter[str], keys: list[str]) -> int:
    """How many of `keys` (a prompt's chained prefix keys), from the first, are in `inflight`."""
    n = 0
    while n < len(keys) and inflight[keys[n]] > 0:
        n += 1
    return n
