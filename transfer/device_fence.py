"""Fences: how the push and receive threads learn that device work queued by the engine has completed.

The engine thread queues a gather (producer) or a scatter (consumer) on its stream and returns; it never
waits for the device. Right after queuing, it records a fence. The producer's push thread posts a chunk
only once the fence recorded after its gather is done; the consumer releases a slot only once the fence
recorded after the scatter that read it is done. On CPU every copy has finished when the call returns, so
the fence is `COMPLETED`; on a GPU it is a CUDA event on the engine's current stream, polled, never waited.
Tests inject fences that complete late to check the contract on machines without a GPU.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch


class Fence(Protocol):
    def done(self) -> bool:
        """True once every device operation queued before the fence was recorded has completed."""


class _Completed:
    def done(self) -> bool:
        return True


COMPLETED: Fence = _Completed()


class CudaFence:
    """A CUDA event recorded on the current stream of `device` when made; `done` queries it."""

    def __init__(self, device: torch.device) -> None:
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(device))

    def done(self) -> bool:
        return self._event.query()


def recorder_for(device: str) -> Callable[[], Fence]:
    """What to call right after queuing device work, for memory on `device` ('cpu', 'cuda:0', ...)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: CudaFence(dev)
    return lambda: COMPLETED
