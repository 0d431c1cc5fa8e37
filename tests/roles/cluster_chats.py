"""The chats the role tests send a cluster, and the offline LLM's answers they must equal."""

import base64
import io

import numpy as np
from PIL import Image

from mmserve import SamplingParams

MAX_TOKENS = 6


def image(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def data_url(picture: Image.Image) -> str:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def conversation(text: str, images: list[Image.Image], as_url: bool) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(im)}} if as_url else {"type": "image", "image": im}
             for im in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def expected(llm, text, images) -> str:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    return llm.chat(conversation(text, images, as_url=False), params)[0].outputs[0].text


def ask(client, text, images, stream=False) -> str:
    reply = client.chat.completions.create(model="tiny", messages=conversation(text, images, as_url=True),
                                           max_tokens=MAX_TOKENS, temperature=0, stream=stream)
    if stream:
        return "".join(chunk.choices[0].delta.content or "" for chunk in reply if chunk.choices)
    return reply.choices[0].message.content


CASES = {
    "text_only": ("Say something.", []),
    "one_image": ("What is this?", [image(1, (64, 64))]),
    "two_images": ("Compare them.", [image(2, (64, 96)), image(3, (96, 64))]),
}
