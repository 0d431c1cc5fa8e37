"""The router decodes no pixel: each image and video leaves it as the client's encoded bytes with the
patch grid its header gives, and that grid is the one the processor gives the decoded pixels. What
the disaggregated backend sends to encode is those bytes (not float32 patches); a file whose header
reads but whose data is broken is refused with a clear reason where it is decoded."""

import asyncio
import base64
import io
import time

import av
import numpy as np
import pytest
from PIL import Image

from mmserve import SamplingParams
from mmserve.engine.inputs import PreparedPrompt, Visual, with_pixels
from mmserve.engine.rejected import RequestRejected
from mmserve.roles.router_backend import DisaggregatedBackend
from mmserve.roles.worker_pool import WorkerHandle, WorkerPool
from mmserve.roles.routing import RoutingConfig, WorkerChooser
from mmserve.roles.wire import visual_from_pb, visual_to_pb
from mmserve.rpc import worker_pb2 as pb
from mmserve.serving.backend import GenerateRequest
from mmserve.serving.router.errors import InvalidRequest
from mmserve.serving.router.media import MediaReader
from mmserve.serving.router.settings import RouterSettings
from models.qwen3_vl_moe.processor import Processor
from models.qwen3_vl_moe.tiny import tiny_processor
from served_model import MODEL_NAME
from videos import lossless_video, random_frames, video_data_url, video_with_hidden_frames

SIZES = [(64, 64), (48, 64), (37, 500), (500, 37), (300, 29), (1024, 1024), (768, 1366)]
"""(height, width): square, landscape, portrait, sizes off the patch grid, sizes the processor
shrinks."""


def reader(processor: Processor) -> MediaReader:
    return MediaReader(RouterSettings(MODEL_NAME, 1 << 20, max_image_pixels=1 << 24), processor)


