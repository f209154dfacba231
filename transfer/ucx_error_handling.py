"""UCX's error handling for a node's NIXL agent: `peer` or `none`, meant to be set alike on a deployment's nodes.

A producer in one mode and its consumer in the other still move host memory and still see a killed consumer fail
the next write, on one host (tests/test_ucx_error_handling.py: not measured between GPUs or across hosts), so nodes
there can be switched one at a time; the handshake does not compare the setting.

`peer` (the default): a dead peer fails its transfers instead of hanging them, on the transports that support
it (TCP, InfiniBand, RoCE, cuda_ipc). Between two processes on one host it keeps UCX's shared-memory message
transports (posix, sysv) off, as they refuse it: writes still copy through cma, but NIXL's notifications go
over TCP, and a write posted after one completes only once the receiving process has driven UCX: each chunk's
write waits for the consumer's next look. Measured with bench/transfer_bench.py's contiguous 1 MiB write, the
consumer looking every 0.5 ms: ~0.6-0.7 ms, of which the copy is ~0.1 ms. Where the selected transports
cannot do `peer` at all, the agent falls back to `none` and logs it.

`none`: between processes on one host notifications go through shared memory, and a write completes when its
copy does. Measured on one host, host memory (UCX's cma): a consumer process killed there still fails the
producer's next write (tests/test_ucx_error_handling.py). Not measured across hosts, where UCX may treat a
lost peer as a fatal error: keep `peer` for a decode node on another host (the node warns when its consumer
listens on a routable address with `none`).
"""
from __future__ import annotations

from typing import Literal, get_args

UcxErrorHandling = Literal["peer", "none"]
ERROR_HANDLING: tuple[str, ...] = get_args(UcxErrorHandling)
