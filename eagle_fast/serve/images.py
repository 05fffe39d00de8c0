"""Image URLs of a chat request -> decoded RGB PIL images, with limits checked before the work.

`data:` URLs carry base64 PNG / JPEG / WebP / GIF bytes. Their size is known from the base64 length
before decoding, and the pixel count from the file header before the pixels are decompressed, so
an oversized upload or a decompression bomb (a small file declaring a huge canvas) is refused
without the memory it would take. http(s) URLs are fetched only when the server is configured to.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request

import PIL.Image
import PIL.ImageOps

from eagle_fast.serve.config import ServeConfig
from eagle_fast.serve.errors import APIError, bad_request

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


def _too_large(message: str, param: str) -> APIError:
    return APIError(413, message, param=param, code="image_too_large")


def _data_url_bytes(url: str, param: str, cfg: ServeConfig) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise bad_request("image data URLs must be base64: data:image/png;base64,...", param, "invalid_image_url")
    media = header[len("data:") : -len(";base64")].split(";")[0].strip().lower()
    if media and not media.startswith("image/"):
        raise bad_request(f"data URL media type {media!r} is not an image", param, "invalid_image_url")
    payload = "".join(payload.split())  # base64 may be wrapped over lines
    if len(payload) // 4 * 3 > cfg.max_image_bytes + 2:
        raise _too_large(
            f"image of about {len(payload) // 4 * 3} bytes exceeds the limit of {cfg.max_image_bytes} bytes", param
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("image data is not valid base64", param, "invalid_image") from None


def _remote_bytes(url: str, param: str, cfg: ServeConfig) -> bytes:
    if not cfg.allow_remote_images:
        raise bad_request(
            "remote image URLs are disabled on this server; send the image as a base64 data URL "
            "(data:image/png;base64,...)",
            param,
            "remote_images_disabled",
        )
    request = urllib.request.Request(url, headers={"User-Agent": "eagle_fast"})
    try:
        with urllib.request.urlopen(request, timeout=cfg.remote_timeout_s) as resp:
            data = resp.read(cfg.max_image_bytes + 1)  # one byte more tells "too large" apart
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise bad_request(f"cannot fetch the image URL: {exc}", param, "image_fetch_failed") from None
    if len(data) > cfg.max_image_bytes:
        raise _too_large(f"image exceeds the limit of {cfg.max_image_bytes} bytes", param)
    return data


def decode_image(data: bytes, param: str, cfg: ServeConfig) -> PIL.Image.Image:
    """Encoded bytes -> a loaded RGB image (EXIF orientation applied, first frame of animations)."""
    if len(data) > cfg.max_image_bytes:
        raise _too_large(f"image of {len(data)} bytes exceeds the limit of {cfg.max_image_bytes} bytes", param)
    try:
        im = PIL.Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except PIL.Image.DecompressionBombError as exc:
        raise bad_request(f"image too large: {exc}", param, "image_too_large") from None
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise bad_request(f"not a decodable image (accepted: {', '.join(FORMATS)})", param, "invalid_image") from None
    w, h = im.size
    if w * h > cfg.max_image_pixels:
        raise bad_request(
            f"image of {w}x{h} = {w * h} pixels exceeds the limit of {cfg.max_image_pixels} pixels",
            param,
            "image_too_large",
        )
    if w == 0 or h == 0:
        raise bad_request("empty image", param, "invalid_image")
    try:
        im.load()  # truncated or corrupt pixel data raises here
        return PIL.ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError) as exc:
        raise bad_request(f"cannot decode the image: {exc}", param, "invalid_image") from None


def load_image_url(url: str, param: str, cfg: ServeConfig) -> PIL.Image.Image:
    """An OpenAI `image_url.url` -> RGB image; raises APIError (400 / 413) naming `param`."""
    if not isinstance(url, str) or not url:
        raise bad_request("image_url.url must be a non-empty string", param, "invalid_image_url")
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        data = _data_url_bytes(url, param, cfg)
    elif scheme in ("http", "https"):
        data = _remote_bytes(url, param, cfg)
    else:
        raise bad_request("image URLs must be data: URLs (or http(s) when enabled)", param, "invalid_image_url")
    return decode_image(data, param, cfg)
