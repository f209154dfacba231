"""The floor of a PD relay on this machine, below any HTTP framework: bench/router_bench.py's fourth server.

asyncio protocols (on uvloop when installed, as the router) with httptools' parser (uvicorn's, installed with vLLM),
keep-alive connections to the upstream, and per request what `run_bare_relay` does: parse the JSON body, send both
legs of one transfer at once (`pd_legs`: the router's leg bodies), answer with the decode leg's body. It speaks only
what the bench's stub and load generator send (one POST path, bodies with Content-Length, no chunked encoding, no
timeouts; a relay that fails answers 502 and closes the client's connection), so it measures what three HTTP
exchanges per request cost the box, not a router anyone could run.

    python -c "from bench.raw_relay import run; run(18604, 18601)"
"""
from __future__ import annotations

import asyncio
import json
from typing import Callable

import httptools

HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: upstream\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n")
ANSWER = b"HTTP/1.1 %d -\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"


class _Upstream(asyncio.Protocol):
    """One keep-alive connection to the stub; back in `idle` once its answer was read."""

    def __init__(self, idle: list[_Upstream]) -> None:
        self.idle, self.parser = idle, httptools.HttpResponseParser(self)
        self.body: list[bytes] = []
        self.answer: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        """The stub closed it (its keep-alive ran out between repeats): never handed out again."""
        if self in self.idle:
            self.idle.remove(self)
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(ConnectionError("the stub closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        answer, body, self.answer, self.body = self.answer, b"".join(self.body), None, []
        self.idle.append(self)
        answer.set_result((self.parser.get_status_code(), body))

    def post(self, payload: bytes) -> asyncio.Future:
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(HEAD % len(payload) + payload)
        return self.answer


class _Client(asyncio.Protocol):
    """One load-generator connection: each complete request is relayed as two legs."""

    def __init__(self, relay: _Relay) -> None:
        self.relay, self.parser = relay, httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.url = b""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        raw, self.body = b"".join(self.body), []
        if self.url == b"/health":  # the readiness probe
            self.transport.write(ANSWER % (200, 2) + b"{}")
            return
        task = asyncio.ensure_future(self.relay.relay(raw, self.transport))
        self.relay.running.add(task)
        task.add_done_callback(self.relay.running.discard)


class _Relay:
    def __init__(self, upstream_port: int, legs: Callable[[dict, int], tuple[dict, dict]]) -> None:
        self.port, self.legs, self.idle = upstream_port, legs, []
        self.running: set[asyncio.Task] = set()

    async def _post(self, payload: bytes) -> tuple[int, bytes]:
        conn = self.idle.pop() if self.idle else (await asyncio.get_running_loop().create_connection(
            lambda: _Upstream(self.idle), "127.0.0.1", self.port))[1]
        return await conn.post(payload)

    async def relay(self, raw: bytes, client: asyncio.Transport) -> None:
        try:
            legs = self.legs(json.loads(raw), self.port)
            _, (status, out) = await asyncio.gather(*(self._post(json.dumps(b).encode()) for b in legs))
        except (ValueError, OSError) as e:  # the load generator sees a failed request at once, not a hang
            out = json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
            client.write(ANSWER % (502, len(out)) + out)
            client.close()
            return
        client.write(ANSWER % (status, len(out)) + out)


def run(port: int, upstream_port: int) -> None:
    """Serve on 127.0.0.1:`port`, relaying to the stub on `upstream_port`, until killed."""
    from bench.router_bench import pd_legs, run_loop

    async def serve() -> None:
        relay = _Relay(upstream_port, pd_legs)
        await asyncio.get_running_loop().create_server(lambda: _Client(relay), "127.0.0.1", port)
        await asyncio.Event().wait()
    run_loop(serve())
