"""The Grafana dashboard shipped as configs/grafana-dashboard.json, built with grafana-foundation-sdk
(Grafana's own typed builders) so the JSON follows Grafana's schema without hand-kept fields.

`kvbridge render dashboard -o configs/grafana-dashboard.json` regenerates it; tests/test_dashboard.py checks
the shipped file is this module's output and that every query names a metric the code exports.
"""
from __future__ import annotations

import json

from grafana_foundation_sdk.builders import dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
RI = "$__rate_interval"
FINAL = "SENT|SCATTERED|FAILED|EXPIRED|ABORTED"


def _q(p: str, metric: str, by: str = "") -> str:
    """A quantile of a histogram, summed over everything but `by` (and le)."""
    return f"histogram_quantile({p}, sum by (le{', ' + by if by else ''}) (rate({metric}_bucket[{RI}])))"


def _panel(title: str, unit: str, why: str, queries: list[tuple[str, str]], width: int = 12) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).description(why).unit(unit).datasource(DS).height(8).span(width)
    for ref, (expr, legend) in zip("ABCDEFGH", queries):
        panel = panel.with_target(prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref))
    return panel


def _panels() -> list[tuple[str, list[timeseries.Panel]]]:
    return [
        ("Requests through the router", [
            _panel("Time to first token", "s", "From the router receiving a request to the decode answer's first "
                   "byte: prefill, KV transfer and the first decode step.",
                   [(_q(0.5, "kvbridge_router_ttft_seconds"), "p50"), (_q(0.99, "kvbridge_router_ttft_seconds"),
                                                                          "p99")]),
            _panel("Inter-token latency", "s", "Gap between two events of a relayed stream, as the client sees it.",
                   [(_q(0.5, "kvbridge_router_inter_event_seconds"), "p50"),
                    (_q(0.99, "kvbridge_router_inter_event_seconds"), "p99")]),
            _panel("Requests by status", "reqps", "Answers by HTTP status; 429s are admission caps.",
                   [(f"sum by (status) (rate(kvbridge_router_requests_total[{RI}]))", "{{status}}")]),
            _panel("Outstanding requests", "short", "In flight per prefill and decode instance.",
                   [("kvbridge_router_outstanding", "{{kind}} {{backend}}")]),
        ]),
        ("KV transfers", [
            _panel("Transfer time", "s", "From a transfer's first state to SENT (producer) or SCATTERED (consumer).",
                   [(_q(0.5, "kvbridge_transfer_seconds", "role"), "p50 {{role}}"),
                    (_q(0.99, "kvbridge_transfer_seconds", "role"), "p99 {{role}}")]),
            _panel("Push throughput", "Bps", "KV bytes producers posted to decode slots (GB/s at scale).",
                   [(f"sum by (instance) (rate(kvbridge_transfer_pushed_bytes_total[{RI}]))", "{{instance}}")]),
            _panel("Transfer time not hidden behind prefill", "percentunit", "Share of push time spent after the "
                   "prefill's last chunk was staged (the rest overlapped the prefill's compute); near 1, TTFT pays "
                   "the whole transfer.",
                   [(f"sum(rate(kvbridge_push_after_prefill_seconds_sum[{RI}])) / "
                     f'sum(rate(kvbridge_transfer_seconds_sum{{role="producer",state="SENT"}}[{RI}]))', "exposed share"),
                    (_q(0.99, "kvbridge_push_after_prefill_seconds"), "p99 exposed seconds")]),
            _panel("Transfers by final state", "ops", "FAILED and EXPIRED cost a recompute or an error.",
                   [(f'sum by (role, state) (rate(kvbridge_transfer_transitions_total{{state=~"{FINAL}"}}[{RI}]))',
                     "{{role}} {{state}}")]),
            _panel("Slot pool and staging", "percentunit", "Free share of each decode node's receive slots and "
                   "each prefill node's staging; at zero, pushes wait. Slots resting: ended unfilled, waiting until "
                   "no late write can land.",
                   [("kvbridge_router_decode_pool_free", "slots free {{backend}}"),
                    ("kvbridge_router_decode_pool_resting", "slots resting {{backend}}"),
                    ("kvbridge_producer_staging_free_slots / kvbridge_producer_staging_slots",
                     "staging free {{instance}}")]),
        ]),
        ("Placement", [
            _panel("Placement decisions", "ops", "Where each prompt was prefilled (remote: a prefill node, local: "
                   "the decode node) and why (router/placement.py).",
                   [(f"sum by (where, reason) (rate(kvbridge_router_placement_total[{RI}]))", "{{where}} {{reason}}")]),
            _panel("Prefix hits expected and confirmed", "short", "Prompt tokens the chosen node was believed to "
                   "hold against those its reply said it held; a gap means the router's index is stale.",
                   [(f"sum by (kind) (rate(kvbridge_router_prefix_hit_tokens_total[{RI}]))", "{{kind}}")]),
            _panel("Decode leg dispatch", "short", "When disaggregated requests' decode legs went: with_prefill, "
                   "before_prefill_end (to an idle decode node, ahead of the prefill's predicted end) or after_prefill "
                   "(answered before its leg went: that decode admits the request late); and the learned lead scale "
                   "(router/dispatch_lead.py: below 1 when recent prefill legs ran shorter than predicted).",
                   [(f"sum by (order) (rate(kvbridge_router_decode_dispatch_total[{RI}]))", "{{order}}"),
                    ("kvbridge_router_decode_lead_scale", "lead scale {{instance}}")]),
            _panel("Learned rates", "short", "The cost model's rates, learned from completed requests.",
                   [("kvbridge_router_learned_rate", "{{rate}}")]),
            _panel("Placement settings", "short", "Mode (0 auto, 1 always remote, 2 never remote) and the break-even "
                   "prompt tokens below which an idle decode node prefills locally.",
                   [("kvbridge_router_placement_setting", "{{setting}}")]),
        ]),
        ("Prefix store", [
            _panel("Hits and misses per tier", "ops", "Chunk reads per tier; a memory miss may be a disk hit.",
                   [(f"sum by (tier) (rate(kvbridge_store_hits_total[{RI}]))", "hits {{tier}}"),
                    (f"sum by (tier) (rate(kvbridge_store_misses_total[{RI}]))", "misses {{tier}}")]),
            _panel("Hit rate per tier", "percentunit", "What alerts.yaml's KVBridgeStoreHitRateFalling watches.",
                   [(f"sum by (tier) (rate(kvbridge_store_hits_total[{RI}])) / sum by (tier) "
                     f"(rate(kvbridge_store_hits_total[{RI}]) + rate(kvbridge_store_misses_total[{RI}]))", "{{tier}}")]),
            _panel("Tier sizes", "bytes", "Bytes each tier holds.", [("kvbridge_store_used_bytes", "{{tier}} {{instance}}")]),
            _panel("Prompt tokens by outcome", "short", "Saved to, loaded from, or failed to load from the store.",
                   [(f"sum by (outcome) (rate(kvbridge_store_prompt_tokens_total[{RI}]))", "{{outcome}}")]),
        ]),
        ("Health", [
            _panel("Instance state", "short", "0 up, 1 suspect, 2 down, as the router sees each node.",
                   [("kvbridge_router_instance_state", "{{kind}} {{backend}}")]),
            _panel("Restarts", "short", "Process restarts (start time changed) and health flaps seen by the router.",
                   [("changes(process_start_time_seconds[1h])", "restarts {{job}} {{instance}}"),
                    ("changes(kvbridge_router_instance_healthy[1h])", "health flaps {{kind}} {{backend}}"),
                    ("increase(kvbridge_supervisor_restarts_total[1h])", "restarted by kvbridge up {{role}}"),
                    ("kvbridge_supervisor_given_up == 1", "given up {{role}}")]),
        ]),
    ]


def build() -> dict:
    board = (dashboard.Dashboard("kvbridge").uid("kvbridge").tags(["kvbridge", "vllm"]).refresh("30s")
             .time("now-1h", "now").with_variable(dashboard.DatasourceVariable("datasource").type("prometheus")
                                                  .label("Prometheus")))
    for row, panels in _panels():
        board = board.with_row(dashboard.Row(row))
        for p in panels:
            board = board.with_panel(p)
    return board.build()


def render_json() -> str:
    """Stable text (sorted keys, numbered panels) so the shipped file diffs cleanly."""
    data = json.loads(JSONEncoder(sort_keys=True).encode(build()))
    for i, panel in enumerate(data["panels"], start=1):
        panel["id"] = i
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
