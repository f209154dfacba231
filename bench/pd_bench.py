"""PD TTFT overhead, kvbridge vs vLLM's own NixlConnector, both over aggregated serving, in one run.

Phases on this machine, same model and prompts: (1) one aggregated vLLM; (2) kvbridge prefill + decode, the legs sent
as the router does (`--kvbridge-dispatch`); (3) NixlConnector prefill + decode in its stock configuration (NIXL), and (4)
"nixl-best" (BEST), NixlConnector in its best configuration here, both sequential as vLLM's proxy does (prefill answers
with the pull handle, then decode pulls). TTFT is measured to the first streamed token; each point is
the median of repeats. Tokens of every PD answer are checked against the aggregated answer; kvbridge's overhead
is also printed as a ratio to NixlConnector-best's.

Stock NixlConnector (as vLLM creates it) spins a core per node even when idle (NIXL's progress thread, about 0.95 of
a core each, bench/nixl_probe.py), and on CPU its worker pins its main thread, which runs the model's compute, to
the last core, so prefill and decode compute both land on core 1 whatever VLLM_CPU_OMP_THREADS_BIND says.
NixlConnector-best (pd/nixl_best.py, loaded as the connector module; only the NIXL agent's settings and the core
binding differ): progress thread off, `num_threads` 0 (no UCX worker threads; the engines' own per-step polling
drives UCX), UCX's copy segment kvbridge's agents use (UCX_CMA_SEG_SIZE=64m), and the core binding kvbridge's nodes
have (prefill core 0, decode core 1). Idle it burns 0.02 of a core per node, and it ran 21 of 21 sequential
128–2000-token requests. With the progress thread off but vLLM's own pinning kept, requests stalled within five in
each of five probe runs: both workers sat on core 1, where the decode worker busy-steps while it waits for KV, and
the stalled prefill worker was runnable but got no CPU (likely why an earlier attempt here hung). Each NixlConnector
row prints both legs' times. For kvbridge each request also prints its exposed transfer time (the decode's
kvbridge_exposed_transfer_seconds: end of the prefill's last forward to the decode being able to schedule the
request), read from the decode worker's metrics endpoint.

    python bench/pd_bench.py [--lengths 128 1000 2000] [--repeats 5] [--agg-core 1 --decode-after 1.5]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import requests

from bench.streamed import stream_ttft
from launch.local_servers import MODEL_DIR, free_port, start_vllm
from launch.servers import VllmServer
from launch.tiny_model import make_tiny_model
from router.leg_bodies import decode_body, prefill_body

MODEL = MODEL_DIR.parent / "bench"
NIXL = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu",
        "kv_load_failure_policy": "recompute"}  # vLLM's NixlConnector as shipped
BEST = dict(NIXL, kv_connector_module_path="pd.nixl_best", kv_connector_extra_config={"num_threads": 0})


def start(name: str, role: str = "aggregated", kv_config: dict | None = None,
          env: dict | None = None) -> VllmServer:
    """A bench server on the bench model; `kv_config` runs an aggregated-role vLLM with that connector."""
    args = ("--kv-transfer-config", json.dumps(kv_config)) if kv_config else ()
    return start_vllm(f"bench-{name}", role, model=MODEL, max_model_len=4096, env=env, vllm_args=args)


class PDAnswer(NamedTuple):
    """One request through a PD system's two legs."""
    ttft: float  # seconds from the first leg's start to the first streamed token, without a --decode-after pause
    text: str
    tpot: float  # seconds per output token after the first event's
    prefill_s: float  # the prefill leg's own time, until it answered
    held: int  # the decode's events that carried more than one token (Streamed.held)
    predicted_s: float | None = None  # the router's prediction of the prefill leg's time (auto dispatch times by it)


class ExposedTimes:
    """Per request, the decode worker's exposed transfer time: the change in its histogram's sum across one
    request (requests run one at a time), grouped by prompt length."""

    def __init__(self, metrics_url: str) -> None:
        self.url = metrics_url
        self.by_length: dict[int, list[float]] = {}

    def read(self) -> tuple[float, float]:
        text = requests.get(self.url, timeout=10).text
        got = dict(re.findall(r"^kvbridge_exposed_transfer_seconds_(sum|count) ([\d.e+-]+)$", text, re.M))
        return float(got.get("sum", 0)), float(got.get("count", 0))

    def record(self, n_tokens: int, before: tuple[float, float]) -> None:
        (s0, c0), (s1, c1) = before, self.read()
        if c1 == c0 + 1:
            self.by_length.setdefault(n_tokens, []).append((s1 - s0) * 1000)
            print(f"    kvbridge exposed transfer time: {(s1 - s0) * 1000:.2f} ms", flush=True)


