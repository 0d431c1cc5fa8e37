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
                                 {"data_plane": "carrier pigeon"}, {"jax_transfer_size": 0},
                                 {"jax_parallel_copies": 0}])
def test_nonsense_is_refused(bad):
    with pytest.raises(ValueError):
        TransferConfig(**bad)


def test_unparsable_environment_names_the_variable():
    with pytest.raises(ValueError, match="MMSERVE_BLOCK_SIZE"):
        TransferConfig.from_env({"MMSERVE_BLOCK_SIZE": "many"})


def test_the_jax_servers_knobs_come_from_the_environment_and_flags():
    config = TransferConfig.from_env({"MMSERVE_JAX_TRANSFER_SIZE": "4194304", "MMSERVE_JAX_PARALLEL_COPIES": "2",
                                      "MMSERVE_JAX_RAW_BUFFERS": "yes"})
    assert (config.jax_transfer_size, config.jax_parallel_copies, config.jax_raw_buffers) == (4 << 20, 2, True)
    assert TransferConfig.from_env({"MMSERVE_JAX_RAW_BUFFERS": "0"}).jax_raw_buffers is False
    with pytest.raises(ValueError, match="MMSERVE_JAX_RAW_BUFFERS"):
        TransferConfig.from_env({"MMSERVE_JAX_RAW_BUFFERS": "maybe"})
    args = transfer_parser().parse_args(["--no-jax-raw-buffers", "--jax-transfer-size", "65536"])
    config = config_from_args(TransferConfig, args, prefix="transfer_", base=config)
    assert (config.jax_transfer_size, config.jax_parallel_copies, config.jax_raw_buffers) == (65536, 2, False)


def test_the_knobs_reach_the_jax_transfer_server(monkeypatch):
    from transfer import jax_plane
    from transfer.data_plane import open_data_plane

    given = {}
    start = jax_plane.jax_transfer.start_transfer_server

    def recording(*args, **kwargs):
        given.update(kwargs)
        return start(*args, **kwargs)

    monkeypatch.setattr(jax_plane.jax_transfer, "start_transfer_server", recording)
    plane = open_data_plane(TransferConfig(data_plane="jax", jax_transfer_size=1 << 20, jax_parallel_copies=3,
                                           jax_raw_buffers=True))
    assert plane.kind == "jax"
    assert given == {"transfer_size": 1 << 20, "max_num_parallel_copies": 3, "use_raw_buffers": True}
    plane.close()
