"""How often the consumer endpoint's thread looks at the wire: fast for spin_s after a notice, and longer while
an idle engine waits for the rest of a transfer under way; a lease still waiting for its first chunk gets no
more than spin_s after another one's notice, and nothing received nothing fast. Times are plain numbers (the
decision takes `now`)."""
from __future__ import annotations

from transfer.consumer_settings import ConsumerSettings
from transfer.poll_pace import poll_timeout_ms, streaming

CFG = ConsumerSettings(chunk_tokens=16, num_slots=4)  # spin_s 0.02, idle_spin_s 0.1
NOTICED = 100.0


def under_way_is(value: bool):
    asked = []

    def under_way() -> bool:
        asked.append(True)
        return value
    return under_way, asked


def test_chunks_stream_for_spin_s_after_a_notice_whatever_the_engine_does():
    under_way, _ = under_way_is(False)
    assert streaming(CFG, NOTICED + 0.019, NOTICED, awaited_until=0.0, receiving=True, under_way=under_way)
    assert not streaming(CFG, NOTICED + 0.021, NOTICED, awaited_until=0.0, receiving=True, under_way=under_way)


def test_an_idle_engine_waiting_for_the_rest_of_a_transfer_keeps_chunks_streaming_for_idle_spin_s():
    under_way, _ = under_way_is(True)
    waiting = NOTICED + 1.0
    assert streaming(CFG, NOTICED + 0.05, NOTICED, awaited_until=waiting, receiving=True, under_way=under_way)
    assert streaming(CFG, NOTICED + 0.099, NOTICED, awaited_until=waiting, receiving=True, under_way=under_way)
    # bounded: a transfer whose next chunk is a long forward away falls back to lease_poll_s looks
    assert not streaming(CFG, NOTICED + 0.101, NOTICED, awaited_until=waiting, receiving=True, under_way=under_way)


def test_a_busy_engine_gets_spin_s_alone():
    under_way, asked = under_way_is(True)
    # the engine's last idle wait ended: its steps run, and looking fast would slow its running requests
    assert not streaming(CFG, NOTICED + 0.05, NOTICED, awaited_until=NOTICED + 0.04, receiving=True,
                         under_way=under_way)
    assert not asked  # the pool's lock was not taken for it


def test_a_lease_waiting_for_its_first_chunk_is_not_hurried_by_an_earlier_transfers_notice():
    under_way, asked = under_way_is(False)
    assert not streaming(CFG, NOTICED + 0.05, NOTICED, awaited_until=NOTICED + 1.0, receiving=True,
                         under_way=under_way)
    assert asked


def test_nothing_streams_and_the_thread_sleeps_long_without_a_receiving_lease():
    under_way, asked = under_way_is(True)
    assert not streaming(CFG, NOTICED + 0.001, NOTICED, awaited_until=NOTICED + 1.0, receiving=False,
                         under_way=under_way)
    assert not asked
    assert poll_timeout_ms(CFG, settling=False, streaming_now=False, receiving=False) == CFG.idle_poll_s * 1000
    assert poll_timeout_ms(CFG, settling=False, streaming_now=False, receiving=True) == CFG.lease_poll_s * 1000
    assert poll_timeout_ms(CFG, settling=True, streaming_now=False, receiving=True) == 0
    assert poll_timeout_ms(CFG, settling=False, streaming_now=True, receiving=True) == 0
