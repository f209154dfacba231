"""A streamed completion as its client sees it: when the first token arrived, the text, and the time per token
after it, counted by tokens rather than by events, also token by token (`gaps_by_index`)."""
from __future__ import annotations

import json
import time
from typing import NamedTuple

import requests


class Streamed(NamedTuple):
    """One streamed answer as the client saw it. When vLLM's API process falls behind its engine, it sends the
    tokens generated meanwhile in one event, so per-token time is taken from token counts, not event counts: a
    NixlConnector decode here sent 64 tokens in 57 events (one carried 8), which counted by events reads 63/56 =
    1.125 x its per-token time."""
    ttft: float  # seconds to the first event that carried a token
    text: str
    tpot: float  # seconds per output token after those of the first event
    held: int  # events that carried more than one token: tokens the client got late, in a burst
    request_id: str | None = None  # the kvbridge router's id for the request (its /debug/requests/{id} trace)
    stamps: tuple[float, ...] = ()  # seconds from the request's start to each event
    counts: tuple[int, ...] = ()  # tokens each event carried (0 for one that carried none)


def stream_ttft(url: str, body: dict) -> Streamed:
    """Stream `body` from `url`, asking vLLM for each event's token ids (`return_token_ids`) to count tokens."""
    t0 = time.perf_counter()
    stamps, text, counts = [], [], []
    with requests.post(url + "/v1/completions", json=dict(body, stream=True, return_token_ids=True), stream=True,
                       timeout=120) as r:
        r.raise_for_status()
        request_id = r.headers.get("x-kvbridge-request-id")
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                stamps.append(time.perf_counter() - t0)
                choice = json.loads(line[6:])["choices"][0]
                text.append(choice["text"])
                counts.append(len(choice["token_ids"]) if choice.get("token_ids") is not None else 1)
    return Streamed(stamps[0], "".join(text), *pace(stamps, counts), request_id, tuple(stamps), tuple(counts))


def pace(stamps: list[float], counts: list[int]) -> tuple[float, int]:
    """(seconds per token after the first event's, events that carried more than one token) for events that
    arrived at `stamps` carrying `counts` tokens each."""
    after_first = sum(counts) - counts[0]
    tpot = (stamps[-1] - stamps[0]) / after_first if after_first else float("nan")
    return tpot, sum(c > 1 for c in counts)


def gaps_by_index(got: Streamed) -> dict[int, float]:
    """Seconds before each output token after the first event's (index 1 = the first of them), an event's gap since
    the last event that carried tokens shared out evenly among the tokens it carried."""
    out: dict[int, float] = {}
    last = None  # when the last event that carried tokens arrived
    for stamp, count in zip(got.stamps, got.counts):
        if not count:
            continue
        if last is not None:
            for _ in range(count):
                out[len(out) + 1] = (stamp - last) / count
        last = stamp
    return out


def in_range(gaps: dict[int, float], lo: int, hi: int) -> float | None:
    """The mean gap over token indices lo..hi, or None when the answer has none there."""
    xs = [g for i, g in gaps.items() if lo <= i <= hi]
    return sum(xs) / len(xs) if xs else None
