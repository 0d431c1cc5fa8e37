"""How routed tokens reach their experts: four strategies that compute the same thing.

Each takes the tokens ``x`` [T, H], their routing (``top_e`` [T, k] expert ids, ``top_w`` [T, k]
renormalised weights) and the expert weights in checkpoint layout (``gate_up`` [E, H, 2I],
``down`` [E, I, H]), and returns sum_j top_w[t, j] * expert_{top_e[t, j]}(x[t]) for every token.
An expert id of E (one past the last) means "no expert": padding tokens carry it and get zeros.

Which one is fast depends on the backend (measured by ``scripts/bench_moe.py``, figures in
docs/status.md):

- ``ragged_dot``: sort the (token, choice) pairs by expert, two grouped matmuls. The right
  primitive on TPU and GPU, and the one XLA partitions by expert on a mesh. XLA:CPU lowers it as
  if every token went through every expert (7-13 GFLOP/s on the routed work).
- ``dense``: every token through every expert, weighted by its routing (zero for unchosen
  experts). E/k times the routed FLOPs, in plain batched matmuls; for parity checks and for
  configs with few experts.
- ``grouped`` (XLA:CPU): each expert takes up to ``capacity`` of its rows in one batched matmul
  over experts (each expert's weights read once, no weight gather), where ``capacity`` is the
  mean rows per expert rounded down to a tile; the rows beyond an expert's capacity run as tiles
  of ``TILE`` rows in a loop whose trip count is the number of tiles actually used, so a decode
  step reads only the experts its tokens chose and nothing is dropped, whatever the imbalance.
  A batch of at most ``GATHER_MAX_TOKENS`` tokens (decode at batch 1 or 2) whose (token, choice)
  pairs are no more than the experts goes to ``gathered``.
- ``gathered``: each (token, choice) pair gathers its expert's weights, then one batched
  matrix-vector product over the pairs, no loop. It copies k experts' weights per token, so it
  only pays for a token or two: there every pair would fill a tile of its own, and XLA:CPU's loop
  (a weight copy and a dispatch per tile) cost 1.4-1.7x as much (``scripts/bench_moe.py``). Chosen
  for a whole model it copies [tokens x k, H, 2I] of weights at every prefill step: for checks only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

STRATEGIES = ("ragged_dot", "dense", "grouped", "gathered")
TILE = 8
"""Rows of one overflow tile. Small: an expert's tiles run back to back, so its weights stay in
cache, and a decode step's few rows per expert waste little."""
GATHER_MAX_TOKENS = 2
"""The most tokens ``grouped`` hands to ``gathered`` (when their pairs are no more than the experts).
Measured on CPU (bench and 30b shapes): ``gathered`` is faster at 1 and 2 tokens, 1.5-2x slower at 4,
where pairs start to share experts and each pair still copies its own."""


def choose(requested: str, backend: str, sharded: bool) -> str:
    """``auto`` -> ``grouped`` on an unsharded CPU model, ``ragged_dot`` elsewhere (the grouped
    loop and ``gathered`` index expert weights by a traced id, which on an expert-sharded mesh would
    gather them: asked for by name there, they run, slowly)."""
    if requested == "auto":
        return "grouped" if backend == "cpu" and not sharded else "ragged_dot"
    if requested not in STRATEGIES:
        raise ValueError(f"unknown MoE dispatch {requested!r}; expected auto or one of {', '.join(STRATEGIES)}")
    return requested


def dispatch(strategy: str, x, top_e, top_w, gate_up, down):
    return {"ragged_dot": ragged, "dense": dense, "grouped": grouped,
            "gathered": gathered}[strategy](x, top_e, top_w, gate_up, down)


def _swiglu(h):
    inter = h.shape[-1] // 2
    return jax.nn.silu(h[..., :inter]) * h[..., inter:]


def ragged(x, top_e, top_w, gate_up, down):
    k = top_e.shape[1]
    flat_e = top_e.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)  # rows of expert E (none) sort last, past every group
    token_of = order // k
    group_sizes = jnp.bincount(flat_e, length=gate_up.shape[0]).astype(jnp.int32)
    h = _swiglu(jax.lax.ragged_dot(x[token_of], gate_up, group_sizes))
    out = jax.lax.ragged_dot(h, down, group_sizes) * top_w.reshape(-1)[order][:, None]
    real = (flat_e[order] < gate_up.shape[0])[:, None]  # rows past the groups are not defined to be zero
    return jnp.zeros_like(x).at[token_of].add(jnp.where(real, out, 0))


