"""Image intake: every allowed format and mode becomes RGB; every bad input gets its own problem type."""

import base64
import io
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from service.intake import ImageProblem, RawImage, combine, decode_base64, decode_image, scale_to_uint8
from service.settings import KNOWN_FORMATS

FORMATS = list(KNOWN_FORMATS)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decode(data: bytes, name="x", formats=FORMATS, max_pixels=10_000_000):
    return decode_image(RawImage(3, name, data), formats=formats, max_pixels=max_pixels)


def gradient(w=40, h=30, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)


@pytest.mark.parametrize(
    "fmt,mode",
    [
        ("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "LA"),
        ("PNG", "L"), ("WEBP", "RGB"), ("BMP", "RGB"), ("GIF", "P"), ("TIFF", "RGB"), ("TIFF", "CMYK"),
        ("TIFF", "RGBA"),
    ],
)
def test_allowed_formats_and_modes_become_rgb(fmt, mode):
    out = decode(encode(gradient(mode=mode), fmt))
    assert out.image.mode == "RGB" and (out.width, out.height) == (40, 30)
    assert out.format == fmt and out.index == 3


def test_gif_takes_the_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = decode(buf.getvalue())
    assert out.image.getpixel((8, 8))[0] > 200  # red, the first frame
    assert "first of 2 frames used" in out.notes


def test_exif_orientation_is_applied():
    image = gradient(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise on display
    out = decode(encode(image, "JPEG", exif=exif))
    assert (out.width, out.height) == (20, 40)
    assert "EXIF orientation 6 applied" in out.notes


def test_16bit_grey_is_scaled_per_image():
    array = np.linspace(1000, 3000, 64 * 32).reshape(32, 64).astype(np.uint16)
    out = decode(encode(Image.fromarray(array), "PNG"))
    pixels = np.asarray(out.image)
    assert pixels.min() == 0 and pixels.max() == 255  # stretched, not clipped to 255 or cut to the top byte
    assert any("scaled to 8 bits" in n for n in out.notes)


@pytest.mark.parametrize("mode", ["I", "I;16"])
def test_32_and_16_bit_integer_tiffs_are_scaled(mode):
    array = np.linspace(0, 1000, 20 * 10).reshape(10, 20).astype(np.int32 if mode == "I" else np.uint16)
    source = Image.fromarray(array)
    assert source.mode == mode
    out = decode(encode(source, "TIFF"))
    pixels = np.asarray(out.image)
    assert out.image.mode == "RGB" and pixels.max() == 255 and pixels.min() == 0
    assert f"{mode} image scaled to 8 bits (min-max over the image)" in out.notes


def test_float_tiff_is_scaled():
    array = np.linspace(-1, 1, 20 * 10, dtype=np.float32).reshape(10, 20)
    out = decode(encode(Image.fromarray(array, "F"), "TIFF"))
    assert np.asarray(out.image).max() == 255 and out.image.mode == "RGB"


@pytest.mark.parametrize("bands,planar", [(4, "contig"), (5, "separate"), (8, "contig")])
def test_multiband_16bit_tiff_keeps_first_three_bands(bands, planar):
    rng = np.random.default_rng(1)
    array = rng.integers(100, 4000, (24, 32, bands)).astype(np.uint16)
    array[..., 0] = 4000  # band 0 constant high, band 1 constant low: scaled jointly
    array[..., 1] = 100
    buf = io.BytesIO()
    data = np.moveaxis(array, -1, 0) if planar == "separate" else array
    tifffile.imwrite(buf, data, photometric="minisblack", planarconfig=planar)
    out = decode(buf.getvalue(), name="scene.tif")
    pixels = np.asarray(out.image)
    assert pixels.shape == (24, 32, 3)
    assert (pixels[..., 0] == 255).all() and (pixels[..., 1] == 0).all()
    assert f"{bands} bands: the first 3 used as RGB" in out.notes


def test_rgb_16bit_tiff_is_not_cut_to_its_top_byte():
    array = np.full((8, 8, 3), 300, dtype=np.uint16)  # Pillow alone would give 300 >> 8 = 1
    array[0, 0] = 0
    array[1, 1] = 600
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, photometric="rgb")
    pixels = np.asarray(decode(buf.getvalue()).image)
    assert pixels[2, 2, 0] == 128 and pixels[1, 1, 0] == 255


def test_scale_to_uint8_handles_constant_and_nan():
    assert scale_to_uint8(np.full((2, 2), 7.0)).tolist() == [[0, 0], [0, 0]]
    out = scale_to_uint8(np.array([[0.0, np.nan], [1.0, 0.5]]))
    assert out.tolist() == [[0, 0], [255, 128]]


def problem(data, **kw) -> ImageProblem:
    with pytest.raises(ImageProblem) as info:
        decode(data, **kw)
    return info.value


def test_empty_image():
    p = problem(b"", name="blank.png")
    assert (p.slug, p.status) == ("empty-image", 400)
    assert "image 3 ('blank.png')" in p.detail


def test_text_named_jpg_is_unsupported():
    p = problem(b"hello, I am not a picture\n" * 10, name="notes.jpg")
    assert (p.slug, p.status) == ("unsupported-image", 415)
    assert "looks like text" in p.detail and "notes.jpg" in p.detail


def test_format_outside_the_allow_list_is_refused():
    p = problem(encode(gradient(), "PNG"), formats=["JPEG"])
    assert p.slug == "unsupported-image" and "looks like PNG" in p.detail


def test_truncated_png_is_invalid():
    data = encode(gradient(200, 200), "PNG")
    p = problem(data[: len(data) // 2], name="cut.png")
    assert (p.slug, p.status) == ("invalid-image", 400)
    assert "truncated or corrupt PNG" in p.detail


def test_pixel_cap_is_checked_from_the_header_before_decoding():
    p = problem(encode(gradient(400, 300), "PNG"), max_pixels=100_000)
    assert (p.slug, p.status) == ("image-too-large", 413)
    assert "400x300 = 120000 pixels" in p.detail


def png_bomb(width, height) -> bytes:
    """A valid PNG header claiming width x height grey pixels, with a tiny compressed all-zero body."""

    def chunk(kind, payload):
        body = kind + payload
        return len(payload).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    rows = zlib.compress(b"\x00" * (width + 1) * 64, 9)  # only the first rows; the header is what counts
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_without_decoding():
    data = png_bomb(100_000, 100_000)  # 10 gigapixels in a few kilobytes
    assert len(data) < 10_000
    p = problem(data, name="bomb.png")
    assert (p.slug, p.status) == ("image-too-large", 413)
    # the configured cap is named, never Pillow's own fixed limits (89478485 / 178956970 pixels)
    assert "100000x100000 = 10000000000 pixels is more than the cap of 10000000 (CAPTIONER_MAX_IMAGE_PIXELS)" in p.detail
    assert "89478485" not in p.detail and "178956970" not in p.detail and "DOS" not in p.detail
    p = problem(png_bomb(10_000, 9_000), name="90mp.png", max_pixels=50_000_000)  # between Pillow's two limits
    assert p.slug == "image-too-large" and "the cap of 50000000 (CAPTIONER_MAX_IMAGE_PIXELS)" in p.detail


def test_the_configured_cap_decides_not_pillows_guard(monkeypatch):
    """An image the setting allows is decoded even when it is over Pillow's process-wide guard (made tiny
    here so the test stays cheap: 1200 pixels against a guard of 1000)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    out = decode(encode(gradient(40, 30), "PNG"), max_pixels=1200)
    assert (out.width, out.height) == (40, 30)
    p = problem(encode(gradient(40, 30), "PNG"), max_pixels=1199)
    assert p.slug == "image-too-large" and "40x30 = 1200 pixels is more than the cap of 1199" in p.detail


def test_a_gif_frame_larger_than_its_screen_is_checked_against_the_cap():
    """Pillow grows a GIF's size to its first frame's extent (its own bomb guard is off here): the cap sees
    the grown size, not the 10x10 logical screen."""
    import struct

    screen = b"GIF89a" + struct.pack("<HH", 10, 10) + bytes([0x80, 0, 0]) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHH", 0, 0, 60_000, 60_000) + b"\x00" + b"\x02\x02\x44\x01\x00"
    p = problem(screen + frame + b";", name="wide.gif")
    assert (p.slug, p.status) == ("image-too-large", 413)
    assert "60000x60000 = 3600000000 pixels" in p.detail


def test_a_png_that_is_only_a_header():
    """The signature and an IHDR claiming 60000x60000, nothing else: Pillow cannot open it (no IDAT), which
    used to read as 415 'not an image'. Over the cap: 413 from the declared size; under it: 400 naming the
    truncation."""
    header = png_bomb(60_000, 60_000)[:33]  # 8-byte signature + 25-byte IHDR chunk
    p = problem(header, name="head.png")
    assert (p.slug, p.status) == ("image-too-large", 413)
    assert "60000x60000 = 3600000000 pixels" in p.detail and "CAPTIONER_MAX_IMAGE_PIXELS" in p.detail
    p = problem(header, name="head.png", max_pixels=10**10)
    assert (p.slug, p.status) == ("invalid-image", 400)
    assert "a PNG whose header cannot be read: the file is truncated or corrupt after 33 bytes" in p.detail
    assert "declares 60000x60000" in p.detail
    p = problem(header[:8], name="sig.png")  # the signature alone
    assert (p.slug, p.status) == ("invalid-image", 400) and "truncated" in p.detail
    p = problem(encode(gradient(), "JPEG")[:3], name="three.jpg")  # JPEG magic only
    assert (p.slug, p.status) == ("invalid-image", 400) and "a JPEG whose header cannot be read" in p.detail


def test_base64_and_combined_errors():
    data = encode(gradient(), "PNG")
    assert decode_base64(base64.b64encode(data).decode(), 0, None) == data
    assert decode_base64("data:image/png;base64," + base64.b64encode(data).decode(), 0, None) == data
    with pytest.raises(ImageProblem, match="image 1 \\('a.png'\\): not valid base64"):
        decode_base64("%%%", 1, "a.png")
    errors = [problem(b"", name="a"), problem(b"text", name="b")]
    combined = combine(errors, 5)
    assert combined.status == 400 and "2 of 5 images were rejected" in combined.detail
    assert [e["type"] for e in combined.extra["errors"]] == ["/problems/empty-image", "/problems/unsupported-image"]


def test_intake_bypasses_the_ultralytics_image_open_patch(monkeypatch):
    import ultralytics.utils.patches as patches

    from service.intake import pillow_open

    # ultralytics installs its wrapper on first import (our detector module takes it off again, so install it
    # here whatever was imported before): intake must still use Pillow's own function
    monkeypatch.setattr(Image, "open", patches.image_open)
    assert Image.open.__module__ != "PIL.Image"
    assert pillow_open().__module__ == "PIL.Image"
    p = problem(b"plain text, not a HEIF either\n" * 5, name="x.jpg")
    assert p.slug == "unsupported-image"


# --- reading a multipart body ---------------------------------------------------------------------------
def multipart_request(body: bytes, chunk: int, boundary: bytes = b"XyZbound"):
    from starlette.requests import Request

    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]

    async def receive():
        if chunks:
            part = chunks.pop(0)
            return {"type": "http.request", "body": part, "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    headers = [(b"content-type", b"multipart/form-data; boundary=" + boundary)]
    return Request({"type": "http", "method": "POST", "headers": headers, "path": "/", "query_string": b""}, receive)


def multipart_body(image: bytes, boundary: bytes = b"XyZbound") -> bytes:
    return (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--" + boundary
            + b'\r\nContent-Disposition: form-data; name="beam_size"\r\n\r\n2\r\n--' + boundary + b"--\r\n")


@pytest.mark.parametrize("chunk", [7, 1000, 10**6])  # 7: the close delimiter arrives split across chunks
def test_a_whole_multipart_body_is_read(chunk):
    import asyncio

    from service.reading import read_images

    image = encode(gradient(), "PNG")
    raws, params = asyncio.run(read_images(multipart_request(multipart_body(image), chunk), 8))
    assert [(r.filename, r.data) for r in raws] == [("a.png", image)] and params == {"beam_size": "2"}


@pytest.mark.parametrize("cut", ["no close", "half", "nothing"])
def test_multipart_without_its_closing_boundary_is_invalid_request(cut):
    """python-multipart drops a part that is not closed, which used to read as 400 no-image."""
    import asyncio

    from service.problems import Problem
    from service.reading import read_images

    body = multipart_body(encode(gradient(), "PNG"))
    body = {"no close": body[: -len(b"--\r\n")], "half": body[: len(body) // 2], "nothing": b""}[cut]
    with pytest.raises(Problem) as info:
        asyncio.run(read_images(multipart_request(body, 1000), 8))
    assert (info.value.slug, info.value.status) == ("invalid-request", 400)
    assert "no closing boundary (--XyZbound--)" in info.value.detail
