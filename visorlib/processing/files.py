"""Opening image files safely: regular files only, inside a root folder, bounded in size.

Every image visorlib reads from a path (training data, ``visorlib generate --image``) goes through
:func:`open_image`, so the same rules hold everywhere:

* **Regular files only.** A FIFO would block the reader forever and a device file can be
  endless (``/dev/zero``) or have side effects on open, so the path is ``stat``-ed and refused
  *before* it is opened. It is then opened non-blocking and checked again on the open descriptor,
  which closes the window in which the file could be swapped for a FIFO in between.
* **Inside the root.** With a ``root`` (a dataset's ``image_root``), a path that leaves it — by
  ``..`` or through a symbolic link — is refused unless ``allow_outside`` is set, so a dataset
  file cannot make training read arbitrary files of the machine.
* **Bounded.** PNG and JPEG files compress very well: a 1.9 MB PNG of 12000 x 12000 pixels
  decodes to 2.7 GB. The pixel count is known from the header, so an image over ``max_pixels`` is
  refused before any decoding. PIL's own decompression-bomb check (warning above
  ``PIL.Image.MAX_IMAGE_PIXELS``, error above twice that) is replaced by this limit; note that
  PIL still refuses anything above twice its own limit, so a ``max_pixels`` beyond that also needs
  ``PIL.Image.MAX_IMAGE_PIXELS`` raised.
* **One upright frame.** A multi-frame file (animated GIF, APNG, multi-page TIFF) gives its first
  frame, detached from the file (the file is closed on return; a still-attached frame failed later
  with "seek of closed file"). A JPEG's EXIF orientation is applied (``ImageOps.exif_transpose``,
  as transformers' ``load_image`` does), so a phone photo is not processed sideways.
* **Decoded here.** The image is fully loaded (``Image.load``), so a truncated or corrupt file
  fails in this function, with the file's name, not later inside preprocessing — whatever
  ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` says: some libraries set that process-wide switch on
  import (lmms-eval does), which would otherwise make truncated images load silently padded.

All failures are :class:`~visorlib.models.InputError` naming the file; training wraps them in a
``DataError`` that ``on_error: skip`` may skip.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from ..validation import InputError

#: Default pixel limit: 64 Mpx (e.g. 8192 x 8192, 192 MB as RGB). The largest inputs the zoo's
#: processors use are far smaller (LLaVA-OV anyres_max_9: ~2300 x 2300; Qwen2-VL: 12.8 Mpx).
DEFAULT_MAX_PIXELS = 1 << 26

_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


# LOAD_TRUNCATED_IMAGES is a module global of PIL: switched off around our decoding, one thread at a time.
_STRICT = threading.Lock()


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "special file")


def resolve_image_path(path: str | os.PathLike, root: str | os.PathLike | None = None,
                       allow_outside: bool = False) -> Path:
    """``path`` joined to ``root`` (when relative), refused if it resolves outside ``root``.

    Args:
        path: The image path as written (relative to ``root``, or absolute).
        root: Folder the path must stay inside; ``None``: no containment (a path given directly).
        allow_outside: Accept paths that leave ``root`` (``..``, absolute paths, symbolic links).

    Raises:
        InputError: The path leaves ``root``.
    """
    path = Path(path)
    if root is None:
        return path
    full = path if path.is_absolute() else Path(root) / path
    if allow_outside:
        return full
    # resolve() follows symbolic links, so a link inside the root pointing out of it is caught too.
    real_root, real = Path(root).resolve(), full.resolve()
    if not real.is_relative_to(real_root):
        raise InputError(f"image {path} resolves to {real}, outside the image root {real_root}; "
                         "set data.allow_outside_image_root: true in the recipe to allow it")
    return full


def open_image(path: str | os.PathLike, *, root: str | os.PathLike | None = None, allow_outside: bool = False,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode one image file under the rules of this module.

    Args:
        path: The file (relative to ``root`` when one is given).
        root: Folder the file must stay inside (see :func:`resolve_image_path`).
        allow_outside: Accept paths outside ``root``.
        max_pixels: Largest ``width * height`` accepted; ``None``: only PIL's own limit applies.

    Returns:
        The decoded image in its file's mode (the processors convert modes): the first frame of a
        multi-frame file, turned upright by its EXIF orientation.

    Raises:
        InputError: Not found, not a regular file, outside the root, too many pixels, or not a
            readable image; the message names the file.
    """
    full = resolve_image_path(path, root, allow_outside)
    try:
        info = os.stat(full)  # follows links: a link to a FIFO is refused like the FIFO itself
    except FileNotFoundError:
        raise InputError(f"image {full} not found") from None
    except OSError as err:
        raise InputError(f"image {full} cannot be read: {err.strerror or err}") from err
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"image {full} is a {_kind(info.st_mode)}, not a regular file; refusing to open it")
    try:
        # O_NONBLOCK: should the path have become a FIFO since the stat, opening it does not hang.
        fd = os.open(full, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise InputError(f"image {full} cannot be read: {err.strerror or err}") from err
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise InputError(f"image {full} is not a regular file; refusing to read it")
        return _decode(handle, full, max_pixels)


def decode_image_bytes(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode an in-memory image (a ``data:`` URL sent to ``visorlib serve``) under the rules
    of :func:`open_image`; ``name`` says where it came from in messages."""
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(handle, full: Path | str, max_pixels: int | None) -> Image.Image:
    with warnings.catch_warnings():
        # PIL's warning threshold is not ours: max_pixels below decides (and is checked before decoding).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(handle)
        except Image.DecompressionBombError as err:
            raise InputError(f"image {full} is too large to decode safely (decompression bomb guard): {err}") from err
        except UnidentifiedImageError as err:
            raise InputError(f"image {full} is corrupt or unreadable: not an image format PIL can read") from err
        except (OSError, SyntaxError, ValueError) as err:
            raise InputError(f"image {full} is corrupt or unreadable: {err}") from err
        pixels = image.width * image.height
        if max_pixels is not None and pixels > max_pixels:
            raise InputError(f"image {full} has {image.width}x{image.height} = {pixels:,} pixels, more than "
                             f"max_pixels={max_pixels:,} (decompression bomb guard; raise data.max_pixels to allow it)")
        try:
            with _STRICT:
                tolerant, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
                try:
                    image.load()
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = tolerant
        except Image.DecompressionBombError as err:
            raise InputError(f"image {full} is too large to decode safely (decompression bomb guard): {err}") from err
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            # PIL reports truncated data as OSError ("image file is truncated"), broken headers as
            # SyntaxError / ValueError depending on the plugin.
            raise InputError(f"image {full} is corrupt or unreadable (truncated?): {err}") from err
        return _upright_first_frame(image, full)


def _upright_first_frame(image: Image.Image, full: Path) -> Image.Image:
    """The loaded first frame, independent of the (about to be closed) file, EXIF orientation applied."""
    from PIL import ImageOps

    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
            image = image.copy()  # a frame still tied to its file would seek the closed handle later
        if image.getexif().get(0x0112, 1) != 1:  # 0x0112: Orientation; 1 is upright
            image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InputError(f"image {full} is corrupt or unreadable: {err}") from err
    return image
