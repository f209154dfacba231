"""The router's leg client (router/upstream_client.py), its answers: split anywhere, cut short, malformed or out of
turn (UpstreamError, never a wrong answer), their headers as the client gets them, TLS verified, and backend URLs
with credentials refused."""
from __future__ import annotations

import json
import ssl

import pytest
import trustme

from router.config import Instance
from router.decode_relay import client_headers
from router.node_file import NodeFile
from router.upstream_response import EventTooLarge, UpstreamError
from tests.exact_backend import ON_BOTH_LOOPS, OK, Backend, pool, runs_on_the_loop_named
from tests.exact_backend import event_loop_policy  # noqa: F401 (fixture: each test on asyncio and on uvloop)
from transfer.config_errors import ConfigError

pytestmark = ON_BOTH_LOOPS


async def test_each_test_here_runs_on_the_loop_it_names(event_loop_policy):  # noqa: F811 (the fixture)
    assert await runs_on_the_loop_named(event_loop_policy)


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


@pytest.mark.parametrize("cut", [None, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345",
                                 [b"HTTP/1.1 200 OK\r\n\r\npart of it", b"RST"]],
                         ids=["before_headers", "mid_body", "reset_of_an_answer_with_no_length"])
async def test_a_backend_that_closes_before_its_answer_is_complete_raises_upstream_error(cut):
    """A reset cuts an answer with no length short instead of ending it (its end is the connection's close)."""
    b = Backend(lambda req: cut, hang_up=True)
    url, p = await b.start(), pool()
    with pytest.raises(UpstreamError, match="closed the connection before its answer was complete"):
        await (await p.post(url, b"{}", {})).read()
    p.close()
    await b.stop()


async def test_an_answer_that_is_not_http_raises_upstream_error():
    garbage, p = Backend(lambda req: b"HTTP/1.1 abc\r\n\r\n"), pool()
    with pytest.raises(UpstreamError, match="not valid HTTP"):
        await p.post(await garbage.start(), b"{}", {})
    p.close()
    await garbage.stop()


async def test_an_answer_with_no_length_ends_where_its_connection_does_and_a_1xx_is_skipped():
    b = Backend(lambda req: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nall of it", hang_up=True)
    url, p = await b.start(), pool()
    up = await p.post(url, b"{}", {})
    assert up.status == 200
    assert await up.read() == b"all of it"
    p.close()
    await b.stop()


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


async def test_bytes_after_an_answer_or_an_upgrade_are_not_taken_for_the_next_answer():
    b = Backend(lambda req: (OK % (2, b"{}")) + b"HTTP/1.1 2")  # the start of an answer nobody asked for
    url, p = await b.start(), pool()
    for _ in range(2):
        up = await p.post(url, b"{}", {})
        assert await up.read() == b"{}"
        up.release()
    assert len(b.peers) == 2  # the first connection was closed, not reused with a half-parsed answer in it
    upgrade = Backend(lambda req: b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ws\r\nConnection: upgrade\r\n\r\n")
    with pytest.raises(UpstreamError, match="switched protocols"):
        await p.post(await upgrade.start(), b"{}", {})
    p.close()
    await b.stop()
    await upgrade.stop()


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


async def test_a_non_chunked_transfer_coding_ends_at_close_and_non_ascii_headers_are_not_relayed():
    b = Backend(lambda req: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nX-Odd: caf\xe9\r\nX-Id: 7\r\n\r\nall",
                hang_up=True)
    url, p = await b.start(), pool()
    up = await p.post(url, b"{}", {})
    assert await up.read() == b"all"
    assert client_headers(up, "r1") == {"X-Id": "7", "x-kvbridge-request-id": "r1"}
    p.close()
    await b.stop()


def test_a_node_file_with_credentials_in_a_url_stops_the_start_without_printing_them(tmp_path):
    path = tmp_path / "nodes.json"
    path.write_text(json.dumps({"added": [{"kind": "prefill", "name": "p9", "url": "http://u:s3cret@10.0.0.9:8100"}]}))
    with pytest.raises(ConfigError, match="credentials in a backend URL are not sent") as e:
        NodeFile(path, set())
    assert "s3cret" not in str(e.value)
