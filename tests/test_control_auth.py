"""Authenticated control frames without sockets: forged, tampered, replayed, stale and redirected
frames are refused; the table of seen nonces stays bounded without opening a replay window."""
from __future__ import annotations

import time

import msgpack
import pytest

from transfer import wire
from transfer.control_auth import AuthError, Authenticator, Credential, _frame, _mac, parse, sender_key
from transfer.credentials import CredentialError, load_secret, require_secret

SECRET = b"deployment-secret-for-tests"


def stats_frame(sender: str = "router", secret: bytes | None = SECRET) -> tuple[bytes, bytes]:
    return Credential(sender, secret).seal(wire.encode(wire.Stats(rid=7)))


def test_authentic_frame_opens_once_and_its_reply_is_bound_to_it():
    auth, cred = Authenticator(SECRET), Credential("router", SECRET)
    frame, nonce = cred.seal(wire.encode(wire.Stats(rid=7)))
    opened = auth.open(frame)
    assert opened.sender == "router" and wire.decode_request(opened.body).rid == 7
    reply = auth.seal_reply(opened, wire.encode(wire.Ack(rid=7, ok=True)))
    assert wire.decode_reply(cred.open_reply(reply, nonce)).ok is True
    with pytest.raises(AuthError) as e:
        auth.open(frame)
    assert e.value.code == "replayed"
    other_frame, other_nonce = cred.seal(wire.encode(wire.Stats(rid=8)))
    with pytest.raises(AuthError) as e:  # the reply to request 7 cannot stand in for the reply to request 8
        cred.open_reply(reply, other_nonce)
    assert e.value.code == "stale"


@pytest.mark.parametrize("secret", [None, b"wrong-secret"])
def test_frames_without_the_secret_are_refused(secret):
    frame, _ = stats_frame(secret=secret)
    with pytest.raises(AuthError) as e:
        Authenticator(SECRET).open(frame)
    assert e.value.code == "unauthenticated"


@pytest.mark.parametrize("field", ["from", "ts", "nonce", "body", "mac"])
def test_any_tampered_field_is_refused(field):
    frame, _ = stats_frame()
    obj = msgpack.unpackb(frame)
    obj[field] = {"from": "producer/x", "ts": obj["ts"] + 1, "nonce": b"\1" * 16,
                  "body": wire.encode(wire.Stats(rid=8)), "mac": b"\0" * 32}[field]
    with pytest.raises(AuthError) as e:
        Authenticator(SECRET).open(msgpack.packb(obj, use_bin_type=True))
    assert e.value.code == "unauthenticated"


def test_a_producer_key_cannot_sign_as_another_producer():
    """Each sender name has its own key: a frame signed for producer/a and relabelled producer/b fails."""
    frame, _ = stats_frame("producer/a")
    obj = msgpack.unpackb(frame)
    obj["from"] = "producer/b"
    with pytest.raises(AuthError):
        Authenticator(SECRET).open(msgpack.packb(obj, use_bin_type=True))


def test_frames_outside_the_time_window_are_refused():
    auth = Authenticator(SECRET, window_s=30)
    frame, _ = stats_frame()
    ts = parse(frame)[1]
    for now in (ts + 31_000, ts - 31_000):
        with pytest.raises(AuthError) as e:
            auth.open(frame, now_ms=now)
        assert e.value.code == "stale"
    assert auth.open(frame, now_ms=ts + 29_000).sender == "router"


def test_nonce_table_is_bounded_and_overflow_never_reopens_a_replay():
    auth = Authenticator(SECRET, max_nonces=8)
    frames = []
    for _ in range(20):
        frames.append(stats_frame()[0])
        time.sleep(0.002)  # distinct milliseconds, as a sender's successive frames have
    for f in frames:
        auth.open(f)
    assert len(auth._seen) <= 8
    for f in frames:  # dropped from the table or not: every one of them is refused again
        with pytest.raises(AuthError):
            auth.open(f)


def test_forged_reply_is_refused_by_the_caller():
    """A man in the middle sees the nonce but lacks the key: its WELCOME (its own NIXL agent) is refused."""
    cred = Credential("producer/p", SECRET)
    _, nonce = cred.seal(wire.encode(wire.Stats()))
    body, ts = wire.encode(wire.Ack(ok=True)), 1
    forged = _frame("consumer", ts, nonce, body, _mac(sender_key(b"attacker", "producer/p"), b"rep", "consumer", ts,
                                                     nonce, body))
    with pytest.raises(AuthError) as e:
        cred.open_reply(forged, nonce)
    assert e.value.code == "unauthenticated"
    unsigned = Authenticator(SECRET).seal_reply(None, wire.encode(wire.Ack(ok=True)))
    with pytest.raises(AuthError):  # the generic refusal is never taken for an answer
        cred.open_reply(unsigned, nonce)


def test_secret_comes_from_file_or_env_and_a_bad_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KVB_TEST_SECRET", "from-env")
    assert load_secret("KVB_TEST_SECRET") == b"from-env"
    f = tmp_path / "s"
    f.write_text("from-file\n")
    assert load_secret("KVB_TEST_SECRET", f) == b"from-file"
    monkeypatch.delenv("KVB_TEST_SECRET")
    assert load_secret("KVB_TEST_SECRET") is None
    with pytest.raises(CredentialError, match="cannot read"):
        load_secret(None, tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(CredentialError, match="empty"):
        load_secret(None, tmp_path / "empty")


def test_routable_listener_needs_a_secret_or_insecure():
    assert require_secret("127.0.0.1", None, False, "x") == ""
    assert require_secret("localhost", None, False, "x") == ""
    assert require_secret("0.0.0.0", SECRET, False, "x") == ""
    with pytest.raises(CredentialError, match="would listen on 0.0.0.0 without a secret"):
        require_secret("0.0.0.0", None, False, "the consumer endpoint")
    assert "INSECURE" in require_secret("0.0.0.0", None, True, "x")
