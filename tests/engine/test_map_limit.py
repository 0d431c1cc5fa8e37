"""A process near the kernel's limit on memory mappings (each compiled XLA:CPU program takes ~170)
is told so in the log, with what to do, before a later compile crashes it."""

import logging

from mmserve.engine import warmup


def test_a_process_past_half_the_map_limit_warns_with_the_fix(tmp_path, monkeypatch, caplog):
    limit = tmp_path / "max_map_count"
    limit.write_text("100\n")  # this process has more than 50 mappings
    monkeypatch.setattr(warmup, "MAP_LIMIT", limit)
    with caplog.at_level(logging.WARNING, logger="mmserve"):
        warmup.warn_if_near_map_limit()
    assert "vm.max_map_count" in caplog.text and "sysctl -w vm.max_map_count" in caplog.text


def test_a_process_well_under_the_limit_says_nothing(tmp_path, monkeypatch, caplog):
    limit = tmp_path / "max_map_count"
    limit.write_text(str(10**9))
    monkeypatch.setattr(warmup, "MAP_LIMIT", limit)
    with caplog.at_level(logging.WARNING, logger="mmserve"):
        warmup.warn_if_near_map_limit()
    assert caplog.text == ""