def encoded(image: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


def data_url(raw: bytes, kind: str) -> str:
    return f"data:image/{kind.lower()};base64,{base64.b64encode(raw).decode()}"


def random_image(seed: int, height: int, width: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("processor", [tiny_processor(), Processor.default()], ids=["tiny", "default"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_grid_from_the_header_is_the_processors_grid(processor, size):
    raw = encoded(random_image(sum(size), *size), "PNG")
    visual = reader(processor).from_url(data_url(raw, "PNG"), "image")
    assert visual.pixel_values is None and visual.source.data == raw and visual.source.kind == "image"
    want = processor(images=[Image.open(io.BytesIO(raw))])
    assert np.array_equal(visual.grid_thw, want["image_grid_thw"])
    decoded = with_pixels(visual, processor)
    assert np.array_equal(decoded.grid_thw, want["image_grid_thw"])
    assert np.array_equal(decoded.pixel_values, want["pixel_values"])


@pytest.mark.parametrize("frames, fps, size", [(4, 2, (64, 64)), (9, 3, (64, 128)), (30, 10, (96, 160)),
                                               (13, 4, (50, 70)), (24, 24, (200, 120))])
def test_a_videos_grid_from_its_header_is_the_processors_grid(frames, fps, size):
    processor = tiny_processor()
    video = random_frames(frames, frames, *size)
    raw = lossless_video(video, fps=fps)
    visual = reader(processor).video_from_url(video_data_url(raw), "video")
    assert visual.pixel_values is None and visual.source.data == raw and visual.source.kind == "video"
    want = processor(videos=[video[processor.sample_frame_indices(frames, fps)]])
    assert np.array_equal(visual.grid_thw, want["video_grid_thw"])
    assert np.array_equal(with_pixels(visual, processor).pixel_values, want["pixel_values_videos"])


def test_a_video_cut_without_reencoding_is_read_as_it_plays():
    """Frames kept before a cut for decoding only are marked to be discarded: counted as frames, the
    router sampled up to a last frame the decoder never returns, and every such video was a 400."""
    processor = tiny_processor()
    raw = video_with_hidden_frames(random_frames(5, 20, 64, 96), fps=10, hidden=6)
    with av.open(io.BytesIO(raw)) as container:
        shown = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    assert len(shown) == 14  # what a player shows
    visual = reader(processor).video_from_url("data:video/mp4;base64," + base64.b64encode(raw).decode(), "video")
    want = processor(videos=[shown[processor.sample_frame_indices(len(shown), 10)]])
    assert np.array_equal(visual.grid_thw, want["video_grid_thw"])
    assert np.array_equal(with_pixels(visual, processor).pixel_values, want["pixel_values_videos"])


class _Stream:
    def __aiter__(self):
        return self

    async def __anext__(self):
        raise StopAsyncIteration

    def cancel(self):
        pass


class _Acknowledged:
    """Prefill's stream as far as the router reads it here: the Ack."""

    async def read(self):
        return pb.PrefillEvent(ack=pb.Ack(ok=True))

    def cancel(self):
        pass


class _Stub:
    """A worker that acknowledges everything and keeps what it was sent."""

    def __init__(self):
        self.sent: list = []

    def Decode(self, request, metadata=None):
        self.sent.append(request)
        return _Stream()

    def Prefill(self, request, metadata=None):
        self.sent.append(request)
        return _Acknowledged()

    async def Encode(self, request, metadata=None):
        self.sent.append(request)
        return pb.Ack(ok=False, error="stop here")

    async def Abort(self, request, timeout=None):
        return pb.Ack(ok=True)


def test_encode_receives_the_clients_bytes_not_pixels():
    processor = tiny_processor()
    jpeg = encoded(random_image(7, 1024, 1024), "JPEG")
    raw_video = lossless_video(random_frames(8, 9, 64, 96), fps=3)
    read = reader(processor)
    image, video = read.from_url(data_url(jpeg, "JPEG"), "image"), read.video_from_url(video_data_url(raw_video), "v")
    pool = WorkerPool("token", WorkerChooser(RoutingConfig(), None, None), model_fingerprint="")
    stubs = {role: _Stub() for role in ("encode", "prefill", "decode")}
    for role, stub in stubs.items():
        pool.workers[role] = WorkerHandle(role, role, "nowhere", stub, None, time.monotonic())
    prompt = PreparedPrompt([1, 2, 3], [image], [video])

    async def run():
        return [e async for e in DisaggregatedBackend(pool).generate(
            GenerateRequest("r", prompt, SamplingParams(max_tokens=1)))]

    assert asyncio.run(run())[-1].error == "stop here"
    (sent,) = stubs["encode"].sent
    assert [v.encoded for v in sent.images] == [jpeg] and [v.encoded for v in sent.videos] == [raw_video]
    assert list(sent.images[0].grid_thw) == image.grid_thw[0].tolist()
    assert sent.ByteSize() <= 1.1 * (len(jpeg) + len(raw_video))
    (to_prefill,) = stubs["prefill"].sent
    assert all(not v.encoded for v in [*to_prefill.images, *to_prefill.videos])  # prefill needs grids alone
    assert list(to_prefill.videos[0].grid_thw) == video.grid_thw[0].tolist()
    # prefill keys its cached pages by the same picture keys the router routes by
    assert [v.content_key for v in [*to_prefill.images, *to_prefill.videos]] == [image.content_key, video.content_key]


def test_a_pictures_content_key_follows_its_file_through_decoding_and_the_wire():
    processor = tiny_processor()
    raw = encoded(random_image(12, 64, 64), "PNG")
    read = reader(processor)
    first, again = read.from_url(data_url(raw, "PNG"), "image"), read.from_url(data_url(raw, "PNG"), "image")
    other = read.from_url(data_url(encoded(random_image(13, 64, 64), "PNG"), "PNG"), "image")
    assert len(first.content_key) == 32 and first.content_key == again.content_key != other.content_key
    assert with_pixels(first, processor).content_key == first.content_key
    for with_source in (True, False):
        assert visual_from_pb(visual_to_pb(first, with_source), "image").content_key == first.content_key
    keyless = visual_to_pb(first, with_source=False)
    keyless.content_key = b""
    with pytest.raises(ValueError, match="content key"):
        visual_from_pb(keyless, "image")
    # pixels given directly are keyed by the pixels: the same patches, the same key
    patches = with_pixels(first, processor)
    assert Visual(patches.grid_thw, patches.pixel_values).content_key == Visual(
        patches.grid_thw, patches.pixel_values.copy()).content_key


def test_a_truncated_jpeg_passes_the_door_and_is_refused_clearly_where_it_is_decoded():
    jpeg = encoded(random_image(9, 128, 128), "JPEG")
    visual = reader(tiny_processor()).from_url(data_url(jpeg[:len(jpeg) // 2], "JPEG"), "image")
    with pytest.raises(RequestRejected, match="the image cannot be decoded: .*truncated"):
        with_pixels(visual, tiny_processor())


def test_a_truncated_png_is_refused_at_the_door():
    png = encoded(random_image(10, 128, 128), "PNG")
    with pytest.raises(InvalidRequest, match="cannot be decoded"):
        reader(tiny_processor()).from_url(data_url(png[:len(png) // 2], "PNG"), "image")


def test_a_jpeg_of_thousands_of_scans_is_refused_at_the_door_and_where_it_is_decoded():
    """Each scan of a progressive JPEG is a pass over the whole image: a file repeating a tiny scan
    thousands of times cost minutes of decoding for a picture worth a fraction of a second."""
    jpeg = io.BytesIO()
    random_image(12, 256, 256).save(jpeg, "JPEG", progressive=True, quality=10)
    raw = jpeg.getvalue()
    starts = [i for i in range(len(raw) - 1) if raw[i:i + 2] == b"\xff\xda"]
    scan = raw[starts[-1]:-2]  # the last scan, repeated before the end-of-image marker
    bomb = raw[:-2] + scan * 100 + raw[-2:]
    # a motion photo: a video after the picture's end, FF DA in it every ~64 KiB; an EXIF block holding some too
    motion = raw + np.random.default_rng(5).integers(0, 256, 6 << 20, dtype=np.uint8).tobytes()
    exif = Image.Exif()
    exif[0x010E] = "\xff\xda" * 200  # ImageDescription
    tagged = io.BytesIO()
    random_image(12, 256, 256).save(tagged, "JPEG", progressive=True, quality=10, exif=exif.tobytes())
    for ordinary in (raw, motion, tagged.getvalue()):
        visual = reader(tiny_processor()).from_url(data_url(ordinary, "JPEG"), "image")
        assert with_pixels(visual, tiny_processor()).pixel_values is not None
    from models.qwen3_vl_moe.media import BadMedia, decode_image
    for kind in ("JPEG", "MPO"):
        # (an MPO is a JPEG whose APP2 segment lists more pictures: Pillow names it MPO and decodes its first)
        file = bomb if kind == "JPEG" else mpo(bomb)
        with pytest.raises(InvalidRequest, match="scans"):
            reader(tiny_processor()).from_url(data_url(file, "JPEG"), "image")
        with pytest.raises(BadMedia, match="scans"):
            decode_image(file)


def mpo(jpeg: bytes) -> bytes:
    """The JPEG as the first picture of a two-picture MPO (an MPF APP2 segment after SOI)."""
    out = io.BytesIO()
    first = Image.open(io.BytesIO(jpeg))
    first.save(out, "MPO", save_all=True, append_images=[first.copy()])
    head = out.getvalue()
    app2 = head.index(b"\xff\xe2")  # Pillow's MPF segment, taken as it wrote it
    length = int.from_bytes(head[app2 + 2:app2 + 4], "big")
    return jpeg[:2] + head[app2:app2 + 2 + length] + jpeg[2:]


def test_a_video_whose_decoding_would_read_too_many_pixels_is_refused_before_decoding():
    raw = lossless_video(random_frames(13, 40, 32, 48), fps=4)  # 10 s at 4 fps: samples up to frame 39
    limited = MediaReader(RouterSettings(MODEL_NAME, 1 << 20, max_video_decode_pixels=40 * 32 * 48 - 1),
                          tiny_processor())
    with pytest.raises(InvalidRequest, match="max-video-decode-pixels"):
        limited.video_from_url(video_data_url(raw), "video")
    MediaReader(RouterSettings(MODEL_NAME, 1 << 20, max_video_decode_pixels=40 * 32 * 48),
                tiny_processor()).video_from_url(video_data_url(raw), "video")


def test_a_grid_other_than_the_routers_is_a_clear_error_before_anything_is_decoded(monkeypatch):
    """A worker decodes only what the request's grid says, which is what the router charged (a worker
    reached by a router with looser limits, or by any holder of the cluster secret)."""
    from mmserve.engine import inputs

    raw = encoded(random_image(11, 64, 64), "PNG")
    visual = reader(tiny_processor()).from_url(data_url(raw, "PNG"), "image")
    video = reader(tiny_processor()).video_from_url(video_data_url(lossless_video(random_frames(1, 4, 32, 32), 2)),
                                                    "video")
    for decoder in ("decode_image", "decode_sampled_frames"):
        monkeypatch.setattr(inputs, decoder, lambda *args: pytest.fail("decoded"))
    for good in (visual, video):
        wrong = Visual(good.grid_thw * [[1, 2, 1]], source=good.source)
        with pytest.raises(ValueError, match="header gives") as raised:
            with_pixels(wrong, tiny_processor())
        assert not isinstance(raised.value, RequestRejected)  # the server's inconsistency, not the client's


def test_a_local_path_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path):
    """A FIFO in the allowed directory blocked the router's read until someone wrote to it."""
    import os

    os.mkfifo(tmp_path / "pipe.png")
    local = MediaReader(RouterSettings(MODEL_NAME, 1 << 20, allowed_local_media_path=tmp_path), tiny_processor())
    started = time.monotonic()
    with pytest.raises(InvalidRequest, match="not a regular file"):
        local.from_url(f"file://{tmp_path / 'pipe.png'}", "messages[0].content[0]")
    assert time.monotonic() - started < 1


def test_a_symlink_loop_in_the_allowed_directory_is_a_400(tmp_path):
    """Resolving it raised RuntimeError before any check: a 500."""
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    local = MediaReader(RouterSettings(MODEL_NAME, 1 << 20, allowed_local_media_path=tmp_path), tiny_processor())
    with pytest.raises(InvalidRequest, match="cannot read the image file"):
        local.from_url(f"file://{tmp_path / 'a.png'}", "messages[0].content[0]")


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("tag", ["exif", "xmp"])
def test_a_photo_stored_sideways_is_turned_upright_as_transformers_loads_it(orientation, tag, tmp_path):
    """A phone stores a portrait photo landscape with EXIF orientation 6; transformers' load_image
    turns every file upright (``ImageOps.exif_transpose``: the EXIF tag, else XMP's
    ``tiff:Orientation``, which was not read). The router's grid (from the header) and the
    decoded patches equal the processor's on transformers' upright image."""
    from transformers.image_utils import load_image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from mmserve.serving.router.media import MediaReader
    from mmserve.serving.router.settings import RouterSettings
    from models.qwen3_vl_moe.processor import Processor

    stored = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (96, 192, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           f'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{orientation}"/>'
           '</rdf:RDF></x:xmpmeta>').encode()
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, **({"exif": exif.tobytes()} if tag == "exif" else {"xmp": xmp}))
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    processor = Processor.default().with_pixel_limits(min_pixels=32 * 32, max_pixels=128 * 128)
    processor.save(tmp_path)
    reference = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)(images=[load_image(url)], return_tensors="np")
    visual = MediaReader(RouterSettings("tiny", 4096), processor).from_url(url, "image_url")
    assert visual.grid_thw.tolist() == reference["image_grid_thw"].tolist()
    np.testing.assert_array_equal(with_pixels(visual, processor).pixel_values, reference["pixel_values"])
