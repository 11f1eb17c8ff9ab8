"""Image parts -> decoded images, under the operator's rules.

Where an ``image_url`` may point is the server operator's decision, never the client's:

* ``data:`` URLs (base64) are always accepted, up to ``max_image_bytes`` encoded size;
* a local path (``file:///...`` or a bare path) only under ``--media-root``, and only if it stays
  inside it after ``..`` and symbolic links are resolved — otherwise a client could make the
  server read any file of the machine;
* ``http(s)://`` only with ``--allow-remote-media`` and a host on the allow-list, fetched with a
  time limit and a size limit and without following redirects (a redirect could leave the list).

Every image is decoded fully here, with the pixel-count guard of
:mod:`visorlib.processing.files`, so a corrupt or oversized image is a 400 naming its field before
the request reaches the model.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

from PIL import Image

from ..processing.files import DEFAULT_MAX_PIXELS, decode_image_bytes, open_image, resolve_image_path
from ..validation import InputError
from .protocol import APIError, ImageRef


@dataclass(frozen=True)
class MediaPolicy:
    """What the server may read images from.

    Attributes:
        media_root: Folder local paths must stay inside; None refuses local paths.
        allow_remote: Fetch ``http(s)`` URLs at all.
        remote_hosts: Host names that may be fetched (exact match); empty refuses every host.
        max_image_bytes: Largest encoded image (data URL payload, file or download).
        max_pixels: Largest ``width * height`` decoded.
        fetch_timeout: Seconds a remote fetch may take in all.
    """

    media_root: str | None = None
    allow_remote: bool = False
    remote_hosts: frozenset[str] = field(default_factory=frozenset)
    max_image_bytes: int = 10 << 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    fetch_timeout: float = 10.0


def load_images(refs: list[ImageRef], policy: MediaPolicy) -> list[Image.Image]:
    """Decode every referenced image in order, or raise an :class:`APIError` naming the part."""
    return [load_image(ref, policy) for ref in refs]


def load_image(ref: ImageRef, policy: MediaPolicy) -> Image.Image:
    """One image part, decoded (see the module docstring for the rules)."""
    url = ref.url
    scheme = urlparse(url).scheme.lower() if ":" in url[:12] else ""
    try:
        if url.startswith("data:"):
            return decode_image_bytes(_data_url(ref, policy), ref.param, policy.max_pixels)
        if scheme in ("http", "https"):
            return decode_image_bytes(_fetch(ref, policy), ref.param, policy.max_pixels)
        if scheme in ("", "file"):
            return _local(ref, policy)
    except InputError as err:
        raise APIError(f"'{ref.param}': {err}", ref.param) from None
    raise APIError(f"'{ref.param}': unsupported URL scheme {scheme!r} (data:, file paths under --media-root, "
                   "or http(s) with --allow-remote-media)", ref.param)


def _data_url(ref: ImageRef, policy: MediaPolicy) -> bytes:
    head, sep, payload = ref.url.partition(",")
    if not sep or ";base64" not in head:
        raise APIError(f"'{ref.param}': a data URL must be 'data:image/...;base64,<data>'", ref.param)
    # Base64 is 4 characters per 3 bytes: refuse an oversized payload before decoding it.
    if len(payload) * 3 // 4 > policy.max_image_bytes:
        raise APIError(f"'{ref.param}': the image is larger than the server's limit of {policy.max_image_bytes:,} "
                       "bytes (--max-image-bytes)", ref.param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise APIError(f"'{ref.param}': the data URL is not valid base64 ({err})", ref.param) from None


def _local(ref: ImageRef, policy: MediaPolicy) -> Image.Image:
    if policy.media_root is None:
        raise APIError(f"'{ref.param}': local image paths are refused (the server was started without "
                       "--media-root); send the image as a data: URL", ref.param)
    parsed = urlparse(ref.url)
    if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise APIError(f"'{ref.param}': file URLs must name a local path (file:///...)", ref.param)
    path = unquote(parsed.path) if parsed.scheme == "file" else ref.url
    try:
        full = resolve_image_path(path, policy.media_root)
    except InputError:
        raise APIError(f"'{ref.param}': {path} is outside the server's --media-root", ref.param) from None
    try:
        size = os.stat(full).st_size
    except OSError:
        size = 0  # open_image reports a missing file with its own message
    if size > policy.max_image_bytes:
        raise APIError(f"'{ref.param}': {path} is larger than the server's limit of {policy.max_image_bytes:,} bytes",
                       ref.param)
    return open_image(full, max_pixels=policy.max_pixels)


def _fetch(ref: ImageRef, policy: MediaPolicy) -> bytes:
    host = (urlparse(ref.url).hostname or "").lower()
    if not policy.allow_remote:
        raise APIError(f"'{ref.param}': remote image URLs are refused (start the server with --allow-remote-media "
                       "and --remote-host to allow chosen hosts); send the image as a data: URL", ref.param)
    if host not in policy.remote_hosts:
        raise APIError(f"'{ref.param}': host {host!r} is not on the server's --remote-host list", ref.param)
    import httpx  # part of the serve extra; only needed when remote media is enabled

    data, started = bytearray(), time.monotonic()
    try:
        with httpx.stream("GET", ref.url, timeout=policy.fetch_timeout, follow_redirects=False) as response:
            if response.status_code != 200:
                raise APIError(f"'{ref.param}': fetching the image gave HTTP {response.status_code}", ref.param)
            for chunk in response.iter_bytes():
                data += chunk
                if time.monotonic() - started > policy.fetch_timeout:  # httpx's timeout is per read
                    raise APIError(f"'{ref.param}': fetching the image took longer than {policy.fetch_timeout} s",
                                   ref.param)
                if len(data) > policy.max_image_bytes:
                    raise APIError(f"'{ref.param}': the image is larger than the server's limit of "
                                   f"{policy.max_image_bytes:,} bytes", ref.param)
    except httpx.HTTPError as err:
        raise APIError(f"'{ref.param}': fetching the image failed: {type(err).__name__}", ref.param) from None
    return bytes(data)
