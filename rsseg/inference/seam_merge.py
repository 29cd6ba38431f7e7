"""Pixel polygons as flat arrays: exact union of block pieces, and coverage simplification.

Both work on polygons whose corners are pixel corners (integers; x = column, y = row), held as
flat arrays (:class:`Rag`). The simplifier is described at :class:`CoverageSimplifier`.

Union of pixel-region pieces that were polygonized block by block (hand-written).

Why not ``shapely.union_all``: GEOS's overlay nodes every segment of every piece, and the few
regions that span many blocks carry hundreds of thousands of vertices; at 8192² that union took
30 s of a 68 s blockwise run, more than half of what polygonizing the whole raster costs
(``benchmarks/vectorize.py``). No library offers a cheaper exact union for this case, and the
case is special enough to need none: corners are integers, edges are axis-parallel, and pieces of
one region touch only along the seams between blocks (rows and columns). The union is then an
edge operation: drop the seam edges two pieces share, and re-link the ring parts at the vertices
on the seams and at the vertices the rings pass more than once. Every other vertex is copied as
it is.

Where four pixels meet at a vertex with the region on two diagonal ones (a pinch, which merging
can create anywhere two pieces touch at a corner), the rings are linked so that they turn right,
around the outside pixel. That keeps the rings apart at the pinch, so a hole touching the shell
at a point stays a separate ring, which is the OGC-valid form and the one GDAL's polygonize writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import shapely


@dataclass
class Rag:
    """Polygons as flat arrays: ring vertices without the closing repeat, shell first.

    ``xy`` (n, 2) int64 pixel corners, or float64 map coordinates; ``ring_sizes`` vertices per
    ring; ``ring_counts`` rings per polygon. What the pipeline carries from ``shapes`` to the
    file: no shapely geometry is built on the way (building, reading rings back and transforming
    them cost more than the arithmetic done on them).
    """

    xy: np.ndarray
    ring_sizes: np.ndarray
    ring_counts: np.ndarray

    @classmethod
    def empty(cls, dtype=np.int64) -> "Rag":
        return cls(np.zeros((0, 2), dtype=dtype), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))

    @classmethod
    def concat(cls, parts: Sequence["Rag"]) -> "Rag":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        return cls(np.concatenate([p.xy for p in parts]), np.concatenate([p.ring_sizes for p in parts]),
                   np.concatenate([p.ring_counts for p in parts]))

    @classmethod
    def from_shapely(cls, polygons) -> "Rag":
        polygons = np.asarray(polygons, dtype=object)
        if len(polygons) == 0:
            return cls.empty()
        rings, owner = shapely.get_rings(polygons, return_index=True)
        coords, ring_of = shapely.get_coordinates(rings, return_index=True)
        sizes = np.bincount(ring_of, minlength=len(rings)) - 1
        is_open = np.ones(len(coords), dtype=bool)
        is_open[np.cumsum(sizes + 1) - 1] = False
        return cls(coords[is_open].astype(np.int64), sizes, np.bincount(owner, minlength=len(polygons)))

    def __len__(self) -> int:
        return len(self.ring_counts)

    def ring_starts(self) -> np.ndarray:
        return np.cumsum(self.ring_sizes) - self.ring_sizes

    def shell_rings(self) -> np.ndarray:
        return np.cumsum(self.ring_counts) - self.ring_counts

    def take(self, which: np.ndarray) -> "Rag":
        """The polygons at these indices (or this mask), in order."""
        which = np.flatnonzero(which) if np.asarray(which).dtype == bool else np.asarray(which, dtype=np.int64)
        ring, k = _runs(self.ring_counts[which])
        rings = self.shell_rings()[which][ring] + k
        vertex, j = _runs(self.ring_sizes[rings])
        return Rag(self.xy[self.ring_starts()[rings][vertex] + j], self.ring_sizes[rings], self.ring_counts[which])

    def closed_xy(self) -> np.ndarray:
        """Vertices with each ring's first repeated at its end."""
        ring, k = _runs(self.ring_sizes + 1)
        return self.xy[self.ring_starts()[ring] + k % self.ring_sizes[ring]]

    def ring_areas2(self, xy: np.ndarray | None = None) -> np.ndarray:
        """Twice each ring's signed area (shoelace; exact for integer corners)."""
        xy = self.xy if xy is None else xy
        ring, pos = _runs(self.ring_sizes)
        nxt = self.ring_starts()[ring] + (pos + 1) % self.ring_sizes[ring]
        cross = xy[:, 0] * xy[nxt, 1] - xy[nxt, 0] * xy[:, 1]
        return np.bincount(ring, weights=cross, minlength=len(self.ring_sizes))

    def areas(self, xy: np.ndarray | None = None) -> np.ndarray:
        """Polygon areas: the shell's less the holes' (rings may turn either way)."""
        ring_area = np.abs(self.ring_areas2(xy)) / 2
        owner = np.repeat(np.arange(len(self)), self.ring_counts)
        shell = np.zeros(len(ring_area), dtype=bool)
        shell[self.shell_rings()] = True
        return np.bincount(owner, weights=np.where(shell, ring_area, -ring_area), minlength=len(self))

    def to_shapely(self, xy: np.ndarray | None = None) -> np.ndarray:
        if len(self) == 0:
            return np.empty(0, dtype=object)
        closed = Rag(self.xy if xy is None else xy, self.ring_sizes, self.ring_counts).closed_xy()
        offsets = (np.r_[0, np.cumsum(self.ring_sizes + 1)], np.r_[0, np.cumsum(self.ring_counts)])
        return shapely.from_ragged_array(shapely.GeometryType.POLYGON, closed.astype(np.float64), offsets)


