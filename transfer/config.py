"""Knobs of the transfer package, with MMSERVE_* environment fallbacks.

One frozen dataclass is passed down to every piece (allocator, buffers, sender, receiver,
bootstrap registry) so a role is configured in one place and nothing reads globals.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from transfer.curve import CurveKeys

DATA_PLANES = ("auto", "jax", "zmq")


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """How big the block pools are, how long each phase may take, and who may talk to us.

    Every field has an environment variable (see ``ENV``); ``from_env`` reads them. A program's
    flags go over that (mmserve's are generated from these fields and their docstrings), so
    ``--block-size`` beats ``MMSERVE_BLOCK_SIZE`` beats the default here.
    """

    block_size: int = 64
    """Tokens per block: the unit of allocation and of padding on the wire."""
    default_blocks: int = 16
    """The most a room's first chunk carries (a receiver registers this capacity before it knows
    the real length); a longer room resumes for the rest."""
    buffer_blocks: int = 2048
    """Blocks in a sender's device pool; a receiver's reservation (it keeps chunks as pulled, no pool)."""
    bind_host: str = "127.0.0.1"
    """Interface every listener (control, registry, data plane) binds to."""
    advertise_host: str = ""
    """The address peers dial to reach this process's listeners (a pod IP, a host name), published
    in the registry; empty: the bind host. Needed when binding 0.0.0.0 across hosts or pods."""
    secret: str = dataclasses.field(default="", repr=False)
    """The secret the CurveZMQ keys of every control and registry socket are derived from
    (:mod:`transfer.curve`): a peer without it is refused at the connection's handshake, and the
    control traffic is encrypted. Empty: plain ZMQ (a library user's choice; mmserve's roles always
    set it from the cluster credential). Never a flag: argv is readable by every local user."""
    max_message_bytes: int = 1 << 20
    """Largest control message accepted; bigger ones get an OVERSIZED error."""
    bootstrap_timeout_s: float = 30.0
    """Seconds within which a room must be registered (the receiver looked up the sender and shook
    hands)."""
    waiting_timeout_s: float = 300.0
    """Seconds a registered room may wait for the sender's input (its compute queue)."""
    transfer_timeout_s: float = 60.0
    """Seconds within which each step of an active transfer (a chunk pulled, a resume requested) must
    finish."""
    heartbeat_interval_s: float = 1.0
    """Seconds between a receiver's pings of each sender it has live rooms with, and between a
    sender's re-publications."""
    heartbeat_timeout_s: float = 10.0
    """Seconds after which a silent peer is dead: its rooms fail and their blocks are freed."""
    data_plane: str = "auto"
    """Which data plane moves the arrays: "jax" (transfer server), "zmq" (raw frames) or "auto": the
    zmq plane in ``data_plane_dir`` when one is given, else the transfer server where it starts."""
    data_plane_dir: str = ""
    """A directory only this user can enter: the zmq data plane listens on a Unix socket there, not
    on a TCP port every local user reaches (the transfer server aborts its process on a malformed
    packet from any of them: docs/security.md). ``--role all`` gives its workers its own."""
    jax_transfer_size: int = 256 << 20
    """Bytes the jax transfer server moves per chunk of a pull (its ``transfer_size``); a pull of
    more is cut in chunks of this size, copied ``jax_parallel_copies`` at a time. Set on both
    sides (docs/transfer.md has the figures)."""
    jax_parallel_copies: int = 8
    """Chunks the jax transfer server copies at once (its ``max_num_parallel_copies``)."""
    jax_raw_buffers: bool = False
    """The jax transfer server reads and writes device buffers directly (its ``use_raw_buffers``)."""

    def __post_init__(self) -> None:
        positive = ("block_size", "default_blocks", "buffer_blocks", "max_message_bytes", "jax_transfer_size",
                "jax_parallel_copies")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("bootstrap_timeout_s", "waiting_timeout_s", "transfer_timeout_s",
                     "heartbeat_interval_s", "heartbeat_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.default_blocks > self.buffer_blocks:
            raise ValueError("default_blocks cannot exceed buffer_blocks")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must exceed heartbeat_interval_s")
        if self.data_plane not in DATA_PLANES:
            raise ValueError(f"data_plane must be one of {DATA_PLANES}, got {self.data_plane!r}")

    @property
    def control_keys(self) -> CurveKeys | None:
        """The control and registry sockets' CurveZMQ keys; None without a secret."""
        return CurveKeys.from_secret(self.secret.encode(), "transfer-control") if self.secret else None

    @property
    def public_host(self) -> str:
        return self.advertise_host or self.bind_host

    @property
    def default_tokens(self) -> int:
        return self.default_blocks * self.block_size

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> TransferConfig:
        """Defaults, replaced by MMSERVE_* variables that are set, replaced by ``overrides``."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name in SECRET_FIELDS:
                continue
            raw = env.get(ENV[field.name])
            if raw is not None and raw != "":
                values[field.name] = _parse(field.type, raw, ENV[field.name])
        values.update(overrides)
        return cls(**values)


SECRET_FIELDS = ("secret",)
"""Fields only the caller sets (mmserve derives the key from its cluster credential): never a
command-line flag, nor a variable of their own."""

ENV = {
    "block_size": "MMSERVE_BLOCK_SIZE",
    "default_blocks": "MMSERVE_DEFAULT_BLOCKS",
    "buffer_blocks": "MMSERVE_BUFFER_BLOCKS",
    "bind_host": "MMSERVE_TRANSFER_HOST",
    "advertise_host": "MMSERVE_TRANSFER_ADVERTISE_HOST",
    "max_message_bytes": "MMSERVE_MAX_MESSAGE_BYTES",
    "bootstrap_timeout_s": "MMSERVE_BOOTSTRAP_TIMEOUT",
    "waiting_timeout_s": "MMSERVE_WAITING_TIMEOUT",
    "transfer_timeout_s": "MMSERVE_TRANSFER_TIMEOUT",
    "heartbeat_interval_s": "MMSERVE_HEARTBEAT_INTERVAL",
    "heartbeat_timeout_s": "MMSERVE_HEARTBEAT_TIMEOUT",
    "data_plane": "MMSERVE_DATA_PLANE",
    "data_plane_dir": "MMSERVE_DATA_PLANE_DIR",
    "jax_transfer_size": "MMSERVE_JAX_TRANSFER_SIZE",
    "jax_parallel_copies": "MMSERVE_JAX_PARALLEL_COPIES",
    "jax_raw_buffers": "MMSERVE_JAX_RAW_BUFFERS",
}

_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _bool(raw: str) -> bool:
    try:
        return _BOOLS[raw.strip().lower()]
    except KeyError:
        raise ValueError(raw) from None


_TYPES = {"int": int, "float": float, "str": str, "bool": _bool}


def _parse(type_name: str, raw: str, variable: str) -> Any:
    try:
        return _TYPES[type_name](raw)
    except ValueError as error:
        raise ValueError(f"{variable}={raw!r} is not a valid {type_name}") from error
