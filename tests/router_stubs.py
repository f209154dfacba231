"""In-process stand-ins for the router's backends (aiohttp vLLM nodes and a fake decode connector on ZMQ),
and a `make` fixture that starts a router in front of them: the router's semantics are tested against
these (tests/test_router_semantics.py, tests/test_router_timeouts.py) where a real vLLM cannot be made to
fail on cue."""
from __future__ import annotations

import asyncio
import json
import os
import threading
from typing import Callable

import aiohttp
import pytest
import zmq
from aiohttp import web
from multidict import CIMultiDict

from router.app import PROXY, build_admin_app, build_app
from router.config import RouterConfig
from transfer import control_auth, wire

REFUSAL = {"object": "error", "message": "This model's maximum context length is 2048 tokens", "type": "BadRequestError",
           "param": None, "code": 400}


class StubNode:
    """A fake vLLM node. `mode`: ok | refuse (HTTP `refuse_status`, by default 400 as vLLM refuses a prompt over
    its context length)
    | reset (drop the connection) | die (abort after `die_after` events)
    | silent (go quiet after one event) | hang (never answer, and fail /health from then on) | late (headers
    at once, then no first event and no unstreamed answer for an hour, /health passing: a stuck prefill).
    `interval`: seconds between streamed events, and before an unstreamed answer (a function of the request's
    body: a prefill whose time depends on the prompt). `store`: it keeps every prompt it saw (until
    `held.clear()`) and its unstreamed answers report `usage` as vLLM does, 4 characters a token, with the longest held prefix as `cached_tokens` (`details=False`: no
    `prompt_tokens_details`, as vLLM without --enable-prompt-tokens-details). `scattered`: its
    connector says of every transfer asked about that it was received and scattered (else that it has none).
    `pad`: characters added to each streamed event's text. `healthy` and `health_hangs` (set at any time): /health answers 500, or never answers.
    `received`: a decode node that got the prompt's KV over PD, as vLLM reports one: every prompt token cached, in
    its unstreamed answers and in a stream's usage chunk (asked for with stream_options.include_usage).
    `end_after_done`: seconds between a stream's [DONE] and its end (the chunked terminator)."""

    def __init__(self, name: str, mode: str = "ok", events: int = 4,
                 interval: float | Callable[[dict], float] = 0.0, die_after: int = 2,
                 kv: bool = False, store: bool = False, ranks: int = 1, scattered: bool = False,
                 details: bool = True, pad: int = 0, refuse_status: int = 400, received: bool = False,
                 end_after_done: float = 0.0) -> None:
        self.name, self.mode, self.events, self.interval, self.die_after = name, mode, events, interval, die_after
        self.bodies, self.headers, self.cancels, self.answered = [], [], [], []  # each leg's, rank 0 connector's
        self.peers: list[tuple] = []  # each leg's connection (the router's address and port)
        self.answered_ago: list[float] = []  # each prefill_answered notice's age of the answer (rank 0)
        self.answered_by: list[str] = []  # and the prefill node it names, with its up-period
        self.rank_notices: dict[int, list[tuple[str, str]]] = {r: [] for r in range(1, ranks)}  # (type, tid)
        self.aborted, self.healthy, self.health_hangs = 0, True, False  # aborted: requests the router closed before their answer was whole
        self._stop = threading.Event()
        self.held: list[str] | None = [] if store else None
        self.ranks, self.scattered, self.details, self.pad = ranks, scattered, details, pad
        self.refuse_status, self.received, self.end_after_done = refuse_status, received, end_after_done
        self.resting = 0  # of the connector's 8 slots, resting after unfilled leases (the others free, or one used)
        self.stats_silent = False  # (set at any time) the connector leaves the router's Stats unanswered
        self.kv_port = self._start_connector() if kv else None

    def _start_connector(self) -> int:
        """One endpoint per TP rank, on consecutive ports as a decode node's ranks listen."""
        ctx = zmq.Context.instance()
        while True:
            socks = [ctx.socket(zmq.ROUTER)]
            port = socks[0].bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=40000)
            try:
                for r in range(1, self.ranks):
                    socks.append(ctx.socket(zmq.ROUTER))
                    socks[-1].bind(f"tcp://127.0.0.1:{port + r}")
                break
            except zmq.ZMQError:  # a neighbouring port is taken: try another base port
                for s in socks:
                    s.close(0)
        for rank, sock in enumerate(socks):
            threading.Thread(target=self._serve, args=(sock, rank), daemon=True).start()
        return port

    def _serve(self, sock: zmq.Socket, rank: int) -> None:
        auth = control_auth.Authenticator(None)  # no deployment secret: frames unsigned, as the router sends them
        while not self._stop.is_set():
            if not sock.poll(100):
                continue
            ident, raw = sock.recv_multipart()
            req = wire.decode_request((opened := auth.open(raw)).body)
            if isinstance(req, (wire.Cancel, wire.PrefillAnswered)):
                if rank:
                    self.rank_notices[rank].append((req.type, req.transfer_id))
                else:
                    if isinstance(req, wire.PrefillAnswered):  # its age first: whoever sees the id sees the age
                        self.answered_ago.append(req.answered_s_ago)
                        self.answered_by.append(req.prefill)
                    (self.cancels if isinstance(req, wire.Cancel) else self.answered).append(req.transfer_id)
            if isinstance(req, wire.Stats) and self.stats_silent:
                continue
            if isinstance(req, wire.TraceQuery):  # `scattered`: every transfer was received and used
                reply = wire.TransferTrace(rid=req.rid, found=self.scattered, state="SCATTERED" if self.scattered else "")
                sock.send_multipart([ident, auth.seal_reply(opened, wire.encode(reply))])
                continue
            reply = wire.Ack(rid=req.rid, ok=True) if isinstance(req, (wire.Cancel, wire.PrefillAnswered)) else wire.PoolStatus(
                rid=req.rid, incarnation="stub", total=8, free=8 - self.resting - bool(self.resting),
                used=int(bool(self.resting)), quarantined=self.resting, expired_total=0, dropped_total=0,
                ranks=self.ranks)
            sock.send_multipart([ident, auth.seal_reply(opened, wire.encode(reply))])
        sock.close(0)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        self._stop.set()
        await self.runner.cleanup()

    def instance(self) -> dict:
        return {"name": self.name, "url": self.url, **({"kv_address": f"127.0.0.1:{self.kv_port}"} if self.kv_port else {})}

    def _usage(self, body: dict) -> dict:
        if (self.held is None and not self.received) or not isinstance(body.get("prompt"), str):
            return {}
        prompt = body["prompt"]
        if self.received:
            return {"usage": {"prompt_tokens": len(prompt) // 4, "prompt_tokens_details": {"cached_tokens":
                                                                                           len(prompt) // 4}}}
        common = max((len(os.path.commonprefix([prompt, h])) for h in self.held), default=0)
        self.held.append(prompt)
        details = {"prompt_tokens_details": {"cached_tokens": common // 4}} if self.details else {}
        return {"usage": {"prompt_tokens": max(1, len(prompt) // 4), **details}}

    async def health(self, _: web.Request) -> web.Response:
        if self.health_hangs:
            await asyncio.sleep(3600)
        return web.Response(status=200 if self.healthy else 500)

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "tiny", "object": "model", "root": "/models/tiny",
                                                              "max_model_len": 2048, "permission": [{}]}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(request.headers.copy())
        self.peers.append(request.transport.get_extra_info("peername"))
        try:
            if self.mode == "reset":
                request.transport.abort()
                return web.Response()
            if self.mode == "refuse":
                return web.json_response(REFUSAL, status=self.refuse_status)
            if self.mode == "hang":
                self.healthy = False
                await asyncio.sleep(3600)
            if not body.get("stream"):
                await asyncio.sleep(3600 if self.mode == "late" else
                                    self.interval(body) if callable(self.interval) else self.interval)
                return web.json_response({"object": "text_completion", "choices": [{"index": 0, "text": self.name}],
                                          "kv_transfer_params": {"kvbridge": {}}, **self._usage(body)})
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Request-Id": "from-" + self.name})
            await resp.prepare(request)
            for i in range(self.events):
                if self.mode == "die" and i == self.die_after:
                    request.transport.abort()
                    return resp
                if (self.mode == "silent" and i == 1) or (self.mode == "late" and i == 0):
                    await asyncio.sleep(3600)
                chunk = {"choices": [{"index": 0, "text": f"t{i}" + "x" * self.pad}], **({"kv_transfer_params": {"kvbridge": {}}} if i == 0 else {})}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                await asyncio.sleep(self.interval)
            if (body.get("stream_options") or {}).get("include_usage"):
                await resp.write(b"data: " + json.dumps({"choices": [], **self._usage(body)}).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await asyncio.sleep(self.end_after_done)
            return resp
        except asyncio.CancelledError:
            self.aborted += 1
            raise


def transfer_id(prefill: StubNode) -> str:
    """The transfer id the router gave the first prefill leg `prefill` received."""
    return prefill.bodies[0]["kv_transfer_params"]["kvbridge"]["transfer_id"]


@pytest.fixture
async def make():
    """make(prefill=[StubNode], decode=[StubNode], **router config) -> (router url, api app); all stopped after."""
    started: list = []

    async def _make(prefill: list[StubNode], decode: list[StubNode], **cfg) -> tuple[str, web.Application]:
        for s in prefill + decode:
            await s.start()
            started.append(s)
        config = RouterConfig.model_validate({"model": "tiny", "health_interval_s": 0.2, "unhealthy_after": 1,
                                              "prefill": [s.instance() for s in prefill],
                                              "decode": [s.instance() for s in decode], **cfg})
        api = build_app(config)
        runners = [web.AppRunner(api, handler_cancellation=True)]
        if config.admin_port:
            runners.append(web.AppRunner(build_admin_app(api, config)))
        for r, port in zip(runners, (0, config.admin_port)):
            await r.setup()
            await web.TCPSite(r, "127.0.0.1", port).start()
            started.append(r)
        return f"http://127.0.0.1:{runners[0].addresses[0][1]}", api
    yield _make
    for s in reversed(started):
        await (s.stop() if isinstance(s, StubNode) else s.cleanup())


def states(api: web.Application, kind: str = "decode") -> list[str]:
    return [b.state for b in api[PROXY].registry.backends[kind]]


async def post(url: str, body: dict, headers: dict | None = None) -> tuple[int, CIMultiDict, bytes]:
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", json=body, headers=headers,
                                                    timeout=aiohttp.ClientTimeout(total=30)) as r:
        return r.status, r.headers.copy(), await r.read()


def events(raw: bytes) -> list[str]:
    return [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e.strip()]


REQ = {"model": "tiny", "prompt": "hello", "max_tokens": 8}


async def eventually(cond) -> bool:
    """cond() within ~5 s: the stubs see closed connections and CANCELs a moment after the router acts."""
    for _ in range(100):
        if cond():
            return True
        await asyncio.sleep(0.05)
    return cond()
