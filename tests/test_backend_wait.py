"""A wait on a backend ends at its timeout or at the node's abandonment, as a failure that names the node; a
cancel that is not its own (the client leaving) stays a cancel; nothing of it outlives the block."""
from __future__ import annotations

import asyncio

import pytest

from router.backend_wait import ABANDONED, BackendWait
from router.config import Instance
from router.failures import UpstreamFailure
from router.registry import Backend


def node() -> Backend:
    return Backend(Instance(name="decode-0", url="http://127.0.0.1:1"), "decode")


async def test_a_wait_past_its_timeout_fails_naming_the_node():
    with pytest.raises(UpstreamFailure) as e:
        with BackendWait(node(), 0.05):
            await asyncio.sleep(5)
    assert (e.value.backend, e.value.why) == ("decode-0", "timed out")


async def waiting(b: Backend) -> asyncio.Task:
    """A task inside a long wait on `b`."""
    async def wait() -> None:
        with BackendWait(b, 30):
            await asyncio.sleep(30)
    task = asyncio.create_task(wait())
    while not b.watchers:  # inside the wait
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    return task


async def test_a_wait_on_a_node_abandoned_fails_at_once_saying_it_went_down():
    b = node()
    task = await waiting(b)
    b.abandon_waiters(0.005)  # it has waited 10 ms
    with pytest.raises(UpstreamFailure) as e:
        await asyncio.wait_for(task, 1)
    assert (e.value.backend, e.value.why) == ("decode-0", ABANDONED)


async def test_abandonment_leaves_a_wait_younger_than_it_asks_alone():
    b = node()
    task = await waiting(b)
    b.abandon_waiters(1.0)  # it has waited 10 ms: a stream's wait for its next event while events flow
    await asyncio.sleep(0.05)
    assert not task.done()
    b.abandon_waiters(0.0)
    with pytest.raises(UpstreamFailure):
        await asyncio.wait_for(task, 1)


@pytest.mark.parametrize("order", [["client"], ["abandon", "client"], ["client", "abandon"]])
async def test_a_cancel_from_elsewhere_stays_a_cancel_even_when_the_wait_ended_too(order):
    b = node()
    task = await waiting(b)
    for who in order:  # both before the task runs again
        task.cancel() if who == "client" else b.abandon_waiters(0.0)
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_after_the_block_neither_the_timer_nor_the_watcher_reaches_the_task():
    b = node()
    with BackendWait(b, 0.02):
        await asyncio.sleep(0)
    assert not b.watchers
    b.abandon_waiters(0.0)
    await asyncio.sleep(0.05)  # past the timeout: a live timer would cancel this task here
    assert asyncio.current_task().cancelling() == 0