def kvbridge_once(p: VllmServer, d: VllmServer, body: dict, exposed: ExposedTimes,
                  dispatch: str = "after_prefill", gap: float = 0.0) -> PDAnswer:
    """One request through kvbridge's two legs, sent as the router does (`decode_dispatch`): requests here run
    one at a time, so the router's `auto` sends the decode leg after the prefill leg answered; `with_prefill`
    sends both at once. TTFT is counted from the first leg's start, without `gap`: seconds slept between the
    legs (after_prefill only), so the decode leg's tokens are timed with the prefill node quiet."""
    import concurrent.futures as cf
    before = exposed.read()
    tid = uuid.uuid4().hex
    pre, dec = prefill_body(body, tid, d.handshake), decode_body(body, tid)
    def prefill_leg() -> float:
        t0 = time.perf_counter()
        requests.post(p.url + "/v1/completions", json=pre, timeout=300).raise_for_status()
        return time.perf_counter() - t0
    if dispatch == "after_prefill":
        leg_s = prefill_leg()
        time.sleep(gap)
        got = stream_ttft(d.url, dec)
        ttft = got.ttft + leg_s
    else:
        with cf.ThreadPoolExecutor(1) as ex:
            f = ex.submit(prefill_leg)
            got = stream_ttft(d.url, dec)
            ttft, leg_s = got.ttft, f.result()
    print(f"    kvbridge leg times ({dispatch}): prefill {leg_s * 1000:.1f} ms, decode TTFT {ttft * 1000:.1f} ms "
          "from the first leg's start", flush=True)
    exposed.record(len(body["prompt"]), before)
    return PDAnswer(ttft, got.text, got.tpot, leg_s, got.held)


def router_once(router_url: str, body: dict, exposed: ExposedTimes) -> PDAnswer:
    """One request through kvbridge's router, whose `decode_dispatch` decides when the decode leg goes; the
    prefill leg's time is the router's (its trace's `prefill_done`)."""
    before = exposed.read()
    got = stream_ttft(router_url, body)
    for _ in range(50):  # a short answer may end before its prefill leg's reply
        trace = requests.get(f"{router_url}/debug/requests/{got.request_id}", timeout=10).json()
        at = {e["phase"]: e for e in trace["events"]}
        if "prefill_done" in at:
            break
        time.sleep(0.1)
    else:
        raise RuntimeError(f"kvbridge's prefill leg did not answer: {trace['events']}")
    dispatched = at["decode_dispatched"]["detail"] if "decode_dispatched" in at else "with the prefill leg"
    eta = trace["placement"][-1]["prefill_eta_s"]
    print(f"    kvbridge via its router: prefill leg {at['prefill_done']['ms']:.1f} ms (predicted "
          f"{'-' if eta is None else round(eta * 1000, 1)}), "
          f"decode leg sent {dispatched}, TTFT {got.ttft * 1000:.1f} ms", flush=True)
    exposed.record(len(body["prompt"]), before)
    return PDAnswer(got.ttft, got.text, got.tpot, at["prefill_done"]["ms"] / 1000, got.held, eta)


def nixl_prefill(p: VllmServer, body: dict) -> dict:
    """NixlConnector's prefill leg, as its proxy sends it: the kv_transfer_params its decode leg pulls with."""
    none = dict.fromkeys(("remote_engine_id", "remote_block_ids", "remote_host", "remote_port"))
    pre = dict(body, max_tokens=1, kv_transfer_params=dict(none, do_remote_decode=True, do_remote_prefill=False))
    r = requests.post(p.url + "/v1/completions", json=pre, timeout=120)
    r.raise_for_status()
    if not (params := r.json().get("kv_transfer_params")):
        raise RuntimeError(f"NixlConnector's prefill node gave no kv_transfer_params (log: {p.log_path})")
    return params


def nixl_once(p: VllmServer, d: VllmServer, body: dict, gap: float = 0.0) -> PDAnswer:
    """One request through NixlConnector's two legs; `gap` as for kvbridge_once."""
    t0 = time.perf_counter()
    params = nixl_prefill(p, body)
    prefill_s = time.perf_counter() - t0
    time.sleep(gap)
    got = stream_ttft(d.url, dict(body, kv_transfer_params=params))
    print(f"    nixl leg times: prefill {prefill_s * 1000:.1f} ms, decode TTFT {got.ttft * 1000:.1f} ms", flush=True)
    return PDAnswer(prefill_s + got.ttft, got.text, got.tpot, prefill_s, got.held)


