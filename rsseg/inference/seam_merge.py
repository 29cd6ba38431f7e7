"""Exact union of pixel-region pieces that were polygonized strip by strip (hand-written).

Why not ``shapely.union_all``: GEOS's overlay nodes every segment of every piece, and the few
regions that span many strips carry hundreds of thousands of vertices; at 8192² that union took
30 s of a 68 s blockwise run, more than half of what polygonizing the whole raster costs
(``benchmarks/vectorize.py``). No library offers a cheaper exact union for this case, and the
case is special enough to need none: corners are integers, edges are axis-parallel, and pieces of
one region touch only along the seam rows between strips. The union is then an edge operation:
drop the seam edges two pieces share, and re-link the ring parts at the vertices on the seams
and at the vertices the rings pass more than once. Every other vertex is copied as it is.

Where four pixels meet at a vertex with the region on two diagonal ones (a pinch, which merging
can create anywhere two pieces touch at a corner), the rings are linked so that they turn right,
around the outside pixel. That keeps the rings
apart at the pinch, so a hole touching the shell at a point stays a separate ring, which is the
OGC-valid form and the one GDAL's polygonize writes.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
import shapely


def merge_seam_pieces(pieces: Sequence[shapely.Polygon], seam_rows: Iterable[int]) -> shapely.Polygon | None:
    """The union of ``pieces`` (pixel coordinates: x = column, y = row), or None.

    ``pieces`` are parts of one 4-connected region, each polygonized inside one strip of rows;
    ``seam_rows`` are the row coordinates where strips meet. None means an invariant of that
    setting did not hold (a vertex that cannot be linked, not exactly one outer ring); the caller
    then falls back to a general union.
    """
    polys = shapely.orient_polygons(np.asarray(pieces, dtype=object))  # shells CCW, holes CW
    rings = shapely.get_rings(polys)
    coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    xy = coords.astype(np.int64)  # exact: every vertex is a pixel corner
    ring_ends = np.cumsum(np.bincount(ring_of, minlength=len(rings)))
    ring_starts = ring_ends - np.bincount(ring_of, minlength=len(rings))
    # Rings are cut where the union may link them differently from the pieces: on the seams,
    # and at every vertex the rings pass more than once (pinches between or inside pieces).
    seams = np.unique(np.fromiter(seam_rows, dtype=np.int64))
    cut = np.isin(xy[:, 1], seams)
    closing = np.zeros(len(xy), dtype=bool)
    closing[ring_ends - 1] = True
    keys = (xy[:, 0] << 32) + xy[:, 1]
    _, vertex_id, counts = np.unique(keys[~closing], return_inverse=True, return_counts=True)
    cut[~closing] |= counts[vertex_id] > 1
    touches = np.add.reduceat(cut.astype(np.int64), ring_starts) > 0

    chains: list[np.ndarray] = []  # ring parts from one cut vertex to the next
    seam_edges: dict[tuple[int, int], list[tuple[int, int, int]]] = defaultdict(list)
    for r in np.flatnonzero(touches):
        ring = xy[ring_starts[r] : ring_ends[r] - 1]  # without the closing repeat
        n = len(ring)
        cuts = np.flatnonzero(cut[ring_starts[r] : ring_ends[r] - 1])
        for j, start in enumerate(cuts):
            stop = cuts[j + 1] if j + 1 < len(cuts) else cuts[0] + n
            part = ring[np.arange(start, stop + 1) % n]
            if len(part) == 2 and part[0, 1] == part[1, 1]:
                # An edge lying on a seam: split into unit edges, so that the edges two pieces
                # share can be matched one for one whatever their lengths.
                (x0, y), (x1, _) = part.tolist()
                step = 1 if x1 > x0 else -1
                for x in range(x0, x1, step):
                    seam_edges[(min(x, x + step), y)].append((x, x + step, y))
            else:
                chains.append(part)
    for shared in seam_edges.values():
        if len(shared) == 1:  # an edge used twice was interior to the union (it ran both ways)
            x0, x1, y = shared[0]
            chains.append(np.array([[x0, y], [x1, y]], dtype=np.int64))

    successor = _link(chains)
    if successor is None:
        return None
    shell, holes = None, []
    visited = np.zeros(len(chains), dtype=bool)
    for first in range(len(chains)):
        if visited[first]:
            continue
        parts, c = [], first
        while not visited[c]:
            visited[c] = True
            parts.append(chains[c][:-1])
            c = successor[c]
        if c != first:
            return None
        ring = _drop_collinear(np.concatenate(parts))
        if _twice_signed_area(ring) > 0:
            if shell is not None:
                return None
            shell = ring
        else:
            holes.append(ring)
    if shell is None:
        return None
    hole_rings = [shapely.linearrings(h.astype(np.float64)) for h in holes]
    # A ring without cuts is a hole, copied as it is: a piece's shell always reaches a seam
    # (or the piece would not need merging), and a hole is closed inside its strip.
    hole_rings += list(rings[~touches])
    return shapely.polygons(shapely.linearrings(shell.astype(np.float64)), holes=hole_rings or None)


def _link(chains: list[np.ndarray]) -> list[int] | None:
    """For every chain, the chain that continues it at its end vertex (None if ambiguous)."""
    starting_at: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, chain in enumerate(chains):
        starting_at[(int(chain[0, 0]), int(chain[0, 1]))].append(i)
    successor = [-1] * len(chains)
    for i, chain in enumerate(chains):
        options = starting_at.get((int(chain[-1, 0]), int(chain[-1, 1])), [])
        if len(options) == 1:
            successor[i] = options[0]
            continue
        d_in = chain[-1] - chain[-2]
        right = [o for o in options if _cross(d_in, chains[o][1] - chains[o][0]) < 0]
        if len(right) != 1:
            return None
        successor[i] = right[0]
    if sorted(successor) != list(range(len(chains))):
        return None
    return successor


def _cross(a: np.ndarray, b: np.ndarray) -> int:
    return int(a[0] * b[1] - a[1] * b[0])


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Vertices where the ring turns, closed (the seam edges were split into unit edges)."""
    d_in = ring - np.roll(ring, 1, axis=0)
    d_out = np.roll(ring, -1, axis=0) - ring
    turns = d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0] != 0
    kept = ring[turns]
    return np.concatenate([kept, kept[:1]])


def _twice_signed_area(ring: np.ndarray) -> int:
    x, y = ring[:-1, 0], ring[:-1, 1]
    xn, yn = ring[1:, 0], ring[1:, 1]
    return int(np.sum(x * yn - xn * y))
