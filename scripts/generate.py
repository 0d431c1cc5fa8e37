"""Generate from the command line with the offline engine.

    python scripts/generate.py --model tiny --generated-image --prompt "Describe this image."
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np
from PIL import Image

from mmserve import LLM, SamplingParams
from mmserve.roles.launch import model_errors_said
from models.qwen3_vl_moe.model import AUTO_DTYPE, DTYPES


def generated_image(width: int = 320, height: int = 240) -> Image.Image:
    """A deterministic test picture: colour gradients with a bright square."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    pixels[height // 4: height // 2, width // 4: width // 2] = 255
    return Image.fromarray(pixels.astype(np.uint8))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny', a Hugging Face checkpoint dir or an orbax dir")
    p.add_argument("--dtype", default=AUTO_DTYPE, choices=(AUTO_DTYPE, *DTYPES),
                   help="parameter and compute dtype; auto: the checkpoint's")
    p.add_argument("--prompt", required=True, help="the user's message (chat template applied unless --raw)")
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument("--generated-image", action="store_true", help="add a generated test picture")
    p.add_argument("--raw", action="store_true", help="send --prompt as is, without the chat template")
    p.add_argument("--max-tokens", type=int, default=32, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 turns it off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 turns it off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 turns it off")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--logprobs", type=int, default=None, help="return the top-k logprobs of each token")
    p.add_argument("--json", action="store_true", help="print the whole output as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # a bad value is said in one line before the model loads, as serve.py says it
        params = SamplingParams(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
            repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty, stop=tuple(args.stop), max_tokens=args.max_tokens,
            logprobs=args.logprobs)
        images = [Image.open(path) for path in args.image] + ([generated_image()] if args.generated_image else [])
    except (ValueError, OSError) as error:
        raise SystemExit(f"generate.py: {error}") from None
    with model_errors_said(args.model, "generate.py"):
        llm = LLM(args.model, dtype=args.dtype)
    if args.raw:
        prompt = {"prompt": args.prompt, "multi_modal_data": {"image": images} if images else {}}
        output = llm.generate(prompt, params)[0]
    else:
        content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": args.prompt}]
        output = llm.chat([{"role": "user", "content": content}], params)[0]
    completion = output.outputs[0]
    if args.json:
        print(json.dumps(dataclasses.asdict(output), default=str, indent=2))
    else:
        print(completion.text)
        print(f"[{len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