def merge_seam_pieces(pieces: Sequence[shapely.Polygon], seam_rows: Iterable[int],
                      seam_cols: Iterable[int] = ()) -> shapely.Polygon | None:
    """The union of ``pieces`` (pixel coordinates: x = column, y = row), or None.

    ``pieces`` are parts of one 4-connected region, each polygonized inside one block;
    ``seam_rows`` and ``seam_cols`` are the row and column coordinates where blocks meet. None
    means an invariant of that setting did not hold (a vertex that cannot be linked, not exactly
    one outer ring); the caller then falls back to a general union. See :func:`merge_rag`.
    """
    merged = merge_rag(Rag.from_shapely(pieces), seam_rows, seam_cols)
    return None if merged is None else merged.to_shapely()[0]


def merge_rag(pieces: Rag, seam_rows: Iterable[int], seam_cols: Iterable[int] = ()) -> Rag | None:
    """:func:`merge_seam_pieces` on flat arrays: one polygon, or None.

    Vectorized throughout but for one loop over integers: a speckled region can have hundreds of
    thousands of holes and pinches.
    """
    seam_y = sorted_unique(np.fromiter(seam_rows, dtype=np.int64))
    seam_x = sorted_unique(np.fromiter(seam_cols, dtype=np.int64))
    sizes_all, starts_all = pieces.ring_sizes, pieces.ring_starts()
    is_shell = np.zeros(len(sizes_all), dtype=bool)
    is_shell[pieces.shell_rings()] = True
    # A ring that reaches no seam is a hole closed inside its block: copied as it is, and left
    # out of the work (a speckled region has many). Only shells reach the seams.
    ring_all, pos_all = _runs(sizes_all)
    touching = np.isin(pieces.xy[:, 1], seam_y) | np.isin(pieces.xy[:, 0], seam_x)
    reaches = np.bincount(ring_all, weights=touching, minlength=len(sizes_all)) > 0
    del touching
    aside = np.flatnonzero(~reaches)
    work = np.flatnonzero(reaches)
    # Shells counter-clockwise, holes clockwise (x right, y down: the shoelace sign flips, but
    # only consistency matters to the linking).
    one_ring_each = Rag(pieces.xy, sizes_all, np.ones(len(sizes_all), dtype=np.int64))
    flip = (one_ring_each.ring_areas2()[work] > 0) != is_shell[work]
    size = sizes_all[work]
    ring, pos = _runs(size)
    src_pos = np.where(flip[ring], size[ring] - 1 - pos, pos)
    xy = pieces.xy[starts_all[work][ring] + src_pos]
    first = np.cumsum(size) - size  # index of each ring's first vertex in xy

    # Rings are cut where the union may link them differently from the pieces: on the seams,
    # and at every vertex the rings pass more than once (pinches between or inside pieces).
    on_row, on_col = np.isin(xy[:, 1], seam_y), np.isin(xy[:, 0], seam_x)
    on_seam = on_row | on_col
    _, vertex, passes = np.unique(_keys(xy), return_inverse=True, return_counts=True)
    cut = on_seam | (passes[vertex] > 1)
    touches = np.bincount(ring, weights=cut, minlength=len(size)) > 0
    # Parts of the rings between consecutive cuts (cyclically within a ring).
    starts = np.flatnonzero(cut)  # in ring order, then position
    part_ring = ring[starts]
    ring_first_cut = np.r_[True, part_ring[1:] != part_ring[:-1]]
    ring_last_cut = np.r_[part_ring[1:] != part_ring[:-1], True]
    wrap_to = starts[ring_first_cut][np.cumsum(ring_first_cut) - 1]
    stops = np.where(ring_last_cut, wrap_to, np.roll(starts, -1))
    # In 1 .. size: a ring cut once is one part, the whole ring.
    n_edges = (pos[stops] - pos[starts] - 1) % size[part_ring] + 1

    # An edge lying on a seam (a horizontal one on a seam row, a vertical one on a seam column)
    # is split into unit edges, so that the edges two pieces share can be matched one for one
    # whatever their lengths; a shared edge (met twice, once each way) is interior to the union
    # and dropped.
    single = n_edges == 1
    row_edge = single & on_row[starts] & (xy[starts, 1] == xy[stops, 1])
    col_edge = single & on_col[starts] & (xy[starts, 0] == xy[stops, 0])
    on_seam_edge = row_edge | col_edge
    units = []
    for edges, along in ((row_edge, 0), (col_edge, 1)):
        # In (along, across) coordinates: x, y for seam rows; y, x for seam columns.
        a0, a1 = xy[starts[edges], along], xy[stops[edges], along]
        across = xy[starts[edges], 1 - along]
        length, step = np.abs(a1 - a0), np.sign(a1 - a0)
        edge, k = _runs(length)
        u0 = a0[edge] + step[edge] * k
        u1, u_across = u0 + step[edge], across[edge]
        _, unit, uses = np.unique(_keys(np.stack([np.minimum(u0, u1), u_across], 1)),
                                  return_inverse=True, return_counts=True)
        if (uses > 2).any():
            return None
        kept = uses[unit] == 1
        start = np.empty((int(kept.sum()), 2), dtype=np.int64)
        stop = np.empty_like(start)
        start[:, along], start[:, 1 - along] = u0[kept], u_across[kept]
        stop[:, along], stop[:, 1 - along] = u1[kept], u_across[kept]
        units.append((start, stop))
    unit_start = np.concatenate([units[0][0], units[1][0]])
    unit_stop = np.concatenate([units[0][1], units[1][1]])

    # Chains: the ring parts off the seam edges, then the kept unit edges. Each is emitted as
    # its vertices but the last: ``n`` vertices of ``table`` from ``base + offset`` on, modulo
    # ``period`` (a ring's size; 1 for a unit edge, whose start is appended to the table).
    part = ~on_seam_edge
    p_start, p_stop, p_ring = starts[part], stops[part], part_ring[part]
    n_units = len(unit_start)
    unit_dir = unit_stop - unit_start
    table = np.concatenate([xy, unit_start])
    base = np.concatenate([first[p_ring], len(xy) + np.arange(n_units)])
    offset = np.concatenate([pos[p_start], np.zeros(n_units, dtype=np.int64)])
    period = np.concatenate([size[p_ring], np.ones(n_units, dtype=np.int64)])
    n = np.concatenate([n_edges[part], np.ones(n_units, dtype=np.int64)])
    begin = np.concatenate([xy[p_start], unit_start])
    end = np.concatenate([xy[p_stop], unit_stop])
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
    ring_xy, ring_sizes, positive = _rings_from_cycles(cycle_xy, cycle_sizes)
    if positive.sum() != 1:  # exactly one outer ring: the region is 4-connected
        return None
    # A ring without cuts is a hole, copied as it is: a piece's shell always reaches a seam
    # (or the piece would not need merging), and a hole is closed inside its block.
    order = np.r_[np.flatnonzero(positive), np.flatnonzero(~positive)]
    new = Rag(ring_xy, ring_sizes, np.ones(len(ring_sizes), dtype=np.int64)).take(order)
    kept_rings = np.r_[work[~touches], aside]
    kept = one_ring_each.take(kept_rings)
    return Rag(np.concatenate([new.xy, kept.xy]), np.concatenate([new.ring_sizes, kept.ring_sizes]),
               np.array([len(order) + len(kept_rings)], dtype=np.int64))


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


