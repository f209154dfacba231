"""UCX's error handling is a setting of the connector (transfer/nixl_agent.py says what each mode gives up).

`peer` stays the default; `none` is asked for by name, reaches the NIXL agent, and a value that is neither is
refused before any agent exists. Delivery, a killed and a frozen consumer in both modes: test_dead_consumer.py."""
from __future__ import annotations

import pytest

from pd.connector_config import ConnectorConfig, ConnectorConfigError
from transfer.nixl_agent import NixlAgent


def test_peer_is_the_default_and_none_is_accepted():
    assert ConnectorConfig.from_extra({}).ucx_error_handling == "peer"
    assert ConnectorConfig.from_extra({"ucx_error_handling": "none"}).ucx_error_handling == "none"


def test_another_value_is_refused_naming_the_field_and_the_choices():
    with pytest.raises(ConnectorConfigError, match="ucx_error_handling.*'peer' or 'none'"):
        ConnectorConfig.from_extra({"ucx_error_handling": "off"})
    with pytest.raises(ValueError, match=r"one of \('peer', 'none'\), got 'off'"):
        NixlAgent("refused", "off")


@pytest.mark.parametrize("mode", ["peer", "none"])
def test_the_agent_runs_with_the_mode_asked_for(mode):
    assert NixlAgent(f"mode-{mode}", mode).error_handling == mode
