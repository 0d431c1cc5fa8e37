"""TransferConfig: defaults, MMSERVE_* fallbacks, CLI flags on top, validation."""

from __future__ import annotations

import argparse

import pytest

from mmserve.config_flags import add_config_flags, config_from_args
from transfer import TransferConfig
from transfer.config import ENV, SECRET_FIELDS


def transfer_parser() -> argparse.ArgumentParser:
    """The flags as serve.py adds them."""
    parser = argparse.ArgumentParser()
    add_config_flags(parser, TransferConfig, "transfer", prefix="transfer_", skip=SECRET_FIELDS, env=ENV)
    return parser


def test_environment_fills_what_is_not_given():
    config = TransferConfig.from_env({"MMSERVE_BLOCK_SIZE": "32", "MMSERVE_DEFAULT_BLOCKS": "8",
                                      "MMSERVE_BUFFER_BLOCKS": "512", "MMSERVE_TRANSFER_TIMEOUT": "2.5",
                                      "MMSERVE_DATA_PLANE": "zmq"})
    assert (config.block_size, config.default_blocks, config.buffer_blocks) == (32, 8, 512)
    assert (config.transfer_timeout_s, config.data_plane) == (2.5, "zmq")
    assert config.default_tokens == 256
    assert TransferConfig.from_env({}) == TransferConfig()
    assert TransferConfig().bind_host == "127.0.0.1", "listeners stay on loopback unless configured"


def test_the_key_is_never_a_flag_or_a_variable_of_its_own():
    """argv is readable by every local user; the key comes from the caller (mmserve derives it
    from the cluster credential)."""
    parser = transfer_parser()
    assert not any("secret" in action.dest for action in parser._actions)
    assert TransferConfig.from_env({"MMSERVE_TRANSFER_SECRET": "s"}).secret == ""


def test_cli_flags_beat_environment_beat_defaults():
    args = transfer_parser().parse_args(["--block-size", "8", "--heartbeat-timeout", "30"])
    base = TransferConfig.from_env({"MMSERVE_BLOCK_SIZE": "32", "MMSERVE_BUFFER_BLOCKS": "100"})
    config = config_from_args(TransferConfig, args, prefix="transfer_", base=base)
    assert (config.block_size, config.buffer_blocks, config.heartbeat_timeout_s) == (8, 100, 30.0)
    assert config.default_blocks == TransferConfig().default_blocks


@pytest.mark.parametrize("bad", [{"block_size": 0}, {"default_blocks": 10, "buffer_blocks": 5},
                                 {"transfer_timeout_s": 0}, {"heartbeat_interval_s": 5, "heartbeat_timeout_s": 5},
                                 {"data_plane": "carrier pigeon"}])
def test_nonsense_is_refused(bad):
    with pytest.raises(ValueError):
        TransferConfig(**bad)


def test_unparsable_environment_names_the_variable():
    with pytest.raises(ValueError, match="MMSERVE_BLOCK_SIZE"):
        TransferConfig.from_env({"MMSERVE_BLOCK_SIZE": "many"})
