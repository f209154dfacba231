"""How a consumer endpoint receives: its slots, listener, security, and how often its thread looks at the wire."""
from __future__ import annotations

from dataclasses import dataclass

from transfer.ucx_error_handling import UcxErrorHandling


@dataclass(frozen=True)
class ConsumerSettings:
    chunk_tokens: int
    num_slots: int
    host: str = "127.0.0.1"
    port: int = 0
    secret: bytes | None = None
    insecure: bool = False  # a routable listener without a secret starts (with a warning) instead of refusing
    device: str = "cpu"  # where the slots live: "cpu", "cuda:N", or "pinned" host memory
    ucx_error_handling: UcxErrorHandling = "peer"  # ucx_error_handling.py
    quarantine_s: float = 2.0
    fence_timeout_s: float = 30.0  # quarantine.py: how long at least an ended lease's slots wait for a silent fence
    unclaimed_ttl_s: float = 30.0
    handshake_grace_s: float = 4.0  # answered_notices.py: how long a prefill node's first contact lasts
    expect_wait_s: float = 0.0  # >0: an ALLOC before its decode request waits this long to learn the held chunks
    window_slots: int = 0  # most slots one transfer holds (larger ones stream through them); 0: the whole pool
    busy_poll_s: float = 0.0005  # while a scatter still reads a slot (GPU)
    # After a chunk landed, while a lease still waits for more, look every stream_poll_s for spin_s (the next
    # chunk completes only once the endpoint's thread drives NIXL). It used to poll without pause, and the
    # engine thread beside it lost its core and interpreter meanwhile: 8 decodes running while a 400-token
    # transfer arrived every 1.5 s (bench/decode_under_arrivals.py, one run) took 78 / 182 ms per token (median /
    # p90) spinning, 53 / 68 ms pausing (aggregated vLLM prefilling the same arrivals: 62-63 / 89-103 ms), and
    # the transfer itself was no slower (bench/exposed_bench.py: last chunk staged -> complete 8-10 ms both ways).
    spin_s: float = 0.02
    # ... and for idle_spin_s after it while the engine sits idle waiting for the rest of a transfer under way
    # (nothing of its own to slow down): a chunked prefill's next forward, or the last group of layers its
    # forward pushes, comes later than spin_s, and its write (which completes only as this thread looks) and
    # then its notice each waited for a lease_poll_s look. bench/exposed_bench.py, the last of 4 chunks staged
    # 50 ms after the others, last staged -> seen complete, median of 30, in 3 runs: 8.1-10.0 ms with spin_s
    # alone, 2.5-3.0 ms so (all 4 staged at once, which spin_s covers: 5.3-9.3 and 3.8-6.0 ms). Bounded: looking
    # every stream_poll_s costs this thread ~7 % of a core (measured: 0.75 s in 10.5 s), maybe the prefill's core.
    idle_spin_s: float = 0.1
    stream_poll_s: float = 0.0005
    # A granted lease may wait a whole prefill forward for its first chunk; polling it every busy_poll_s took the
    # engine thread's interpreter lock ~2000 times a second, and running decodes slowed by a fifth meanwhile
    lease_poll_s: float = 0.005
    idle_poll_s: float = 0.05
