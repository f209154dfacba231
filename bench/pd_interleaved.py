"""PD TTFT overhead of kvbridge and of NixlConnector at its best, measured back to back on the same prompts.

bench/pd_bench.py runs each system in its own phase, minutes apart; on a shared 2-core box the load drifts between
phases by more than the overheads it compares (one run measured NixlConnector-best 143 ms *faster* than aggregated
at 2000 tokens). Here every server is up at once — aggregated vLLM (core 0), kvbridge prefill (core 0) + decode
(core 1), NixlConnector-best prefill (core 0) + decode (core 1), pd/nixl_best.py — and each prompt goes to the three
systems (four with `--decode-after`) one after the other, in an order that rotates, so each overhead is a difference
taken within seconds: system TTFT minus aggregated TTFT for the same prompt. Requests run one at a time, `--settle`
seconds apart (an idle server costs the others little: kvbridge's and NixlConnector-best's idle nodes burn about
0.02 of a core, but a vLLM worker busy-polls for 1 s after its last step, on its node's core, and without the pause
whoever follows the aggregated server, which decodes on core 0, paid for it). kvbridge's requests go through its
router (started here; it learns its prefill rates from a few prompts of each length first), which sends an idle decode node
its leg `decode_lead_s` before the prefill leg's predicted end, earlier by what its predictions ran long
(router/dispatch_lead.py); `--kvbridge-dispatch after_prefill|with_prefill`
sends the legs from here instead (bench/core_share.py says why the order matters). NixlConnector-best's legs are
sent from here, as its proxy would, without a router's cost. Stock NixlConnector is left out: its progress
threads spin a core per node, which would slow the others. Prints per length the median overhead of each system, the
ratio kvbridge / NixlConnector-best of those medians, whether every answer equalled aggregated's, and each system's
time per output token. Each overhead is also split in two: the prefill leg's time until it answered minus
aggregated's TTFT (the prompt computed by another server on another core: where most of the spread between prompts
comes from), and the decode's first token after the prefill answered (the part PD itself adds, and the one the two
systems do differently: kvbridge pushed the KV during the prefill, NixlConnector pulls it now).

    python -m bench.pd_interleaved [--lengths 128 1000 2000] [--repeats 6] [--kvbridge-dispatch router]
        [--settle 1.5] [--prefill-connector JSON] [--agg-core 1] [--decode-after 1.5] [--confine-prefills]
        [--confine-decodes] [--confine-aggregated]

`--decode-after S` sleeps S seconds between each PD request's prefill answer and its decode leg, so the decode's
time per output token is timed with its prefill node quiet (that node's worker busy-polls its core for 1 s after its
last step, and on a 2-core box the decode's unpinned threads then share the other core); the TTFT table is then left
out, and a fourth system runs: aggregated vLLM decoding after the same pause, a prompt of the same length computed
before it (`paused_aggregated`): a PD decode node starts decoding after sitting idle while another node computed the
prompt, and the ratio to this control is what is left for the connector. Every per-token ratio is taken prompt by
prompt and printed as a median with its 95 % interval (bench/median_ci.py).

`--confine-prefills` keeps every thread of both prefill nodes on core 0 (bench/confine.py), as separate hosts would:
unconfined, NixlConnector's prefill node, busy for about a second after its decode pulled the KV, takes CPU from its
decode's threads (its answers then come partly in bursts), and kvbridge's prefill node may push from core 1. kvbridge's
router goes to core 0 too: it relays every token, and would otherwise do so on the decode's core.
`--confine-decodes` keeps every thread of both decode nodes on core 1. Unconfined, a decode node whose request waits
for KV (kvbridge's decode leg sent with its prefill leg) steps its engine without pause, and its threads that are
not bound to core 1 may then run on core 0 too. One run, 8 prompts each, kvbridge's prefill leg took 130 ms (1000
tokens) and 259 ms (2000) longer than aggregated's TTFT, and 30 ms and 389 ms with both flags (NixlConnector-best's:
-12 and 86 ms, then 26 and 117 ms): equal at 1000 tokens, not at 2000.
`--confine-aggregated` keeps every thread of the aggregated server on `--agg-core`: unconfined, its API server
streams tokens from the other core while a confined decode node's shares its engine's, and a time per output token
compared across the two is then one core against two. One run with every flag, `--agg-core 1 --decode-after 1.5`,
10 prompts each: kvbridge's time per output token ÷ aggregated's 1.092 [0.921, 1.227] at 1000 tokens and 0.935
[0.904, 1.063] at 2000 (NixlConnector-best's 1.060 and 0.947); one without `--decode-after`, `--agg-core 0`, 8 each:
1.111 [0.867, 1.620] and 1.007 [0.927, 1.239]. Two earlier runs with the aggregated server unconfined: 1.01-1.23.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import requests

from bench.confine import confine
from bench.median_ci import MedianCI, median_ci
from bench.pd_bench import (BEST, MODEL, ExposedTimes, PDAnswer, kvbridge_once, nixl_once, parse_with_decode_after,
                             router_once, start)
from bench.streamed import Streamed, stream_ttft
from launch.local_servers import free_port, start_router, start_vllm
from launch.servers import RouterServer, VllmServer
from router.config import RouterConfig
from launch.tiny_model import make_tiny_model

PD = ("kvbridge", "nixl-best")  # the PD systems: their TTFT is compared with aggregated's
PAUSED = "aggregated after the same pause"  # with --decode-after: see paused_aggregated


def start_side_by_side(tag: str, prefill_connector: dict, metrics_port: int, agg_core: str = "0"
                       ) -> dict[str, VllmServer]:
    """Aggregated vLLM (`agg_core`), kvbridge prefill (core 0) + decode (core 1, its worker's metrics on
    `metrics_port`) and NixlConnector-best prefill (core 0) + decode (core 1), all started, none waited for."""
    def best(role: str, core: str) -> VllmServer:
        return start(f"{tag}-best-{role}", kv_config=BEST, env={"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()),
                                                                 "VLLM_CPU_OMP_THREADS_BIND": core})
    return {"agg": start(f"{tag}-agg", env={"VLLM_CPU_OMP_THREADS_BIND": agg_core}),
            "kp": start_vllm(f"bench-{tag}-kvb-prefill", "prefill", prefill_connector, model=MODEL, max_model_len=4096),
            "kd": start_vllm(f"bench-{tag}-kvb-decode", "decode", {"metrics_port": metrics_port}, model=MODEL,
                             max_model_len=4096),
            "np": best("prefill", "0"), "nd": best("decode", "1")}


def paused_aggregated(url: str, body: dict, pause: float, rng: random.Random) -> Streamed:
    """Aggregated vLLM decoding after the idle pause a PD decode node has: a prompt of the same length computed
    first (and kept in its prefix cache), `pause` seconds of idleness, then the request, which decodes after
    recomputing what the cache did not hold (vLLM keeps whole blocks and recomputes at least the last token: with
    128-token blocks, all of a 128-token prompt, the last 104 of 1000, the last 80 of 2000; a PD decode computes
    one). A PD decode starts on a node that sat idle while another computed the prompt; this control has the pause
    without a connector. Its own prompt: the body's would then be cached for the plain aggregated run."""
    own = dict(body, prompt=[rng.randrange(10, 1000) for _ in body["prompt"]])
    requests.post(url + "/v1/completions", json=dict(own, max_tokens=1), timeout=300).raise_for_status()
    time.sleep(pause)
    return stream_ttft(url, own)