def run_phase(label: str, servers: list, once, bodies: dict, repeats: int) -> dict:
    for s in servers:
        s.wait_ready(900)
    out = {}
    try:
        once(bodies["warmup"][0])
        for n, variants in bodies.items():
            if n == "warmup":
                continue
            runs = [once(b) for b in variants[:repeats]]  # fresh prompts: no prefix-cache hits
            out[n] = {"ttft_ms": statistics.median(r.ttft for r in runs) * 1000, "texts": [r.text for r in runs],
                      "tpot_ms": statistics.median(r.tpot for r in runs) * 1000}
            print(f"  {label:10} {n:5} tokens: TTFT {out[n]['ttft_ms']:.1f} ms, per output token "
                  f"{out[n]['tpot_ms']:.2f} ms, answers with tokens sent in bursts {sum(r.held > 0 for r in runs)}"
                  f"/{len(runs)}", flush=True)
    finally:
        for s in servers:
            s.stop()
    return out


def nixl_phase(label: str, kv: dict, bodies: dict, repeats: int, gap: float = 0.0) -> dict:
    """NixlConnector prefill (core 0) + decode (core 1) with the kv-transfer-config `kv`; {} if it fails."""
    p, d = (start(f"{label}-{role}", kv_config=kv, env={"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()),
                                                        "VLLM_CPU_OMP_THREADS_BIND": core})
            for role, core in (("prefill", "0"), ("decode", "1")))
    try:
        return run_phase(label, [p, d], lambda b: nixl_once(p, d, b, gap), bodies, repeats)
    except requests.RequestException as e:  # the table still shows what the other phases measured
        print(f"  {label} phase failed: {type(e).__name__}: {e} (logs: {p.log_path}, {d.log_path})")
        return {}


