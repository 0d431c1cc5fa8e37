"""Worker: the model of one checkpoint, unsharded and sharded over several meshes of 8 CPU devices.

Usage: sharded_forward_worker.py CHECKPOINT MESH [MESH ...]. Prints one JSON line: per mesh, the
max logit difference to the unsharded model (safetensors and orbax loads), the partition specs
and per-device shard shapes of a few parameters and of a KV cache, and what XLA compiled the
sharded MoE block into (its collectives, the largest array an all-gather builds, any loops).
"""

import json
import math
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from hf_reference import image_prompt, random_patches
from mmserve.distributed import MeshLayout, make_mesh
from models.qwen3_vl_moe import load_model
from models.qwen3_vl_moe.moe import SparseMoeBlock

PROBES = {
    "q_proj": ("language_model", "layers_0", "self_attn", "q_proj", "kernel"),
    "k_proj": ("language_model", "layers_0", "self_attn", "k_proj", "kernel"),
    "gate_up_proj": ("language_model", "layers_1", "mlp", "gate_up_proj"),
    "down_proj": ("language_model", "layers_1", "mlp", "down_proj"),
    "embed_tokens": ("language_model", "embed_tokens", "embedding"),
    "lm_head": ("lm_head", "kernel"),
    "vision_fc1": ("visual", "blocks_0", "mlp", "linear_fc1", "kernel"),
}


def describe(array) -> dict:
    return {
        "spec": [None if a is None else a for a in array.sharding.spec] + [None] * (array.ndim - len(array.sharding.spec)),
        "shards": sorted({tuple(s.data.shape) for s in array.addressable_shards}),
        "devices": len(array.sharding.device_set),
    }


def probe(params, path):
    for name in path:
        params = params[name]
    return params


def moe_program(model, layout: MeshLayout) -> dict:
    """Collectives of the compiled MoE block (layer 1) for 16 tokens, from the optimized HLO."""
    block = SparseMoeBlock(model.config.text, jnp.float32, model.moe_dispatch)
    params = probe(model.params, ("language_model", "layers_1", "mlp"))
    x = jax.device_put(jnp.ones((1, 16, model.config.text.hidden_size)), layout.replicated())
    hlo = jax.jit(lambda p, x: block.apply({"params": p}, x)).lower(params, x).compile().as_text()
    gathered = [math.prod(int(n) for n in dims.split(",") if n)
                for dims in re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlo)]
    return {op: len(re.findall(rf" {op}\(", hlo)) for op in ("all-gather", "all-to-all", "all-reduce", "while")} | {
        "largest_all_gather": max(gathered, default=0)}


def decode_cache_gathers(model, layout: MeshLayout, cache) -> int:
    """All-gathers in the compiled decode step that build an array of the whole KV cache's shape
    (XLA splitting a replicated cache by head inside the step, then gathering it back)."""
    from mmserve.engine.runner import _decode

    put = lambda x: jax.device_put(x, layout.replicated())  # noqa: E731
    rows, width = 4, 2
    hlo = _decode.lower(model.module, model.params, put(np.zeros(rows, np.int32)), put(np.zeros((rows, 3), np.int32)),
                        cache, put(np.zeros((rows, width), np.int32)), put(np.full(rows, 3, np.int32))
                        ).compile().as_text()
    shape = ",".join(str(n) for n in cache.k.shape)
    return len(re.findall(rf"= \w+\[{shape}\]\S* all-gather(?:-start)?\(", hlo))


def main(checkpoint: str, meshes: list[str]) -> dict:
    rng = np.random.default_rng(0)
    grids = np.array([[1, 4, 6]])
    ids, patches = image_prompt(rng, grids), random_patches(rng, grids)
    reference = load_model(checkpoint)
    want = np.asarray(reference.forward(ids, patches, grids))
    orbax_dir = tempfile.mkdtemp()
    reference.save_orbax(orbax_dir)

    report = {}
    for text in meshes:
        layout = MeshLayout(make_mesh(text))
        model = load_model(checkpoint, shardings=layout.params)
        restored = load_model(orbax_dir, shardings=layout.params)
        cache = layout.create_kv_cache(model.config, num_pages=8, page_size=4)
        report[text] = {
            "safetensors_diff": float(np.abs(np.asarray(model.forward(ids, patches, grids)) - want).max()),
            "orbax_diff": float(np.abs(np.asarray(restored.forward(ids, patches, grids)) - want).max()),
            "params": {name: describe(probe(model.params, path)) for name, path in PROBES.items()},
            "orbax_params": {name: describe(probe(restored.params, path)) for name, path in PROBES.items()},
            "kv_cache": describe(cache.k),
            "moe_program": moe_program(model, layout),
            "decode_cache_gathers": decode_cache_gathers(model, layout, cache),
        }
    return report


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    print(json.dumps(main(sys.argv[1], sys.argv[2:])))
