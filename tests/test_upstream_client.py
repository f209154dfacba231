"""The router's leg client (router/upstream_client.py), its connections: reused for the next leg when, and only
when, the last answer ended cleanly and recently; closed when a leg is given up or the router closes it; a body
buffered only to read_bufsize."""
from __future__ import annotations

import asyncio

import pytest

from router.upstream_response import UpstreamError
from tests.exact_backend import ON_BOTH_LOOPS, OK, Backend, pool, runs_on_the_loop_named, until
from tests.exact_backend import event_loop_policy  # noqa: F401 (fixture: each test on asyncio and on uvloop)

pytestmark = ON_BOTH_LOOPS


async def test_each_test_here_runs_on_the_loop_it_names(event_loop_policy):  # noqa: F811 (the fixture)
    assert await runs_on_the_loop_named(event_loop_policy)


async def test_a_connection_is_reused_for_the_next_leg_and_both_bodies_arrive_whole():
    b = Backend(lambda req: OK % (len(req), req))  # echoes the request
    url, p = await b.start(), pool()
    for body in (b'{"prompt": "a"}', b'{"prompt": "' + b"x" * 200_000 + b'"}'):
        up = await p.post(url, body, {"x-request-id": "r1", "x-raw": "caf\udce9"})  # a byte aiohttp kept as is
        echoed = await up.read()
        up.release()
        assert up.status == 200 and echoed.endswith(b"\r\n\r\n" + body)
        assert b"\r\nx-request-id: r1\r\nx-raw: caf\xe9\r\n" in echoed
        assert b"\r\nAccept-Encoding: identity\r\n" in echoed
        assert b"\r\nContent-Length: %d\r\n" % len(body) in echoed
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


async def test_a_router_that_closes_a_leg_or_its_pool_says_so_instead_of_blaming_the_backend():
    b = Backend(lambda req: [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345"])
    url, p = await b.start(), pool()
    up = await p.post(url, b"{}", {})
    reading = asyncio.ensure_future(up.read())
    await asyncio.sleep(0.05)
    up.close()
    with pytest.raises(UpstreamError, match="the router closed the connection"):
        await reading
    answered = Backend(lambda req: OK % (2, b"{}"))
    up = await p.post(await answered.start(), b"{}", {})
    await asyncio.sleep(0.05)
    p.close()
    assert await up.read() == b"{}"  # whole before the pool closed: still read, its connection closed with the pool
    up.release()
    assert await until(lambda: answered.closed == 1)
    with pytest.raises(UpstreamError, match="shutting down"):
        await p.post(url, b"{}", {})
    await b.stop()
    await answered.stop()


async def test_a_stream_released_at_its_done_is_reused_once_its_end_arrives_and_closed_if_it_never_does():
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    done = b"e\r\ndata: [DONE]\n\n\r\n"
    ends = Backend(lambda req: [head + done, b"0\r\n\r\n"])  # the terminator 10 ms behind [DONE]
    url, p = await ends.start(), pool()
    for _ in range(2):
        up = await p.post(url, b"{}", {})
        assert await up.readuntil(b"\n\n", 1 << 10) == b"data: [DONE]\n\n"
        up.release(tail_s=1.0)
        await asyncio.sleep(0.5)  # the end is 10 ms behind
    assert len(ends.peers) == 1 and ends.closed == 0
    never = Backend(lambda req: [head + done, b""])  # no terminator, connection left open
    up = await p.post(await never.start(), b"{}", {})
    assert await up.readuntil(b"\n\n", 1 << 10) == b"data: [DONE]\n\n"
    up.release(tail_s=0.5)
    await asyncio.sleep(0.1)
    assert never.closed == 0
    assert await until(lambda: never.closed == 1)
    p.close()
    await ends.stop()
    await never.stop()


async def test_a_stream_paused_at_read_bufsize_when_released_at_its_done_still_reads_on_to_its_end():
    events = b"".join(b"data: %04d\n\n" % i for i in range(800)) + b"data: [DONE]\n\n"  # 9 KiB, one chunk
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b = Backend(lambda req: [head + b"%x\r\n%s\r\n" % (len(events), events), b"0\r\n\r\n"])
    url, p = await b.start(), pool(read_bufsize=4096)
    for _ in range(2):
        up = await p.post(url, b"{}", {})
        await asyncio.sleep(0.1)  # all but the end arrives unread: reading pauses
        while await up.readuntil(b"\n\n", 1 << 10) != b"data: [DONE]\n\n":
            pass
        up.release(tail_s=1.0)
        await asyncio.sleep(0.3)
    assert len(b.peers) == 1
    p.close()
    await b.stop()