@dataclass
class Length:
    """One prompt length's figures, one entry per prompt, in the order the prompts ran."""
    n: int
    names: list[str]
    over: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in PD})  # TTFT - agg ms
    parts: dict[str, list[tuple[float, float]]] = field(  # (prefill leg - aggregated TTFT, first token after it) ms
        default_factory=lambda: {name: [] for name in PD})
    equal: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PD, 0))
    tpot: dict[str, list[float]] = field(default_factory=dict)  # ms per output token after the first event's
    bursty: dict[str, int] = field(default_factory=dict)  # answers with an event that carried more than one token
    eta: list[float] = field(default_factory=list)  # kvbridge's router: predicted / actual prefill leg time

    def add(self, got: dict) -> None:
        for name in self.names:
            self.tpot.setdefault(name, []).append(got[name].tpot * 1000)
            self.bursty[name] = self.bursty.get(name, 0) + (got[name].held > 0)
        agg_ttft = got["aggregated"].ttft
        for name in self.over:
            self.over[name].append((got[name].ttft - agg_ttft) * 1000)
            prefill_s = got[name].prefill_s
            self.parts[name].append(((prefill_s - agg_ttft) * 1000, (got[name].ttft - prefill_s) * 1000))
            self.equal[name] += got[name].text == got["aggregated"].text
        if got["kvbridge"].predicted_s is not None:
            self.eta.append(got["kvbridge"].predicted_s / got["kvbridge"].prefill_s)

    def paired(self) -> dict[tuple[str, str], MedianCI]:
        """Each system's per-token time over aggregated's, over the paused control's and over NixlConnector-best's,
        prompt by prompt."""
        pairs = [("kvbridge", "aggregated"), ("kvbridge", PAUSED), ("kvbridge", "nixl-best"),
                 ("nixl-best", "aggregated"), ("nixl-best", PAUSED), (PAUSED, "aggregated")]
        return {(num, den): median_ci([x / y for x, y in zip(self.tpot[num], self.tpot[den])])
                for num, den in pairs if num in self.tpot and den in self.tpot}


