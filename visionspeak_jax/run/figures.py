"""Attention figures in the style of the "Show, Attend and Tell" paper.

The first panel is the image; every further panel shows the image with the
attention map of one word blended over it, the word as its title.

The panels are composed in NumPy and drawn as one pixel-exact image with
matplotlib's Agg canvas: one image and a few text labels per figure instead
of one axes per word keeps a 64-figure batch to a few seconds. The figure is
a `matplotlib.figure.Figure`, never a pyplot one, so nothing is registered
globally and nothing leaks or needs a display.
"""

import io
import math
from typing import Any, Sequence

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
from PIL import Image

_DPI = 100
_MARGIN = 6  # Pixels between panels and around the grid.
_TITLE = 24  # Pixels above every panel for its word.


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3]."""
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size),
                                                  Image.Resampling.BICUBIC))


def _upsample_map(alpha: np.ndarray, size: int) -> np.ndarray:
  """float [h, w] attention -> float [size, size] in [0, 1], smooth."""
  alpha = np.nan_to_num(np.asarray(alpha, np.float32))
  # Bilinear rather than nearest: the grid cells are receptive-field centres,
  # not hard boxes, and blocks would suggest a precision the model lacks.
  up = np.asarray(Image.fromarray(alpha, mode="F").resize(
      (size, size), Image.Resampling.BILINEAR))
  up = np.clip(up, 0.0, None)
  # Normalised per word: with 49+ regions the raw weights are all small, and
  # the figure is about where each word looked, not how peaked it was.
  peak = up.max()
  return up / peak if peak > 0 else up


def _blend(base: np.ndarray, alpha: np.ndarray, cmap: str,
           opacity: float) -> np.ndarray:
  """float [P, P, 3] image, [h, w] attention -> float [P, P, 3] overlay."""
  heat = colormaps[cmap](_upsample_map(alpha, base.shape[0]))[..., :3]
  return (1.0 - opacity) * base + opacity * heat * 255.0


def overlay(image: np.ndarray, alpha: np.ndarray, *, size: int = 224,
            cmap: str = "Greys_r", opacity: float = 0.7) -> np.ndarray:
  """One word's panel of `attention_figure`, as an array.

  Args:
    image: uint8 [H, W, 3], the image the model saw.
    alpha: float [h, w], the word's attention map.
    size: side of the square result in pixels.
    cmap: matplotlib colormap of the overlay (see `attention_figure`).
    opacity: weight of the overlay against the image, in [0, 1].

  Returns:
    uint8 [size, size, 3].
  """
  base = _resize_image(np.asarray(image), size).astype(np.float32)
  panel = _blend(base, np.asarray(alpha), cmap, opacity)
  return np.clip(np.round(panel), 0, 255).astype(np.uint8)


def grid_shape(num_panels: int, columns: int = 5) -> tuple[int, int]:
  """(rows, columns) of the panel grid for `num_panels` panels."""
  cols = max(1, min(columns, num_panels))
  return math.ceil(num_panels / cols), cols


def attention_figure(image: np.ndarray, words: Sequence[str],
                     alphas: np.ndarray, path: str, *, columns: int = 5,
                     panel_size: int = 224, cmap: str = "Greys_r",
                     opacity: float = 0.7) -> int:
  """Writes a PNG: the image, then one attention panel per word.

  Args:
    image: uint8 [H, W, 3], the image the model saw.
    words: the caption, T words (append "<end>" with its map to show EOS).
    alphas: float [T, h, w], the attention map of every word.
    path: where the PNG goes.
    columns: panels per row before wrapping.
    panel_size: side of each square panel in pixels.
    cmap: matplotlib colormap of the attention overlay; the default, white
      where the model looked and dark elsewhere, is the paper's look.
    opacity: weight of the overlay against the image, in [0, 1].

  Returns:
    The number of panels drawn, 1 + T.

  Raises:
    ValueError: the shapes of `image`, `words` and `alphas` disagree.
  """
  image = np.asarray(image)
  alphas = np.asarray(alphas)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"The image must be uint8 [H, W, 3], got {image.dtype} "
                     f"{list(image.shape)}.")
  if alphas.shape[0] != len(words) or (len(words) and alphas.ndim != 3):
    raise ValueError(f"Expected {len(words)} attention maps [T, h, w] for "
                     f"{len(words)} words, got {list(alphas.shape)}.")
  size = panel_size
  base = _resize_image(image, size).astype(np.float32)  # [P, P, 3]
  panels = [base] + [_blend(base, alpha, cmap, opacity) for alpha in alphas]

  rows, cols = grid_shape(len(panels), columns)
  height = rows * (_TITLE + size) + (rows + 1) * _MARGIN
  width = cols * size + (cols + 1) * _MARGIN
  canvas = np.full((height, width, 3), 255, np.uint8)
  titles = [""] + list(words)
  fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
  FigureCanvasAgg(fig)
  for i, (panel, title) in enumerate(zip(panels, titles)):
    r, c = divmod(i, cols)
    top = _MARGIN + r * (_TITLE + size + _MARGIN) + _TITLE
    left = _MARGIN + c * (size + _MARGIN)
    canvas[top:top + size, left:left + size] = np.clip(
        np.round(panel), 0, 255).astype(np.uint8)
    if title:
      # Figure coordinates run bottom-up; the title sits centred in its band.
      fig.text((left + size / 2) / width,
               1.0 - (top - _TITLE / 2) / height, title, ha="center",
               va="center", fontsize=13, parse_math=False)
  fig.figimage(canvas, xo=0, yo=0, origin="upper")
  fig.savefig(path, dpi=_DPI, format="png")
  return len(panels)


def attention_figure_array(image: np.ndarray, words: Sequence[str],
                           alphas: np.ndarray, **options: Any) -> np.ndarray:
  """`attention_figure` as uint8 [H, W, 3] rather than a file.

  Args:
    image: uint8 [H, W, 3].
    words: the caption, T words.
    alphas: float [T, h, w].
    **options: `attention_figure`'s keyword arguments.

  Returns:
    The figure's pixels, uint8 [H', W', 3].
  """
  buffer = io.BytesIO()
  attention_figure(image, words, alphas, buffer, **options)
  buffer.seek(0)
  with Image.open(buffer) as png:
    return np.asarray(png.convert("RGB"))
