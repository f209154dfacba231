"""The router's leg client (router/upstream_client.py) against backends that write exact bytes: connection reuse
and when it must not happen, answers split anywhere, broken answers as UpstreamError, backpressure, TLS."""
from __future__ import annotations

import asyncio
import socket
import ssl
import struct

import pytest
import trustme

from router.config import Instance
from router.upstream_client import UpstreamPool
from router.upstream_response import EventTooLarge, UpstreamError

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


async def test_a_connection_is_reused_for_the_next_leg_and_both_bodies_arrive_whole():
    b = Backend(lambda req: OK % (len(req), req))  # echoes the request
    url, p = await b.start(), pool()
    for body in (b'{"prompt": "a"}', b'{"prompt": "' + b"x" * 200_000 + b'"}'):
        up = await p.post(url, body, {"x-request-id": "r1"})
        echoed = await up.read()
        up.release()
        assert up.status == 200 and echoed.endswith(b"\r\n\r\n" + body)
        assert b"\r\nx-request-id: r1\r\n" in echoed and b"\r\nContent-Length: %d\r\n" % len(body) in echoed
    assert len(b.peers) == 1
    p.close()
    await b.stop()


async def test_a_connection_idle_past_keepalive_s_or_closed_by_the_backend_is_not_reused():
    b = Backend(lambda req: OK % (2, b"{}"))
    url, p = await b.start(), pool(keepalive_s=0.05)
    for _ in range(2):
        up = await p.post(url, b"{}", {})
        await up.read()
        up.release()
        await asyncio.sleep(0.1)
    assert len(b.peers) == 2
    closing = Backend(lambda req: b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
    url = await closing.start()
    for _ in range(2):
        up = await p.post(url, b"{}", {})
        assert await up.read() == b"{}"
        up.release()
    assert len(closing.peers) == 2
    p.close()
    await b.stop()
    await closing.stop()


async def test_an_sse_stream_split_at_every_byte_reads_event_by_event_then_ends():
    events = [b'data: {"n": %d}\n\n' % i for i in range(3)] + [b"data: [DONE]\n\n"]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b = Backend(lambda req: [bytes([c]) for c in head + chunked][:150] + [(head + chunked)[150:]])
    url, p = await b.start(), pool()
    up = await p.post(url, b"{}", {})
    assert up.headers["content-type"] == "text/event-stream"
    assert [await up.readuntil(b"\n\n", 1 << 10) for _ in events] == events
    assert await up.readuntil(b"\n\n", 1 << 10) == b""
    up.release()
    up = await p.post(url, b"{}", {})  # the stream ended cleanly: its connection carries the next leg
    assert await up.read() == b"".join(events)
    assert len(b.peers) == 1
    p.close()
    await b.stop()


async def test_an_event_longer_than_max_size_is_refused():
    b = Backend(lambda req: OK % (5000, b"a" * 5000))
    url, p = await b.start(), pool()
    up = await p.post(url, b"{}", {})
    with pytest.raises(EventTooLarge):
        await up.readuntil(b"\n\n", 1000)
    up.close()
    p.close()
    await b.stop()


@pytest.mark.parametrize("cut", [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345"])
async def test_a_backend_that_closes_before_its_answer_is_complete_raises_upstream_error(cut):
    b = Backend(lambda req: cut or None, hang_up=True)
    url, p = await b.start(), pool()
    with pytest.raises(UpstreamError, match="closed the connection before its answer was complete"):
        await (await p.post(url, b"{}", {})).read()
    with pytest.raises(UpstreamError, match="not valid HTTP"):
        garbage = Backend(lambda req: b"HTTP/1.1 abc\r\n\r\n")
        await (await p.post(await garbage.start(), b"{}", {})).read()
    p.close()


async def test_an_answer_with_no_length_ends_where_its_connection_does_and_a_1xx_is_skipped():
    b = Backend(lambda req: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nall of it", hang_up=True)
    url, p = await b.start(), pool()
    up = await p.post(url, b"{}", {})
    assert up.status == 200
    assert await up.read() == b"all of it"
    p.close()
    await b.stop()


async def test_a_leg_given_up_mid_answer_closes_its_connection_so_the_backend_sees_it_go():
    """A released, unfinished answer and a leg cancelled before its headers both close their connection, which is
    how vLLM learns to abort the request."""
    b = Backend(lambda req: [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"part"])
    url, p = await b.start(), pool()
    up = await p.post(url, b"{}", {})
    up.release()
    silent = Backend(lambda req: [b""])  # reads the request, never answers
    silent_url = await silent.start()
    leg = asyncio.ensure_future(p.post(silent_url, b"{}", {}))
    await asyncio.sleep(0.1)
    leg.cancel()
    await asyncio.sleep(0.2)
    assert b.closed == 1 and silent.closed == 1
    p.close()
    await b.stop()
    await silent.stop()


async def test_an_unread_answer_is_buffered_only_up_to_read_bufsize_and_then_arrives_whole():
    body = bytes(range(256)) * 16384  # 4 MiB
    b = Backend(lambda req: OK % (len(body), body))
    url, p = await b.start(), pool(read_bufsize=1 << 16)
    up = await p.post(url, b"{}", {})
    await asyncio.sleep(0.3)  # the backend writes as fast as the socket takes it
    assert len(up._buf) < (1 << 16) + (1 << 18)  # read_bufsize and at most one socket read past it
    assert await up.read() == body
    up.release()
    p.close()
    await b.stop()


async def test_connect_failures_and_header_injection_are_refused_before_anything_is_sent():
    p = pool()
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(UpstreamError, match=f"connecting to 127.0.0.1:{port}"):
        await p.post(f"http://127.0.0.1:{port}/v1/completions", b"{}", {})
    with pytest.raises(ValueError, match="line break"):
        await p.post(f"http://127.0.0.1:{port}/v1/completions", b"{}", {"x-a": "1\r\nx-b: 2"})


async def test_an_https_backend_is_verified_against_the_trusted_cas(monkeypatch, tmp_path):
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(tls)
    b = Backend(lambda req: OK % (2, b"{}"))
    url = await b.start(tls)
    with pytest.raises(UpstreamError, match="CERTIFICATE_VERIFY_FAILED"):
        await pool().post(url, b"{}", {})
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))  # what create_default_context() trusts
    up = await pool().post(url, b"{}", {})
    assert up.status == 200 and await up.read() == b"{}"
    up.close()
    await b.stop()


async def test_an_answer_that_ends_unread_past_read_bufsize_leaves_its_connection_reading_for_the_next_leg():
    b = Backend(lambda req: OK % (8192, b"x" * 8192))  # one write: the socket read that passes the limit ends it
    url, p = await b.start(), pool(read_bufsize=4096)
    for _ in range(2):
        up = await asyncio.wait_for(p.post(url, b"{}", {}), 2)
        await asyncio.sleep(0.1)
        assert await up.read() == b"x" * 8192
        up.release()
    assert len(b.peers) == 1
    p.close()
    await b.stop()


async def test_releasing_twice_or_closing_after_a_release_never_lends_one_connection_to_two_legs():
    b = Backend(lambda req: OK % (len(req), req))
    url, p = await b.start(), pool()
    up = await p.post(url, b"{}", {})
    await up.read()
    up.release()
    up.release()
    up.close()
    legs = await asyncio.gather(*(p.post(url, b'{"n": %d}' % i, {}) for i in range(2)))
    assert [(await leg.read()).endswith(b'{"n": %d}' % i) for i, leg in enumerate(legs)] == [True, True]
    assert len(b.peers) == 2 and b.closed == 0
    p.close()
    await b.stop()


async def test_bytes_after_an_answer_or_an_upgrade_are_not_taken_for_the_next_answer():
    b = Backend(lambda req: (OK % (2, b"{}")) + b"HTTP/1.1 2")  # the start of an answer nobody asked for
    url, p = await b.start(), pool()
    for _ in range(2):
        up = await p.post(url, b"{}", {})
        assert await up.read() == b"{}"
        up.release()
    assert len(b.peers) == 2  # the first connection was closed, not reused with a half-parsed answer in it
    upgrade = Backend(lambda req: b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ws\r\nConnection: upgrade\r\n\r\n")
    with pytest.raises(UpstreamError, match="not valid HTTP"):
        await p.post(await upgrade.start(), b"{}", {})
    p.close()
    await b.stop()
    await upgrade.stop()


async def test_a_reset_cuts_an_answer_with_no_length_short_instead_of_ending_it():
    def reset(req: bytes) -> list[bytes]:
        return [b"HTTP/1.1 200 OK\r\n\r\npart of it", b"RST"]
    b = Backend(reset)
    url, p = await b.start(), pool()
    with pytest.raises(UpstreamError, match="closed the connection before its answer was complete"):
        await (await p.post(url, b"{}", {})).read()
    p.close()
    await b.stop()


async def test_idle_time_counts_from_the_answers_end_and_idle_connections_are_closed_without_another_leg():
    b = Backend(lambda req: OK % (2, b"{}"))
    url, p = await b.start(), pool(keepalive_s=0.3)
    up = await p.post(url, b"{}", {})
    await asyncio.sleep(0.2)  # the answer is in; the caller takes its time
    await up.read()
    up.release()
    await asyncio.sleep(0.15)  # 0.35 s after the answer ended, 0.15 s after the release
    up = await p.post(url, b"{}", {})
    await up.read()
    up.release()
    assert len(b.peers) == 2 and b.closed == 1
    await asyncio.sleep(0.8)
    assert b.closed == 2  # the pool closed it on its own
    p.close()
    await b.stop()


async def test_a_chunked_answers_trailer_is_not_one_of_its_headers_and_a_url_with_credentials_is_refused():
    b = Backend(lambda req: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-t\r\n\r\n"
                b"2\r\n{}\r\n0\r\nx-t: 1\r\n\r\n")
    url, p = await b.start(), pool()
    up = await p.post(url, b"{}", {})
    assert await up.read() == b"{}" and "x-t" not in up.headers and up.headers["trailer"] == "x-t"
    up.release()
    p.close()
    await b.stop()
    with pytest.raises(ValueError, match="credentials in a backend URL are not sent"):
        Instance(name="p", url="http://user:secret@127.0.0.1:8100")
