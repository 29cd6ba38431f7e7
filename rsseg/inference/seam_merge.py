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
around the outside pixel. That keeps the rings apart at the pinch, so a hole touching the shell
at a point stays a separate ring, which is the OGC-valid form and the one GDAL's polygonize writes.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import shapely


def merge_seam_pieces(pieces: Sequence[shapely.Polygon], seam_rows: Iterable[int]) -> shapely.Polygon | None:
    """The union of ``pieces`` (pixel coordinates: x = column, y = row), or None.

    ``pieces`` are parts of one 4-connected region, each polygonized inside one strip of rows;
    ``seam_rows`` are the row coordinates where strips meet. None means an invariant of that
    setting did not hold (a vertex that cannot be linked, not exactly one outer ring); the caller
    then falls back to a general union. Vectorized throughout but for one loop over integers:
    a speckled region can have hundreds of thousands of holes and pinches.
    """
    polys = shapely.orient_polygons(np.asarray(pieces, dtype=object))  # shells CCW, holes CW
    rings = shapely.get_rings(polys)
    coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    # Ring vertices without the closing repeat; exact integers (every vertex is a pixel corner).
    size = np.bincount(ring_of, minlength=len(rings)) - 1
    is_open = np.ones(len(coords), dtype=bool)
    is_open[np.cumsum(size + 1) - 1] = False
    xy = coords[is_open].astype(np.int64)
    ring, pos = _runs(size)
    first = np.cumsum(size) - size  # index of each ring's first vertex in xy

    # Rings are cut where the union may link them differently from the pieces: on the seams,
    # and at every vertex the rings pass more than once (pinches between or inside pieces).
    seams = np.unique(np.fromiter(seam_rows, dtype=np.int64))
    on_seam = np.isin(xy[:, 1], seams)
    _, vertex, passes = np.unique(_keys(xy), return_inverse=True, return_counts=True)
    cut = on_seam | (passes[vertex] > 1)
    touches = np.bincount(ring, weights=cut, minlength=len(rings)) > 0

    # Parts of the rings between consecutive cuts (cyclically within a ring).
    starts = np.flatnonzero(cut)  # in ring order, then position
    part_ring = ring[starts]
    ring_first_cut = np.r_[True, part_ring[1:] != part_ring[:-1]]
    ring_last_cut = np.r_[part_ring[1:] != part_ring[:-1], True]
    wrap_to = starts[ring_first_cut][np.cumsum(ring_first_cut) - 1]
    stops = np.where(ring_last_cut, wrap_to, np.roll(starts, -1))
    # In 1 .. size: a ring cut once is one part, the whole ring.
    n_edges = (pos[stops] - pos[starts] - 1) % size[part_ring] + 1

    # An edge lying on a seam is split into unit edges, so that the edges two pieces share can
    # be matched one for one whatever their lengths; a shared edge (met twice, once each way)
    # is interior to the union and dropped.
    on_seam_edge = (n_edges == 1) & on_seam[starts] & (xy[starts, 1] == xy[stops, 1])
    x0, x1, y = xy[starts[on_seam_edge], 0], xy[stops[on_seam_edge], 0], xy[starts[on_seam_edge], 1]
    length, step = np.abs(x1 - x0), np.sign(x1 - x0)
    edge, k = _runs(length)
    unit_x0 = x0[edge] + step[edge] * k
    unit_x1 = unit_x0 + step[edge]
    unit_y = y[edge]
    _, unit, uses = np.unique(_keys(np.stack([np.minimum(unit_x0, unit_x1), unit_y], 1)),
                              return_inverse=True, return_counts=True)
    if (uses > 2).any():
        return None
    kept = uses[unit] == 1
    unit_x0, unit_x1, unit_y = unit_x0[kept], unit_x1[kept], unit_y[kept]

    # Chains: the ring parts off the seam edges, then the kept unit edges. Each is emitted as
    # its vertices but the last: ``n`` vertices of ``table`` from ``base + offset`` on, modulo
    # ``period`` (a ring's size; 1 for a unit edge, whose start is appended to the table).
    part = ~on_seam_edge
    p_start, p_stop, p_ring = starts[part], stops[part], part_ring[part]
    n_units = len(unit_x0)
    unit_start = np.stack([unit_x0, unit_y], 1)
    unit_dir = np.stack([unit_x1 - unit_x0, np.zeros_like(unit_y)], 1)
    table = np.concatenate([xy, unit_start])
    base = np.concatenate([first[p_ring], len(xy) + np.arange(n_units)])
    offset = np.concatenate([pos[p_start], np.zeros(n_units, dtype=np.int64)])
    period = np.concatenate([size[p_ring], np.ones(n_units, dtype=np.int64)])
    n = np.concatenate([n_edges[part], np.ones(n_units, dtype=np.int64)])
    begin = np.concatenate([xy[p_start], unit_start])
    end = np.concatenate([xy[p_stop], np.stack([unit_x1, unit_y], 1)])
    after_begin = first[p_ring] + (pos[p_start] + 1) % size[p_ring]
    before_end = first[p_ring] + (pos[p_stop] - 1) % size[p_ring]
    first_dir = np.concatenate([xy[after_begin] - xy[p_start], unit_dir])
    last_dir = np.concatenate([xy[p_stop] - xy[before_end], unit_dir])

    successor = _link(begin, end, first_dir, last_dir)
    if successor is None:
        return None
    chain_order, cycle_chains = _cycles(successor)
    if chain_order is None:
        return None
    lens = n[chain_order]
    in_order, k = _runs(lens)
    chain = chain_order[in_order]
    cycle_xy = table[base[chain] + (offset[chain] + k) % period[chain]]
    cycle_sizes = np.add.reduceat(lens, np.cumsum(cycle_chains) - cycle_chains)
    if _passes_a_vertex_twice(cycle_xy, cycle_sizes):
        return None  # pieces meeting only at a corner: not one 4-connected region
    new_rings, positive = _rings_from_cycles(cycle_xy, cycle_sizes)
    if positive.sum() != 1:  # exactly one outer ring: the region is 4-connected
        return None
    # A ring without cuts is a hole, copied as it is: a piece's shell always reaches a seam
    # (or the piece would not need merging), and a hole is closed inside its strip.
    holes = np.concatenate([new_rings[~positive], rings[~touches]])
    return shapely.polygons(new_rings[positive][0], holes=holes if len(holes) else None)


