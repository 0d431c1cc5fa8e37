"""Videos from requests: charged against the request's limits from their headers (the router decodes
no frame), decoded with PyAV where they are processed, sampled as Qwen3-VL's processor samples
them; a served video chat equals the offline ``LLM`` given the same frames."""

import numpy as np
import openai
import pytest

from mmserve import SamplingParams
from mmserve.engine.inputs import prepare_prompt, with_pixels
from mmserve.serving.router.errors import InvalidRequest
from mmserve.serving.router.media import MediaReader
from mmserve.serving.router.settings import RouterSettings
from models.qwen3_vl_moe.media import decode_sampled_frames, read_video_header
from models.qwen3_vl_moe.tiny import tiny_processor
from served_model import API_KEY, MODEL_NAME
from videos import encoded_video, lossless_video, random_frames, video_data_url


def reader(**limits) -> MediaReader:
    return MediaReader(RouterSettings(MODEL_NAME, 4096, **limits), tiny_processor())


def test_the_sampled_frames_are_decoded_exactly():
    frames = random_frames(0, 12, 64, 96)  # 3 s at 4 fps: the processor keeps 6 (2 fps)
    raw = lossless_video(frames, fps=4)
    got = decode_sampled_frames(raw, read_video_header(raw), tiny_processor())
    assert np.array_equal(got, frames[tiny_processor().sample_frame_indices(12, 4.0)])
    assert len(got) == 6


def test_the_router_forwards_the_video_as_sent_with_the_grid_its_frames_will_have():
    frames = random_frames(0, 12, 64, 96)
    raw = lossless_video(frames, fps=4)
    visual = reader().video_from_url(video_data_url(raw), "v")
    assert visual.pixel_values is None and visual.source.kind == "video" and visual.source.data == raw
    processed = tiny_processor()(videos=[frames[tiny_processor().sample_frame_indices(12, 4.0)]])
    assert np.array_equal(visual.grid_thw, processed["video_grid_thw"])
    decoded = with_pixels(visual, tiny_processor())
    assert np.array_equal(decoded.pixel_values, processed["pixel_values_videos"])


@pytest.mark.parametrize("frames, size", [(4, (64, 64)), (9, (64, 128)), (30, (96, 160))])
def test_tokens_are_known_before_decoding(frames, size):
    processor = tiny_processor()
    video = random_frames(1, frames, *size)
    from models.qwen3_vl_moe import load_model

    model = load_model("tiny")
    prepared = prepare_prompt({"prompt": "<|vision_start|><|video_pad|><|vision_end|>",
                               "multi_modal_data": {"video": [video]}}, model)
    placeholders = prepared.token_ids.count(model.config.video_token_id)
    assert processor.num_tokens_of_video(frames, *size) == placeholders


@pytest.mark.parametrize("count, fps", [(8, 4), (60, 30), (300, 10), (9, 3)])
def test_the_prompts_timestamps_are_transformers(count, fps):
    """Each temporal patch is stamped with the seconds transformers' Qwen3-VL processor writes for
    the same file: its frames sampled from the source's, at the source's frame rate."""
    import re
    import types

    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    from models.qwen3_vl_moe import load_model

    raw = lossless_video(random_frames(5, count, 32, 32), fps=fps)
    processor = tiny_processor()
    sampling = types.SimpleNamespace(fps=processor.video.fps, min_frames=processor.video.min_frames,
                                     max_frames=processor.video.max_frames)
    indices = Qwen3VLVideoProcessor.sample_frames(sampling, VideoMetadata(total_num_frames=count, fps=fps))
    stamps = Qwen3VLProcessor._calculate_timestamps(None, indices, fps, processor.temporal_patch_size)
    model = load_model("tiny", weights=False)
    prepared = prepare_prompt({"prompt": "<|vision_start|><|video_pad|><|vision_end|>",
                               "multi_modal_data": {"video": [reader().video_from_url(video_data_url(raw), "v")]}},
                              model)
    text = model.tokenizer.decode(prepared.token_ids, skip_special_tokens=False)
    assert re.findall(r"<[0-9.]+ seconds>", text) == [f"<{t:.1f} seconds>" for t in stamps]


