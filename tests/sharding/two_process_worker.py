"""Worker: one of two processes joined by jax.distributed into one 8-device mesh (4 CPU devices each).

Usage: two_process_worker.py CHECKPOINT REFERENCE_NPY (cluster from MMSERVE_* env). Both processes
load the model sharded over the whole mesh and run the same prompt; process 0 compares the logits
with the unsharded ones and prints the result as JSON.
"""

import json
import sys

import numpy as np

from mmserve.distributed import MeshLayout, make_mesh
from mmserve.distributed.multihost import Cluster, initialize, is_leader

MESH = "data=1,model=4,expert=2"
PROMPT = list(range(3, 40))


def main(checkpoint: str, reference: str) -> dict | None:
    initialize(Cluster.from_env())
    import jax

    from models.qwen3_vl_moe import load_model

    assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 4, 8)
    layout = MeshLayout(make_mesh(MESH))
    model = load_model(checkpoint, shardings=layout.params)
    q_proj = model.params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    logits = jax.jit(lambda x: x, out_shardings=layout.replicated())(model.forward(PROMPT))
    if not is_leader():
        return None
    return {
        "max_diff": float(np.abs(np.asarray(logits) - np.load(reference)).max()),
        "q_proj_processes": len({d.process_index for d in q_proj.sharding.device_set}),
        "q_proj_local_shards": len(q_proj.addressable_shards),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
