"""PD across hosts: prefill, decode and router in three network namespaces on one box, joined by
shaped veth links; KV moves over TCP (UCX_TLS=tcp) and every control message is signed."""
from __future__ import annotations

import pytest

from launch.polling import wait_for
from launch.tiny_prompts import random_token_prompt
from tests.pd_client import text_of

MAX_TOKENS = 12


@pytest.fixture
def pools_full_after(hosts):
    """Every test leaves the decode's slot pool and the producer's staging full, and no transfer held."""
    yield
    def full() -> bool:
        st, m = hosts.pool_status(), hosts.producer_metrics()
        return (st.free == st.total and m.get("kvbridge_producer_active_transfers") == 0 and
                m.get("kvbridge_producer_staging_free_slots") == m.get("kvbridge_producer_staging_slots"))
    try:
        wait_for(full, 15, interval=0.5)
    except TimeoutError:
        raise AssertionError(f"not back to full: {hosts.pool_status()} {hosts.producer_metrics()}") from None


def answers_equal(hosts, n: int, seed: int) -> None:
    body = {"model": "tiny", "prompt": random_token_prompt(n, seed=seed), "max_tokens": MAX_TOKENS, "temperature": 0}
    code, want = hosts.reference("/v1/completions", body)
    assert code == 200, want
    before = hosts.pool_status().counters.get("tokens_scattered", 0)
    code, got = hosts.post("/v1/completions", body)
    assert code == 200, got
    assert text_of(got) == text_of(want)
    assert hosts.pool_status().counters["tokens_scattered"] - before == n


@pytest.mark.usefixtures("pools_full_after")
@pytest.mark.parametrize("n", [300, 1000])
def test_pd_across_hosts_equals_aggregated(hosts, n):
    """The decode listens on its host's address (signed control plane), the router and the prefill
    reach it only over their links, and the KV of the whole prompt arrives over TCP."""
    assert hosts.decode.handshake.startswith("198.18.")
    answers_equal(hosts, n, seed=n)