def print_ttft(rows: list[Length], exposed: ExposedTimes, repeats: int) -> None:
    print(f"\nTTFT over aggregated, same prompts back to back, median of {repeats} per length [95 % interval]")
    print("prompt  kvbridge +ms            NixlConnector-best +ms  kvbridge / best  answers equal (kvbridge, best)  "
          "kvbridge exposed transfer ms")
    for r in rows:
        ex = statistics.median(exposed.by_length[r.n]) if exposed.by_length.get(r.n) else float("nan")
        kc, bc = median_ci(r.over["kvbridge"]), median_ci(r.over["nixl-best"])
        print(f"{r.n:6} {kc.median:7.1f} [{kc.low:.0f}, {kc.high:.0f}] {bc.median:10.1f} [{bc.low:.0f}, {bc.high:.0f}] "
              f"{kc.median / bc.median if bc.median else float('nan'):10.2f}  {r.equal['kvbridge']}/{repeats}, "
              f"{r.equal['nixl-best']}/{repeats}{'':21}{ex:.1f}")
    print("\nthe same overheads in two parts (medians): the prefill leg's time until it answered, minus aggregated's "
          "TTFT (the prompt's compute on another server: most of the spread between prompts), and the decode's first "
          "token after the prefill answered (what PD adds: the KV's move, the decode's scheduling, its first step)")
    print("prompt  prefill leg - aggregated ms (kvbridge / best)  first token after the prefill answered ms "
          "(kvbridge / best; kvbridge / best paired by prompt [95 % interval])")
    for r in rows:
        (kp, ka), (bp, ba) = ([statistics.median(x) for x in zip(*r.parts[name])] for name in PD)
        after = median_ci([k[1] / b[1] for k, b in zip(r.parts["kvbridge"], r.parts["nixl-best"])])
        print(f"{r.n:6} {kp:15.1f} / {bp:7.1f}{'':22}{ka:15.1f} / {ba:7.1f}; {after}")
    if any(r.eta for r in rows):
        print("the router's predicted prefill leg time / the leg's actual time (auto dispatch sends an idle decode "
              "node its leg decode_lead_s before the predicted end, earlier by what they ran long): "
              + ", ".join(f"{r.n} tokens {median_ci(r.eta)}" for r in rows if r.eta))


