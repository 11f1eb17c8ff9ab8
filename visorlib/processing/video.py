"""Video files -> frames: decoded with PyAV, sampled as each family's transformers video processor samples.

``videos=["clip.mp4"]`` or a ``{"type": "video", "path": "clip.mp4"}`` message part reach the
family's processor as a path; :meth:`~visorlib.processing.ChatProcessor.load_video` decodes it here
into ``[frames, height, width, 3]`` uint8 RGB (the array transformers' ``load_video`` returns with its
``pyav`` backend, frame for frame) and the family's pixel pipeline takes it from there, as it takes
frames handed in directly.

Which frames: transformers' LLaVA-OneVision and Qwen2-VL video processors default to
``do_sample_frames=False``, i.e. every decoded frame, and so do we. ``num_frames`` / ``fps``
(processor attributes ``video_num_frames`` / ``video_fps``, or arguments here) ask for sampling,
by the family's rule: :func:`uniform_indices` (transformers' ``default_sample_indices_fn``,
LLaVA-OneVision) or :func:`qwen2_vl_indices` (``Qwen2VLVideoProcessor.sample_frames``: counts
rounded to the temporal patch of 2, ``fps`` clamped to 4..768 frames). The total frame count is
the container's (``stream.frames``), as transformers reads it, or the decoded count when the
container does not say.

PyAV is an optional extra (``pip install 'visorlib[video]'``). A missing, corrupt or empty file is
a :class:`VideoError` naming it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..validation import InputError


class VideoError(InputError):
    """A video file that cannot be decoded (missing, corrupt, no frames), or a bad sampling request."""


def uniform_indices(total: int, video_fps: float, num_frames: int | None = None, fps: float | None = None) -> np.ndarray:
    """transformers' ``default_sample_indices_fn``: ``num_frames`` evenly spaced (``fps`` gives the count)."""
    if num_frames is None and fps is not None:
        num_frames = max(1, int(total / video_fps * fps))
    if num_frames is None:
        return np.arange(total, dtype=int)
    if num_frames > total:
        raise VideoError(f"num_frames={num_frames} exceeds the video's {total} frames")
    return np.arange(num_frames, dtype=int) * total // num_frames


def qwen2_vl_indices(total: int, video_fps: float, num_frames: int | None = None, fps: float | None = None,
                     temporal_patch_size: int = 2, min_frames: int = 4, max_frames: int = 768) -> np.ndarray:
    """``Qwen2VLVideoProcessor.sample_frames``: counts in whole temporal patches."""
    if num_frames is not None:
        num_frames = round(num_frames / temporal_patch_size) * temporal_patch_size
    elif fps is not None:
        top = math.floor(min(max_frames, total) / temporal_patch_size) * temporal_patch_size
        count = min(max(total / video_fps * fps, min_frames), top, total)
        num_frames = math.floor(count / temporal_patch_size) * temporal_patch_size
    if num_frames is None:
        return np.arange(total, dtype=int)
    if num_frames > total or num_frames < 1:
        raise VideoError(f"sampling asks for {num_frames} frames of a video of {total}")
    return np.arange(0, total, total / num_frames).astype(int)


SampleIndices = Callable[..., np.ndarray]


def decode_video(path: str | os.PathLike, num_frames: int | None = None, fps: float | None = None,
                 sample_indices: SampleIndices = uniform_indices) -> np.ndarray:
    """The sampled frames of a video file: ``[frames, height, width, 3]`` uint8 RGB.

    Args:
        path: The file.
        num_frames: Frames to sample (None: see ``fps``).
        fps: Frames per second to sample (None with ``num_frames`` None: every frame).
        sample_indices: The family's rule, ``(total, video_fps, num_frames, fps) -> indices``.

    Raises:
        VideoError: PyAV missing, ``num_frames`` and ``fps`` both given, or the file missing,
            not a video, corrupt or without frames (naming it).
    """
    if num_frames is not None and fps is not None:
        raise VideoError(f"{path}: num_frames and fps are mutually exclusive; give one")
    try:
        import av
    except ImportError as err:
        raise VideoError(f"{path}: decoding video files needs PyAV: pip install 'visorlib[video]'") from err
    name = os.fspath(path)
    if not Path(name).is_file():
        raise VideoError(f"video file {name} does not exist (or is not a regular file)")
    try:
        with av.open(name) as container:
            if not container.streams.video:
                raise VideoError(f"{name} has no video stream")
            stream = container.streams.video[0]
            video_fps = float(stream.average_rate or 0) or None
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
            total = int(stream.frames) or len(frames)
    except av.FFmpegError as err:
        raise VideoError(f"{name} cannot be decoded as a video: {err}") from err
    if not frames:
        raise VideoError(f"{name} holds no video frames")
    if fps is not None and video_fps is None:
        raise VideoError(f"{name}: fps={fps} sampling needs the video's frame rate, which the file does not give")
    indices = sample_indices(total, video_fps or 0.0, num_frames=num_frames, fps=fps)
    if int(indices.max()) >= len(frames):
        raise VideoError(f"{name}: the container says {total} frames but only {len(frames)} decode (truncated file?)")
    return np.stack([frames[int(i)] for i in indices])
