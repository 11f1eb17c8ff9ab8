"""LLaVA-OneVision image and video preprocessing (anyres_max_N tiling).

The reference is the processor ``AutoImageProcessor`` picks by default in transformers 5.x for
``llava_onevision``: the *torchvision* backend (``LlavaOnevisionImageProcessor``), not the PIL
one (``LlavaOnevisionImageProcessorPil``). The two differ by a few uint8 levels because PIL's
bicubic resampling rounds differently, so we run the very same ``torchvision.transforms.v2``
kernels on the same uint8 channel-first tensors, in the same order, and get identical
``pixel_values``:

* single-image samples: base tile = whole image resized to ``S x S``; then the image is resized
  (aspect kept, ``ceil`` on the short side) into the best pinpoint, zero-padded (black, pixel
  value 0) to it with the extra pixel on the bottom/right, and cut into ``S x S`` tiles row-major;
* images of multi-image samples (``tiled=False``): padded to a square with the mean colour
  (``int(255 * mean)``), then resized to ``S x S`` - one tile each;
* every tile: bicubic + antialias resize on uint8, then ``(x - 255 * mean) / (255 * std)`` in
  float32 (rescale and normalise fused, as HF does).

Which pinpoint is best and how many tiles an image yields comes from :mod:`.anyres`, the single
place that geometry is defined.
"""

from __future__ import annotations

import importlib
import math
import types
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import ModelConfig
from ..validation import InputError
from . import anyres


class _LazyModule(types.ModuleType):
    """A module imported on first attribute access.

    torchvision's import pulls in ``torch._dynamo`` (seconds on a loaded 2-core machine); the
    processors need it only once an image is processed, not on ``import visorlib``.
    """

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attr)


tvF = _LazyModule("torchvision.transforms.v2.functional")  # torchvision's functional transforms, lazily


def _bicubic():
    """torchvision's bicubic interpolation mode (looked up at call time: torchvision loads lazily)."""
    return tvF.InterpolationMode.BICUBIC
_RESCALE = 1 / 255


# PIL modes whose values are not 8-bit: read as arrays and put on the 0-255 scale below. (PIL's own
# convert("RGB") clips them to 0..255, turning a 16-bit photo white; transformers does the same.)
_WIDE_PIL_MODES = ("I", "F")
_MAX_16BIT = 65535


