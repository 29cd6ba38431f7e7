"""Window grid and blend weights for large-scene prediction."""

from __future__ import annotations

import numpy as np
import pytest

from rsseg.errors import UsageError
from rsseg.inference.windows import blend_weights, ramp_1d, window_grid, window_starts


@pytest.mark.parametrize("length,tile,overlap", [(1, 8, 0), (7, 8, 3), (8, 8, 0), (9, 8, 0), (37, 8, 3),
                                                 (100, 16, 15), (1000, 256, 64)])
def test_window_starts_cover_every_pixel_and_end_at_the_edge(length, tile, overlap):
    starts = window_starts(length, tile, overlap)
    covered = np.zeros(length, dtype=int)
    for s in starts:
        covered[s : s + tile] += 1
    assert covered.min() >= 1
    assert starts[0] == 0
    assert starts == sorted(set(starts))
    if length >= tile:
        assert starts[-1] == length - tile  # no window hangs over the edge
        gaps = np.diff(starts)
        assert (gaps <= tile - overlap).all() and (gaps > 0).all()
    else:
        assert starts == [0]


def test_window_starts_stride():
    assert window_starts(100, 40, 10) == [0, 30, 60]
    assert window_starts(101, 40, 10) == [0, 30, 60, 61]


@pytest.mark.parametrize("tile,overlap", [(0, 0), (8, 8), (8, -1), (8, 9)])
def test_bad_tile_or_overlap_is_a_usage_error(tile, overlap):
    with pytest.raises(UsageError):
        window_starts(50, tile, overlap)


def test_ramp_is_one_at_scene_borders_and_never_zero():
    w = ramp_1d(10, 4, start_border=True, end_border=False)
    np.testing.assert_allclose(w, [1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2], rtol=1e-6)
    w = ramp_1d(10, 4, start_border=False, end_border=True)
    np.testing.assert_allclose(w[:4], [0.2, 0.4, 0.6, 0.8], rtol=1e-6)
    assert (ramp_1d(10, 9, False, False) > 0).all()


@pytest.mark.parametrize("h,w,tile,overlap", [(37, 53, 16, 5), (64, 64, 32, 0), (101, 67, 32, 31), (5, 9, 16, 4)])
def test_blended_weights_are_positive_everywhere_and_full_at_the_scene_border(h, w, tile, overlap):
    total = np.zeros((h, w), dtype=np.float64)
    top_left = None
    for line in window_grid(h, w, tile, overlap):
        for win in line:
            wt = blend_weights(win, tile, overlap)
            assert wt.shape == (win.height, win.width)
            assert (wt > 0).all()
            total[win.row : win.row + win.height, win.col : win.col + win.width] += wt
            if win.row == 0 and win.col == 0:
                top_left = wt
    assert total.min() > 0
    # The corner window trusts the scene's corner pixel fully: no taper towards the border.
    assert top_left[0, 0] == 1.0
