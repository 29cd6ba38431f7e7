"""Window grid over a large scene and the weights that blend overlapping windows.

The grid covers every pixel with square windows of ``tile`` pixels that overlap by ``overlap``.
The last window on each axis is moved back so that it ends exactly at the scene edge (no window
hangs over the border unless the scene is smaller than one tile, in which case the single window
is padded by the reader). Blend weights ramp down only towards sides that have a neighbouring
window; at the scene border they stay at 1, so border pixels are as trusted as central ones and
never come out empty (the bug the design notes list for other tools).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsseg.errors import UsageError


def window_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of size ``tile`` along an axis of ``length`` pixels.

    Consecutive windows are ``tile - overlap`` apart; the last one is aligned to the end. A
    length shorter than the tile gives one window at 0 (the reader pads it).
    """
    check_tile_overlap(tile, overlap)
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def check_tile_overlap(tile: int, overlap: int) -> None:
    if tile < 1:
        raise UsageError(f"--tile must be a positive number of pixels, got {tile}")
    if overlap < 0 or overlap >= tile:
        raise UsageError(f"--overlap must be >= 0 and smaller than --tile ({tile}), got {overlap}")


@dataclass(frozen=True)
class Window:
    """One window in scene pixels. ``height``/``width`` are clipped to the scene."""

    row: int
    col: int
    height: int
    width: int
    # Index of the window row it belongs to (windows of a row are processed together).
    grid_row: int
    top_border: bool
    bottom_border: bool
    left_border: bool
    right_border: bool


def window_grid(height: int, width: int, tile: int, overlap: int) -> list[list[Window]]:
    """All windows of a ``height`` x ``width`` scene, as a list of window rows (top to bottom)."""
    rows = window_starts(height, tile, overlap)
    cols = window_starts(width, tile, overlap)
    grid: list[list[Window]] = []
    for i, r in enumerate(rows):
        line = []
        for c in cols:
            line.append(
                Window(
                    row=r,
                    col=c,
                    height=min(tile, height - r),
                    width=min(tile, width - c),
                    grid_row=i,
                    top_border=r == 0,
                    bottom_border=r + tile >= height,
                    left_border=c == 0,
                    right_border=c + tile >= width,
                )
            )
        grid.append(line)
    return grid


def ramp_1d(size: int, overlap: int, start_border: bool, end_border: bool) -> np.ndarray:
    """1-D weights: 1 in the middle, a linear ramp over ``overlap`` towards inner sides.

    The ramp never reaches zero (its smallest value is ``1 / (overlap + 1)``), so every pixel a
    window covers gets a positive weight even where only that window reaches.
    """
    w = np.ones(size, dtype=np.float32)
    if overlap <= 0:
        return w
    ramp = (np.arange(1, overlap + 1, dtype=np.float32)) / (overlap + 1)
    n = min(overlap, size)
    if not start_border:
        w[:n] = np.minimum(w[:n], ramp[:n])
    if not end_border:
        w[size - n :] = np.minimum(w[size - n :], ramp[:n][::-1])
    return w


def blend_weights(window: Window, tile: int, overlap: int) -> np.ndarray:
    """(height, width) float32 weights for one window, clipped like the window."""
    wy = ramp_1d(tile, overlap, window.top_border, window.bottom_border)[: window.height]
    wx = ramp_1d(tile, overlap, window.left_border, window.right_border)[: window.width]
    return np.outer(wy, wx)
