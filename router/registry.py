"""Instance registry: health checks take dead instances out and put recovered ones back.

Failures seen while proxying count too (`report_failure`), so a node killed between
two health checks is dropped at its first failed request, not seconds later.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass

import aiohttp

from router.config import DecodeInstance, Instance, RouterConfig
from router.metrics import DECODE_POOL_FREE, INSTANCE_HEALTHY, OUTSTANDING
from router.pool_probe import pool_free_fraction

log = logging.getLogger("kvbridge.router")


@dataclass
class Backend:
    inst: Instance
    kind: str
    healthy: bool = False
    fails: int = 0
    outstanding: int = 0
    pool_free: float = 1.0  # decode only: fraction of its connector's slots that are free

    @property
    def name(self) -> str:
        return self.inst.name

    @property
    def kv_address(self) -> str | None:
        return self.inst.kv_address if isinstance(self.inst, DecodeInstance) else None

    def set_health(self, ok: bool, why: str = "") -> None:
        if ok != self.healthy:
            log.warning("%s %s is now %s%s", self.kind, self.name, "healthy" if ok else "UNHEALTHY",
                        f" ({why})" if why else "")
        self.healthy = ok
        INSTANCE_HEALTHY.labels(self.kind, self.name).set(1 if ok else 0)


class Registry:
    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.backends = {"prefill": [Backend(i, "prefill") for i in cfg.prefill],
                         "decode": [Backend(i, "decode") for i in cfg.decode]}
        self._rr = {k: itertools.count() for k in self.backends}
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        await self.check_all()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    def pick(self, kind: str, exclude: set[str] = frozenset()) -> Backend | None:
        live = [b for b in self.backends[kind] if b.healthy and b.name not in exclude]
        if not live:
            return None
        if self.cfg.policy == "round_robin":
            return live[next(self._rr[kind]) % len(live)]
        return min(live, key=lambda b: (b.pool_free == 0, b.outstanding, -b.pool_free))

    def acquire(self, b: Backend) -> None:
        b.outstanding += 1
        OUTSTANDING.labels(b.kind, b.name).set(b.outstanding)

    def release(self, b: Backend) -> None:
        b.outstanding -= 1
        OUTSTANDING.labels(b.kind, b.name).set(b.outstanding)

    def report_failure(self, b: Backend, why: str) -> None:
        b.fails = self.cfg.unhealthy_after
        b.set_health(False, why)

    def snapshot(self) -> dict:
        return {k: [{"name": b.name, "url": b.inst.url, "healthy": b.healthy, "outstanding": b.outstanding,
                     **({"pool_free": round(b.pool_free, 3)} if b.kv_address else {})}
                    for b in bs] for k, bs in self.backends.items()}

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(b) for bs in self.backends.values() for b in bs))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval_s)
            await self.check_all()

    async def _check(self, b: Backend) -> None:
        try:
            timeout = aiohttp.ClientTimeout(total=self.cfg.health_timeout_s)
            async with self._session.get(b.inst.url + "/health", timeout=timeout) as r:
                ok, why = r.status == 200, f"/health answered {r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            ok, why = False, f"/health failed: {type(e).__name__}"
        if ok and b.kv_address:
            free = await pool_free_fraction(b.kv_address, self.cfg.health_timeout_s, self.cfg.kv_secret)
            ok, why = free is not None, "its kvbridge connector does not answer"
            b.pool_free = free if free is not None else 0.0
            DECODE_POOL_FREE.labels(b.name).set(b.pool_free)
        if ok:
            b.fails = 0
            b.set_health(True)
        else:
            b.fails += 1
            if b.fails >= self.cfg.unhealthy_after or not b.healthy:
                b.set_health(False, why)
