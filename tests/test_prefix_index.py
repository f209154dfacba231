"""The router's prefix index (router/prefix_index.py): leading chunks held, LRU within a node's capacity,
corrections from a node's reported hit in both directions, and prompts of both APIs as one growing string."""
from __future__ import annotations

from router.prefix_index import PrefixIndex, prompt_text


def test_held_counts_leading_chunks_and_lru_evicts_least_recently_used():
    ix = PrefixIndex(chunk_chars=4, capacity_chunks=6, shared_capacity_chunks=6)
    a, b = ix.keys({"prompt": "aaaabbbbcccc"}), ix.keys({"prompt": "xxxxyyyyzzzz"})
    ix.record("n", a)
    assert ix.held("n", a) == 3 and ix.held("n", ix.keys({"prompt": "aaaabbbbQQQQ"})) == 2
    ix.record("n", b)
    assert ix.held("n", a) == 3 and ix.held("other", a) == 0
    ix.record("n", a)  # a used again: now the most recent
    ix.record("n", ix.keys({"prompt": "1111"}))  # one more: the least recently used (b's first) goes
    assert ix.held("n", b) == 0 and ix.held("n", a) == 3 and ix.snapshot()["n"]["evicted"] == 1
    ix.record("n", ix.keys({"prompt": "2222"}))  # and then b's second: a prefix's middle chunk gone ends it
    ix.record("n", b[:1])
    assert ix.held("n", b) == 1


def test_a_smaller_reported_hit_drops_the_missing_chunks_and_everything_older():
    ix = PrefixIndex(chunk_chars=4, capacity_chunks=100, shared_capacity_chunks=100)
    old, a = ix.keys({"prompt": "oooopppp"}), ix.keys({"prompt": "aaaabbbbccccdddd"})
    ix.record("n", old)
    ix.record("n", a)
    note = ix.correct("n", a, predicted=4, observed=1)
    assert note.startswith("n held 1 of 4")
    assert ix.held("n", a) == 1 and ix.held("n", old) == 0  # older than the first evicted chunk: gone too
    assert ix.correct("n", a, predicted=1, observed=3).startswith("n held 2 chunk(s) more")
    assert ix.held("n", a) == 3 and ix.correct("n", a, 3, 3) is None


def test_a_chat_and_its_next_turn_share_a_prefix():
    turn1 = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    turn2 = {"messages": turn1["messages"] + [{"role": "assistant", "content": "hello"},
                                               {"role": "user", "content": "more"}]}
    assert prompt_text(turn2).startswith(prompt_text(turn1)) and prompt_text(turn1) != prompt_text(turn2)
    assert prompt_text({"prompt": ["one string"]}) == "one string"
    ix = PrefixIndex(chunk_chars=8, capacity_chunks=100, shared_capacity_chunks=100)
    ix.record("d", ix.keys(turn1))
    assert ix.held("d", ix.keys(turn2)) == len(ix.keys(turn1)) > 0
