"""A backend that writes exact bytes, for the router's leg client (router/upstream_client.py): tests choose each
answer's bytes, how they are split across writes, and how the connection ends."""
from __future__ import annotations

import asyncio
import socket
import ssl
import struct

import pytest
import uvloop

from router.upstream_client import UpstreamPool

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"


class Backend:
    """A server answering each request with what `answer(request_bytes)` returns: bytes, or a list of parts
    written 10 ms apart (b"RST": reset the connection); None, or `hang_up`, closes the connection instead of
    reading another request."""

    def __init__(self, answer, hang_up: bool = False) -> None:
        self.answer, self.hang_up, self.requests, self.peers, self.closed = answer, hang_up, [], [], 0
        self.server: asyncio.Server | None = None

    async def start(self, tls: ssl.SSLContext | None = None) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        return f"{'https' if tls else 'http'}://localhost:{self.server.sockets[0].getsockname()[1]}/v1/completions"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername"))
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                out = self.answer(request)
                if out is None:
                    break
                for part in out if isinstance(out, list) else [out]:
                    if part == b"RST":  # close with a reset instead of a FIN
                        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                                   struct.pack("ii", 1, 0))
                        writer.transport.abort()
                        return
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0.01 if isinstance(out, list) else 0)
                if self.hang_up:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed += 1
            writer.close()

    async def stop(self) -> None:
        self.server.close()


def pool(**kw) -> UpstreamPool:
    return UpstreamPool(**{"keepalive_s": 5.0, "connect_timeout_s": 2.0, "read_bufsize": 1 << 16, **kw})


# pytest-asyncio 1.x deprecates overriding event_loop_policy for a hook that would reach every async test of the
# suite; each module using this override checks that its tests run on the loop they name.
ON_BOTH_LOOPS = pytest.mark.filterwarnings("ignore:Overriding the \"event_loop_policy\" fixture is deprecated")


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Each test on asyncio's loop and on uvloop, which the router runs on (their transports pause, resume and
    read in their own ways)."""
    return uvloop.EventLoopPolicy() if request.param == "uvloop" else asyncio.DefaultEventLoopPolicy()


async def runs_on_the_loop_named(policy: asyncio.AbstractEventLoopPolicy) -> bool:
    return isinstance(asyncio.get_running_loop(), uvloop.Loop) == isinstance(policy, uvloop.EventLoopPolicy)


async def until(cond, within_s: float = 3.0) -> bool:
    """cond() within `within_s`: what a peer sees of a close comes a moment after it."""
    for _ in range(int(within_s / 0.02)):
        if cond():
            return True
        await asyncio.sleep(0.02)
    return cond()
