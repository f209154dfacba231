"""kvbridge's transfer statistics along vLLM's own path: worker -> dict -> scheduler -> logger / Prometheus.

vLLM calls the connector class's `build_kv_connector_stats` on the dict the worker's stats became, adds the
steps of a log interval with `aggregate`, logs `reduce()` and hands each step's dict to the Prometheus
logger's `observe`. These tests run that path with vLLM's own logging class and a private registry.
"""
from __future__ import annotations

from types import SimpleNamespace

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry

from pd.connector import KVBridgeConnector
from pd.transfer_stats import BridgePromMetrics, BridgeTransferStats
from transfer.states import State, Transfer


def _received(seconds: float) -> Transfer:
    t = Transfer("t-recv", "consumer")
    t.to(State.RECEIVED)
    t.to(State.SCATTERED)
    t.times[State.SCATTERED.value] = t.times[State.EXPECTED.value] + seconds
    return t


def _sent(seconds: float) -> Transfer:
    t = Transfer("t-send", "producer")
    for s in (State.ALLOCATING, State.SENDING, State.SENT):
        t.to(s)
    t.times[State.SENT.value] = t.times[State.NEW.value] + seconds
    return t


def _failed() -> Transfer:
    t = Transfer("t-fail", "consumer")
    t.to(State.EXPIRED, "no sign")
    return t


def test_worker_stats_survive_the_trip_to_the_scheduler_and_reduce_to_what_happened():
    worker = BridgeTransferStats()
    assert worker.take() is None, "a step without transfers sends nothing"
    worker.record_receive(_received(0.010), 3 << 20)
    worker.record_receive(_failed(), 0)
    step1 = worker.take()
    assert worker.is_empty()
    t = _sent(0.040)
    worker.record_send(t, last_staged=t.times[State.SENT.value] - 0.015)
    step2 = worker.take()

    # what the scheduler and the logger process rebuild from the dicts the steps travelled as
    total = KVBridgeConnector.build_kv_connector_stats(step1.to_dict())
    total = total.aggregate(KVBridgeConnector.build_kv_connector_stats(step2.to_dict()))
    r = total.reduce()
    assert r["Num received transfers"] == 1 and r["Num sent transfers"] == 1 and r["Num failed transfers"] == 1
    assert r["MB received"] == 3.0
    assert r["Avg recv time (ms)"] == pytest.approx(10.0, abs=1e-3)
    assert r["Avg send time (ms)"] == pytest.approx(40.0, abs=1e-3)
    assert r["Avg exposed time after prefill (ms)"] == pytest.approx(15.0, abs=1e-3)


def test_vllm_logging_class_prints_kvbridge_transfers(monkeypatch):
    from vllm.distributed.kv_transfer.kv_connector.v1 import metrics
    monkeypatch.setattr(metrics.KVConnectorFactory, "get_connector_class", lambda cfg: KVBridgeConnector)
    logging_ = metrics.KVConnectorLogging(SimpleNamespace(kv_connector="KVBridgeConnector"))
    stats = BridgeTransferStats()
    stats.record_receive(_received(0.002), 1 << 20)
    logging_.observe(stats.to_dict())
    logging_.observe(stats.to_dict())   # a second step's dict, the same transfer once more
    lines = []
    logging_.log(lambda fmt, *args: lines.append(fmt % args))
    assert len(lines) == 1 and "Num received transfers=2" in lines[0] and "MB received=2.0" in lines[0], lines


def test_prometheus_series_count_bytes_and_failures_per_engine(monkeypatch):
    registry = CollectorRegistry()
    kinds = {cls: (lambda c: lambda *a, **kw: c(*a, registry=registry, **kw))(cls)
             for cls in (prometheus_client.Counter, prometheus_client.Gauge, prometheus_client.Histogram)}
    prom = BridgePromMetrics(SimpleNamespace(kv_transfer_config=None), kinds, ["engine"], {0: ["0"], 1: ["1"]})
    stats = BridgeTransferStats()
    stats.record_receive(_received(0.020), 5000)
    stats.record_receive(_failed(), 0)
    prom.observe(stats.to_dict(), engine_idx=1)
    get = registry.get_sample_value
    assert get("vllm:kvbridge_recv_bytes_total", {"engine": "1"}) == 5000
    assert get("vllm:kvbridge_recv_bytes_total", {"engine": "0"}) == 0
    assert get("vllm:kvbridge_failed_transfers_total", {"engine": "1"}) == 1
    assert get("vllm:kvbridge_recv_seconds_count", {"engine": "1"}) == 1
