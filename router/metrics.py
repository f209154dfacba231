"""Router metrics (Prometheus, served on /metrics)."""
from __future__ import annotations

from functools import lru_cache

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

REQUESTS = Counter("kvbridge_router_requests_total", "Requests by endpoint and HTTP status", ["endpoint", "status"])
LATENCY = Histogram("kvbridge_router_request_seconds", "End-to-end request latency", ["endpoint"],
                    buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
TTFT = Histogram("kvbridge_router_ttft_seconds", "From the request's arrival to its answer's first event (streamed) or whole answer read (not streamed)", ["endpoint"],
                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
PREFILL_FAILURES = Counter("kvbridge_router_prefill_failures_total", "Prefill legs that failed", ["action"])
CANCELLED = Counter("kvbridge_router_cancelled_total", "Requests whose client went away")
# A node is named by `backend`, not `instance`: Prometheus sets `instance` to the scraped target (the router) and
# would rename ours `exported_instance`, so every node's series would show the router's address in dashboards.
INSTANCE_HEALTHY = Gauge("kvbridge_router_instance_healthy", "1 if the instance passes health checks",
                         ["kind", "backend"])
OUTSTANDING = Gauge("kvbridge_router_outstanding", "Requests in flight per instance", ["kind", "backend"])
DECODE_POOL_FREE = Gauge("kvbridge_router_decode_pool_free", "Free fraction of a decode connector's slots",
                         ["backend"])
DECODE_POOL_RESTING = Gauge("kvbridge_router_decode_pool_resting", "Fraction of a decode connector's slots resting "
                            "after an unfilled lease until no late write can land (transfer/quarantine.py)",
                            ["backend"])
REJECTED = Counter("kvbridge_router_rejected_total", "Requests refused with 429, by which cap", ["cap"])
RETRIES = Counter("kvbridge_router_retries_total", "Requests re-dispatched before their first byte", ["kind"])
DECODE_DISPATCH = Counter("kvbridge_router_decode_dispatch_total", "Disaggregated requests by when their decode "
                          "leg was sent: with_prefill, before_prefill_end (auto's lead before the prefill's predicted end) or "
                          "after_prefill (router config decode_dispatch)", ["order"])
DECODE_LEAD_SCALE = Gauge("kvbridge_router_decode_lead_scale", "Auto dispatch: the share of a prefill leg's "
                          "predicted time an idle decode node's leg waits before decode_lead_s is taken off (1 until "
                          "enough legs answered; lower when recent legs answered sooner than predicted)")
STREAM_ERRORS = Counter("kvbridge_router_stream_errors_total", "Started streams ended by an upstream failure")
AGGREGATED = Counter("kvbridge_router_aggregated_total", "Requests served on the decode node without a "
                     "prefill leg because transferred KV cannot honour them", ["reason"])
ITL = Histogram("kvbridge_router_inter_event_seconds", "Time between two events of a relayed stream (inter-token "
                "latency as the client sees it)", ["endpoint"],
                buckets=(.001, .0025, .005, .01, .02, .04, .08, .16, .32, .64, 1.28, 5))
INSTANCE_STATE = Gauge("kvbridge_router_instance_state", "0 up, 1 suspect, 2 down", ["kind", "backend"])
PLACEMENT = Counter("kvbridge_router_placement_total", "Placement decisions by where the prompt was prefilled "
                    "(remote: a prefill node, local: the decode node) and why", ["where", "reason"])
LEARNED_RATE = Gauge("kvbridge_router_learned_rate", "The placement cost model's learned rates (chars_per_token, "
                     "prefill_tokens_per_s at a prompt's start, prefill_context_s: what each token of context "
                     "adds to a token's seconds, request_s, shared_load_tokens_per_s, link_bytes_per_s)", ["rate"])
PLACEMENT_SETTING = Gauge("kvbridge_router_placement_setting", "Placement settings in force: mode (0 auto, "
                          "1 always remote, 2 never remote) and the break-even prompt tokens below which an "
                          "idle decode node prefills locally", ["setting"])
PREFIX_HIT_TOKENS = Counter("kvbridge_router_prefix_hit_tokens_total", "Prompt tokens the chosen node was expected "
                            "to hold, and those its reply said it held", ["kind"])


@lru_cache(maxsize=4096)
def child(metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
    """`metric.labels(*labels)`, looked up once per label set: labels() checks and hashes its arguments on every
    call, a few microseconds that each routed request paid about ten times. Emptied when a label set is removed
    (`forget_instance`), so that a node added again under its name gets a child that is exported."""
    return metric.labels(*labels)


def forget_instance(kind: str, name: str) -> None:
    """A removed node's series go with it: a drained node must not show as healthy (or busy) forever."""
    for metric, labels in ((INSTANCE_HEALTHY, (kind, name)), (INSTANCE_STATE, (kind, name)),
                           (OUTSTANDING, (kind, name)), (DECODE_POOL_FREE, (name,)), (DECODE_POOL_RESTING, (name,))):
        try:
            metric.remove(*labels)
        except KeyError:  # never exported (DECODE_POOL_FREE for a prefill node, OUTSTANDING before a request)
            pass
    child.cache_clear()
