"""Instance registry: each backend is up, suspect or down, and only backend failures move it.

One failed request makes an instance *suspect*: requests go to up instances while there are any,
and to a suspect one when it is all there is (removing the last instance of a kind on one error
would turn one glitch into an outage). `down_after_failures` consecutive failed requests, or
`unhealthy_after` failed health checks, take it *down*; a passing health check brings it back.
A node that stays down by its health checks for `abandon_after_s` has what has waited on it that long
cancelled (router/backend_wait.py), so no request hangs on a node that vanished without closing its
connections; the grace keeps a node that is only slow to answer /health under load from losing
its in-flight requests (a node that really died closes its connections, which fails them at once).

Each node is checked on its own schedule (one task per node), so a node whose /health hangs delays only its own
next check, never another node's return to service or fall from it.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Literal

import aiohttp

from router.admission import AtCapacity
from router.config import DecodeInstance, Instance, RouterConfig
from router.control_channel import ControlChannels
from router.metrics import (DECODE_POOL_FREE, DECODE_POOL_RESTING, INSTANCE_HEALTHY, INSTANCE_STATE, OUTSTANDING,
                            child, forget_instance)
from router.node_file import NodeFile
from router.pool_probe import PoolShare, pool_status
from transfer.rank_address import rank_address

log = logging.getLogger("kvbridge.router")
State = Literal["up", "suspect", "down"]
STATE_CODE = {"up": 0, "suspect": 1, "down": 2}


@dataclass(eq=False)
class Backend:
    inst: Instance
    kind: str
    state: State = "down"
    request_fails: int = 0
    health_fails: int = 0
    outstanding: int = 0
    pool_free: float = 1.0  # decode only: fraction of its connector's slots that are free
    ranks: int = 1  # decode only: its TP ranks, from its connector (each rank's endpoint is on port + rank)
    draining: bool = False  # takes no new request; those in flight finish
    removal: asyncio.Task | None = None  # a waiting drain's: removes it once none is in flight (router/node_admin.py)
    downs: int = 0  # times it went down: what it held may be gone (router/placement.py forgets it)
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex[:8])  # this router's record of the node
    # when its health checks took it down (health_fails reached unhealthy_after; None while they pass); request
    # failures do not count
    health_down_since: float | None = None
    watchers: set[Callable[[float], None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        """Export the starting state, so a node that is down from the start shows (and alerts) as down."""
        INSTANCE_HEALTHY.labels(self.kind, self.name).set(1 if self.state == "up" else 0)
        INSTANCE_STATE.labels(self.kind, self.name).set(STATE_CODE[self.state])

    @property
    def name(self) -> str:
        return self.inst.name

    @property
    def up_period(self) -> str:
        """The node and its time up as decode connectors are told it (transfer/answered_notices.py): new once it
        was down, re-added or this router restarted, as a new process may be behind it, its first handshake to come."""
        return f"{self.name}#{self.incarnation}.{self.downs}"

    @property
    def kv_address(self) -> str | None:
        return self.inst.kv_address if isinstance(self.inst, DecodeInstance) else None

    @property
    def rank_addresses(self) -> list[str]:
        """Every TP rank's connector endpoint: notices about a transfer go to each (each keeps its own book)."""
        return [rank_address(self.kv_address, r) for r in range(self.ranks)] if self.kv_address else []

    def set_state(self, state: State, why: str = "") -> None:
        if state == self.state:
            return
        log.warning("%s %s is now %s%s", self.kind, self.name, state.upper(), f" ({why})" if why else "")
        self.state = state
        self.downs += state == "down"
        INSTANCE_HEALTHY.labels(self.kind, self.name).set(1 if state == "up" else 0)
        INSTANCE_STATE.labels(self.kind, self.name).set(STATE_CODE[state])

    def abandon_waiters(self, waited_s: float) -> None:
        """End every request that has waited on this node `waited_s` or more (router/backend_wait.py: each wait
        ends once). A wait begun since is left alone: a stream's wait for its next event while tokens still flow."""
        for fire in list(self.watchers):
            fire(waited_s)


