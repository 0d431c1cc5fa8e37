"""Flags generated from a config dataclass: help from the field docstrings, unset flags override
nothing, a field without a docstring cannot become a flag."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from mmserve.config_flags import add_config_flags, config_from_args


@dataclasses.dataclass(frozen=True)
class Knobs:
    width: int = 4
    """how wide, in cells"""
    wait_s: float | None = None
    """seconds to wait; none waits forever"""
    fast: bool = True
    """go fast"""
    label: str = "x"
    """what to call it"""


@dataclasses.dataclass(frozen=True)
class Undocumented:
    width: int = 4


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Knobs, "knobs", prefix="k_", env={"width": "KNOB_WIDTH"})
    return parser.parse_args(list(argv))


def test_flags_parse_into_the_config():
    args = parse("--width", "7", "--wait", "2.5", "--no-fast", "--label", "y")
    assert config_from_args(Knobs, args, prefix="k_") == Knobs(7, 2.5, False, "y")


def test_unset_flags_keep_the_base_and_fixed_values_win():
    base = Knobs(width=9, label="from env")
    assert config_from_args(Knobs, parse(), prefix="k_", base=base) == base
    assert config_from_args(Knobs, parse("--width", "1"), prefix="k_", base=base, label="z") == Knobs(1, None, True, "z")


def test_help_is_the_docstring_with_default_and_variable():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Knobs, "knobs", prefix="k_", env={"width": "KNOB_WIDTH"})
    text = parser.format_help()
    assert "how wide, in cells (default: 4; env KNOB_WIDTH)" in " ".join(text.split())
    assert "seconds to wait; none waits forever (default: none)" in " ".join(text.split())
    assert "--fast, --no-fast" in text


def test_a_field_without_a_docstring_is_refused():
    with pytest.raises(TypeError, match="no docstring"):
        add_config_flags(argparse.ArgumentParser(), Undocumented, "u", prefix="u_")


def test_a_bad_value_is_a_usage_error():
    with pytest.raises(SystemExit):
        parse("--width", "wide")
