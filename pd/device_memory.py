"""What kvbridge holds in GPU memory outside vLLM's KV cache, said once at start-up.

vLLM sizes its KV cache to `gpu_memory_utilization` before the connector allocates anything, so consumer
slots, producer staging and the store's scratch chunk come on top of it: the operator needs that figure
to leave the headroom (or to move a decode node's slots to pinned host memory).
"""
from __future__ import annotations

import logging

import torch

from transfer.nixl_agent import Region

log = logging.getLogger("kvbridge.worker")


def report_device_memory(device: torch.device, slots: Region | None, staging: Region | None,
                         scratch_bytes: int = 0) -> None:
    if device.type != "cuda":
        return
    held = {name: r.nbytes for name, r in (("consumer slots", slots), ("producer staging", staging))
            if r is not None and r.mem_type == "VRAM"}
    if scratch_bytes:
        held["store scratch chunk"] = scratch_bytes
    total = torch.cuda.get_device_properties(device).total_memory
    gib = sum(held.values()) / 2**30
    log.info("kvbridge holds %.2f GiB of GPU memory outside vLLM's KV cache (%.1f%% of %s; %s): leave that much "
             "headroom under gpu_memory_utilization, or set slot_memory: host on a decode node", gib,
             100 * gib * 2**30 / total, device, ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in held.items()))