def print_tpot(rows: list[Length], agg_core: str, repeats: int) -> None:
    print(f"\ntime per output token after the first event's, ms (median; aggregated decodes on core {agg_core}, both "
          "decode nodes on core 1), and each prompt's own ratio to another system's, median [95 % interval]; "
          "'bursts': answers that sent tokens late, several in one event")
    for r in rows:
        print(f"{r.n} tokens (answers equal to aggregated: kvbridge {r.equal['kvbridge']}/{repeats}, "
              f"NixlConnector-best {r.equal['nixl-best']}/{repeats})")
        paired = r.paired()
        for name, ms in r.tpot.items():
            ratios = "  ".join(f"/ {den} {ci}" for (num, den), ci in paired.items() if num == name)
            print(f"  {name:32} {statistics.median(ms):7.2f}  bursts {r.bursty[name]}/{repeats}  {ratios}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 1000, 2000])
    ap.add_argument("--repeats", type=int, default=6, help="prompts per length (6: the fewest whose medians get "
                    "a 95 %% interval)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--kvbridge-dispatch", choices=["router", "after_prefill", "with_prefill"], default="router",
                    help="when kvbridge's decode leg is sent: router sends kvbridge's requests through its router "
                    "(decode_dispatch auto: for requests one at a time, decode_lead_s and what its predictions ran "
                    "long before the prefill leg's predicted end), the others play the router with that decode_dispatch")
    ap.add_argument("--settle", type=float, default=1.5, help="seconds between requests: an idle vLLM worker "
                    "busy-polls for 1 s after its last step, on its node's core, and would slow whoever comes next")
    ap.add_argument("--prefill-connector", type=json.loads, default={},
                    help='extra kvbridge settings for the prefill node, e.g. \'{"gil_switch_interval_ms": 5}\'')
    ap.add_argument("--agg-core", default="0", choices=["0", "1"], help="the aggregated server's core: 0, the "
                    "prefill nodes' (its TTFT computes where theirs do), or 1, the decode nodes' (its time per output "
                    "token is measured where theirs is)")
    ap.add_argument("--confine-prefills", action="store_true", help="every thread of both prefill nodes (and of "
                    "kvbridge's router) on core 0, as separate hosts would keep their work off the decode nodes' core")
    ap.add_argument("--confine-decodes", action="store_true", help="every thread of both decode nodes on core 1, as "
                    "separate hosts would keep a waiting decode engine's steps off the prefills' core")
    ap.add_argument("--confine-aggregated", action="store_true", help="every thread of the aggregated server (its "
                    "API server's too) on --agg-core, so that its time per output token is timed on one core, as the "
                    "decode nodes' with --confine-decodes")
    args = parse_with_decode_after(ap)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.decode_after and args.kvbridge_dispatch == "router":
        args.kvbridge_dispatch = "after_prefill"  # the pause goes between the legs: this bench sends them
    make_tiny_model(MODEL, "bench")
    rng = random.Random(1)
    metrics_port = free_port()
    servers = start_side_by_side("il", args.prefill_connector, metrics_port, args.agg_core)
    exposed = ExposedTimes(f"http://127.0.0.1:{metrics_port}/metrics")
    s = servers
    router: list[RouterServer] = []

    def kvbridge(b: dict) -> PDAnswer:
        if router:
            return router_once(router[0].url, b, exposed)
        return kvbridge_once(s["kp"], s["kd"], b, exposed, args.kvbridge_dispatch, args.decode_after)
    systems = {"aggregated": lambda b: stream_ttft(s["agg"].url, b), "kvbridge": kvbridge,
               "nixl-best": lambda b: nixl_once(s["np"], s["nd"], b, args.decode_after)}
    if args.decode_after:
        own = random.Random(2)  # its prompts: those of the other systems stay the same with or without it
        systems[PAUSED] = lambda b: paused_aggregated(s["agg"].url, b, args.decode_after, own)
    names = list(systems)
    rows = []
    try:
        for srv in servers.values():
            srv.wait_ready(900)
        if args.confine_prefills:
            print(f"confined to core 0: {confine(s['kp'], {0})} threads of kvbridge's prefill node, "
                  f"{confine(s['np'], {0})} of NixlConnector-best's", flush=True)
        if args.confine_decodes:
            print(f"confined to core 1: {confine(s['kd'], {1})} threads of kvbridge's decode node, "
                  f"{confine(s['nd'], {1})} of NixlConnector-best's", flush=True)
        if args.confine_aggregated:
            print(f"confined to core {args.agg_core}: {confine(s['agg'], {int(args.agg_core)})} threads of the "
                  "aggregated server", flush=True)
        if args.kvbridge_dispatch == "router":
            router.append(start_router(RouterConfig(
                port=free_port(), model="tiny", prefill=[{"name": "kp", "url": s["kp"].url}],
                decode=[{"name": "kd", "url": s["kd"].url, "kv_address": s["kd"].handshake}])))
            if args.confine_prefills:  # a router runs on its own host: here, not on the decode node's core
                print(f"confined to core 0: {confine(router[0], {0})} threads of kvbridge's router", flush=True)
            # the router learns its rates from idle prefill legs: a prompt's fixed cost from short ones, the
            # prefill compute's cost (which grows with the prompt's length) from longer ones of each length
            learn = random.Random(3)
            for n in [32] * 3 + sorted(args.lengths) * 4:
                router_once(router[0].url, {"model": "tiny", "prompt": [learn.randrange(10, 1000) for _ in range(n)],
                                            "max_tokens": 8}, exposed)
        warm = {"model": "tiny", "prompt": [rng.randrange(10, 1000) for _ in range(64)], "max_tokens": 2}
        for once in systems.values():
            once(warm)
        turn = 0
        for n in args.lengths:
            row = Length(n, names)
            for _ in range(args.repeats):
                body = {"model": "tiny", "prompt": [rng.randrange(10, 1000) for _ in range(n)],
                        "max_tokens": args.max_tokens, "temperature": 0}
                order = names[turn % len(names):] + names[:turn % len(names)]
                turn += 1
                got = {}
                for name in order:
                    time.sleep(args.settle)
                    got[name] = systems[name](body)
                row.add(got)
            rows.append(row)
            print(f"  {n} tokens: TTFT overhead{' (not comparable: --decode-after)' if args.decode_after else ''} "
                  f"per prompt, kvbridge / NixlConnector-best ms: {[round(x) for x in row.over['kvbridge']]} / "
                  f"{[round(x) for x in row.over['nixl-best']]}; per output token ms "
                  f"{({name: [round(x, 1) for x in v] for name, v in row.tpot.items()})}", flush=True)
    finally:
        for srv in [*router, *servers.values()]:
            srv.stop()
    if not args.decode_after:
        print_ttft(rows, exposed, args.repeats)
    print_tpot(rows, args.agg_core, args.repeats)


if __name__ == "__main__":
    main()