def _runs(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For runs of these lengths laid end to end: each element's run, and its offset in the run."""
    run = np.repeat(np.arange(len(lengths)), lengths)
    return run, np.arange(len(run)) - (np.cumsum(lengths) - lengths)[run]


def _keys(xy: np.ndarray) -> np.ndarray:
    """One int64 per vertex (pixel corners are non-negative and below 2**31)."""
    return (xy[:, 0] << 32) + xy[:, 1]


def _link(begin: np.ndarray, end: np.ndarray, first_dir: np.ndarray, last_dir: np.ndarray) -> np.ndarray | None:
    """For every chain, the chain that continues it at its end vertex (None if none fits).

    A vertex has one or two chains leaving it; with two (a pinch) the ring turns right.
    """
    begin_keys = _keys(begin)
    order = np.argsort(begin_keys, kind="stable")
    sorted_keys = begin_keys[order]
    end_keys = _keys(end)
    lo = np.searchsorted(sorted_keys, end_keys, "left")
    options = np.searchsorted(sorted_keys, end_keys, "right") - lo
    if ((options < 1) | (options > 2)).any():
        return None
    successor = order[lo]
    two = np.flatnonzero(options == 2)
    if len(two):
        a, b = order[lo[two]], order[lo[two] + 1]
        d_in = last_dir[two]
        right_a = d_in[:, 0] * first_dir[a, 1] - d_in[:, 1] * first_dir[a, 0] < 0
        right_b = d_in[:, 0] * first_dir[b, 1] - d_in[:, 1] * first_dir[b, 0] < 0
        if (right_a == right_b).any():
            return None
        successor[two] = np.where(right_a, a, b)
    if (np.bincount(successor, minlength=len(begin)) != 1).any():  # not a permutation
        return None
    return successor


def _cycles(successor: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """Chains in cycle order, and how many chains each cycle has (one loop over integers)."""
    nxt = successor.tolist()
    visited = bytearray(len(nxt))
    order: list[int] = []
    counts: list[int] = []
    for head in range(len(nxt)):
        if visited[head]:
            continue
        c, count = head, 0
        while not visited[c]:
            visited[c] = 1
            order.append(c)
            c = nxt[c]
            count += 1
        if c != head:
            return None, np.zeros(0, dtype=np.int64)
        counts.append(count)
    return np.asarray(order, dtype=np.int64), np.asarray(counts, dtype=np.int64)


def _passes_a_vertex_twice(xy: np.ndarray, sizes: np.ndarray) -> bool:
    """Whether some cycle visits one vertex twice (never, for one 4-connected region)."""
    cycle, _ = _runs(sizes)
    keys = _keys(xy)
    order = np.lexsort((keys, cycle))
    keys, cycle = keys[order], cycle[order]
    return bool(((keys[1:] == keys[:-1]) & (cycle[1:] == cycle[:-1])).any())


def _rings_from_cycles(xy: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear rings from vertex cycles (consecutive in ``xy``, not closed), keeping only the
    vertices where a ring turns (seam edges were split into unit edges), and whether each ring
    is counter-clockwise."""
    ring_id, offset = _runs(sizes)
    ring_start = np.arange(len(xy)) - offset
    previous = ring_start + (offset - 1) % sizes[ring_id]
    following = ring_start + (offset + 1) % sizes[ring_id]
    d_in, d_out = xy - xy[previous], xy[following] - xy
    turns = d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0] != 0
    # Twice the signed area (shoelace): sums of integers far inside float64's exact range.
    cross = xy[:, 0] * xy[following, 1] - xy[following, 0] * xy[:, 1]
    positive = np.bincount(ring_id, weights=cross, minlength=len(sizes)) > 0
    rings = shapely.linearrings(xy[turns].astype(np.float64), indices=ring_id[turns])
    return rings, positive
