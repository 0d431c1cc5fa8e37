"""Fixtures of the sharding tests (helpers are in ``multidevice``: a ``conftest`` module name is
shared by every test folder, so tests cannot import from it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from multidevice import SHARDABLE_TEXT


@pytest.fixture(scope="session")
def shardable_checkpoint(tmp_path_factory) -> Path:
    """A transformers-written checkpoint of a small config that splits on every test mesh."""
    from hf_reference import hf_config, hf_model, write_checkpoint

    return write_checkpoint(hf_model(hf_config(text=SHARDABLE_TEXT)), tmp_path_factory.mktemp("shardable"))
