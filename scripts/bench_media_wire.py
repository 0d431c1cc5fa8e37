"""What one image costs the router and the router -> encode wire, before and after the router
stopped decoding (issue 12: "the router sends compressed bytes").

Before: the router decoded the image (Pillow), ran the processor into float32 patches and sent them
in the EncodeRequest. After: it reads the header, checks the file's structure (``verify_image``),
computes the grid, and sends the client's bytes. Both are timed from the request's base64 string to
the serialized EncodeRequest, on this machine's CPU, with Qwen3-VL's default processor settings.
(The old message is measured as a message carrying the same number of bytes, since its proto
fields are gone.)

    python scripts/bench_media_wire.py --size 1024 --repeat 10
"""

from __future__ import annotations

import argparse
import base64
import io
import time

import numpy as np
from PIL import Image

from mmserve.roles.wire import visual_to_pb
from mmserve.rpc import worker_pb2 as pb
from mmserve.serving.router.media import MediaReader
from mmserve.serving.router.settings import RouterSettings
from models.qwen3_vl_moe.media import decode_image
from models.qwen3_vl_moe.processor import Processor


def photo_like_jpeg(size: int) -> bytes:
    """Smooth gradients with mild noise: compresses like a photograph (about 200 KB at 1024x1024)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [np.sin(6 * x + 3 * y), np.cos(4 * y - 5 * x * y), np.sin(9 * x * y + 2)]
    pixels = np.stack(channels, -1) * 100 + 128 + rng.normal(0, 6, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def before(data: str, processor: Processor) -> bytes:
    raw = base64.b64decode(data, validate=True)
    out = processor(images=[decode_image(raw)])
    pixels = np.ascontiguousarray(out["pixel_values"], np.float32)
    return pb.EncodeRequest(request_id="r", room=1, images=[pb.Visual(
        grid_thw=out["image_grid_thw"][0].tolist(), encoded=pixels.tobytes())]).SerializeToString()


def after(data: str, processor: Processor) -> bytes:
    visual = MediaReader(RouterSettings("bench", 1 << 20), processor).from_base64(data, "image")
    return pb.EncodeRequest(request_id="r", room=1, images=[visual_to_pb(visual, with_source=True)]).SerializeToString()


def fastest(fn, *args, repeat: int) -> tuple[float, bytes]:
    best, out = float("inf"), b""
    for _ in range(repeat):
        start = time.process_time()
        out = fn(*args)
        best = min(best, time.process_time() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="the JPEG's width and height")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    jpeg = photo_like_jpeg(args.size)
    data = base64.b64encode(jpeg).decode()
    processor = Processor.default()
    print(f"{args.size}x{args.size} JPEG: {len(jpeg) / 1e3:.0f} KB")
    print(f"{'path':8} {'wire bytes':>12} {'x JPEG':>8} {'router CPU ms':>14}")
    for name, fn in (("before", before), ("after", after)):
        seconds, message = fastest(fn, data, processor, repeat=args.repeat)
        print(f"{name:8} {len(message):>12,} {len(message) / len(jpeg):>8.2f} {seconds * 1e3:>14.1f}")


if __name__ == "__main__":
    main()
