"""Offline throughput: mmserve's LLM against transformers' generate on the same checkpoint, same run.

fp32, greedy, every prompt carries an image. The checkpoint is a random-weight model written by
transformers' ``save_pretrained`` (no hub access): ``--shape bench`` (hidden 256, 16 experts,
top-4) or ``--shape 30b`` (Qwen3-VL-30B-A3B's proportions scaled to hidden 512: 128 experts, top-8,
moe_intermediate 3/8 of hidden, 8 query heads per KV head), unless --checkpoint is given.

Per batch size it prints mmserve's and transformers' batched generate (the same prompts in one
call), their ratio, and transformers generating the prompts one at a time (``hf 1x1``), which is
what a user without a batching server gets. Also the compiles after warm-up (0 expected).

    python scripts/bench_offline.py --shape bench --batch-sizes 1 8 32 --max-tokens 32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import torch
except ImportError:  # the test extra's CPU wheel (pyproject.toml pins it)
    raise SystemExit('bench_offline.py compares mmserve with transformers: pip install -e ".[test]"') from None
from PIL import Image
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

from mmserve import LLM, SamplingParams
from models.qwen3_vl_moe.moe_dispatch import STRATEGIES
from models.qwen3_vl_moe.processor import Processor
from models.qwen3_vl_moe.tiny_tokenizer import TINY_SPECIAL_IDS, build_tiny_tokenizer

IMAGE, START, END = (TINY_SPECIAL_IDS[t] for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
ROPE = {"rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True}
TEXT_SHAPES = {
    "bench": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, moe_intermediate_size=128,
                  num_experts=16, num_experts_per_tok=4, max_position_embeddings=4096,
                  rope_parameters=ROPE | {"mrope_section": [8, 4, 4]}),
    "30b": dict(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                num_attention_heads=16, num_key_value_heads=2, head_dim=64, moe_intermediate_size=192,
                num_experts=128, num_experts_per_tok=8, max_position_embeddings=4096,
                rope_parameters=ROPE | {"mrope_section": [16, 8, 8]}),
}
BENCH_CONFIG = dict(
    vision_config=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4,
                       num_position_embeddings=256, deepstack_visual_indexes=[1, 2, 3]),
    image_token_id=IMAGE, video_token_id=TINY_SPECIAL_IDS["<|video_pad|>"], vision_start_token_id=START,
    vision_end_token_id=END, tie_word_embeddings=False,
)


def write_checkpoint(path: Path, shape: str = "bench") -> Path:
    torch.manual_seed(0)
    text = TEXT_SHAPES[shape]
    config = BENCH_CONFIG | {"text_config": text,
                             "vision_config": BENCH_CONFIG["vision_config"] | {"out_hidden_size": text["hidden_size"]}}
    model = Qwen3VLMoeForConditionalGeneration._from_config(Qwen3VLMoeConfig(**config), dtype=torch.float32)
    model.save_pretrained(path)
    build_tiny_tokenizer().save(path)
    Processor.default().with_pixel_limits(min_pixels=64 * 64, max_pixels=128 * 128).save(path)
    return path


def requests(batch: int, seed: int):
    """``batch`` prompts, each with its own picture: new ones for each (batch, seed), so that no
    run finds another's pictures in the engine's embedding or prefix cache."""
    rng = np.random.default_rng((batch, seed))
    images = [Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)) for _ in range(batch)]
    texts = [[int(t) for t in rng.integers(0, 900, 24)] for _ in range(batch)]
    return [{"prompt_token_ids": [START, IMAGE, END] + t, "multi_modal_data": {"image": im}}
            for t, im in zip(texts, images)]


def run_mmserve(llm: LLM, prompts, max_tokens: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)


def run_transformers_one_by_one(model, llm: LLM, prompts, max_tokens: int) -> tuple[float, int]:
    seconds, tokens = 0.0, 0
    for prompt in prompts:
        s, n = run_transformers(model, llm, [prompt], max_tokens)
        seconds, tokens = seconds + s, tokens + n
    return seconds, tokens


def run_transformers(model, llm: LLM, prompts, max_tokens: int) -> tuple[float, int]:
    """The same prompts through HF generate: identical prompt lengths, so no padding is needed.
    The prompts are tokenized and their pictures processed before the clock starts, as
    ``LLM.generate``'s clock starts before it does that work itself."""
    ids = torch.tensor([llm.engine.prepare(p).token_ids for p in prompts])
    processed = llm.model.processor(images=[p["multi_modal_data"]["image"] for p in prompts])
    mm = (ids == IMAGE).to(torch.int32)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, pixel_values=torch.tensor(processed["pixel_values"]),
                             image_grid_thw=torch.tensor(processed["image_grid_thw"]), mm_token_type_ids=mm,
                             max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    return time.perf_counter() - start, (out.shape[1] - ids.shape[1]) * len(prompts)


