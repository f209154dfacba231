"""Pools given as sizes: an operator sizes a decode node's slots and a prefill node's staging in bytes
(what they take from the device), and the connector turns that into whole chunks."""
from __future__ import annotations

import pytest

from pd.connector_config import ConnectorConfig, ConnectorConfigError

MIB = 2**20


def test_slot_pool_and_staging_in_bytes_become_whole_chunks():
    cfg = ConnectorConfig.model_validate({"slot_pool_bytes": "64MiB", "staging_bytes": "20MiB"})
    assert cfg.slots_for(8 * MIB) == 8
    assert cfg.staging_for(8 * MIB) == 2  # 20 MiB holds two whole 8 MiB chunks, not 2.5


def test_a_size_smaller_than_one_chunk_still_gives_one_slot():
    assert ConnectorConfig.model_validate({"slot_pool_bytes": "1MiB"}).slots_for(8 * MIB) == 1


def test_without_sizes_the_counts_stand():
    cfg = ConnectorConfig.model_validate({"num_slots": 12, "staging_chunks": 3})
    assert (cfg.slots_for(8 * MIB), cfg.staging_for(8 * MIB)) == (12, 3)


def test_a_size_that_is_not_one_is_refused_with_the_field_named():
    with pytest.raises(ConnectorConfigError, match="slot_pool_bytes.*'lots' is not a size"):
        ConnectorConfig.from_extra({"slot_pool_bytes": "lots"})
