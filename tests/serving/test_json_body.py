"""A request body that would decode into more Python objects than ``MAX_JSON_VALUES`` is refused
before it is decoded; the bound never undercounts, whatever the strings in the body hold."""

import random
import time
import tracemalloc

import msgspec
import pytest

from mmserve.serving.router import json_body
from mmserve.serving.router.errors import InvalidRequest
from mmserve.serving.router.json_body import MAX_JSON_VALUES, decode_json, json_values_at_most

TRICKY = ['"', "\\", "\\\\", '\\"', ",", ":", "[", "]", "{", "}", "a", "é", "\n", " ", "\\u0022"]


def objects_in(value) -> int:
    """The Python objects a decoded document is made of: each value, and each object's keys."""
    if isinstance(value, list):
        return 1 + sum(objects_in(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(1 + objects_in(v) for v in value.values())
    return 1


def random_document(rng: random.Random, depth: int = 0):
    kind = rng.choice(["list", "dict", "str", "int", "float", "none"] if depth < 4 else ["str", "int", "none"])
    if kind == "list":
        return [random_document(rng, depth + 1) for _ in range(rng.randrange(0, 6))]
    if kind == "dict":
        return {random_text(rng): random_document(rng, depth + 1) for _ in range(rng.randrange(0, 6))}
    if kind == "str":
        return random_text(rng)
    return {"int": rng.randrange(-10**6, 10**6), "float": rng.random(), "none": None}[kind]


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(TRICKY) for _ in range(rng.randrange(0, 12)))


@pytest.mark.parametrize("blank_strings", [False, True], ids=["raw count", "strings blanked"])
def test_the_bound_never_undercounts(monkeypatch, blank_strings):
    if blank_strings:  # a limit of 0 sends every body through the second count
        monkeypatch.setattr(json_body, "MAX_JSON_VALUES", 0)
    rng = random.Random(7)
    for _ in range(500):
        document = random_document(rng)
        body = msgspec.json.encode(document)
        assert json_values_at_most(body) >= objects_in(msgspec.json.decode(body)), body


def test_structure_inside_strings_is_not_counted_once_blanked():
    # millions of commas, colons and brackets in one string, longer than the counter's slices
    text = '",:[{\\' * (2 * MAX_JSON_VALUES)
    body = msgspec.json.encode({"messages": [{"role": "user", "content": text}]})
    assert json_values_at_most(body) < 16
    assert decode_json(body)["messages"][0]["content"] == text


def test_a_body_of_tiny_containers_is_refused_before_it_is_decoded():
    body = b'{"messages": [' + b",".join([b"[]"] * (2 * MAX_JSON_VALUES)) + b"]}"  # 6 MiB
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(InvalidRequest, match=f"more than {MAX_JSON_VALUES} JSON values"):
        decode_json(body)
    took = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # decoded, those lists would take ~27 times the body (about 170 MB here)
    assert peak < 4 * len(body), f"{peak / len(body):.1f} times the body"
    assert took < 2.0


def test_large_legitimate_bodies_are_decoded():
    ids = list(range(100_000, 100_000 + 262_144))  # a prompt of token ids filling a 256k context
    assert decode_json(msgspec.json.encode({"prompt": ids}))["prompt"] == ids
    bias = {str(i): -1.5 for i in range(152_000)}  # a logit_bias over a whole vocabulary
    assert decode_json(msgspec.json.encode({"logit_bias": bias}))["logit_bias"] == bias


def depth_of(value) -> int:
    """Levels of arrays and objects in a decoded document."""
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    return 0


def test_the_depth_is_exact_whatever_the_strings_hold(monkeypatch):
    monkeypatch.setattr(json_body, "MAX_JSON_DEPTH", 0)  # every body through the scan
    rng = random.Random(11)
    for _ in range(500):
        document = random_document(rng)
        body = msgspec.json.encode(document)
        assert json_body.json_depth(body) == depth_of(document), body


def test_a_body_nested_past_the_limit_is_refused_and_one_at_it_decoded():
    """msgspec decodes 600 levels; whatever walked them recursively then raised RecursionError (a 500)."""
    at_limit = b"[" * json_body.MAX_JSON_DEPTH + b"]" * json_body.MAX_JSON_DEPTH
    assert depth_of(decode_json(at_limit)) == json_body.MAX_JSON_DEPTH
    deep = b'{"a":"[[[[","b":' + b"[" * 600 + b"]" * 600 + b"}"
    with pytest.raises(InvalidRequest, match="nested too deeply: more than 128 levels deep"):
        decode_json(deep)