def to_chw_tensor(image: Any, index: int = 0, label: str = "image") -> torch.Tensor:
    """Convert one image to an RGB ``[3, H, W]`` tensor the way HF's torchvision backend does.

    8-bit PIL images keep their dtype semantics (uint8); transparency is composited onto white.
    Arrays and tensors may be ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` with ``C`` in 1, 3, 4
    (channels first wins when ambiguous, as in HF); greyscale is repeated to RGB and RGBA is
    alpha-blended onto white. Values are put on the 0-255 scale by :func:`_to_pixel_scale`
    (16-bit data, including PIL's ``I;16`` / ``I`` modes, scaled by 255/65535; floats, including
    PIL's ``F`` mode, taken on the 0-255 scale like HF and refused when non-finite or outside it).

    Args:
        image: A ``PIL.Image.Image``, ``numpy.ndarray`` or ``torch.Tensor``.
        index: Position of the image in its batch, used in error messages.
        label: What the image is, for messages (``"image"``, ``"video frame"``).

    Raises:
        InputError: Wrong type, unsupported shape, channel count or dtype, a side of length 0, or
            values that are not finite or outside the dtype's range.
    """
    name = f"{label} {index}"
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise InputError(f"{name} has size {image.height}x{image.width} (height x width); both sides must be > 0")
        if image.mode in _WIDE_PIL_MODES or image.mode.startswith("I;16"):
            array = np.asarray(image)
            image = array.astype(array.dtype.newbyteorder("="))  # I;16B is big-endian; torch needs native order
        else:
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, rgba)
            array = np.array(image.convert("RGB"))
            return torch.from_numpy(array).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        if image.dtype.kind not in "uif" or image.dtype.itemsize > 8:
            raise InputError(f"{name} has unsupported dtype {image.dtype}; pass uint8 (or uint16, or floats on the "
                             "0-255 scale)")
        tensor = torch.from_numpy(np.ascontiguousarray(image.astype(image.dtype.newbyteorder("="), copy=False)))
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
    else:
        raise InputError(
            f"{name} has unsupported type {type(image).__name__}; expected a PIL.Image.Image, "
            "numpy.ndarray or torch.Tensor"
        )
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 3:
        raise InputError(f"{name} must have 2 or 3 dimensions, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] not in (1, 3, 4):
        if tensor.shape[-1] not in (1, 3, 4):
            raise InputError(f"{name} has shape {tuple(tensor.shape)}: no axis of 1, 3 or 4 channels")
        tensor = tensor.permute(2, 0, 1)
    if tensor.shape[-1] == 0 or tensor.shape[-2] == 0:
        raise InputError(
            f"{name} has size {tensor.shape[-2]}x{tensor.shape[-1]} (height x width); both sides must be > 0"
        )
    tensor = _to_pixel_scale(tensor, name)
    tensor = tvF.grayscale_to_rgb(tensor)
    if tensor.shape[0] == 4:
        tensor = _blend_alpha_on_white(tensor, name)
    return tensor.contiguous()


def _to_pixel_scale(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Check an image's values and put them on the 0-255 scale the pipeline expects.

    * ``uint8``: as is.
    * Other integer dtypes (``uint16``, ``int32``, PIL ``I;16`` / ``I``): values must lie in
      ``0..65535``. When they all fit in ``0..255`` they are read as 8-bit values (what PIL and
      transformers do, so such images give transformers' exact result); otherwise the image is
      16-bit data and is scaled by 255/65535 (rounded) to uint8: 65535 -> 255, 32896 -> 128.
    * Floating point (PIL ``F`` too): must be finite and in ``[0, 255]`` (the 0-255 scale HF
      expects); values in ``[0, 1]`` pass with a warning, since they are probably fractions.

    Raises:
        InputError: naming the image, for bool / complex data, negative or > 16-bit integers, and
            non-finite or out-of-range floats.
    """
    if tensor.dtype == torch.uint8:
        return tensor
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise InputError(f"{name} has unsupported dtype {tensor.dtype}; pass uint8 (or uint16, or floats on the "
                         "0-255 scale)")
    if tensor.numel() == 0:
        return tensor
    if not tensor.is_floating_point():
        dtype, tensor = tensor.dtype, tensor.to(torch.int64)  # torch has no min/max for uint16/uint32
        low, high = int(tensor.min()), int(tensor.max())
        if low < 0 or high > _MAX_16BIT:
            raise InputError(f"{name} ({dtype}) holds values in [{low}, {high}]; integer images must lie in "
                             f"0..255 (8-bit) or 0..{_MAX_16BIT} (16-bit): rescale it to uint8 yourself")
        if high <= 255:
            return tensor.to(torch.uint8)
        # round(x * 255 / 65535) in integers: 65535 = 255 * 257, so this is round(x / 257).
        return ((tensor * 255 + _MAX_16BIT // 2) // _MAX_16BIT).to(torch.uint8)
    if not bool(torch.isfinite(tensor).all()):
        raise InputError(f"{name} holds NaN or infinite values")
    low, high = float(tensor.min()), float(tensor.max())
    if low < 0.0 or high > 255.0:
        raise InputError(f"{name} is floating point with values in [{low:g}, {high:g}]; floats must be on the 0-255 "
                         "scale (not normalised, not 16-bit); pass uint8 to be safe")
    if high <= 1.0:
        warnings.warn(
            f"{name} is floating point with values in [0, 1]; like Hugging Face, visorlib expects "
            "pixel values on the 0-255 scale (pass uint8 to be safe)",
            stacklevel=4,
        )
    return tensor


def _blend_alpha_on_white(rgba: torch.Tensor, name: str = "image") -> torch.Tensor:
    """Composite an RGBA ``[4, H, W]`` tensor onto white, returning RGB in the input dtype."""
    dtype = rgba.dtype
    if rgba.is_floating_point() and (float(rgba.min()) < 0.0 or float(rgba.max()) > 1.0):
        # Float alpha must be a 0-1 fraction to blend; HF refuses these too.
        raise InputError(f"{name}: a floating-point RGBA image must hold values in [0, 1], got "
                         f"[{float(rgba.min())}, {float(rgba.max())}]")
    x = tvF.to_dtype(rgba.movedim(0, -1), torch.float32, scale=True)
    rgb = x[..., :3] * x[..., 3:] + (1 - x[..., 3:])
    return tvF.to_dtype(rgb, dtype, scale=True).movedim(-1, 0)


def _normalize(tiles: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Rescale by 1/255 and normalise in one float32 step, with HF's exact constants."""
    # HF folds the 1/255 into mean and std (float32 tensors times 255); doing the same keeps the
    # result bit-identical rather than merely close.
    mean_255 = torch.tensor(list(mean)) * (1.0 / _RESCALE)
    std_255 = torch.tensor(list(std)) * (1.0 / _RESCALE)
    return tvF.normalize(tiles.to(torch.float32), mean_255.tolist(), std_255.tolist())


def _fit_size(height: int, width: int, target: Sequence[int]) -> tuple[int, int]:
    """Aspect-kept size inside ``target`` (h, w): one side fills it, the other is ``ceil``-ed.

    HF rounds *up* here (``math.ceil`` of the float product), whereas
    :func:`anyres.select_best_resolution` rounds down when scoring candidates; both are kept.
    """
    target_h, target_w = int(target[0]), int(target[1])
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def anyres_tiles(image: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Base tile plus grid tiles, ``[1 + rows * cols, 3, S, S]``, still uint8 (not normalised).

    Args:
        image: RGB ``[3, H, W]`` tensor from :func:`to_chw_tensor`.
        cfg: Model configuration (tile side ``cfg.vision.image_size``, pinpoints).
    """
    side = cfg.vision.image_size
    height, width = image.shape[-2:]
    best_h, best_w = anyres.select_best_resolution((height, width), cfg.processing.pinpoints(side))
    new_h, new_w = _fit_size(height, width, (best_h, best_w))
    resized = tvF.resize(image, [new_h, new_w], interpolation=_bicubic(), antialias=True)
    # The odd pixel of padding goes to the bottom/right (divmod), matching HF.
    top, extra_h = divmod(best_h - new_h, 2)
    left, extra_w = divmod(best_w - new_w, 2)
    padded = tvF.pad(resized, [left, top, left + extra_w, top + extra_h])
    rows, cols = anyres.tile_grid((height, width), cfg.processing.pinpoints(side), side)
    grid = [padded[:, r * side : (r + 1) * side, c * side : (c + 1) * side] for r in range(rows) for c in range(cols)]
    # Pinpoints that are not multiples of the tile leave short edge tiles; HF resizes them to S.
    grid = [t if t.shape[-2:] == (side, side) else tvF.resize(t, [side, side], interpolation=_bicubic()) for t in grid]
    base = tvF.resize(image, [side, side], interpolation=_bicubic(), antialias=True)
    return torch.stack([base, *grid])


def square_tile(image: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """One ``[1, 3, S, S]`` uint8 tile: mean-colour pad to a square, then resize (multi-image)."""
    side = cfg.vision.image_size
    height, width = image.shape[-2:]
    if height != width:
        size = max(height, width)
        left, top = (size - width) // 2, (size - height) // 2
        fill = [int(m * 255) for m in cfg.processing.image_mean]
        image = tvF.pad(image, [left, top, size - width - left, size - height - top], fill=fill)
    return tvF.resize(image, [side, side], interpolation=_bicubic(), antialias=True).unsqueeze(0)


def preprocess_images(
    images: Any,
    cfg: ModelConfig,
    tiled: bool | Sequence[bool] = True,
) -> dict[str, torch.Tensor]:
    """Turn images into LLaVA-OneVision ``pixel_values`` and ``image_sizes``.

    Args:
        images: One image or a non-empty list of images (PIL, ``numpy.ndarray`` or ``torch.Tensor``).
        cfg: Model configuration: tile side, pinpoints, mean and std.
        tiled: Whether each image gets anyres tiling (True for the only image of a sample) or one
            mean-padded square tile (False for images of a multi-image sample). A single bool
            applies to every image; a sequence gives one flag per image.

    Returns:
        ``pixel_values``: float32 ``[N, T, 3, S, S]`` where ``T`` is the most tiles any image
        needs; images with fewer tiles are zero-padded at the end. ``image_sizes``: int64
        ``[N, 2]`` original ``(height, width)``.

    Raises:
        InputError: No images, an unsupported type, a side of length 0, or a ``tiled`` list of
            the wrong length.
    """
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise InputError("preprocess_images got an empty list of images; pass at least one image")
    flags = [bool(tiled)] * len(images) if isinstance(tiled, bool) else [bool(t) for t in tiled]
    if len(flags) != len(images):
        raise InputError(f"tiled has {len(flags)} flags for {len(images)} images")
    per_image, sizes = [], []
    for index, (image, flag) in enumerate(zip(images, flags, strict=True)):
        chw = to_chw_tensor(image, index)
        sizes.append(list(chw.shape[-2:]))
        tiles = anyres_tiles(chw, cfg) if flag else square_tile(chw, cfg)
        per_image.append(_normalize(tiles, cfg.processing.image_mean, cfg.processing.image_std))
    most = max(t.shape[0] for t in per_image)
    side = cfg.vision.image_size
    pixel_values = torch.zeros(len(per_image), most, 3, side, side, dtype=torch.float32)
    for index, tiles in enumerate(per_image):
        pixel_values[index, : tiles.shape[0]] = tiles
    return {"pixel_values": pixel_values, "image_sizes": torch.tensor(sizes, dtype=torch.long)}


def _frames_tensor(frames: Any) -> torch.Tensor:
    """One video as an RGB ``[F, 3, H, W]`` tensor (list of images, or a 4-D array/tensor)."""
    if isinstance(frames, (np.ndarray, torch.Tensor)):
        if frames.ndim != 4:
            raise InputError(f"a video array must be 4-D [frames, H, W, C] or [frames, C, H, W], got {tuple(frames.shape)}")
        frames = list(frames)
    elif not isinstance(frames, (list, tuple)):
        raise InputError(
            f"a video must be a list of frames or a 4-D numpy.ndarray / torch.Tensor, got {type(frames).__name__}"
        )
    if len(frames) == 0:
        raise InputError("a video must have at least one frame")
    tensors = [to_chw_tensor(frame, index, "video frame") for index, frame in enumerate(frames)]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise InputError(f"all frames of a video must have the same size, got {sorted(shapes)}")
    return torch.stack(tensors)


def preprocess_video(frames: Any, cfg: ModelConfig) -> torch.Tensor:
    """Preprocess one video like transformers' ``LlavaOnevisionVideoProcessor``.

    Every frame is resized straight to ``S x S`` (no tiling, no padding), then rescaled and
    normalised. Frame sampling is the caller's job (HF's ``do_sample_frames`` defaults to False).

    Args:
        frames: A list of frames (PIL, arrays, tensors) or one ``[F, H, W, C]`` / ``[F, C, H, W]``
            array or tensor.
        cfg: Model configuration.

    Returns:
        float32 ``pixel_values_videos`` of shape ``[1, F, 3, S, S]``.
    """
    video = _frames_tensor(frames)
    side = cfg.vision.image_size
    video = tvF.resize(video, [side, side], interpolation=_bicubic(), antialias=True)
    return _normalize(video, cfg.processing.image_mean, cfg.processing.image_std).unsqueeze(0)
