"""The conversations the serving tests send, in the offline form (PIL images in ``image`` parts)
and converted to the OpenAI form (``image_url`` parts with PNG data URLs)."""

from served_model import random_image
from server_process import png_data_url

CHATS = {
    "text": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What does the weather report say about the afternoon?"},
    ],
    "one_image": [
        {"role": "user", "content": [{"type": "image", "image": random_image(1)},
                                     {"type": "text", "text": "Describe the image in detail."}]},
    ],
    "two_images": [
        {"role": "user", "content": [{"type": "text", "text": "Compare the first picture"},
                                     {"type": "image", "image": random_image(2, (80, 40))},
                                     {"type": "text", "text": "with the second one"},
                                     {"type": "image", "image": random_image(3)}]},
    ],
}


def openai_messages(messages: list[dict]) -> list[dict]:
    return [message | {"content": [_openai_part(p) for p in message["content"]]}
            if isinstance(message["content"], list) else message for message in messages]


def _openai_part(part: dict) -> dict:
    if part["type"] == "image":
        return {"type": "image_url", "image_url": {"url": png_data_url(part["image"])}}
    return part
