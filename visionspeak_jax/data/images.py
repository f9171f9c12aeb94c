"""Reading image files as the model sees them: any mode, EXIF, any size.

`load_image` decodes a file like the training pipeline decodes TFDS images
(TensorFlow's JPEG decoder and resize), composites transparency on white,
turns every PIL mode into 8-bit RGB, honours the EXIF orientation, and
shrinks very large files while decoding. Every failure is an `ImageError`
whose message names the file and says what to do.
"""

import io
import os
import warnings

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

# Images much larger than the model input are shrunk while decoding (JPEG
# DCT scaling) or right after (integer box reduction), but only down to this
# many times the model input size: a photo of ordinary size is never touched,
# so its caption matches training preprocessing exactly, and a huge one costs
# seconds, not minutes.
_PRE_REDUCE_MARGIN = 8

# Modes with transparency, composited on white.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# EXIF orientation -> the transpose that shows the image upright, as
# ImageOps.exif_transpose does (applied by hand: the JPEG pixels may come
# from TensorFlow's decoder).
_EXIF_ORIENTATION = 0x0112
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Modes whose pixel values can be averaged.
_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "I", "F")


class ImageError(ValueError):
  """An image file that cannot be captioned; `reason` says what to do."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"Cannot caption {path}: {reason}.")
    self.path = path
    self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode -> 8-bit RGB; transparency is composited on white."""
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")
  if image.mode in _ALPHA_MODES:
    image = image.convert("RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image).convert("RGB")
  if image.mode.startswith("I") or image.mode == "F":
    # 16/32-bit grey: PIL's convert("L") clips at 255, which turns most
    # 16-bit images white; scale the value range to 0..255 instead.
    values = np.nan_to_num(np.asarray(image, np.float64))
    lo, hi = values.min(), values.max()
    if image.mode == "F" and lo >= 0 and hi <= 1:
      values = values * 255.0  # Floats in [0, 1].
    elif image.mode == "F" and lo >= 0 and hi <= 255:
      pass  # Floats holding 8-bit values.
    elif lo >= 0 and hi <= 65535:
      values = values / 257.0  # 16-bit: 65535 -> 255 exactly.
    else:  # Anything else: stretch the range it uses.
      values = (values - lo) / max(hi - lo, 1e-12) * 255.0
    grey = np.clip(np.round(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")
  return image.convert("RGB")


def tensorflow():
  """TensorFlow, imported on first use and kept off the accelerators."""
  # Imported here: TensorFlow only decodes and resizes in this module, and
  # the CLI sets TensorFlow's log level before the first import.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    # TensorFlow would otherwise take the accelerators' memory from JAX.
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass  # TensorFlow is already initialised by the caller; leave it be.
  return tf


def _resize(pixels: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> [size, size, 3] with the training pipeline's resize."""
  from visionspeak_jax.data import input_pipeline
  tf = tensorflow()
  with tf.device("/CPU:0"):
    return input_pipeline.resize_image(tf.constant(pixels), size).numpy()


def _decode_jpeg(data: bytes) -> np.ndarray:
  """JPEG bytes -> uint8 [H, W, 3], bit for bit as TFDS decodes them."""
  # TensorFlow's default IDCT is the fast integer one, PIL's the accurate
  # one: up to 5 levels apart per pixel. The model was trained on the former.
  tf = tensorflow()
  with tf.device("/CPU:0"):
    return tf.io.decode_jpeg(data, channels=3).numpy()


def load_image(path: str, size: int) -> np.ndarray:
  """Reads an image file as the model sees it.

  Handles every PIL mode (grey, palette, alpha composited on white, CMYK,
  16-bit), EXIF orientation, and very large files (decoded at reduced size).

  Args:
    path: the image file.
    size: the model input side S.

  Returns:
    uint8 [S, S, 3].

  Raises:
    ImageError: the file is missing, not an image, truncated, corrupt or too
      large; the message names the file and says what to do.
  """
  if os.path.isdir(path):
    raise ImageError(path, "it is a directory; pass image files")
  if not os.path.exists(path):
    raise ImageError(path, "no such file; check the path")
  if not os.access(path, os.R_OK):
    raise ImageError(path, "permission denied; make the file readable")
  if os.path.getsize(path) == 0:
    raise ImageError(path, "the file is empty; re-export or re-download it")
  try:
    with open(path, "rb") as f:
      data = f.read()
    with warnings.catch_warnings():
      # Large is fine here: the image is reduced while decoding. PIL still
      # refuses images past twice its limit (about 179 megapixels).
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as image:
        request = _PRE_REDUCE_MARGIN * size
        transpose = _EXIF_TRANSPOSE.get(_orientation(image))
        if (image.format == "JPEG" and image.mode in ("L", "RGB") and
            min(image.size) // request < 2):
          # Ordinary photos: the training pipeline's own decoder. PIL checks
          # the file first, as TensorFlow would log its complaints to stderr
          # besides raising.
          image.load()
          image = Image.fromarray(_decode_jpeg(data))
        else:
          image.draft(None, (request, request))  # Only JPEG acts on this.
          image.load()
          # Reduced before the copies that orientation and conversion make.
          image = _reduce(image, request)
        if transpose is not None:
          image = image.transpose(transpose)
        image = _reduce(to_rgb(image), request)  # Modes skipped above too.
        pixels = np.asarray(image, np.uint8)  # [H, W, 3]
  except Image.DecompressionBombError as e:
    raise ImageError(path, "the image has too many pixels to decode safely; "
                     "downscale it first") from e
  except UnidentifiedImageError as e:
    raise ImageError(path, "not an image file PIL can read; convert it to "
                     "PNG or JPEG") from e
  except MemoryError as e:
    raise ImageError(path, "out of memory while decoding it; downscale it "
                     "first") from e
  except Exception as e:  # pylint: disable=broad-except
    # Decoders report damaged files as OSError, SyntaxError, ValueError,
    # struct.error, EOFError... depending on the format; to the user they
    # are all the same problem.
    raise ImageError(path, "the file is truncated or corrupt; re-export or "
                     "re-download it") from e
  return _resize(pixels, size)


def _reduce(image: Image.Image, request: int) -> Image.Image:
  """Box-averages by an integer factor while both sides stay >= request."""
  factor = min(image.width, image.height) // request
  # Averaging palette indices or bits would be meaningless.
  if factor < 2 or image.mode not in _REDUCIBLE_MODES:
    return image
  return image.reduce(factor)


def _orientation(image: Image.Image) -> int:
  """The EXIF orientation tag, 1 (as stored) when absent or unreadable."""
  try:
    return int(image.getexif().get(_EXIF_ORIENTATION, 1))
  except Exception:  # pylint: disable=broad-except
    # A damaged EXIF block should not cost the caption.
    return 1
