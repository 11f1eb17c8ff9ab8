"""Synthetic video files for the video-decoding tests (PyAV writes them; the tests skip without it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_mp4(path: Path, frames: int = 9, size: tuple[int, int] = (48, 64), fps: int = 4, seed: int = 0) -> Path:
    """A short H.264 (or MPEG-4) clip of smooth random frames, ``size`` = (height, width)."""
    import av

    rng = np.random.default_rng(seed)
    height, width = size
    base = rng.integers(0, 256, (height, width, 3)).astype(np.float32)
    with av.open(str(path), mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            image = np.clip(base * 0.6 + 10 * index, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