def test_a_video_longer_than_allowed_is_refused_before_decoding():
    raw = lossless_video(random_frames(2, 20, 64, 64), fps=4)  # 5 s
    with pytest.raises(InvalidRequest, match="lasts 5.0 s"):
        reader(max_video_seconds=4).video_from_url(video_data_url(raw), "v")


def test_too_many_videos_and_too_many_tokens_are_refused():
    url = video_data_url(lossless_video(random_frames(3, 8, 64, 64), fps=4))
    limited = reader(max_videos_per_request=1)
    limited.video_from_url(url, "a")
    with pytest.raises(InvalidRequest, match="at most 1 videos"):
        limited.video_from_url(url, "b")
    small = MediaReader(RouterSettings(MODEL_NAME, 6), tiny_processor())  # the video takes 8
    with pytest.raises(InvalidRequest) as refused:
        small.video_from_url(url, "c")
    assert refused.value.code == "context_length_exceeded"


@pytest.mark.parametrize("url, message", [
    ("data:video/mp4;base64,AAAAAAAA", "not a video"),
    ("data:image/png;base64,AAAA", "not an video type"),
    ("data:video/mp4;base64,@@@", "not valid base64"),
    ("https://example.com/v.mp4", "does not fetch videos"),
    ("/etc/passwd", "local video files are disabled"),
])
def test_bad_videos_are_a_clear_400(url, message):
    with pytest.raises(InvalidRequest, match=message):
        reader().video_from_url(url, "v")


def titled_video(title: str) -> bytes:
    return encoded_video(random_frames(5, 4, 32, 32), 2, title=title)


@pytest.mark.parametrize("raw, message", [
    # the codec's id rewritten: PyAV opens the stream with no decoder (an AttributeError once: a 500)
    (lossless_video(random_frames(4, 4, 32, 32), fps=2).replace(b"V_FFV1", b"V_ZZZ1"), "codec is not one"),
    # a tag that is not UTF-8, which PyAV decodes as it opens the file (a UnicodeDecodeError once)
    (titled_video("TITLETITLE").replace(b"TITLETITLE", bytes([0xa7, 0x82, 0xe1, 0xff, 0xfe] * 2)), "not a video"),
], ids=["unknown_codec", "tags_not_utf8"])
def test_a_video_this_server_cannot_read_is_a_clear_400(raw, message):
    with pytest.raises(InvalidRequest, match=message):
        reader().video_from_url(video_data_url(raw), "v")


def test_a_playlist_or_a_session_description_is_no_video(tmp_path, monkeypatch):
    """Left to probe every demuxer, FFmpeg read an ffconcat playlist of the server's own files (their
    text decoded into frames the model could read back) or an SDP session description (UDP ports
    bound, a 20 s wait) from a few bytes of text sent as a video."""
    import time

    from models.qwen3_vl_moe.media import BadVideo, VideoHeader

    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.txt").write_text("API_KEY=sk-very-secret\n" * 50)
    playlist = b"ffconcat version 1.0\n" + b"file 'secret.txt'\n" * 4
    session = (b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\n"
               b"m=video 45678 RTP/AVP 96\na=rtpmap:96 H264/90000\n")
    for raw in (playlist, session):
        start = time.monotonic()
        with pytest.raises(InvalidRequest, match="not a video"):
            reader().video_from_url(video_data_url(raw), "v")
        assert time.monotonic() - start < 5
    with pytest.raises(BadVideo):  # the worker's decoder refuses it as the router does
        decode_sampled_frames(playlist, VideoHeader(4, 2.0, 32, 32), tiny_processor())


