"""The router's tasks that outlive what started them, kept until they end and cancelled at shutdown.

A prefill leg left to answer on its own (its decode node already scattered the KV), a question to a decode
connector, a transfer's cancel, a control message its connection did not take at once (router/control_channel.py):
the event loop holds tasks only weakly, so each is kept here until done. At shutdown the proxy's are cancelled
before the legs' connections close: a leg ended by that close would fail as its node's fault ("the router closed
the connection"), logged as a failed prefill and counted against a healthy node.
"""
from __future__ import annotations

import asyncio
from typing import Coroutine


class Background:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def keep(self, work: Coroutine) -> asyncio.Task:
        """`work` run as a task, held until it ends."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def cancel(self) -> None:
        """Cancel what is still running, without waiting for it to end."""
        for task in self._tasks:
            task.cancel()

    async def cancel_all(self) -> None:
        """Cancel what is still running and wait until each has ended."""
        tasks = list(self._tasks)
        self.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
