"""The four raster traversals of a feature map used by every 2D Mamba block here.

Order, everywhere in this package: (right, left, down, up) =
row-major (each row left to right, rows top to bottom), its reverse,
column-major (each column top to bottom, columns left to right), its reverse.
"""

from __future__ import annotations

import torch
from torch import Tensor

DIRECTIONS = ("right", "left", "down", "up")


def to_sequences(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4, C, H*W): the map read in the four traversal orders."""
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, rows.flip(-1), cols, cols.flip(-1)], dim=1)


def from_sequences(seqs: Tensor, height: int, width: int) -> Tensor:
    """(B, 4, C, H*W) -> (B, 4, C, H, W): each sequence put back at the pixels it was read from."""
    b, k, c, _ = seqs.shape
    right, left, down, up = seqs.unbind(1)
    rows = torch.stack([right, left.flip(-1)], dim=1).view(b, 2, c, height, width)
    cols = torch.stack([down, up.flip(-1)], dim=1).view(b, 2, c, width, height).transpose(3, 4)
    return torch.stack([rows[:, 0], rows[:, 1], cols[:, 0], cols[:, 1]], dim=1)


def merge_sequences(seqs: Tensor, height: int, width: int) -> Tensor:
    """(B, 4, C, H*W) -> (B, C, H, W): the sum over the four traversals, per pixel (SS2D's merge)."""
    b, _, c, _ = seqs.shape
    rows = seqs[:, 0] + seqs[:, 1].flip(-1)
    cols = seqs[:, 2] + seqs[:, 3].flip(-1)
    return rows.view(b, c, height, width) + cols.view(b, c, width, height).transpose(2, 3)
