"""A kvbridge producer in its own process, so a test can freeze it (SIGSTOP) mid-transfer like a peer
stalled by swap or a debugger, and let it go on (SIGCONT) after its lease expired.

    python -m tests.producer_proc CONSUMER KEY NUM_TOKENS TOKEN_HASH WEIGHTS_FINGERPRINT LEASE_TTL_S
stdin "stage C\\n" stages chunk C with random bytes; "wait\\n" prints the transfer's final state and reason.
"""
from __future__ import annotations

import sys
import time

import torch

from transfer.identity import TransferSpec
from transfer.layout import KVLayout
from transfer.producer import Producer, ProducerSettings

TINY = KVLayout(model_id="tiny", num_layers=2, num_kv_heads=2, kv_heads_per_rank=2, head_size=32, content_size=64,
                dtype="float32", kv_cache_dtype="float32", block_size=128,
                cache_layout="LBHNC")


def main() -> None:
    consumer, key, num_tokens, token_hash, weights, ttl = sys.argv[1:7]
    layout = TINY.model_copy(update={"weights_fingerprint": weights})
    p = Producer(layout, 256, ProducerSettings(producer_id="stalling-producer", lease_ttl_s=float(ttl),
                                               write_margin_s=0.3))
    tid = p.begin(TransferSpec(key, int(num_tokens), token_hash), consumer)
    print("begun", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "stage":
            nbytes = p.geometry.chunk_nbytes(int(num_tokens), int(cmd[1]))
            ok = p.stage(tid, int(cmd[1]), lambda v: v[:nbytes].copy_(torch.randn(nbytes // 4).view(torch.uint8))
                         .numel())
            print(f"staged {ok}", flush=True)
        elif cmd[0] == "wait":
            end = time.monotonic() + 15
            while not (done := p.take_finished()) and time.monotonic() < end:
                time.sleep(0.05)
            print(f"final {done[0].state.value if done else 'NONE'} {done[0].reason if done else ''}", flush=True)
            break
    p.close()


if __name__ == "__main__":
    main()
