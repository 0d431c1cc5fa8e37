"""Command-line flags generated from a config dataclass: one flag per field, its help the field's
docstring, its default the field's default.

A config's fields are documented where they are declared (a string literal right below each field,
as PEP 257 calls an attribute docstring), so ``--help``, the code and the docs cannot drift apart,
and every config reaches the command line the same way (``add_config_flags`` then
``config_from_args``). A flag left unset does not override: the config's own default applies, or a
``base`` the caller built (the environment, for the transfer settings).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

TYPES = {"int": int, "float": float, "str": str, "Path": Path}
"""The field annotations a flag can parse (``X | None`` too); ``bool`` becomes --x / --no-x."""


def flag_name(field_name: str) -> str:
    """``queue_timeout_s`` -> ``--queue-timeout``: seconds are said in the help, not the name."""
    return "--" + field_name.removesuffix("_s").replace("_", "-")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right after its declaration), as one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def add_config_flags(parser: argparse.ArgumentParser, cls: type, title: str, *, prefix: str,
                     skip: Iterable[str] = (), env: Mapping[str, str] | None = None) -> None:
    """One flag per field of ``cls`` but ``skip``, in a group titled ``title``; the parsed value
    lands in ``args.<prefix><field>`` (None when the flag is not given). ``env`` names the
    environment variable a field falls back to, said in its help."""
    group = parser.add_argument_group(title)
    docs = field_docs(cls)
    skip = set(skip)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        if field.name not in docs:
            raise TypeError(f"{cls.__name__}.{field.name} has no docstring: it would be a flag without help")
        help_text = docs[field.name].replace("%", "%%")
        default = field.default if field.default is not dataclasses.MISSING else None
        notes = [] if "(default" in help_text else [f"default: {_shown(field.name, default)}"]
        if env and field.name in env:
            notes.append(f"env {env[field.name]}")
        if notes:
            help_text += f" ({'; '.join(notes)})"
        kind = field.type.removesuffix(" | None")
        if kind == "bool":
            group.add_argument(flag_name(field.name), dest=prefix + field.name, default=None,
                               action=argparse.BooleanOptionalAction, help=help_text)
        elif kind in TYPES:
            group.add_argument(flag_name(field.name), dest=prefix + field.name, default=None, type=TYPES[kind],
                               metavar=kind.upper(), help=help_text)
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: no flag for a field of type {field.type}")


def config_from_args(cls: type, args: argparse.Namespace, *, prefix: str, base: Any = None, **fixed: Any):
    """``cls`` from the flags that were given, over ``base`` (or the defaults), with ``fixed``
    (values that are not flags) over everything. Raises ValueError as the config's own checks do,
    a message that begins with a field given as a flag beginning with the flag's name instead."""
    given = {field.name: getattr(args, prefix + field.name) for field in dataclasses.fields(cls)
             if getattr(args, prefix + field.name, None) is not None}
    values = given | fixed
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except ValueError as error:
        name, _, rest = str(error).partition(" ")
        if name in given and rest:
            raise ValueError(f"{flag_name(name)} {rest}") from None
        raise


def _shown(name: str, default: Any) -> str:
    if default is None:
        return "none"
    if name.endswith("bytes") and isinstance(default, int) and default >= 1 << 20 and default % (1 << 20) == 0:
        return f"{default} ({default >> 20} MiB)"
    return repr(default) if isinstance(default, str) else str(default)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Says each hand-written flag's default too, unless its help already does or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or "(default" in text or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def seconds(text: str) -> float:
    """An argparse type: a duration, 0 or more seconds (finite)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):  # nan fails too
        raise argparse.ArgumentTypeError(f"seconds are 0 or more and finite, got {text}")
    return value


def tcp_port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535 (a larger one wrapped around to
    another port, silently)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {port}")
    return port