def test_sampled_frames_are_held_at_their_processing_size_and_processed_as_the_source_would_be():
    """32x200 frames, 4 of them, process at 32x160 under this bound; 32x160 frames would process at
    32x128 (the bound counts pixels before rounding). The decoder kept such frames whole (765 frames
    of 16334x481 passed the door: 18 GB) and the processor sized them; each is now shrunk as it is
    decoded, and processed at that size: what the source's frames give, processed once."""
    processor = tiny_processor().with_pixel_limits(video_max_pixels=4 * 64 * 64)
    frames = random_frames(3, 4, 32, 200)
    raw = lossless_video(frames, fps=2)
    got = decode_sampled_frames(raw, read_video_header(raw), processor)
    assert got.shape == (4, 32, 160, 3) and processor.video_size(4, 32, 160) != (32, 160)
    pixels, grid = processor.video_at_size(got)
    want = processor(videos=[frames])
    assert np.array_equal(grid, want["video_grid_thw"]) and np.array_equal(pixels, want["pixel_values_videos"])


def test_a_video_whose_processing_size_has_an_extreme_aspect_is_processed_as_the_router_counted_it():
    """34x6418 frames process at 32x6432, whose aspect (201) the size bounds refuse: sizing the
    decoded frames again raised a ValueError (a 500) for a video the router had accepted."""
    frames = random_frames(4, 4, 34, 6418)
    visual = reader().video_from_url(video_data_url(lossless_video(frames, fps=2)), "v")
    done = with_pixels(visual, tiny_processor())
    assert np.array_equal(done.grid_thw, visual.grid_thw) and done.pixel_values.shape[0] == 2 * 2 * 402


@pytest.mark.parametrize("container, codec", [("webm", "libvpx"), ("avi", "mpeg4"), ("mp4", "mpeg4")])
def test_the_containers_clients_send_are_read(container, codec):
    raw = encoded_video(random_frames(6, 4, 32, 32), 2, container, codec, "yuv420p")
    header = read_video_header(raw)
    assert (header.frames, header.width, header.height) == (4, 32, 32)
    assert decode_sampled_frames(raw, header, tiny_processor()).shape[0] == 4


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_served_video_chat_equals_offline(server, offline, stream):
    frames = random_frames(4, 10, 64, 96)
    indices = offline.model.processor.sample_frame_indices(10, 5.0)
    sampled = (frames[indices], {"fps": 5.0, "frames_indices": indices.tolist()})  # vLLM's (frames, metadata)
    want = offline.chat([{"role": "user", "content": [{"type": "video", "video": sampled},
                                                       {"type": "text", "text": "What happens?"}]}],
                        SamplingParams(temperature=0, max_tokens=10))[0]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=180)
    messages = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video_data_url(lossless_video(frames, fps=5))}},
        {"type": "text", "text": "What happens?"}]}]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=10,
                                           stream=stream)
    text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream \
        else reply.choices[0].message.content
    assert text == want.outputs[0].text


def test_every_frame_is_held_to_the_headers_size_not_only_the_sampled_ones():
    """Frames between the sampled ones larger than the header says (what the router held to its
    pixel limit) cost their decoding: the first one ends it."""
    from videos import size_switching_video

    processor = tiny_processor()
    small_at = set(processor.sample_frame_indices(20, 10.0).tolist())
    raw = size_switching_video(20, 10, small_at, big=(256, 256))
    header = read_video_header(raw)
    assert (header.width, header.height) == (64, 64) and set(processor.sample_frame_indices(header.frames, header.fps)
                                                             .tolist()) == small_at
    with pytest.raises(ValueError, match="frames change size"):
        decode_sampled_frames(raw, header, processor)


def test_a_video_of_more_frames_than_allowed_is_refused_before_decoding():
    raw = lossless_video(random_frames(2, 12, 32, 32), fps=24)
    reader(max_video_frames=12).video_from_url(video_data_url(raw), "v")
    with pytest.raises(InvalidRequest, match="more than 11 frames"):
        reader(max_video_frames=11).video_from_url(video_data_url(raw), "v")
