"""A request that decode ends on its first token, by a length cap of its own (its cache holds less
than the context, or its --max-model-len is shorter than prefill's), after prefill streamed that
token as an unfinished request's, its text held back for a stop string: the router's text (prefill's
first event, then decode's) is the colocated engine's. Decode's last event carried only the end,
and the held-back text never reached the client. Real prefill and decode roles over a real
registry in this process, driven by hand; the router's join of the texts as router_backend does it."""

import queue
import time

import pytest

from mmserve import SamplingParams
from mmserve.engine.config import EngineConfig
from mmserve.engine.engine import LLMEngine
from mmserve.roles.decode import DecodeRole
from mmserve.roles.prefill import PrefillRole
from mmserve.roles.token_stream import TokenStream
from mmserve.roles.wire import sampling_to_pb
from mmserve.rpc import worker_pb2 as pb
from models.qwen3_vl_moe import load_model
from transfer import BootstrapServer, TransferConfig

pytestmark = pytest.mark.timeout(300)
DECODE_ENGINE = EngineConfig(num_pages=5, page_size=16, max_model_len=256, max_num_seqs=2, precompile=False)
"""Four usable pages of 16: decode's context is 64 tokens, prefill's 256."""


def test_the_text_prefill_held_back_reaches_the_client_when_decode_ends_the_first_token():
    model = load_model("tiny")
    transfer = TransferConfig(data_plane="zmq", bootstrap_timeout_s=60.0, heartbeat_interval_s=0.2,
                              heartbeat_timeout_s=10.0)
    registry = BootstrapServer(transfer).start()
    prefill = PrefillRole(model, EngineConfig(num_pages=64, page_size=16, max_model_len=256, max_num_seqs=2,
                                              max_prefill_tokens=128, precompile=False),
                          transfer, "prefill-0", registry.address)
    decode = DecodeRole(model, DECODE_ENGINE, transfer, "decode-0", registry.address)
    try:
        prompt = [3 + (i * 7) % 200 for i in range(decode.max_model_len() - 1)]  # the longest the router sends
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=["\u2603" * 6])
        stream, first = TokenStream("router"), queue.Queue()
        decode.decode(pb.DecodeRequest(request_id="r", room=1, token_ids=prompt, sampling=sampling_to_pb(params),
                                       prefill_name="prefill-0", prefill_incarnation=prefill.incarnation()), stream)
        prefill.prefill(pb.PrefillRequest(request_id="r", room=1, token_ids=prompt, sampling=sampling_to_pb(params)),
                        first)
        deadline, first_event, later = time.monotonic() + 240, None, []
        while first_event is None or not any(e.finish_reason or e.error for e in later):
            assert time.monotonic() < deadline, "the request never ended"
            prefill.step()
            decode.step()
            if first_event is None and not first.empty():
                first_event = first.get_nowait()
            later += [e for batch in stream.sent() for e in batch.events]
        assert not first_event.finish_reason  # prefill's context is longer: it streamed an unfinished request

        colocated = LLMEngine(model, DECODE_ENGINE)
        colocated.add_request({"prompt_token_ids": prompt}, params, "r")
        while colocated.has_unfinished():
            outputs = colocated.step()
        expected = outputs[0].outputs[0]
        assert expected.text and expected.finish_reason == "length"
        assert first_event.text_delta + "".join(e.text_delta for e in later) == expected.text
        assert list(first_event.token_ids) + [t for e in later for t in e.token_ids] == expected.token_ids
    finally:
        prefill.close()
        decode.close()
        registry.close()