class Registry:
    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.node_file = NodeFile(cfg.nodes_file, {i.name for i in [*cfg.prefill, *cfg.decode]})  # kept across restarts
        nodes = self.node_file.apply({"prefill": list(cfg.prefill), "decode": list(cfg.decode)})
        self.backends = {kind: [Backend(i, kind) for i in insts] for kind, insts in nodes.items()}
        self._rr = {k: itertools.count() for k in self.backends}
        self._watches: dict[Backend, asyncio.Task] = {}  # each node's health-check loop
        self._session: aiohttp.ClientSession | None = None
        # to the decode connectors, for probes, cancels and traces
        self.control = ControlChannels(cfg.kv_cred, in_use=self._kv_address_in_use)

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Check every node once (the router serves from its first answer), then each on its own loop."""
        self._session = session
        await asyncio.gather(*(self._watch(b) for bs in self.backends.values() for b in bs))

    async def stop(self) -> None:
        for task in self._watches.values():
            task.cancel()
        self._watches.clear()
        self.control.close()

    async def add(self, b: Backend) -> None:
        """Serve `b` too: it takes requests once a health check passed. Its loop starts now with its first check,
        which this awaits; a caller cancelled meanwhile (an admin client that left) leaves the loop running."""
        self.backends[b.kind].append(b)
        await asyncio.shield(self._watch(b))

    def remove(self, b: Backend) -> None:
        """Stop serving and checking `b`; its connector channels close unless another node shares its address."""
        self.backends[b.kind].remove(b)
        if task := self._watches.pop(b, None):
            task.cancel()
        if b.kv_address and all(o.kv_address != b.kv_address for o in self.backends["decode"]):
            for address in b.rank_addresses:
                self.control.drop(address)
        forget_instance(b.kind, b.name)

    def _kv_address_in_use(self, address: str) -> bool:
        return any(address in b.rank_addresses for b in self.backends["decode"])

    def pick(self, kind: str, exclude: set[str] = frozenset()) -> Backend | None:
        """An up instance (a suspect one only when no up one is left), or None when none is alive.
        Raises AtCapacity when instances are alive but each holds its cap of requests."""
        live = self.candidates(kind, exclude)
        if not live:
            return None
        if self.cfg.policy == "round_robin":
            return live[next(self._rr[kind]) % len(live)]
        return min(live, key=lambda b: (b.pool_free == 0, b.outstanding, -b.pool_free))

    def candidates(self, kind: str, exclude: set[str] = frozenset()) -> list[Backend]:
        """The up instances that take new requests and have room (the suspect ones when no up one is left).
        Raises AtCapacity when instances are alive but each holds its cap of requests."""
        alive = [b for b in self.backends[kind] if b.state != "down" and not b.draining and b.name not in exclude]
        cap = self.cfg.max_inflight_per_instance
        room = [b for b in alive if cap is None or b.outstanding < cap]
        if alive and not room:
            raise AtCapacity(f"{kind} instances", cap, self.cfg.retry_after_s)
        return [b for b in room if b.state == "up"] or room

    def acquire(self, b: Backend) -> None:
        b.outstanding += 1
        child(OUTSTANDING, b.kind, b.name).set(b.outstanding)

    def release(self, b: Backend) -> None:
        b.outstanding -= 1
        child(OUTSTANDING, b.kind, b.name).set(b.outstanding)

    def report_failure(self, b: Backend, why: str) -> None:
        """A request to `b` failed through `b`'s fault: suspect at once, down after repeated failures."""
        b.request_fails += 1
        if b.request_fails >= self.cfg.down_after_failures:
            b.set_state("down", f"{b.request_fails} failed requests in a row, last: {why}")
        elif b.state == "up":
            b.set_state("suspect", why)

    def report_success(self, b: Backend) -> None:
        b.request_fails = 0

    def snapshot(self) -> dict:
        return {k: [{"name": b.name, "url": b.inst.url, "state": b.state, "healthy": b.state != "down",
                     "outstanding": b.outstanding, "draining": b.draining, **({"pool_free": round(b.pool_free, 3)} if b.kv_address else {})}
                    for b in bs] for k, bs in self.backends.items()}

    def _watch(self, b: Backend) -> asyncio.Future:
        """Check `b` now and then every health_interval_s; the future resolves once the first check is done."""
        first = asyncio.get_running_loop().create_future()
        self._watches[b] = asyncio.create_task(self._health_loop(b, first), name=f"health {b.kind} {b.name}")
        return first

    async def _health_loop(self, b: Backend, first: asyncio.Future) -> None:
        try:
            await self._check_guarded(b)
        finally:
            first.set_result(None)
        while True:
            await asyncio.sleep(self.cfg.health_interval_s)
            await self._check_guarded(b)

    async def _check_guarded(self, b: Backend) -> None:
        """A check that raised (a fault of ours, not the node's answer) is logged and the loop goes on: ending it
        would freeze the node's state for good."""
        try:
            await self._check(b)
        except Exception:
            log.exception("%s %s: health check raised; its state stays %s", b.kind, b.name, b.state)

    async def _check(self, b: Backend) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=self.cfg.health_timeout_s)
            async with self._session.get(b.inst.url + "/health", timeout=timeout) as r:
                ok, why = r.status == 200, f"/health answered {r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            ok, why = False, f"/health failed: {type(e).__name__}"
        if ok and b.kv_address:
            status = await pool_status(self.control, b.kv_address, self.cfg.health_timeout_s)
            ok, why = status is not None, "its kvbridge connector does not answer"
            if status is not None and status.ranks < b.ranks:  # restarted with fewer ranks: those ports are gone
                for address in b.rank_addresses[status.ranks:]:
                    self.control.drop(address)
            share = status or PoolShare(0.0, float("nan"), b.ranks)  # no answer: no room known, resting unknown
            b.pool_free, b.ranks = share.free, share.ranks
            DECODE_POOL_FREE.labels(b.name).set(share.free)
            DECODE_POOL_RESTING.labels(b.name).set(share.resting)
        if ok:
            b.health_fails, b.health_down_since = 0, None
            if b.state != "up":
                b.request_fails = 0
                b.set_state("up")
        else:
            b.health_fails += 1
            down_by_checks = b.health_fails >= self.cfg.unhealthy_after
            if down_by_checks and b.health_down_since is None:
                b.health_down_since = time.monotonic()
            if down_by_checks or b.state == "down":
                b.set_state("down", why)
            elif b.state == "up":
                b.set_state("suspect", why)
            if down_by_checks and time.monotonic() - b.health_down_since >= self.cfg.abandon_after_s:
                b.abandon_waiters(self.cfg.abandon_after_s)
