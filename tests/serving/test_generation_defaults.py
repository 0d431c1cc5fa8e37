"""The checkpoint's recommended sampling (``generation_config.json``: Qwen3-VL's Instruct checkpoints
ship temperature 0.7, top_p 0.8, top_k 20) fills what a request leaves out or sends as null, as
vLLM's ``--generation-config auto`` and transformers' ``generate`` do; a request's own values win.
Before, a request without them sampled the whole vocabulary at temperature 1."""

import dataclasses
import json

import pytest

from mmserve.serving.backend import TokenEvent
from mmserve.serving.router import RouterSettings, build_app
from models.qwen3_vl_moe import load_model
from models.qwen3_vl_moe.generation_config import sampling_defaults
from scripted_backend import ScriptedBackend, ThreadedServer
from server_process import request

RECOMMENDED = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


@pytest.fixture(scope="module")
def served():
    backend = ScriptedBackend()
    backend.script = [TokenEvent("", [12], text="abc", finish_reason="stop")]
    model = dataclasses.replace(load_model("tiny", weights=False), sampling_defaults=RECOMMENDED)
    server = ThreadedServer(build_app(backend, model, RouterSettings("tiny", 256)))
    yield server, backend
    server.stop()


def _sent(served, path: str, body: dict):
    server, backend = served
    status, reply = request("POST", f"{server.url}{path}", body)
    assert status == 200, reply
    params = backend.requests[-1].params
    return params.temperature, params.top_p, params.top_k, params.repetition_penalty


CHAT = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"model": "tiny", "max_tokens": 4, "prompt": "Hi"}),
    ("/generate", {"prompt": "Hi", "sampling_params": {"max_tokens": 4}}),
], ids=["chat", "completions", "native"])
def test_what_a_request_leaves_out_is_the_checkpoints_recommendation(served, path, body):
    assert _sent(served, path, body) == (0.7, 0.8, 20, 1.05)


def test_a_requests_own_values_win_and_null_is_no_value(served):
    assert _sent(served, "/v1/chat/completions", CHAT | {"temperature": 0, "top_k": None}) == (0.0, 0.8, 20, 1.05)


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"model": "tiny", "max_tokens": 4, "prompt": "Hi"}),
], ids=["chat", "completions"])
def test_vllms_include_stop_str_in_output_and_min_tokens_reach_the_backend(served, path, body):
    """Fields vLLM's server takes (the ``openai`` client's ``extra_body``); each was a 400."""
    server, backend = served
    status, reply = request("POST", f"{server.url}{path}", body | {"stop": ["."], "include_stop_str_in_output": True,
                                                                  "min_tokens": 2})
    assert status == 200, reply
    params = backend.requests[-1].params
    assert params.include_stop_str_in_output is True and params.min_tokens == 2
    status, reply = request("POST", f"{server.url}{path}", body | {"min_tokens": 5})
    assert status == 400 and "min_tokens" in reply["error"]["message"]


def test_the_recommendation_is_read_from_the_checkpoint(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "eos_token_id": [1, 2],
         "repetition_penalty": True}))  # a bool is no penalty
    assert sampling_defaults(tmp_path) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
    assert sampling_defaults(tmp_path / "missing") == {}


def test_the_offline_llm_samples_with_the_recommendation_when_given_no_params(tmp_path):
    """``LLM.generate(prompts)`` with no params, as vLLM's ``LLM`` (its ``get_default_sampling_params``)."""
    import shutil

    from hf_reference import hf_config, hf_model, write_checkpoint
    from mmserve import LLM

    checkpoint = write_checkpoint(hf_model(hf_config(), seed=3), tmp_path / "checkpoint")
    config = json.loads((checkpoint / "generation_config.json").read_text()) \
        if (checkpoint / "generation_config.json").exists() else {}
    (checkpoint / "generation_config.json").write_text(json.dumps(config | {"temperature": 0.7, "top_k": 20}))
    llm = LLM(checkpoint, num_pages=64, page_size=8, max_model_len=128, max_prefill_tokens=64, precompile=False)
    default = llm.get_default_sampling_params()
    assert (default.temperature, default.top_k, default.top_p) == (0.7, 20, 1.0)
    shutil.rmtree(checkpoint)


def test_a_value_the_server_cannot_take_is_left_out_not_held_against_every_request():
    """top_p 0 in generation_config.json would have refused every request leaving top_p out."""
    from mmserve.sampling_params import checked_defaults

    assert checked_defaults({"temperature": 0.7, "top_p": 0, "min_p": 2, "top_k": 20}) == {"temperature": 0.7,
                                                                                        "top_k": 20}