def dense(x, top_e, top_w, gate_up, down):
    t, e = x.shape[0], gate_up.shape[0]
    combine = jnp.zeros((t, e), x.dtype).at[jnp.arange(t)[:, None], top_e].add(top_w, mode="drop")
    h = _swiglu(jnp.einsum("th,ehi->eti", x, gate_up))
    return jnp.einsum("eti,eih,te->th", h, down, combine)


def capacity_for(tokens: int, k: int, experts: int) -> int:
    """Rows per expert in the batched part: the mean load rounded down to a tile (0 for decode-sized
    batches, where most experts get no row and a batched pass would read every expert's weights)."""
    return tokens * k // experts // TILE * TILE


def gathered(x, top_e, top_w, gate_up, down):
    t, k = top_e.shape
    e = gate_up.shape[0]
    flat_e = top_e.reshape(-1)
    expert = jnp.minimum(flat_e, e - 1)  # a padding pair computes with the last expert, then is dropped
    h = _swiglu(jnp.einsum("ah,ahi->ai", jnp.repeat(x, k, axis=0), gate_up[expert]))
    y = jnp.einsum("ai,aih->ah", h, down[expert])
    y = jnp.where((flat_e < e)[:, None], y * top_w.reshape(-1)[:, None], 0)
    return y.reshape(t, k, down.shape[-1]).sum(axis=1)


def grouped(x, top_e, top_w, gate_up, down):
    t, k = top_e.shape
    e, h_dim = gate_up.shape[0], x.shape[1]
    if t <= GATHER_MAX_TOKENS and t * k <= e:
        return gathered(x, top_e, top_w, gate_up, down)
    a = t * k
    cap = capacity_for(t, k, e)
    flat_e = top_e.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    sorted_e = flat_e[order]
    sizes = jnp.bincount(flat_e, length=e)  # rows of expert e (none) are left out
    real = sorted_e < e
    rank = jnp.arange(a) - (jnp.cumsum(sizes) - sizes)[jnp.minimum(sorted_e, e - 1)]  # place in its group
    token = order // k
    weight = top_w.reshape(-1)[order]
    padded = jnp.concatenate([x, jnp.zeros((1, h_dim), x.dtype)])  # row t: the zero row padding reads
    out = jnp.zeros((t + 1, h_dim), x.dtype)

    if cap > 0:
        slot = jnp.where(real & (rank < cap), sorted_e * cap + rank, e * cap)  # e * cap: the rest land here
        rows = jnp.full((e * cap + 1,), t, jnp.int32).at[slot].set(token)[:-1]
        gates = jnp.zeros((e * cap + 1,), x.dtype).at[slot].set(weight)[:-1]
        h = _swiglu(jnp.einsum("ech,ehi->eci", padded[rows].reshape(e, cap, h_dim), gate_up))
        y = jnp.einsum("eci,eih->ech", h, down).reshape(e * cap, h_dim)
        out = out.at[rows].add(y * gates[:, None])

    max_tiles = min(-(-a // TILE) + e, a, e * -(-max(t - cap, 0) // TILE))
    if max_tiles == 0:  # every expert's rows fit in its capacity
        return out[:t]
    over = jnp.maximum(sizes - cap, 0)
    tiles = -(-over // TILE)
    tile_end = jnp.cumsum(tiles)
    spill = rank - cap
    dest = jnp.where(real & (spill >= 0),
                     ((tile_end - tiles)[jnp.minimum(sorted_e, e - 1)] + spill // TILE) * TILE + spill % TILE,
                     max_tiles * TILE)
    rows = jnp.full((max_tiles * TILE + 1,), t, jnp.int32).at[dest].set(token)
    gates = jnp.zeros((max_tiles * TILE + 1,), x.dtype).at[dest].set(weight)
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(max_tiles), side="right"), e - 1)

    def run_tile(i, out):
        tile_rows = jax.lax.dynamic_slice_in_dim(rows, i * TILE, TILE)
        tile_gates = jax.lax.dynamic_slice_in_dim(gates, i * TILE, TILE)
        expert = tile_expert[i]
        y = _swiglu(padded[tile_rows] @ gate_up[expert]) @ down[expert]
        return out.at[tile_rows].add(y * tile_gates[:, None])

    return jax.lax.fori_loop(0, tile_end[-1], run_tile, out)[:t]