def parse_with_decode_after(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments, with `--decode-after` added and checked against `--kvbridge-dispatch` (which `ap` has)."""
    ap.add_argument("--decode-after", type=float, default=0.0, help="seconds between a PD request's prefill answer "
                    "and its decode leg: per-token times with the prefill node quiet (its worker busy-polls its core "
                    "for 1 s after its last step); keep it well under the decode's unclaimed_ttl_s (30 s)")
    args = ap.parse_args()
    if args.decode_after and args.kvbridge_dispatch == "with_prefill":  # the pause would apply to NixlConnector only
        ap.error("--decode-after needs the decode leg sent after the prefill answered "
                 "(--kvbridge-dispatch after_prefill)")
    return args


def push_times_ms(log_path: Path) -> list[float]:
    pat = re.compile(r"producer \S+ -> SENT \{.*'SENDING': ([\d.]+), 'SENT': ([\d.]+)\}")
    return [float(b) - float(a) for a, b in pat.findall(log_path.read_text(errors="replace"))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 1000, 2000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--skip-nixl", action="store_true", help="aggregated and kvbridge only")
    ap.add_argument("--decode-connector", type=json.loads, default={},
                    help='extra kvbridge settings for the decode node, e.g. \'{"gil_switch_interval_ms": 0.5}\'')
    ap.add_argument("--prefill-connector", type=json.loads, default={}, help="extra kvbridge settings for the prefill node")
    ap.add_argument("--kvbridge-dispatch", choices=["after_prefill", "with_prefill"], default="after_prefill",
                    help="when kvbridge's decode leg is sent (the router's decode_dispatch; auto is after_prefill "
                    "for requests one at a time)")
    ap.add_argument("--agg-core", default="0", help="the aggregated server's core: 0 is the prefill node's (TTFT "
                    "compares), 1 the decode node's (per-token time compares on the same core)")
    args = parse_with_decode_after(ap)
    make_tiny_model(MODEL, "bench")
    rng = random.Random(0)
    def body(n: int) -> dict:
        return {"model": "tiny", "prompt": [rng.randrange(10, 1000) for _ in range(n)], "max_tokens": args.max_tokens,
                "temperature": 0}
    bodies = {**{n: [body(n) for _ in range(args.repeats)] for n in args.lengths}, "warmup": [body(64)]}
    print("phase 1: aggregated")
    # One core each for prefill and decode compute, as two nodes would have; aggregated gets core 0.
    agg = start("agg", env={"VLLM_CPU_OMP_THREADS_BIND": args.agg_core})
    base = run_phase("aggregated", [agg], lambda b: stream_ttft(agg.url, b), bodies, args.repeats)
    print("phase 2: kvbridge (push)")
    kp = start_vllm("bench-kvb-prefill", "prefill", args.prefill_connector, model=MODEL, max_model_len=4096)
    decode_connector = {"metrics_port": free_port(), **args.decode_connector}
    kd = start_vllm("bench-kvb-decode", "decode", decode_connector, model=MODEL, max_model_len=4096)
    exposed = ExposedTimes(f"http://127.0.0.1:{decode_connector['metrics_port']}/metrics")
    ours = run_phase("kvbridge", [kp, kd], lambda b: kvbridge_once(kp, kd, b, exposed, args.kvbridge_dispatch,
                                                                   args.decode_after), bodies, args.repeats)
    pushes = push_times_ms(kp.log_path)
    hooks = [total for total, _ in hook_lines(kd.log_path).get("Worker", [])]
    theirs, best = {}, {}
    if not args.skip_nixl:
        print("phase 3: NixlConnector (pull), stock configuration")
        theirs = nixl_phase("nixl", NIXL, bodies, args.repeats, args.decode_after)
        print("phase 4: NixlConnector (pull), best configuration here (pd/nixl_best.py)")
        best = nixl_phase("nixl-best", BEST, bodies, args.repeats, args.decode_after)
    nan = {"ttft_ms": float("nan"), "tpot_ms": float("nan"), "texts": None}
    if args.decode_after:
        print(f"\n(--decode-after {args.decode_after}: the PD TTFT columns and kvbridge's exposed transfer times "
              "below are not comparable, KV landed during the pause; the equal-tokens column and the per-token "
              "table are)")
    print("\nprompt  agg TTFT  kvbridge +ms  NixlConnector +ms  NixlConnector-best +ms  ratio to best  "
          "tokens equal (ours, stock, best)")
    for n in args.lengths:
        a, o = base[n]["ttft_ms"], ours[n]["ttft_ms"]
        t, b = theirs.get(n, nan), best.get(n, nan)
        print(f"{n:6} {a:9.1f} {o - a:13.1f} {t['ttft_ms'] - a:18.1f} {b['ttft_ms'] - a:23.1f} "
              f"{(o - a) / (b['ttft_ms'] - a) if b['ttft_ms'] != a else float('nan'):14.2f}  "
              f"{ours[n]['texts'] == base[n]['texts']}, {t['texts'] == base[n]['texts']}, "
              f"{b['texts'] == base[n]['texts']}")
    print("\nper output token after the first (ms, median): prompt  aggregated  kvbridge decode (ratio)  "
          "NixlConnector decode (ratio)  NixlConnector-best decode (ratio)")
    for n in args.lengths:
        a, o = base[n]["tpot_ms"], ours[n]["tpot_ms"]
        t, b = theirs.get(n, nan)["tpot_ms"], best.get(n, nan)["tpot_ms"]
        print(f"{n:6} {a:10.2f} {o:10.2f} ({o / a:4.2f}) {t:10.2f} ({t / a:4.2f}) {b:10.2f} ({b / a:4.2f})")
    for n in args.lengths:
        if exposed.by_length.get(n):
            print(f"kvbridge exposed transfer time, {n} tokens: median {statistics.median(exposed.by_length[n]):.2f} ms "
                  f"({len(exposed.by_length[n])} requests)")
    if pushes:
        print(f"kvbridge push time per request (producer SENDING->SENT): median {statistics.median(pushes):.1f} ms")
    if hooks:
        print(f"kvbridge decode node, connector hooks per engine step (worker): median {statistics.median(hooks):.1f} us")


HOOK_LINE = re.compile(r"\((Worker|EngineCore)[^)]*\).*connector hooks: ([\d.]+) us/step over \d+ steps \((.*?)\)")


def hook_lines(log: Path, offset: int = 0) -> dict[str, list[tuple[float, dict[str, float]]]]:
    """process kind (Worker | EngineCore) -> [(us per step, {hook: us per step})]: the periodic 'connector
    hooks' lines (pd/hook_timer.py) of a server's log after byte `offset`."""
    out: dict[str, list] = {}
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    for kind, total, parts in HOOK_LINE.findall(text):
        per = {h: float(us) for h, us in (p.rsplit(" ", 1) for p in parts.split(", "))}
        out.setdefault(kind, []).append((float(total), per))
    return out


if __name__ == "__main__":
    main()
