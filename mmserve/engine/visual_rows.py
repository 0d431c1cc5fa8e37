"""Visual tokens' rows kept on device, from the vision tower (or the transfer that brought them) to
the prefill program, in the model's dtype.

A vision call packs several pictures into one output, and a transfer brings a prompt's pictures as
one run, so a picture's rows are a run ``[start, start + count)`` of a larger array rather than an
array of their own: slicing one out would be a device program per (source, picture) shape, and a
host copy would be a round trip. ``VisualRows`` names such a run; a prompt's visual tokens are a
list of runs (``PromptVisuals``), and each prefill step gathers the runs its chunks need into the
step's visual block (``place_rows``: one program per source row count, whatever the offsets).

Rows are token-major: embeddings ``[R, H]`` and deepstack ``[R, levels * H]`` (every level of a
token in one row), the layout the embedding transfer carries.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class VisualRows:
    """Rows ``[start, start + count)`` of ``embeddings`` [R, H] and ``deepstack`` [R, levels * H]."""

    embeddings: jax.Array
    deepstack: jax.Array
    start: int
    count: int

    def __post_init__(self):
        if not 0 <= self.start <= self.start + self.count <= self.embeddings.shape[0]:
            raise ValueError(f"rows [{self.start}, {self.start + self.count}) outside {self.embeddings.shape[0]}")

    def take(self, offset: int, count: int) -> VisualRows:
        """The sub-run of ``count`` rows from ``offset`` within this one."""
        if not 0 <= offset <= offset + count <= self.count:
            raise ValueError(f"rows [{offset}, {offset + count}) outside a run of {self.count}")
        return dataclasses.replace(self, start=self.start + offset, count=count)

    def host(self) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [count, H], deepstack [count, levels * H]) on the host: for tests and tools,
        never on the serving path."""
        end = self.start + self.count
        return np.asarray(self.embeddings)[self.start:end], np.asarray(self.deepstack)[self.start:end]


def total_rows(runs: Sequence[VisualRows]) -> int:
    return sum(r.count for r in runs)


@dataclasses.dataclass(frozen=True)
class PromptVisuals:
    """Where a prompt's visual tokens are and which rows hold them: ``positions`` [n] ascending
    prompt positions, the i-th taken from the i-th row of ``runs`` laid end to end; ``missing``:
    ascending positions of visual tokens whose rows have not arrived yet (rows that come from
    another process in chunks: the prompt is prefilled up to the first of them meanwhile)."""

    positions: np.ndarray
    runs: tuple[VisualRows, ...]
    missing: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.int64))

    @classmethod
    def place(cls, token_ids, image_token_id: int, video_token_id: int, image: Sequence[VisualRows] = (),
              video: Sequence[VisualRows] = (), partial: bool = False) -> PromptVisuals | None:
        """Images' rows at the image placeholders, videos' at the video placeholders, each in prompt
        order; None for a prompt without either. A count that does not match is a ValueError;
        with ``partial``, fewer rows than placeholders of a kind are the first placeholders' rows
        (the rest are ``missing``)."""
        ids = np.asarray(token_ids).reshape(-1)
        segments, missing = [], []
        for token, runs, name in ((image_token_id, image, "image"), (video_token_id, video, "video")):
            where = np.flatnonzero(ids == token)
            rows = total_rows(runs)
            if rows > where.size or (rows < where.size and not partial):
                raise ValueError(f"prompt has {where.size} {name} placeholder tokens but {rows} {name} embeddings")
            at = 0
            for run in runs:
                segments.append((where[at:at + run.count], run))
                at += run.count
            missing.append(where[rows:])
        segments = [(p, r) for p, r in segments if r.count]
        missing = np.sort(np.concatenate(missing))
        if not segments and not missing.size:
            return None
        segments.sort(key=lambda s: int(s[0][0]))  # images and videos interleave in the prompt
        positions = np.concatenate([p for p, _ in segments]) if segments else np.empty(0, np.int64)
        return cls(positions, tuple(r for _, r in segments), missing)

    def ready_until(self, start: int, end: int) -> int:
        """The end of the prompt's run from ``start`` whose visual tokens all have their rows, at
        most ``end``: the first missing position from ``start`` on."""
        if not self.missing.size:  # every row is here: the common case, checked at every step
            return end
        at = int(np.searchsorted(self.missing, start))
        return min(end, int(self.missing[at])) if at < self.missing.size else end

    def in_span(self, start: int, end: int) -> list[tuple[np.ndarray, VisualRows]]:
        """The visual tokens in prompt positions [start, end), as (positions, rows) per run."""
        out, at = [], 0
        for run in self.runs:
            positions = self.positions[at:at + run.count]
            lo, hi = np.searchsorted(positions, [start, end])
            if hi > lo:
                out.append((positions[lo:hi], run.take(int(lo), int(hi - lo))))
            at += run.count
        return out


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _place(block_rows, block_deepstack, embeddings, deepstack, destination, source):
    """block[destination[i]] = rows[source[i]]; destinations past the block are dropped."""
    return (block_rows.at[destination].set(embeddings[source].astype(block_rows.dtype), mode="drop"),
            block_deepstack.at[destination].set(deepstack[source].astype(block_deepstack.dtype), mode="drop"))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _zeros(rows: int, width: int, deepstack_width: int, dtype):
    return jnp.zeros((rows, width), dtype), jnp.zeros((rows, deepstack_width), dtype)


def empty_block(rows: int, hidden: int, levels: int, dtype, device) -> tuple[jax.Array, jax.Array]:
    """A zero visual block made on ``device`` (nothing moves from the host), committed to it as
    ``place_rows``'s outputs are, so that every placement runs one program."""
    with jax.default_device(device):
        return jax.device_put(_zeros(rows, hidden, levels * hidden, jnp.dtype(dtype)), device)


def place_rows(block: tuple[jax.Array, jax.Array], placed: Sequence[tuple[np.ndarray, VisualRows]]
               ) -> tuple[jax.Array, jax.Array]:
    """Writes each run's rows at its block rows (``placed``: (block rows, run) pairs), one program
    per source row count; the block is donated. Sources are put where the block is first: moved
    there (device to device) from another device, and committed to it when they are not (so that
    the vision tower's uncommitted outputs and a transfer's committed rows run one program)."""
    rows, deepstack = block
    size = rows.shape[0]
    for destination, run in placed:
        dst = np.full(size, size, np.int32)
        src = np.zeros(size, np.int32)
        dst[:destination.size] = destination
        src[:destination.size] = run.start + np.arange(run.count)
        embeddings, stack = jax.device_put((run.embeddings, run.deepstack), rows.sharding)
        rows, deepstack = _place(rows, deepstack, embeddings, stack, dst, src)
    return rows, deepstack