def _rings_from_cycles(xy: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rings from vertex cycles (consecutive in ``xy``, not closed), keeping only the vertices
    where a ring turns (seam edges were split into unit edges): their vertices, sizes, and
    whether each ring turns the way shells were oriented."""
    ring_id, offset = _runs(sizes)
    ring_start = np.arange(len(xy)) - offset
    previous = ring_start + (offset - 1) % sizes[ring_id]
    following = ring_start + (offset + 1) % sizes[ring_id]
    d_in, d_out = xy - xy[previous], xy[following] - xy
    turns = d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0] != 0
    # Twice the signed area (shoelace): sums of integers far inside float64's exact range.
    cross = xy[:, 0] * xy[following, 1] - xy[following, 0] * xy[:, 1]
    positive = np.bincount(ring_id, weights=cross, minlength=len(sizes)) > 0
    return xy[turns], np.bincount(ring_id[turns], minlength=len(sizes)), positive


# ----------------------------------------------------------------------------- coverage simplification

_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it permutes the uint64 values
_NEVER = np.iinfo(np.int64).max


def node_positions(above: np.ndarray, below: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes of the pixel-edge network on vertex rows between pixel rows ``above`` and ``below``.

    ``above[i]`` and ``below[i]`` are the class rows just above and just below vertex row i (255
    for nodata and for outside the raster). Vertex (row i, x) is a node when three or four of the
    unit edges that meet there separate different classes (three or more regions meet, or one
    region touches itself diagonally). Returns (rows, xs), row-major.
    """
    rows, width = above.shape
    pad = np.full((rows, 1), 255, dtype=above.dtype)
    a = np.concatenate([pad, above, pad], axis=1)
    b = np.concatenate([pad, below, pad], axis=1)
    degree = (a[:, :-1] != a[:, 1:]).astype(np.uint8)  # up: the two pixels above the vertex
    degree += b[:, :-1] != b[:, 1:]  # down
    degree += a[:, :-1] != b[:, :-1]  # left
    degree += a[:, 1:] != b[:, 1:]  # right
    return np.nonzero(degree >= 3)


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` of a 1-d array by sorting (numpy 2.4's hash-based ``np.unique`` takes
    seconds on a few million int64)."""
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def _isin(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``np.isin`` by hashing (pandas): binary search costs a cache miss per step on millions
    of values, and ``np.isin`` sorts both."""
    return pd.Series(values, copy=False).isin(keys).to_numpy()


def _isin_sorted(values: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    if len(sorted_keys) == 0:
        return np.zeros(len(values), dtype=bool)
    i = np.minimum(np.searchsorted(sorted_keys, values), len(sorted_keys) - 1)
    return sorted_keys[i] == values


def _yx_keys(xy: np.ndarray) -> np.ndarray:
    return (xy[:, 1] << 32) + xy[:, 0]


def _ext_gcd(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with a*s + b*t = 1 for coprime a, b (either sign), elementwise."""
    old_r, r = np.abs(a), np.abs(b)
    old_s, s = np.ones_like(a), np.zeros_like(a)
    old_t, t = np.zeros_like(a), np.ones_like(a)
    while (r != 0).any():
        going = r != 0
        q = np.where(going, old_r // np.where(going, r, 1), 0)
        old_r, r = np.where(going, r, old_r), np.where(going, old_r - q * r, r)
        old_s, s = np.where(going, s, old_s), np.where(going, old_s - q * s, s)
        old_t, t = np.where(going, t, old_t), np.where(going, old_t - q * t, t)
    return old_s * np.where(a < 0, -1, 1), old_t * np.where(b < 0, -1, 1)


def _empty_triangles(x: np.ndarray, y: np.ndarray, ip: np.ndarray, iv: np.ndarray, inx: np.ndarray,
                     area2: np.ndarray, keys: np.ndarray, gone: list[np.ndarray]) -> np.ndarray:
    """Whether each closed triangle of vertices (ip, iv, inx) (indices into x, y) holds no present
    vertex but its corners: none of ``keys`` (sorted ``_keys`` of every vertex there was) that is
    not in one of ``gone`` (sorted).

    All vertices are lattice points, so only lattice points need testing: those on the base p-n,
    and, when twice the area is 3 or more (Pick's theorem: below that a triangle has no interior
    lattice point), those inside. Points on the sides p-v and v-n lie on existing edges, which
    no vertex can. Lattice points are enumerated in the unimodular basis (d0, e) where d0 is the
    base direction reduced by its gcd g and cross(d0, e) = 1: the triangle spans the lattice
    lines at heights 0 .. |H| parallel to the base, each one an interval of integers.
    """
    ok = np.ones(len(ip), dtype=bool)
    # A base with lattice points inside (gcd g >= 2) needs twice the area >= g >= 2; at exactly
    # 2 (the most a one-pixel tolerance allows) g = 2: both steps even, one point, the midpoint.
    two = np.flatnonzero(area2 == 2)
    if len(two):
        a, b = ip[two], inx[two]
        dx, dy = x[b] - x[a], y[b] - y[a]
        even = ((dx | dy) & 1) == 0
        two, a, dx, dy = two[even], a[even], dx[even], dy[even]
        mid = np.stack([x[a] + dx // 2, y[a] + dy // 2], 1).astype(np.int64)
        ok[two[_present(_keys(mid), keys, gone)]] = False
    idx = np.flatnonzero(area2 >= 3)
    if len(idx) == 0:
        return ok
    ip, iv, inx = ip[idx], iv[idx], inx[idx]
    p = np.stack([x[ip], y[ip]], 1).astype(np.int64)
    d = np.stack([x[inx], y[inx]], 1).astype(np.int64) - p
    g = np.gcd(d[:, 0], d[:, 1])
    need = (g > 1) | (area2[idx] >= 3)
    if not need.any():
        return ok
    idx, d, g, p, iv = idx[need], d[need], g[need], p[need], iv[need]
    v = np.stack([x[iv], y[iv]], 1).astype(np.int64)
    area2 = area2[idx]
    d0 = d // g[:, None]
    owner_parts, point_parts = [], []
    # Height 0: the base, t = 1 .. g-1.
    run, t = _runs(np.maximum(g - 1, 0))
    owner_parts.append(run)
    point_parts.append(p[run] + (t + 1)[:, None] * d0[run])
    inner = np.flatnonzero(area2 >= 3)
    if len(inner):
        pi, vi, d0i, gi = p[inner], v[inner], d0[inner], g[inner]
        s, t_ = _ext_gcd(d0i[:, 0], d0i[:, 1])
        e = np.stack([-t_, s], 1)  # cross(d0, e) = d0x*s + d0y*t = 1
        w = vi - pi
        h = d0i[:, 0] * w[:, 1] - d0i[:, 1] * w[:, 0]
        sign = np.where(h < 0, -1, 1)
        e = e * sign[:, None]
        hm = np.abs(h)
        tv = sign * (w[:, 0] * e[:, 1] - w[:, 1] * e[:, 0])  # w = tv*d0 + hm*e
        level_of, k = _runs(np.maximum(hm - 1, 0))
        lev = k + 1
        hm_l, tv_l, g_l = hm[level_of], tv[level_of], gi[level_of]
        lo = -((-tv_l * lev) // hm_l)
        hi = (g_l * hm_l + (tv_l - g_l) * lev) // hm_l
        seg, tt = _runs(np.maximum(hi - lo + 1, 0))
        tri = level_of[seg]
        owner_parts.append(inner[tri])
        point_parts.append(pi[tri] + (lo[seg] + tt)[:, None] * d0i[tri] + lev[seg][:, None] * e[tri])
    owner = np.concatenate(owner_parts)
    points = np.concatenate(point_parts)
    if len(points) == 0:
        return ok
    ok[idx[owner[_present(_keys(points), keys, gone)]]] = False
    return ok


def _present(points: np.ndarray, keys: np.ndarray, gone: list[np.ndarray]) -> np.ndarray:
    """Which of these keys are vertices: in ``keys``, in none of ``gone``."""
    found = _isin_sorted(points, keys)
    for removed in gone:
        if found.any():
            found[found] = ~_isin_sorted(points[found], removed)
    return found


def _visvalingam(x: np.ndarray, y: np.ndarray, prev: np.ndarray, nxt: np.ndarray, active: np.ndarray,
                 chain: np.ndarray, remaining: np.ndarray, min_keep: np.ndarray, vertex_keys: np.ndarray,
                 keys: np.ndarray, gone: np.ndarray, limit2: float) -> np.ndarray:
    """Remove vertices in rounds of Visvalingam-Whyatt; returns the removed mask.

    A vertex is removable while twice its triangle's area is at most ``limit2`` and the triangle
    holds no other present vertex (``_empty_triangles``; ``keys``: every vertex position, less
    those in ``gone`` and those removed here): then the new edge crosses no other edge and passes
    through no vertex, so the network stays planar and every ring stays simple. Each round
    removes the removable vertices whose priority (area, then a scramble of the position) is
    below both ring neighbours', so no two neighbours go at once, and at most
    ``remaining - min_keep`` per chain. Only the vertices whose triangle changed are evaluated
    again. ``x``, ``y``, ``prev``, ``nxt``: int32 columns (1-d gathers cost half of 2-d ones);
    ``prev`` and ``nxt`` are relinked in place around the removed vertices.
    """
    n = len(x)
    # Priority: twice the area in the high bits, a scramble of the position (distinct for
    # distinct positions but for 2^-40 odds) below; _NEVER for a vertex not removable now.
    prio = np.full(n, _NEVER, dtype=np.int64)
    removed = np.zeros(n, dtype=bool)
    listed = np.zeros(n, dtype=bool)
    touched = np.zeros(n, dtype=bool)
    cand = [np.zeros(0, dtype=np.int64)]
    gone_lists = [gone]
    todo = np.flatnonzero(active).astype(np.int32)
    while True:
        for at in range(0, len(todo), 1 << 20):  # in slices: the first round takes every vertex
            some = todo[at:at + (1 << 20)]
            tp, tn = prev[some], nxt[some]
            bx, by = x[some], y[some]
            area2 = np.abs((bx - x[tp]).astype(np.int64) * (y[tn] - by)
                           - (by - y[tp]).astype(np.int64) * (x[tn] - bx))
            prio[some] = _NEVER
            small = np.flatnonzero(area2 <= limit2)
            fine = _empty_triangles(x, y, tp[small], some[small], tn[small], area2[small], keys, gone_lists)
            good = some[small[fine]]
            tie = (vertex_keys[good].astype(np.uint64) * _MIX) >> np.uint64(24)
            prio[good] = (np.minimum(area2[small[fine]], (1 << 22) - 1) << 40) | tie.astype(np.int64)
            new = good[~listed[good]]
            listed[new] = True
            cand.append(new)
        cand = np.concatenate(cand)
        still = prio[cand] != _NEVER
        if not still.all():
            listed[cand[~still]] = False
            cand = cand[still]
        if len(cand) == 0:
            break
        r = prio[cand]
        sel = cand[(r < prio[prev[cand]]) & (r < prio[nxt[cand]])]
        cand = [cand]
        ch = chain[sel]
        per_chain = np.bincount(ch, minlength=len(remaining))
        over = per_chain > remaining - min_keep
        if over.any():  # only the chains that would go below their minimum are sorted out
            crowded = over[ch]
            extra, ech = sel[crowded], ch[crowded]
            order = np.lexsort((prio[extra], ech))
            extra, ech = extra[order], ech[order]
            first_of_chain = np.r_[True, ech[1:] != ech[:-1]]
            start = np.flatnonzero(first_of_chain)[np.cumsum(first_of_chain) - 1]
            keep = np.arange(len(extra)) - start < (remaining - min_keep)[ech]
            sel = np.concatenate([sel[~crowded], extra[keep]])
            ch = chain[sel]
            per_chain = np.bincount(ch, minlength=len(remaining))
        if len(sel) == 0:
            break
        removed[sel] = True
        listed[sel] = False
        prio[sel] = _NEVER
        gone_lists.append(np.sort(vertex_keys[sel]))
        if len(gone_lists) > 8:
            gone_lists = [sorted_unique(np.concatenate(gone_lists))]
        p, q = prev[sel], nxt[sel]
        nxt[p] = q
        prev[q] = p
        remaining = remaining - per_chain
        touched[p] = True
        touched[q] = True
        touched &= active & ~removed
        todo = np.flatnonzero(touched).astype(np.int32)  # sorted, once each
        touched[todo] = False
    return removed


def _ring_links(size: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(first, last) vertex of each ring, (next, previous) vertex of each vertex (int32)."""
    first = np.cumsum(size) - size
    last = first + size - 1
    n = int(size.sum())
    nxt = np.arange(1, n + 1, dtype=np.int32)
    nxt[last] = first
    prev = np.arange(-1, n - 1, dtype=np.int32)
    prev[first] = last
    return first, last, nxt, prev


class CoverageSimplifier:
    """Visvalingam-Whyatt simplification of a pixel-polygon coverage, batch by batch, each shared
    edge chain once, so that neighbours keep meeting without gaps or overlaps.

    Works on polygons in pixel coordinates (integer corners) as ``polygonize`` streams them:
    :meth:`add_nodes` with the nodes of each vertex row as the rows are read, :meth:`simplify`
    with each batch of finished polygons and the vertex keys of the polygons still open (pieces
    of regions that continue below). The edge network is cut into chains at the nodes (where three
    regions meet or one touches itself diagonally, from the raster, so that a node on the straight
    side of a neighbour is found too and inserted into its ring). A chain between a finished
    polygon and an open one is simplified with the first of them and remembered (its key and the
    positions it lost) until the second is finished; a chain along nodata or the scene edge is
    left as it is, so the union of the polygons stays the valid area. Chains keep enough vertices
    that no polygon collapses onto its neighbour or to nothing (see :meth:`simplify`).
    """

    def __init__(self, area_limit: float):
        self.limit2 = 2.0 * area_limit * (1 + 1e-9)  # twice the area (an integer per triangle)
        self.nodes_xy = np.zeros(0, dtype=np.int64)  # _keys, sorted
        self.nodes_yx = np.zeros(0, dtype=np.int64)  # _yx_keys, sorted
        self.done = np.zeros(0, dtype=np.int64)  # keys of chains simplified, other side open
        self.lost = np.zeros(0, dtype=np.int64)  # positions those chains lost

    def add_nodes(self, ys: np.ndarray, xs: np.ndarray) -> None:
        """More nodes (vertex positions), added block by block."""
        if len(ys) == 0:
            return
        xy = np.stack([np.asarray(xs, dtype=np.int64), np.asarray(ys, dtype=np.int64)], 1)
        self.nodes_yx = np.sort(np.concatenate([self.nodes_yx, _yx_keys(xy)]))
        self.nodes_xy = np.sort(np.concatenate([self.nodes_xy, _keys(xy)]))

    def forget_above(self, y: int) -> None:
        """Drop the nodes above vertex row ``y`` (no polygon still to come reaches there)."""
        self.nodes_yx = self.nodes_yx[np.searchsorted(self.nodes_yx, np.int64(y) << 32):]
        self.nodes_xy = self.nodes_xy[(self.nodes_xy & 0xFFFFFFFF) >= y]

    def simplify(self, polygons: Rag, open_keys: np.ndarray) -> Rag:
        """The batch's polygons, simplified. ``open_keys``: sorted unique ``_keys`` of every vertex
        of the polygons still open, so that chains shared with them are told from chains along
        nodata, and so that their vertices count in the emptiness test."""
        if len(polygons) == 0:
            return polygons
        x, y, size = self._insert_nodes(polygons.xy[:, 0].astype(np.int32),
                                        polygons.xy[:, 1].astype(np.int32), polygons.ring_sizes)
        first, last, nxt, prev = _ring_links(size)
        ring = np.repeat(np.arange(len(size), dtype=np.int32), size)
        vkeys = (x.astype(np.int64) << 32) | y
        node = _isin(vkeys, self.nodes_xy)

        # Chains: a ring is cut at its nodes; the vertices before a ring's first node belong to
        # the chain from its last node. A ring without nodes is one closed chain.
        seen = np.cumsum(node, dtype=np.int32)
        before = seen[first] - node[first]  # nodes before each ring
        nodes_in_ring = (seen[last] - before).astype(np.int64)
        seen -= before[ring]  # nodes of its ring up to this vertex
        chains_in_ring = np.maximum(nodes_in_ring, 1)
        chain = (np.cumsum(chains_in_ring) - chains_in_ring).astype(np.int32)[ring]
        chain += np.where(seen == 0, chains_in_ring[ring].astype(np.int32), seen) - 1
        del seen  # per-vertex temporaries go as soon as used: this runs on a block's millions
        n_chains = int(chains_in_ring.sum())
        chain_ring = np.repeat(np.arange(len(size)), chains_in_ring)
        interior = ~node
        inner_chain = chain[interior]
        count = np.bincount(inner_chain, minlength=n_chains)
        chain_key = np.full(n_chains, _NEVER, dtype=np.int64)
        np.minimum.at(chain_key, inner_chain, vkeys[interior])
        del inner_chain
        kind = nodes_in_ring[chain_ring]

        # Each chain is simplified once: where it first appears, if both sides are polygons.
        real = np.flatnonzero(count > 0)
        uniq, first_at, inverse, uses = np.unique(chain_key[real], return_index=True,
                                                  return_inverse=True, return_counts=True)
        was_done = _isin_sorted(uniq, self.done)
        open_side = (uses == 1) & ~was_done & _isin_sorted(uniq, open_keys)
        todo_u = ~was_done & ((uses == 2) | open_side)
        primary = np.zeros(n_chains, dtype=bool)
        primary[real[first_at[todo_u]]] = True
        # What a chain keeps: a ring without nodes 3 vertices, a loop from a node back to
        # itself 2; a chain that is one of a ring's two chains keeps 1, so that the two never
        # both become the straight line between their nodes (that polygon would collapse), and
        # so does one whose far side is open (its ring is not known yet). Any other may go straight.
        twin = np.zeros(len(uniq), dtype=bool)
        np.logical_or.at(twin, inverse, kind[real] == 2)
        keep_u = np.select([kind[real[first_at]] == 0, kind[real[first_at]] == 1, twin | open_side],
                           [3, 2, 1], 0)
        min_keep = np.zeros(n_chains, dtype=np.int64)
        min_keep[real] = keep_u[inverse]

        # Each chain's index-1 vertex (the one after its start), for the alignment below.
        start_at = np.zeros(n_chains, dtype=np.int64)  # index of each chain's start vertex
        at_node = np.flatnonzero(node)
        start_at[chain[at_node]] = at_node
        free = kind == 0
        anchor = np.flatnonzero(interior & free[chain] & (vkeys == chain_key[chain]))
        start_at[chain[anchor]] = anchor
        second_key = vkeys[nxt[start_at]]
        del at_node, anchor

        all_keys = sorted_unique(np.concatenate([vkeys, open_keys]))
        active = interior & primary[chain]
        removed = _visvalingam(x, y, prev, nxt, active, chain, count.copy(), min_keep, vkeys,
                               all_keys, self.lost, self.limit2)
        del active, all_keys, prev, nxt

        # The same vertices leave the chain's other occurrence (the neighbour's ring): vertex by
        # vertex, numbered from the chain's start node (from its least-key vertex for a ring
        # without nodes), along or against the other ring's turn.
        by_unique = np.argsort(inverse, kind="stable")
        pair_start = np.cumsum(uses) - uses
        paired = np.flatnonzero((uses == 2) & todo_u)
        one, two = real[by_unique[pair_start[paired]]], real[by_unique[pair_start[paired] + 1]]
        lead = np.zeros(n_chains, dtype=np.int64)  # the occurrence that was simplified
        lead[two] = one
        same_turn = np.ones(n_chains, dtype=bool)
        same_turn[two] = second_key[two] == second_key[one]
        is_two = np.zeros(n_chains, dtype=bool)
        is_two[two] = True
        v = np.flatnonzero(interior & is_two[chain])
        c2 = chain[v]
        c1 = lead[c2]
        r2 = ring[v]
        j = (v - start_at[c2]) % size[r2]  # position along the chain from its start
        k = count[c2]
        j = np.where(same_turn[c2], j, np.where(free[c2], (k - j) % k, k + 1 - j))
        r1 = chain_ring[c1]
        twin = first[r1] + (start_at[c1] - first[r1] + j) % size[r1]
        if not np.array_equal(vkeys[v], vkeys[twin]):  # an invariant of the chains above
            raise AssertionError("coverage simplification: a chain's two occurrences differ")
        drop = removed
        drop[v] = removed[twin]
        del v, c2, c1, r2, j, k, r1, twin

        # Chains simplified with a polygon written before lose the positions remembered then.
        closing = np.zeros(n_chains, dtype=bool)
        closing[real[was_done[inverse]]] = True
        on_closing = interior & closing[chain]
        closing_positions = vkeys[on_closing]
        drop[on_closing] = _isin_sorted(closing_positions, self.lost)

        # Remember what open neighbours need; forget what the batch closed.
        opening = np.zeros(n_chains, dtype=bool)
        opening[real[first_at[open_side]]] = True
        closing_keys = sorted_unique(chain_key[closing])
        self.done = sorted_unique(np.concatenate([self.done[~_isin_sorted(self.done, closing_keys)],
                                                  chain_key[opening]]))
        old_lost = self.lost
        if len(old_lost):
            old_lost = old_lost[~_isin_sorted(old_lost, sorted_unique(closing_positions))]
        self.lost = sorted_unique(np.concatenate([old_lost, vkeys[drop & ~on_closing & opening[chain]]]))
        kept = ~drop
        del drop, removed, on_closing, node, interior, chain
        kept_xy = np.empty((int(kept.sum()), 2), dtype=np.int64)
        kept_xy[:, 0] = x[kept]
        kept_xy[:, 1] = y[kept]
        return Rag(kept_xy, np.bincount(ring[kept], minlength=len(size)), polygons.ring_counts)

    def _insert_nodes(self, x: np.ndarray, y: np.ndarray,
                      size: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every node that lies inside a ring edge (a T-junction: a neighbour's corner on this
        polygon's straight side) becomes a vertex of that edge."""
        if len(self.nodes_yx) == 0 or len(x) == 0:
            return x, y, size
        first = np.cumsum(size) - size
        last = first + size - 1
        dx = np.empty_like(x)
        dy = np.empty_like(y)
        dx[:-1] = x[1:] - x[:-1]
        dy[:-1] = y[1:] - y[:-1]
        dx[last] = x[first] - x[last]
        dy[last] = y[first] - y[last]
        horizontal = dy == 0
        # Only an edge two or more long on a row (column) that holds a node can hold one inside.
        node_y, node_x = self.nodes_yx >> 32, self.nodes_xy >> 32
        rows = np.zeros(max(int(y.max()), int(node_y.max())) + 1, dtype=bool)
        cols = np.zeros(max(int(x.max()), int(node_x.max())) + 1, dtype=bool)
        rows[node_y] = True
        cols[node_x] = True
        maybe = np.where(horizontal, rows[y], cols[x])
        maybe &= (np.abs(dx) + np.abs(dy)) >= 2
        seg = np.flatnonzero(maybe)
        del maybe
        # In slices: nearly every edge of a batch is a candidate, and a dozen int64 columns over
        # all of them were the largest part of a block's simplification memory; the edges that
        # do hold a node (T-junctions) are few.
        hits = []
        for at in range(0, len(seg), 1 << 20):
            some = seg[at:at + (1 << 20)]
            hor = horizontal[some]
            sx, sy = x[some].astype(np.int64), y[some].astype(np.int64)
            # Horizontal edges search the nodes by (y, x), vertical ones by (x, y).
            line = np.where(hor, sy, sx) << 32
            along = np.where(hor, sx, sy)
            step = np.where(hor, dx[some], dy[some]).astype(np.int64)
            lo = line + np.minimum(along, along + step) + 1
            hi = line + np.maximum(along, along + step) - 1
            left = np.empty(len(some), dtype=np.int64)
            right = np.empty(len(some), dtype=np.int64)
            for table, which in ((self.nodes_yx, hor), (self.nodes_xy, ~hor)):
                left[which] = np.searchsorted(table, lo[which], "left")
                right[which] = np.searchsorted(table, hi[which], "right")
            holds = right > left
            hits.append((some[holds], hor[holds], step[holds], left[holds], right[holds]))
        del seg, dx, dy, horizontal
        if not hits or not any(len(hit[0]) for hit in hits):
            return x, y, size
        seg, hor, step, left, right = (np.concatenate(column) for column in zip(*hits))
        extra = right - left
        owner, k = _runs(extra)
        at = np.where(step[owner] > 0, left[owner] + k, right[owner] - 1 - k)
        from_yx = hor[owner]
        key = np.where(from_yx, self.nodes_yx[np.where(from_yx, at, 0)], self.nodes_xy[np.where(from_yx, 0, at)])
        hi32, lo32 = (key >> 32).astype(np.int32), (key & 0xFFFFFFFF).astype(np.int32)
        grow = np.ones(len(x), dtype=np.int64)  # each vertex, and the nodes inserted after it
        grow[seg] += extra
        start = np.cumsum(grow)
        start -= grow
        del grow
        slots = start[seg[owner]] + 1 + k
        out_x = np.empty(len(x) + len(key), dtype=np.int32)
        out_y = np.empty(len(x) + len(key), dtype=np.int32)
        out_x[start], out_y[start] = x, y
        out_x[slots] = np.where(from_yx, lo32, hi32)
        out_y[slots] = np.where(from_yx, hi32, lo32)
        ring_of_seg = np.searchsorted(first, seg, "right") - 1
        return out_x, out_y, size + np.bincount(ring_of_seg, weights=extra, minlength=len(size)).astype(np.int64)
