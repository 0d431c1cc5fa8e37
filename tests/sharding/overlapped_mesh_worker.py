"""Worker: one engine on a mesh of 8 CPU devices, its decode steps run in turn and overlapped.

Usage: overlapped_mesh_worker.py CHECKPOINT MESH. Prints one JSON line: each way's answers, how
many decode steps the overlapped engine dispatched on the ids of a step not read yet, and the
compilations each way after its engine was ready (jax's own events).
"""

import json
import sys

import jax

from mmserve import SamplingParams
from mmserve.distributed import MeshLayout, make_mesh
from mmserve.engine.compile_stats import compile_count
from mmserve.engine.config import EngineConfig
from mmserve.engine.engine import LLMEngine
from models.qwen3_vl_moe import load_model

PROMPTS = ["hello there", "a b c d e f", "one two three four five six seven", "zz"]
PARAMS = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
          SamplingParams(temperature=0.8, seed=3, max_tokens=16, ignore_eos=True),
          SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.2, ignore_eos=True),
          SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)]  # ends early: the rest stop overlapping


def run(model, layout, async_scheduling: bool) -> dict:
    engine = LLMEngine(model, EngineConfig(num_pages=64, page_size=8, max_model_len=64, max_prefill_tokens=32,
                                           max_num_seqs=4, max_prefill_seqs=1, async_scheduling=async_scheduling),
                       layout=layout)
    follows, decode = [], engine.runner.decode

    def counting(requests, page_tables, follows_sample=False):
        follows.append(follows_sample)
        return decode(requests, page_tables, follows_sample)

    engine.runner.decode = counting
    ready = compile_count()
    ids = [engine.add_request(engine.prepare(p), sp) for p, sp in zip(PROMPTS, PARAMS)]
    answers = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                answers[output.request_id] = output.outputs[0].token_ids
    return {"answers": [answers[i] for i in ids], "overlapped_steps": sum(follows),
            "compiles_after_ready": compile_count() - ready, "free_pages": engine.kv.num_free_pages}


def main(checkpoint: str, mesh: str) -> dict:
    layout = MeshLayout(make_mesh(mesh))
    model = load_model(checkpoint, shardings=layout.params)
    return {"in_turn": run(model, layout, False), "overlapped": run(model, layout, True)}


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
