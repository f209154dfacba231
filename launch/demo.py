"""The README's demo: real requests through the router, answers printed, transfer and store figures shown.
The last request shares the first one's prompt prefix, so the prefill node loads that part from its store."""
from __future__ import annotations

import json
import time

import requests

from transfer.control_request import fetch_pool_status

PROMPTS = [
    ("completion", {"prompt": "the ka lo mi re tu sa ne vo pi da shi ran " * 20, "max_tokens": 24}),
    ("chat", {"messages": [{"role": "system", "content": "you are a tiny random model"},
                           {"role": "user", "content": "tell me about ka lo mi " * 30}], "max_tokens": 24}),
    ("chat, streamed", {"messages": [{"role": "user", "content": "stream please: sa ne vo " * 40}],
                        "max_tokens": 24, "stream": True}),
    ("completion, same prefix as the first", {"prompt": "the ka lo mi re tu sa ne vo pi da shi ran " * 20
                                              + "and a new ending", "max_tokens": 24}),
]


def prompt_tokens_by_source(urls: list[str]) -> dict[str, float]:
    """vLLM's own count of prompt tokens by where their KV came from, summed over nodes."""
    out: dict[str, float] = {}
    for url in urls:
        for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("vllm:prompt_tokens_by_source_total"):
                src = line.split('source="')[1].split('"')[0]
                out[src] = out.get(src, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def run_demo(url: str, model: str, kv_addresses: list[str], prefill_urls: list[str]) -> None:
    before = [fetch_pool_status(a).counters for a in kv_addresses]
    sources = prompt_tokens_by_source(prefill_urls)
    for label, body in PROMPTS:
        body = dict(body, model=model, temperature=0)
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        t0 = time.perf_counter()
        r = requests.post(url + path, json=body, stream=bool(body.get("stream")), timeout=120)
        r.raise_for_status()
        print(f"\n== {label} ({path})")
        ttft = None
        if body.get("stream"):
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0].get("delta", {}).get("content") or ""
                ttft = ttft or time.perf_counter() - t0
                print(delta, end="", flush=True)
            print()
        else:
            data = r.json()
            c = data["choices"][0]
            print(c.get("text") or c["message"]["content"])
            print(f"usage: {data['usage']}")
        total = time.perf_counter() - t0
        trace = requests.get(f"{url}/debug/requests/{r.headers['x-kvbridge-request-id']}", timeout=5).json()
        phases = ", ".join(f"{e['phase']}@{e['ms']:.0f}ms" for e in trace["events"])
        conn = trace.get("decode_connector") or {}
        states = ", ".join(f"{k}@{v:.0f}ms" for k, v in conn.get("ms", {}).items())
        print(f"latency {total * 1000:.0f} ms" + (f", first token {ttft * 1000:.0f} ms" if ttft else "")
              + f" | router trace: {phases}" + (f" | decode connector: {states}" if states else ""))
    print("\n== transfer figures (decode connector counters, this demo)")
    for addr, old in zip(kv_addresses, before):
        st = fetch_pool_status(addr)
        delta = {k: v - old.get(k, 0) for k, v in st.counters.items()}
        print(f"{addr}: {delta.get('transfers_scattered', 0)} transfers scattered, "
              f"{delta.get('chunks_received', 0)} chunks, {delta.get('bytes_received', 0) / 1024:.0f} KiB received, "
              f"{delta.get('tokens_scattered', 0)} prompt tokens not recomputed; slots free {st.free}/{st.total}")
    now = prompt_tokens_by_source(prefill_urls)
    print("prefill nodes, prompt tokens by where their KV came from (this demo): " + ", ".join(
        f"{k} {now[k] - sources.get(k, 0):.0f}" for k in sorted(now)) + "  (external_kv_transfer = the store)")
