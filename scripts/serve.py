"""Serve Qwen3-VL-MoE over HTTP (OpenAI-compatible) or run one role of the disaggregated pipeline.

    python scripts/serve.py --role colocated --model tiny --port 8000

See ``python scripts/serve.py --help`` and docs/serving.md.
"""

import sys

from mmserve.core_dumps import forbid_core_dumps

if __name__ == "__main__":
    forbid_core_dumps()  # before jax loads (seconds): the environment holds the cluster secret
    from mmserve.serving.cli import main

    sys.exit(main())
