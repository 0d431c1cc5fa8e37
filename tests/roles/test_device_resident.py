"""The disaggregated data path keeps visual rows and KV on device: from the vision tower through
encode's block buffers, the transfer, prefill's visual block and KV pages, the KV transfer and
decode's pages, no visual row and no KV row goes through the host. Real encode, prefill and decode
roles in one process, over a real registry and the JAX transfer server, driven by hand; the answer
equals the colocated engine's, token for token.

What is checked is the host-to-device half of a round trip: every array these rows could come back
to the device as is logged by ``jax.transfer_guard_host_to_device("log_explicit")``, explicit
``device_put`` included, and none may have a row of hidden size (embeddings, deepstack) or of KV.
The device-to-host half cannot be watched on CPU: ``jax.transfer_guard_device_to_host`` lets every
read through there (the buffers are host memory, and ``np.asarray`` reads them in place), and an
accelerator would refuse them under ``"disallow"``. The inputs that do move are the prompt's
patches, the steps' ids, positions, page tables and indices, and the sampling parameters."""

import io
import queue
import re
import time

import jax
import numpy as np
import pytest
from PIL import Image

from mmserve import SamplingParams
from mmserve.engine.config import EngineConfig
from mmserve.engine.engine import LLMEngine
from mmserve.engine.inputs import EncodedMedia, Visual, prepare_prompt
from mmserve.roles.decode import DecodeRole
from mmserve.roles.encode import EncodeRole, decoded
from mmserve.roles.prefill import PrefillRole
from mmserve.roles.token_stream import TokenStream
from mmserve.roles.wire import sampling_to_pb, visual_to_pb
from mmserve.rpc import worker_pb2 as pb
from models.qwen3_vl_moe import load_model
from transfer import BootstrapServer, TransferConfig

pytestmark = pytest.mark.timeout(600)
ENGINE = dict(num_pages=64, page_size=16, max_model_len=256, max_num_seqs=2, max_prefill_tokens=128, precompile=False)


TRANSFER = re.compile(r"host-to-device transfer: aval=ShapedArray\((\w+)\[([\d,]*)\]")


def uploads(captured: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of each host-to-device transfer the guard logged."""
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in TRANSFER.findall(captured)]


def picture(model, seed: int) -> Visual:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (96, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Visual(model.processor(images=[image])["image_grid_thw"], source=EncodedMedia("image", buffer.getvalue()))


def test_visual_rows_and_kv_stay_on_device_and_the_answer_equals_colocated(capfd):
    model = load_model("tiny")
    transfer = TransferConfig(data_plane="jax", bootstrap_timeout_s=60.0, heartbeat_interval_s=0.2,
                              heartbeat_timeout_s=10.0)
    registry = BootstrapServer(transfer).start()
    roles = [EncodeRole(model, EngineConfig(**ENGINE), transfer, "encode-0", registry.address),
             PrefillRole(model, EngineConfig(**ENGINE), transfer, "prefill-0", registry.address),
             DecodeRole(model, EngineConfig(**ENGINE), transfer, "decode-0", registry.address)]
    encode, prefill, decode = roles
    try:
        image = model.config.image_token_id
        prompt = prepare_prompt({"prompt_token_ids": [5, 17, image, 33, 9, image, 41],
                                 "multi_modal_data": {"image": [picture(model, 1), picture(model, 2)]}}, model)
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        images = [visual_to_pb(v, with_source=False) for v in prompt.images]
        stream, first = TokenStream("router"), queue.Queue()
        decode.decode(pb.DecodeRequest(request_id="r", room=1, token_ids=prompt.token_ids,
                                       sampling=sampling_to_pb(params), prefill_name="prefill-0",
                                       prefill_incarnation=prefill.incarnation(), images=images), stream)
        prefill.prefill(pb.PrefillRequest(request_id="r", room=1, token_ids=prompt.token_ids,
                                          sampling=sampling_to_pb(params), images=images, encode_name="encode-0",
                                          encode_incarnation=encode.incarnation()), first)
        job = decoded(pb.EncodeRequest(request_id="r", room=1,
                                       images=[visual_to_pb(v, with_source=True) for v in prompt.images]),
                      encode.encoder)
        capfd.readouterr()
        tokens, deadline = [], time.monotonic() + 300
        with jax.transfer_guard_host_to_device("log_explicit"):  # vision, both transfers, prefill, decode
            encode.encode(job)
            while time.monotonic() < deadline:
                for role in roles:
                    role.step()
                # the first token comes from prefill, the rest a step's message at a time from decode
                events = [first.get_nowait()] if not tokens and not first.empty() else \
                    [e for batch in stream.sent() for e in batch.events] if tokens else []
                for event in events:
                    assert not event.error, event.error
                    tokens += list(event.token_ids)
                if any(e.finish_reason for e in events):
                    break
        moved = uploads(capfd.readouterr().err)
    finally:
        for role in roles:
            role.close()
        registry.close()

    text = model.config.text
    rows = {(text.hidden_size,), (3 * text.hidden_size,), (text.num_hidden_layers, text.num_key_value_heads,
                                                            text.head_dim)}
    assert any(shape[-1:] == (model.config.vision.patch_dim,) for _, shape in moved)  # the log is read
    carried = [(dtype, shape) for dtype, shape in moved if dtype.startswith("float") and
               any(shape[-len(r):] == r for r in rows)]
    assert carried == [], f"rows of visual tokens or KV came from the host: {carried}"

    colocated = LLMEngine(model, EngineConfig(**ENGINE))
    colocated.add_request(prompt, params, "r")
    while colocated.has_unfinished():
        outputs = colocated.step()
    assert tokens == outputs[0].outputs[0].token_ids


def test_the_log_names_an_upload_of_rows(capfd):
    """The instrument itself: rows uploaded the way the old path uploaded them are seen."""
    capfd.readouterr()
    with jax.transfer_guard_host_to_device("log_explicit"):
        jax.device_put(np.zeros((5, 64), np.float32))
    assert ("float32", (5, 64)) in uploads(capfd.readouterr().err)
