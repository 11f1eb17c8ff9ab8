"""Video files: decoded with PyAV, frames sampled as transformers' video processors sample them.

The frames equal transformers' ``load_video`` (pyav backend) for every sampling rule, and a
corrupt, empty or missing file is an error naming it. Pixel and placeholder parity with
transformers' processors lives beside each family's processor tests (``test_processing.py``,
``test_parity_qwen2_vl.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
from video_helpers import write_mp4

from visorlib.processing.video import VideoError, decode_video, qwen2_vl_indices, uniform_indices

pytest.importorskip("av", reason="PyAV is not installed (pip install 'visorlib[video]')")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("options", [{}, {"num_frames": 4}, {"fps": 2}, {"num_frames": 9}])
def test_frames_equal_transformers_load_video(tmp_path, options):
    from transformers.video_utils import default_sample_indices_fn, load_video

    clip = write_mp4(tmp_path / "clip.mp4")
    ours = decode_video(clip, **options)
    theirs, _ = load_video(str(clip), backend="pyav", sample_indices_fn=lambda metadata, **kw:
                           default_sample_indices_fn(metadata, **options))
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape and np.array_equal(ours, theirs)


@pytest.mark.parametrize("options", [{"num_frames": 5}, {"num_frames": 8}, {"fps": 2}, {"fps": 0.5}])
def test_qwen2_vl_sampling_is_transformers(options):
    from transformers import Qwen2VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    metadata = VideoMetadata(total_num_frames=30, fps=4.0, duration=7.5)
    theirs = Qwen2VLVideoProcessor().sample_frames(metadata, **options)
    assert np.array_equal(qwen2_vl_indices(30, 4.0, **options), np.asarray(theirs))
    # Without num_frames / fps transformers does not sample (do_sample_frames=False): every frame.
    assert np.array_equal(qwen2_vl_indices(30, 4.0), np.arange(30))


def test_broken_files_are_named(tmp_path):
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video")
    with pytest.raises(VideoError, match="corrupt.mp4"):
        decode_video(bad)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="empty.mp4"):
        decode_video(empty)
    with pytest.raises(VideoError, match="missing.mp4 does not exist"):
        decode_video(tmp_path / "missing.mp4")
    clip = write_mp4(tmp_path / "clip.mp4", frames=3)
    with pytest.raises(VideoError, match="exceeds the video's 3 frames"):
        decode_video(clip, num_frames=5)
    with pytest.raises(VideoError, match="mutually exclusive"):
        decode_video(clip, num_frames=2, fps=1)
    assert np.array_equal(uniform_indices(10, 5.0), np.arange(10))
