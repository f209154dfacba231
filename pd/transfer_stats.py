"""kvbridge's transfers in vLLM's own KV-transfer statistics: its "KV Transfer metrics" log line and
`vllm:kvbridge_*` series on the API server's /metrics, beside vLLM's other engine metrics.

The worker records each transfer that ended since the last step (a decode node its receives, a prefill
node its pushes); vLLM ships the lists to the scheduler with the step's output, adds them up over its log
interval (`aggregate`) and prints `reduce()`; its Prometheus logger hands the same data to `observe`. vLLM asks only
after an engine step: a push that ends after its request did (the usual case) is reported with the prefill
engine's next step.

A push's exposed time is what the prefill did not hide: from the moment its last chunk was staged (the
prompt's last forward had run) to the moment the consumer's slots held every byte. Its share of all push
time says how much of the transfer the prefill's own compute covered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import Histogram
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)
from vllm.v1.metrics.utils import create_metric_per_engine

from transfer.states import State, Transfer

_KEYS = ("recv_seconds", "recv_bytes", "send_seconds", "exposed_seconds", "failed")
_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# also on the connector's own metrics_port, beside kvbridge_transfer_seconds (whose producer SENT sum it divides)
EXPOSED = Histogram("kvbridge_push_after_prefill_seconds", "Push time after the prefill's last chunk was staged: the "
                    "part of a transfer not hidden behind the prefill", buckets=_SECONDS)


@dataclass
class BridgeTransferStats(KVConnectorStats):
    """Lists of observations (serializable, as vLLM sends them between processes)."""

    def __post_init__(self) -> None:
        for key in _KEYS:
            self.data.setdefault(key, [])

    def reset(self) -> None:
        self.data = {key: [] for key in _KEYS}

    def record_receive(self, t: Transfer, nbytes: int) -> None:
        """A consumer-side transfer that ended: scattered (its bytes and time since it was expected) or not."""
        if t.state == State.SCATTERED:
            self.data["recv_seconds"].append(t.times[State.SCATTERED.value] - t.times[State.EXPECTED.value])
            self.data["recv_bytes"].append(nbytes)
        elif t.state in (State.FAILED, State.EXPIRED):
            self.data["failed"].append(1)

    def record_send(self, t: Transfer, last_staged: float | None) -> None:
        """A producer-side transfer that ended; `last_staged` is when its last chunk was staged, if it was."""
        if t.state == State.SENT:
            sent = t.times[State.SENT.value]
            self.data["send_seconds"].append(sent - t.times[State.NEW.value])
            if last_staged is not None:
                self.data["exposed_seconds"].append(max(0.0, sent - last_staged))
                EXPOSED.observe(self.data["exposed_seconds"][-1])
        elif t.state == State.FAILED:
            self.data["failed"].append(1)

    def take(self) -> BridgeTransferStats | None:
        """What was recorded since the last call (None when nothing was), and start over."""
        if self.is_empty():
            return None
        out = BridgeTransferStats(data=self.data)
        self.reset()
        return out

    def is_empty(self) -> bool:
        return not any(self.data[key] for key in _KEYS)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key in _KEYS:
            self.data[key].extend(other.data.get(key, ()))
        return self

    def reduce(self) -> dict[str, int | float]:
        recv_s, recv_b = np.asarray(self.data["recv_seconds"]), np.asarray(self.data["recv_bytes"])
        send_s, exposed = np.asarray(self.data["send_seconds"]), np.asarray(self.data["exposed_seconds"])
        out: dict[str, int | float] = {"Num received transfers": len(recv_s), "Num sent transfers": len(send_s),
                                       "Num failed transfers": len(self.data["failed"])}
        if len(recv_s):
            out["Avg recv time (ms)"] = round(float(recv_s.mean()) * 1e3, 3)
            out["P90 recv time (ms)"] = round(float(np.percentile(recv_s, 90)) * 1e3, 3)
            out["MB received"] = round(float(recv_b.sum()) / 2**20, 3)
        if len(send_s):
            out["Avg send time (ms)"] = round(float(send_s.mean()) * 1e3, 3)
            if len(exposed):
                out["Avg exposed time after prefill (ms)"] = round(float(exposed.mean()) * 1e3, 3)
        return out


class BridgePromMetrics(KVConnectorPromMetrics):
    """`vllm:kvbridge_*` series, one child per engine, as vLLM's Prometheus logger registers them."""

    def __init__(self, vllm_config: Any, metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def per_engine(metric: PromMetric) -> dict[int, PromMetric]:
            return create_metric_per_engine(metric, per_engine_labelvalues)
        self.recv_seconds = per_engine(self._histogram_cls(
            name="vllm:kvbridge_recv_seconds", documentation="kvbridge receives, from expected to scattered",
            buckets=list(_SECONDS), labelnames=labelnames))
        self.recv_bytes = per_engine(self._counter_cls(
            name="vllm:kvbridge_recv_bytes", documentation="KV bytes kvbridge received and scattered",
            labelnames=labelnames))
        self.send_seconds = per_engine(self._histogram_cls(
            name="vllm:kvbridge_send_seconds", documentation="kvbridge pushes, from start to every byte written",
            buckets=list(_SECONDS), labelnames=labelnames))
        self.exposed_seconds = per_engine(self._histogram_cls(
            name="vllm:kvbridge_exposed_seconds", documentation="kvbridge push time after the prefill's last "
            "chunk was staged (not hidden behind the prefill)", buckets=list(_SECONDS), labelnames=labelnames))
        self.failed = per_engine(self._counter_cls(
            name="vllm:kvbridge_failed_transfers", documentation="kvbridge transfers that failed or expired",
            labelnames=labelnames))

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for v in transfer_stats_data.get("recv_seconds", ()):
            self.recv_seconds[engine_idx].observe(v)
        self.recv_bytes[engine_idx].inc(sum(transfer_stats_data.get("recv_bytes", ())))
        for v in transfer_stats_data.get("send_seconds", ()):
            self.send_seconds[engine_idx].observe(v)
        for v in transfer_stats_data.get("exposed_seconds", ()):
            self.exposed_seconds[engine_idx].observe(v)
        self.failed[engine_idx].inc(len(transfer_stats_data.get("failed", ())))
