"""Time of one sharded forward pass over a mesh, on one process or several (no serving, no lockstep).

Run it on every process of a role, like ``serve.py``; process 0 prints. Comparing one process of
8 devices with two of 4 (same mesh) separates what the cross-process collectives cost from what
the serving stack adds on top (compare with ``bench_serving.py`` against the same two set-ups):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_forward.py
    export XLA_FLAGS=--xla_force_host_platform_device_count=4 MMSERVE_NUM_PROCESSES=2 \\
        MMSERVE_COORDINATOR_ADDRESS=127.0.0.1:8476
    MMSERVE_PROCESS_ID=1 python scripts/bench_forward.py & MMSERVE_PROCESS_ID=0 python scripts/bench_forward.py
"""

import argparse
import time

from mmserve.distributed.multihost import add_cluster_flags, cluster_from_args, initialize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--mesh", default="data=1,model=4,expert=2")
    p.add_argument("--tokens", type=int, default=16, help="prompt length of the timed forward")
    p.add_argument("--repeats", type=int, default=20)
    add_cluster_flags(p)
    args = p.parse_args()
    initialize(cluster_from_args(args))

    import jax

    from mmserve.distributed import MeshLayout, make_mesh
    from models.qwen3_vl_moe import load_model

    layout = MeshLayout(make_mesh(args.mesh))
    model = load_model(args.model, shardings=layout.params)
    ids = list(range(3, 3 + args.tokens))

    def forward():
        return jax.block_until_ready(model.forward(ids))

    for _ in range(3):
        forward()
    start = time.perf_counter()
    for _ in range(args.repeats):
        forward()
    elapsed_ms = 1000 * (time.perf_counter() - start) / args.repeats
    if jax.process_index() == 0:
        print(f"{jax.process_count()} process(es) x {jax.local_device_count()} devices, mesh {args.mesh}: "
              f"forward of {args.tokens} tokens {elapsed_ms:.1f} ms (mean of {args.repeats})")


if __name__ == "__main__":
    main()