def best(repeat: int, run) -> tuple[float, int]:
    """The fastest of ``repeat`` runs, each on new prompts (seeds 2, 3, ...: nothing cached)."""
    return min((run(2 + i) for i in range(repeat)), key=lambda r: r[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="a Hugging Face checkpoint dir (default: a generated one)")
    p.add_argument("--shape", choices=sorted(TEXT_SHAPES), default="bench", help="the generated checkpoint's shape")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--moe-dispatch", default="auto", choices=("auto", *STRATEGIES), help="mmserve's MoE strategy")
    p.add_argument("--no-one-by-one", action="store_true", help="skip transformers one prompt at a time")
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the fastest counts (a shared, "
                   "noisy machine slows some runs, never speeds one up)")
    args = p.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or write_checkpoint(Path(tmp), args.shape)
        llm = LLM(ckpt, moe_dispatch=args.moe_dispatch, max_model_len=args.max_model_len, max_num_seqs=32,
                  num_pages=4096, page_size=16)
        hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
        print(f"shape {args.shape}, MoE dispatch {llm.model.moe_dispatch}, {args.max_tokens} tokens per prompt")
        print(f"{'batch':>5} {'mmserve tok/s':>14} {'hf tok/s':>9} {'ratio':>6} {'hf 1x1 tok/s':>13} {'ratio':>6} "
              f"{'mmserve s':>10} {'hf s':>7} {'hf 1x1 s':>9}")
        for batch in args.batch_sizes:
            run_mmserve(llm, requests(batch, seed=1), args.max_tokens)  # warm-up: compiles the buckets
            compiles = llm.engine.stats()["compiles"]
            ms_time, ms_tokens = best(args.repeat, lambda s: run_mmserve(llm, requests(batch, seed=s), args.max_tokens))
            new_compiles = llm.engine.stats()["compiles"] - compiles
            run_transformers(hf, llm, requests(batch, seed=1), 2)  # warm-up: torch's first calls
            hf_time, hf_tokens = best(args.repeat, lambda s: run_transformers(hf, llm, requests(batch, seed=s),
                                                                               args.max_tokens))
            one_time, one_tokens = ((float("nan"), 1) if args.no_one_by_one else best(
                args.repeat, lambda s: run_transformers_one_by_one(hf, llm, requests(batch, seed=s), args.max_tokens)))
            ms_rate, hf_rate, one_rate = ms_tokens / ms_time, hf_tokens / hf_time, one_tokens / one_time
            print(f"{batch:>5} {ms_rate:>14.1f} {hf_rate:>9.1f} {ms_rate / hf_rate:>6.2f} {one_rate:>13.1f} "
                  f"{ms_rate / one_rate:>6.2f} {ms_time:>10.2f} {hf_time:>7.2f} {one_time:>9.2f}"
                  f"   (compiles after warm-up: {new_compiles})")
        print(f"total compiles: {llm.engine.stats()['compiles']}")


if __name__ == "__main__":
    main()
