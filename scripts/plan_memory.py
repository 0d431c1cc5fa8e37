"""Parameter count and per-device memory of a model on a mesh, before anything is allocated.

    python scripts/plan_memory.py --model deploy/configs/qwen3-vl-30b-a3b-instruct.json \
        --mesh data=1,model=4,expert=4 --dtype bfloat16 --kv-tokens 131072 --device-gib 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.qwen3_vl_moe.config import ModelConfig
from mmserve.distributed.memory_plan import format_plan, plan_memory
from mmserve.distributed.mesh import MeshShape


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a config.json, or a checkpoint directory holding one")
    p.add_argument("--mesh", required=True, help="e.g. data=1,model=4,expert=2")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="parameter and KV cache dtype")
    p.add_argument("--kv-tokens", type=_at_least(0), default=0, help="also plan a KV cache for this many tokens")
    p.add_argument("--page-size", type=_at_least(1), default=16, help="KV page size in tokens")
    p.add_argument("--device-gib", type=float, help="device memory, to print what is left")
    return p.parse_args(argv)


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def main(argv=None) -> int:
    args = parse_args(argv)
    path = Path(args.model)
    try:
        if str(path) == "tiny":
            from models.qwen3_vl_moe.tiny import tiny_config
            config = tiny_config()
        else:
            config = ModelConfig.from_file(path / "config.json" if path.is_dir() else path)
        mesh = MeshShape.parse(args.mesh)
    except (OSError, ValueError, KeyError, TypeError) as error:
        detail = str(error) if isinstance(error, (OSError, ValueError)) else f"{type(error).__name__}: {error}"
        raise SystemExit(f"plan_memory.py: {detail}") from None
    plan = plan_memory(config, mesh, args.dtype, args.kv_tokens, args.page_size)
    print(format_plan(plan, args.device_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
