"""The per-room state machine shared by senders and receivers, SGLang-style poll states.

Each state carries its own deadline (from TransferConfig), and only the transitions listed
in ``TRANSITIONS`` are legal, so every way a room can end is visible here: it ends in
SUCCESS or FAILED, and the owner frees the room's blocks on entering either.
"""

from __future__ import annotations

import dataclasses
import enum
import time

from transfer.config import TransferConfig

SWEEP_INTERVAL_S = 0.01
"""Deadlines and heartbeats are checked at most this often, not on every loop iteration."""


class PollState(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"
    """Sender: no receiver has registered yet. Receiver: allocating, looking up, shaking hands."""
    WAITING_FOR_INPUT = "waiting_for_input"
    """Registered; the sender's data is not ready yet (its role is still computing)."""
    TRANSFERRING = "transferring"
    """Chunks are being offered and pulled, or a resume is pending."""
    SUCCESS = "success"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (PollState.SUCCESS, PollState.FAILED)


TRANSITIONS: dict[PollState, frozenset[PollState]] = {
    PollState.BOOTSTRAPPING: frozenset({PollState.WAITING_FOR_INPUT, PollState.TRANSFERRING, PollState.FAILED}),
    PollState.WAITING_FOR_INPUT: frozenset({PollState.TRANSFERRING, PollState.FAILED}),
    PollState.TRANSFERRING: frozenset({PollState.SUCCESS, PollState.FAILED}),
    PollState.SUCCESS: frozenset(),
    PollState.FAILED: frozenset(),
}


def timeout_of(state: PollState, config: TransferConfig) -> float:
    return {
        PollState.BOOTSTRAPPING: config.bootstrap_timeout_s,
        PollState.WAITING_FOR_INPUT: config.waiting_timeout_s,
        PollState.TRANSFERRING: config.transfer_timeout_s,
    }.get(state, float("inf"))


@dataclasses.dataclass
class Room:
    """One request's transfer as seen by one side; subclasses add what that side holds."""

    room: int
    config: TransferConfig
    state: PollState = PollState.BOOTSTRAPPING
    deadline: float = dataclasses.field(default=0.0)
    reason: str = ""

    def __post_init__(self) -> None:
        self.touch()

    def move(self, state: PollState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"room {self.room}: illegal transition {self.state.name} -> {state.name}")
        self.state = state
        self.touch()

    def touch(self) -> None:
        """Restarts the current state's clock: progress was made."""
        self.deadline = time.monotonic() + timeout_of(self.state, self.config)

    def expired(self, now: float) -> bool:
        return not self.state.terminal and now > self.deadline
