"""Offline throughput and latency: mmserve's LLM against transformers' generate on one checkpoint.

fp32, CPU, greedy; every prompt carries an image. The checkpoint is a random-weight model written
by transformers' ``save_pretrained`` (no hub access), with the config below unless --checkpoint is
given. Prints a table per batch size and the compile count after warm-up.

    python scripts/bench_offline.py --batch-sizes 1 8 32 --max-tokens 32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

from mmserve import LLM, SamplingParams
from models.qwen3_vl_moe.processor import Processor
from models.qwen3_vl_moe.tokenizer import TINY_SPECIAL_IDS, build_tiny_tokenizer

IMAGE, START, END = (TINY_SPECIAL_IDS[t] for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
BENCH_CONFIG = dict(
    text_config=dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=32, moe_intermediate_size=128,
                     num_experts=16, num_experts_per_tok=4, max_position_embeddings=4096,
                     rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [8, 4, 4],
                                      "mrope_interleaved": True}),
    vision_config=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256,
                       num_position_embeddings=256, deepstack_visual_indexes=[1, 2, 3]),
    image_token_id=IMAGE, video_token_id=TINY_SPECIAL_IDS["<|video_pad|>"], vision_start_token_id=START,
    vision_end_token_id=END, tie_word_embeddings=False,
)


def write_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration._from_config(Qwen3VLMoeConfig(**BENCH_CONFIG), dtype=torch.float32)
    model.save_pretrained(path)
    build_tiny_tokenizer().save(path)
    Processor.default().with_pixel_limits(min_pixels=64 * 64, max_pixels=128 * 128).save(path)
    return path


def requests(batch: int, seed: int):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)) for _ in range(batch)]
    texts = [[int(t) for t in rng.integers(0, 900, 24)] for _ in range(batch)]
    return [{"prompt_token_ids": [START, IMAGE, END] + t, "multi_modal_data": {"image": im}}
            for t, im in zip(texts, images)]


def run_mmserve(llm: LLM, prompts, max_tokens: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)


def run_transformers(model, llm: LLM, prompts, max_tokens: int) -> tuple[float, int]:
    """The same prompts through HF generate: identical prompt lengths, so no padding is needed."""
    start = time.perf_counter()
    ids = torch.tensor([llm.engine.prepare(p).token_ids for p in prompts])
    processed = llm.model.processor(images=[p["multi_modal_data"]["image"] for p in prompts])
    mm = (ids == IMAGE).to(torch.int32)
    with torch.no_grad():
        out = model.generate(ids, pixel_values=torch.tensor(processed["pixel_values"]),
                             image_grid_thw=torch.tensor(processed["image_grid_thw"]), mm_token_type_ids=mm,
                             max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    return time.perf_counter() - start, (out.shape[1] - ids.shape[1]) * len(prompts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="a Hugging Face checkpoint dir (default: a generated one)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=512,
                   help="the engine's context; without page-table width buckets attention reads all of it")
    args = p.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or write_checkpoint(Path(tmp))
        llm = LLM(ckpt, max_model_len=args.max_model_len, max_num_seqs=32, num_pages=4096, page_size=16)
        hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
        print(f"{'batch':>5} {'mmserve tok/s':>14} {'hf tok/s':>10} {'ratio':>6} "
              f"{'mmserve s':>10} {'hf s':>8}")
        for batch in args.batch_sizes:
            run_mmserve(llm, requests(batch, seed=1), args.max_tokens)  # warm-up: compiles the buckets
            compiles = llm.engine.stats()["compiles"]
            ms_time, ms_tokens = run_mmserve(llm, requests(batch, seed=2), args.max_tokens)
            new_compiles = llm.engine.stats()["compiles"] - compiles
            hf_time, hf_tokens = run_transformers(hf, llm, requests(batch, seed=2), args.max_tokens)
            ms_rate, hf_rate = ms_tokens / ms_time, hf_tokens / hf_time
            print(f"{batch:>5} {ms_rate:>14.1f} {hf_rate:>10.1f} {ms_rate / hf_rate:>6.2f} "
                  f"{ms_time:>10.2f} {hf_time:>8.2f}   (compiles after warm-up: {new_compiles})")
        print(f"total compiles: {llm.engine.stats()['compiles']}")


if __name__ == "__main__":
    main()
