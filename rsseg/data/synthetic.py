"""Procedural, georeferenced Vaihingen-like orthophotos with ISPRS labels.

Nothing here is downloaded: a small village is drawn from a seed. Its streets form a jittered,
rotated grid; each block between streets becomes a row of houses with gardens, a commercial lot,
a park or a yard. The six ISPRS classes come out as:

- impervious surface: asphalt streets with sidewalks and dashed markings, driveways, terraces,
  parking lots and footpaths;
- building: gabled roofs (sun-lit and shaded halves, tile rows, ridge cap) and flat roofs
  (gravel, skylight grid, parapet rim), mostly clay-tile tones but also grey, dark and light,
  casting shadows that darken whatever lies below (shadow is not a class);
- low vegetation: the ground everywhere else, with patchy colour and fine grass texture;
- tree: clusters of round, shaded, strongly textured crowns, also casting shadows;
- car: small oriented rectangles with dark windscreens, on streets, driveways and lots;
- clutter: pools, tarps, containers and soil piles in odd colours.

Bands are NIR, R, G (IRRG, like the Vaihingen TOP tiles): vegetation is bright in NIR, so it
shows red in a false-colour display. Object sizes are given in metres and converted with the
ground sampling distance (0.09 m by default).

**Seamless by construction.** Every value is a function of *global* pixel coordinates and the
seed: object layouts come from a ``numpy`` Generator seeded with (seed, block row, block column),
and pixel noise from an integer hash of (seed, row, column). Rendering any window of the plane
therefore gives exactly the pixels the same window has inside any larger rendering, which is what
lets :func:`write_scene` stream huge scenes window by window with flat memory.

Each tile, area and scene is its own village (:func:`area_seed`, :func:`scene_seed`), so a
scene never repeats the training areas. Labels follow ``rsseg.data.specs.ISPRS_CLASSES``.

Writers: :func:`write_vaihingen_layout` (the official archive layout, zipped or extracted) and
:func:`write_scene` (one large tiled GeoTIFF, optional nodata border, uint8/uint16/float32, with
matching class labels on request).
"""

from __future__ import annotations

import contextlib
import functools
import math
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.io import MemoryFile
from rasterio.transform import Affine
from rasterio.windows import Window
from scipy import ndimage

from rsseg.data.specs import ISPRS_COLORS, get_spec
from rsseg.errors import OutputError, UsageError

__all__ = [
    "CRS",
    "GSD_M",
    "IMAGE_ARCHIVE",
    "LABEL_ARCHIVE",
    "ERODED_ARCHIVE",
    "LABEL_NODATA",
    "generate_tile",
    "render_window",
    "encode_labels_rgb",
    "erode_boundaries",
    "area_origin",
    "area_seed",
    "scene_seed",
    "area_sizes",
    "vaihingen_relative_paths",
    "write_vaihingen_layout",
    "write_scene",
    "write_scene_labels",
]

CRS = "EPSG:32632"  # UTM zone 32N, the CRS of the real Vaihingen tiles
GSD_M = 0.09
IMAGE_ARCHIVE = "ISPRS_semantic_labeling_Vaihingen.zip"
LABEL_ARCHIVE = "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip"
ERODED_ARCHIVE = "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip"
BAND_NAMES = ("NIR", "R", "G")
LABEL_NODATA = 255  # class GeoTIFFs of scenes: value outside the valid footprint

# Class indices, ISPRS order (rsseg.data.specs.ISPRS_CLASSES).
IMPERVIOUS, BUILDING, LOW_VEG, TREE, CAR, CLUTTER = range(6)

# Top-left corner (UTM 32N metres) of the first synthetic area; areas sit on a grid 400 m apart,
# which is more than the largest tile (3800 px * 0.09 m = 342 m), so they never overlap.
_AREA_EASTING0 = 496_000.0
_AREA_NORTHING0 = 5_421_000.0
_AREA_SPACING_M = 400.0
_AREAS_PER_ROW = 6
# Synthetic scenes get their own origin, south of the areas.
_SCENE_ORIGIN = (497_000.0, 5_417_000.0)


# --------------------------------------------------------------------------------------------
# Integer hashing and noise: values depend only on (key, global row, global column).
# Hand-written because no library offers windowable, coordinate-addressed noise in numpy.
# --------------------------------------------------------------------------------------------
_U64 = np.uint64
_K_X = _U64(0x9E3779B97F4A7C15)
_K_Y = _U64(0xC2B2AE3D27D4EB4F)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast, well-spread bijection on uint64 arrays."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _key(*parts: int) -> int:
    """A 64-bit key from small integers (seed, tags, indices), stable across platforms."""
    return int(
        np.random.SeedSequence([p & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(
            1, np.uint64
        )[0]
    )


def _hash2d(key: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """uint64 hash of (key, row, col), broadcasting ``rows`` against ``cols``."""
    with np.errstate(over="ignore"):
        r = np.asarray(rows, dtype=np.int64).astype(np.uint64)
        c = np.asarray(cols, dtype=np.int64).astype(np.uint64)
        return _mix64((r * _K_Y + _U64(key)) ^ (c * _K_X))


def _to_unit(h: np.ndarray, shift: int = 40) -> np.ndarray:
    """24 bits of a hash as float32 uniform in [0, 1)."""
    return ((h >> _U64(shift)) & _U64(0xFFFFFF)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _smooth_axis(start: int, n: int, cell: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Lattice index, smoothstep weight and first lattice index for pixels start..start+n-1."""
    pos = (start + np.arange(n, dtype=np.float64) + 0.5) / cell
    idx = np.floor(pos).astype(np.int64)
    f = (pos - idx).astype(np.float32)
    return idx, f * f * (3.0 - 2.0 * f), int(idx.min())


def _value_noise(key: int, r0: int, c0: int, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth value noise in [-1, 1] with lattice spacing ``cell`` pixels, at global coordinates."""
    iy, sy, y0 = _smooth_axis(r0, h, cell)
    ix, sx, x0 = _smooth_axis(c0, w, cell)
    lat_r = np.arange(y0, iy.max() + 2)
    lat_c = np.arange(x0, ix.max() + 2)
    grid = _to_unit(_hash2d(key, lat_r[:, None], lat_c[None, :])) * 2.0 - 1.0
    # Separable interpolation: along columns first (small), then along rows.
    jx = ix - x0
    across = grid[:, jx] * (1.0 - sx) + grid[:, jx + 1] * sx
    jy = iy - y0
    out = across[jy + 1]
    low = across[jy]
    out -= low
    out *= sy[:, None]
    out += low
    return out


# --------------------------------------------------------------------------------------------
# The world: street grid, sun, and per-block object lists, all derived from the seed.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _World:
    seed: int
    gsd: float

    @functools.cached_property
    def params(self) -> dict:
        rng = np.random.default_rng(_key(self.seed, 1))
        theta = math.radians(rng.uniform(-35.0, 35.0))  # street grid orientation
        # Shadows point away from a southern sun: "up" in the image, +/- 50 degrees.
        az = math.radians(rng.uniform(-50.0, 50.0))
        elev = math.radians(rng.uniform(48.0, 65.0))
        return {
            "cos": math.cos(theta),
            "sin": math.sin(theta),
            "pitch": rng.uniform(52.0, 64.0) / self.gsd,  # block pitch, pixels
            "shadow_dir": (math.sin(az), -math.cos(az)),  # pixel space (x right, y down)
            "shadow_per_m": 1.0 / math.tan(elev),  # shadow length per metre of height
        }

    def m(self, metres: float) -> float:
        """Metres to pixels."""
        return metres / self.gsd

    def to_px(self, u: np.ndarray | float, v: np.ndarray | float) -> tuple:
        """Layout (street-aligned) coordinates to global pixel coordinates (x=col, y=row)."""
        c, s = self.params["cos"], self.params["sin"]
        return c * u - s * v, s * u + c * v

    def to_layout(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple:
        c, s = self.params["cos"], self.params["sin"]
        return c * x + s * y, -s * x + c * y

    def shadow_vec(self, height_m: float) -> tuple[float, float]:
        dx, dy = self.params["shadow_dir"]
        length = self.m(height_m * self.params["shadow_per_m"])
        return dx * length, dy * length


@functools.lru_cache(maxsize=4096)
def _hroad(world: _World, j: int) -> tuple[float, float]:
    """Horizontal (layout) street j: centre v and width, pixels."""
    rng = np.random.default_rng(_key(world.seed, 2, j))
    pitch = world.params["pitch"]
    return j * pitch + rng.uniform(-0.1, 0.1) * pitch, world.m(rng.uniform(5.5, 8.0))


@functools.lru_cache(maxsize=4096)
def _vroad(world: _World, i: int, j: int) -> tuple[float, float] | None:
    """Vertical street segment at column line i between streets j and j+1 (None: no street)."""
    rng = np.random.default_rng(_key(world.seed, 3, i, j))
    present = rng.random() < 0.7
    pitch = world.params["pitch"]
    u = i * pitch + rng.uniform(-0.12, 0.12) * pitch
    width = world.m(rng.uniform(4.5, 7.0))
    return (u, width) if present else None


# Colours in (NIR, R, G) digital numbers. Vegetation: high NIR, low R.
_GRASS = np.array([188.0, 104.0, 116.0])
_DRY_GRASS = np.array([150.0, 122.0, 118.0])
_TREE = np.array([168.0, 78.0, 94.0])
_ASPHALT = np.array([100.0, 104.0, 108.0])
_SIDEWALK = np.array([152.0, 150.0, 146.0])
_MARKING = np.array([228.0, 228.0, 226.0])
_PAVINGS = np.array([[168, 160, 150], [138, 134, 130], [186, 180, 176], [122, 119, 116]], float)
_ROOFS = np.array(
    [
        [172, 122, 96],
        [150, 108, 88],
        [128, 126, 124],
        [84, 84, 90],
        [204, 194, 188],
        [138, 102, 84],
        [112, 118, 126],
    ],
    float,
)
# Clay tiles dominate, as in Vaihingen; grey, dark and light roofs are rarer.
_ROOF_WEIGHTS = (0.3, 0.2, 0.12, 0.1, 0.08, 0.12, 0.08)
_CARS = np.array(
    [
        [232, 232, 230],
        [38, 38, 44],
        [124, 124, 128],
        [118, 176, 44],
        [44, 52, 96],
        [168, 196, 182],
        [96, 60, 140],
    ],
    float,
)
_CLUTTER_ODD = np.array(
    [[42, 70, 150], [60, 120, 190], [210, 92, 44], [226, 60, 200], [40, 160, 150], [90, 170, 90]],
    float,
)
_WATER = np.array([38.0, 92.0, 160.0])
_SOIL = np.array([136.0, 128.0, 104.0])

# Draw order (painter's algorithm); objects of one layer are drawn in a global block order.
L_SIDEWALK, L_ASPHALT, L_MARKING, L_PAVING, L_CLUTTER, L_CAR, L_SHADOW, L_BUILDING, L_TREE = range(
    9
)


@dataclass(frozen=True)
class _Obj:
    layer: int
    kind: str  # "poly", "roof", "car", "crown", "shadow_poly", "shadow_capsule"
    geom: tuple  # kind-specific, pixel space
    cls: int = -1
    color: tuple = (0.0, 0.0, 0.0)
    texture: str = "flat"
    extra: tuple = ()


def _rect(world: _World, cu: float, cv: float, half_u: float, half_v: float, ang: float = 0.0):
    """Corners (pixel space) of a rectangle given in layout space, rotated by ``ang`` about its
    centre; also its pixel-space centre and the pixel-space angle of its u axis."""
    ca, sa = math.cos(ang), math.sin(ang)
    corners = []
    for du, dv in ((-half_u, -half_v), (half_u, -half_v), (half_u, half_v), (-half_u, half_v)):
        corners.append(world.to_px(cu + ca * du - sa * dv, cv + sa * du + ca * dv))
    centre = world.to_px(cu, cv)
    px_ang = ang + math.atan2(world.params["sin"], world.params["cos"])
    return tuple(corners), centre, px_ang


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Monotone-chain convex hull (few points; hand-written to avoid a geometry dependency here)."""
    pts = sorted(set(map(tuple, np.round(points, 6))))
    if len(pts) <= 2:
        return np.array(pts)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])


def _shadow_of(world: _World, corners, height_m: float, strength: float) -> _Obj:
    dx, dy = world.shadow_vec(height_m)
    pts = np.array(corners, float)
    hull = _convex_hull(np.concatenate([pts, pts + [dx, dy]]))
    return _Obj(L_SHADOW, "shadow_poly", tuple(map(tuple, hull)), extra=(strength,))


class _BlockBuilder:
    """Collects the objects of one block, with simple overlap checks in layout space."""

    def __init__(self, world: _World, rng: np.random.Generator):
        self.world, self.rng, self.objs = world, rng, []
        self.solid: list[tuple[float, float, float, float]] = []  # layout bboxes to keep clear

    def free(self, u0, v0, u1, v1, pad: float = 0.0) -> bool:
        return all(
            u1 + pad <= a or u0 - pad >= c or v1 + pad <= b or v0 - pad >= d
            for a, b, c, d in self.solid
        )

    def poly(self, layer, cls, color, texture, cu, cv, hu, hv, ang=0.0, solid=False):
        corners, _, _ = _rect(self.world, cu, cv, hu, hv, ang)
        self.objs.append(_Obj(layer, "poly", corners, cls, tuple(color), texture))
        if solid:
            r = math.hypot(hu, hv)
            self.solid.append((cu - r, cv - r, cu + r, cv + r))
        return corners

    def building(self, cu, cv, hu, hv, ang, height_m, flat: bool, color=None):
        w = self.world
        if color is None:
            color = _ROOFS[self.rng.choice(len(_ROOFS), p=_ROOF_WEIGHTS)]
        color = color * self.rng.uniform(0.9, 1.1)
        corners, centre, px_ang = _rect(w, cu, cv, hu, hv, ang)
        # Gable ridge along the longer side.
        ridge = px_ang if hu >= hv else px_ang + math.pi / 2
        along, across = max(hu, hv), min(hu, hv)
        self.objs.append(
            _Obj(
                L_BUILDING,
                "roof",
                corners,
                BUILDING,
                tuple(color),
                "flat" if flat else "gable",
                (centre[0], centre[1], ridge, w.m(0.3), along, across, w.m(0.4)),
            )
        )
        self.objs.append(_shadow_of(w, corners, height_m, 0.5))
        r = math.hypot(hu, hv)
        self.solid.append((cu - r, cv - r, cu + r, cv + r))
        return color

    def car(self, cu, cv, along_u: bool, flip: bool):
        w, rng = self.world, self.rng
        length, width = w.m(rng.uniform(3.9, 4.9)), w.m(rng.uniform(1.7, 1.95))
        ang = (0.0 if along_u else math.pi / 2) + (math.pi if flip else 0.0)
        ang += rng.normal(0.0, 0.03)
        color = _CARS[rng.integers(len(_CARS))] * rng.uniform(0.92, 1.08)
        corners, centre, px_ang = _rect(w, cu, cv, length / 2, width / 2, ang)
        self.objs.append(
            _Obj(
                L_CAR,
                "car",
                corners,
                CAR,
                tuple(color),
                extra=(centre[0], centre[1], px_ang, length, width),
            )
        )
        self.objs.append(_shadow_of(w, corners, 1.4, 0.6))

    def tree(self, cu, cv, radius_m: float, n_crowns: int):
        w, rng = self.world, self.rng
        height = rng.uniform(5.0, 10.0)
        tone = _TREE * rng.uniform(0.88, 1.1, size=3)
        for k in range(n_crowns):
            off = rng.normal(0.0, 0.6 * radius_m, size=2) if k else np.zeros(2)
            r = w.m(radius_m * rng.uniform(0.7, 1.1))
            x, y = w.to_px(cu + w.m(off[0]), cv + w.m(off[1]))
            dx, dy = w.shadow_vec(height)
            self.objs.append(_Obj(L_TREE, "crown", (x, y, r), TREE, tuple(tone)))
            self.objs.append(
                _Obj(L_SHADOW, "shadow_capsule", (x, y, x + dx, y + dy, 0.9 * r), extra=(0.55,))
            )

    def clutter(self, cu, cv, size_m: float):
        w, rng = self.world, self.rng
        kind = rng.choice(["pool", "odd", "pile", "odd"])
        ang = rng.uniform(0, math.pi) if kind != "pool" else rng.choice([0.0, math.pi / 2])
        if kind == "pile":
            pts = rng.uniform(-1, 1, size=(7, 2)) * w.m(size_m)
            hull = _convex_hull(pts)
            corners = tuple(w.to_px(cu + p[0], cv + p[1]) for p in hull)
            color = _SOIL * rng.uniform(0.85, 1.15, size=3)
            self.objs.append(_Obj(L_CLUTTER, "poly", corners, CLUTTER, tuple(color), "soil"))
        else:
            color = _WATER if kind == "pool" else _CLUTTER_ODD[rng.integers(len(_CLUTTER_ODD))]
            hu, hv = w.m(size_m) * rng.uniform(0.5, 1.0), w.m(size_m) * rng.uniform(0.3, 0.7)
            self.poly(
                L_CLUTTER, CLUTTER, color * rng.uniform(0.9, 1.1), "smooth", cu, cv, hu, hv, ang
            )
        r = w.m(size_m) * 1.2
        self.solid.append((cu - r, cv - r, cu + r, cv + r))


def _streets(b: _BlockBuilder, i: int, j: int) -> None:
    """The street pieces block (i, j) owns: street j along the block, segment (i, j) across."""
    w, rng = b.world, b.rng
    pitch = w.params["pitch"]
    sw = w.m(1.6)
    v, width = _hroad(w, j)
    u0, u1 = i * pitch - 1.0, (i + 1) * pitch + 1.0
    cu = (u0 + u1) / 2
    b.poly(
        L_SIDEWALK,
        IMPERVIOUS,
        _SIDEWALK * rng.uniform(0.9, 1.1),
        "paving",
        cu,
        v,
        (u1 - u0) / 2,
        width / 2 + sw,
    )
    b.poly(
        L_ASPHALT,
        IMPERVIOUS,
        _ASPHALT * rng.uniform(0.85, 1.15),
        "asphalt",
        cu,
        v,
        (u1 - u0) / 2,
        width / 2,
    )
    dash, period = w.m(3.0), w.m(9.0)
    for k in range(math.ceil(i * pitch / period), math.ceil((i + 1) * pitch / period)):
        b.poly(L_MARKING, IMPERVIOUS, _MARKING, "flat", k * period, v, dash / 2, w.m(0.075))
    for _ in range(rng.poisson(1.4)):
        cu_car = rng.uniform(i * pitch + w.m(3), (i + 1) * pitch - w.m(3))
        lane = rng.choice([-1.0, 1.0])
        b.car(cu_car, v + lane * width / 4, True, lane < 0)
    seg = _vroad(w, i, j)
    if seg is not None:
        u, vw = seg
        v0, v1 = v, _hroad(w, j + 1)[0]
        cv, hv = (v0 + v1) / 2, (v1 - v0) / 2
        b.poly(
            L_SIDEWALK,
            IMPERVIOUS,
            _SIDEWALK * rng.uniform(0.9, 1.1),
            "paving",
            u,
            cv,
            vw / 2 + sw,
            hv,
        )
        b.poly(
            L_ASPHALT, IMPERVIOUS, _ASPHALT * rng.uniform(0.85, 1.15), "asphalt", u, cv, vw / 2, hv
        )
        for _ in range(rng.poisson(0.8)):
            cv_car = rng.uniform(v0 + w.m(6), v1 - w.m(6))
            lane = rng.choice([-1.0, 1.0])
            b.car(u + lane * vw / 4, cv_car, False, lane < 0)
    if rng.random() < 0.3:  # street trees along the sidewalk
        side = rng.choice([-1.0, 1.0])
        step = w.m(rng.uniform(9.0, 14.0))
        start = i * pitch + rng.uniform(0, step)
        for k in range(int((pitch - (start - i * pitch)) // step)):
            b.tree(
                start + k * step, v + side * (width / 2 + sw + w.m(1.0)), rng.uniform(2.2, 3.5), 1
            )


def _interior(w: _World, i: int, j: int) -> tuple[float, float, float, float]:
    """Layout bounds (u0, v0, u1, v1) of the block between the streets around cell (i, j)."""
    pitch, sw = w.params["pitch"], w.m(1.6)
    vt, wt = _hroad(w, j)
    vb, wb = _hroad(w, j + 1)
    left, right = _vroad(w, i, j), _vroad(w, i + 1, j)
    u0 = left[0] + left[1] / 2 + sw if left else i * pitch + w.m(1.5)
    u1 = right[0] - right[1] / 2 - sw if right else (i + 1) * pitch - w.m(1.5)
    return u0, vt + wt / 2 + sw, u1, vb - wb / 2 - sw


def _houses(b: _BlockBuilder, u0: float, v0: float, u1: float, v1: float, sides=(1, -1)) -> None:
    """Rows of detached houses facing the streets, with driveways, terraces and cars."""
    w, rng = b.world, b.rng
    depth_avail = (v1 - v0) / (2 if len(sides) == 2 else 1)
    for side in sides:
        edge = v0 if side == 1 else v1  # the street-side edge of this row
        u = u0 + w.m(rng.uniform(1.0, 5.0))
        while True:
            bw, bd = w.m(rng.uniform(8.0, 15.0)), w.m(rng.uniform(8.0, 12.5))
            setback, drive = w.m(rng.uniform(2.0, 6.0)), w.m(3.0)
            if setback + bd > depth_avail - w.m(2.0):
                bd = depth_avail - w.m(2.0) - setback
            if u + bw + drive > u1 - w.m(1.0) or bd < w.m(5.0):
                break
            cu, cv = u + bw / 2, edge + side * (setback + bd / 2)
            ang = rng.normal(0.0, math.radians(4.0)) if rng.random() < 0.4 else 0.0
            flat = rng.random() < 0.15
            roof = b.building(cu, cv, bw / 2, bd / 2, ang, rng.uniform(5.0, 10.0), flat)
            if rng.random() < 0.25 and depth_avail > setback + bd + w.m(6):  # L-shaped wing
                ww, wd = bw * rng.uniform(0.35, 0.5), w.m(rng.uniform(4.0, 6.0))
                b.building(
                    u + ww / 2,
                    cv + side * (bd / 2 + wd / 2 - w.m(0.5)),
                    ww / 2,
                    wd / 2,
                    ang,
                    rng.uniform(3.5, 6.0),
                    flat,
                    roof,
                )
            # Driveway from the street to the house, beside it.
            pave = _PAVINGS[rng.integers(len(_PAVINGS))] * rng.uniform(0.92, 1.08)
            dv0, dv1 = edge - side * w.m(1.7), edge + side * (setback + bd)
            b.poly(
                L_PAVING,
                IMPERVIOUS,
                pave,
                "paving",
                u + bw + drive / 2,
                (dv0 + dv1) / 2,
                drive / 2,
                abs(dv1 - dv0) / 2,
            )
            if rng.random() < 0.4:
                b.car(
                    u + bw + drive / 2,
                    edge + side * w.m(rng.uniform(2.6, max(2.7, setback))),
                    False,
                    rng.random() < 0.5,
                )
            if rng.random() < 0.45 and depth_avail > setback + bd + w.m(4.0):  # terrace behind
                tv = edge + side * (setback + bd + w.m(1.5))
                b.poly(L_PAVING, IMPERVIOUS, pave, "paving", cu, tv, bw * 0.3, w.m(1.5))
            b.solid.append(
                (u - w.m(1), min(edge, dv1) - w.m(1), u + bw + drive, max(edge, dv1) + w.m(1))
            )
            u += bw + drive + w.m(rng.uniform(3.0, 9.0))


def _garden_items(b: _BlockBuilder, u0, v0, u1, v1, trees_per_100m2: float, clutter_mean: float):
    w, rng = b.world, b.rng
    area_m2 = max(0.0, (u1 - u0) * (v1 - v0)) * w.gsd**2
    for _ in range(rng.poisson(clutter_mean)):
        size = rng.uniform(1.5, 4.0)
        for _try in range(6):
            cu, cv = rng.uniform(u0, u1), rng.uniform(v0, v1)
            r = w.m(size)
            if b.free(cu - r, cv - r, cu + r, cv + r, w.m(0.5)):
                b.clutter(cu, cv, size)
                break
    for _ in range(rng.poisson(area_m2 * trees_per_100m2 / 100.0)):
        radius = rng.uniform(1.8, 4.5)
        for _try in range(4):
            cu, cv = rng.uniform(u0, u1), rng.uniform(v0, v1)
            r = w.m(radius * 0.6)
            if b.free(cu - r, cv - r, cu + r, cv + r):
                b.tree(cu, cv, radius, int(rng.integers(1, 4)))
                break


@functools.lru_cache(maxsize=2048)
def _block_objects(world: _World, i: int, j: int) -> tuple[_Obj, ...]:
    """Everything block (i, j) owns, in drawing order within each layer."""
    rng = np.random.default_rng(_key(world.seed, 4, i, j))
    b = _BlockBuilder(world, rng)
    _streets(b, i, j)
    u0, v0, u1, v1 = _interior(world, i, j)
    kind = rng.choice(["houses", "commercial", "park", "yard"], p=[0.62, 0.14, 0.12, 0.12])
    w = world
    if kind == "houses":
        _houses(b, u0, v0, u1, v1)
        _garden_items(b, u0, v0, u1, v1, trees_per_100m2=0.4, clutter_mean=3.5)
    elif kind == "commercial":
        bw, bd = (u1 - u0) * rng.uniform(0.4, 0.65), (v1 - v0) * rng.uniform(0.35, 0.55)
        cu = rng.uniform(u0 + bw / 2 + w.m(3), max(u0 + bw / 2 + w.m(3.1), u1 - bw / 2 - w.m(3)))
        cv = v0 + w.m(3) + bd / 2
        b.building(cu, cv, bw / 2, bd / 2, 0.0, rng.uniform(7.0, 14.0), flat=True)
        lot_v0 = v0 + w.m(3) + bd + w.m(2)
        pave = _PAVINGS[rng.integers(len(_PAVINGS))]
        if v1 - lot_v0 > w.m(7):
            b.poly(
                L_PAVING,
                IMPERVIOUS,
                pave,
                "asphalt",
                (u0 + u1) / 2,
                (lot_v0 + v1) / 2,
                (u1 - u0) / 2 - w.m(1),
                (v1 - lot_v0) / 2,
            )
            stall = w.m(2.6)
            for k in range(int((u1 - u0 - w.m(4)) // stall)):
                if rng.random() < 0.55:
                    b.car(
                        u0 + w.m(2) + (k + 0.5) * stall,
                        lot_v0 + w.m(3.0),
                        False,
                        rng.random() < 0.5,
                    )
            b.solid.append((u0, lot_v0, u1, v1))
        _garden_items(b, u0, v0, u1, v1, trees_per_100m2=0.15, clutter_mean=2.5)
    elif kind == "park":
        ang = rng.uniform(-0.6, 0.6)
        b.poly(
            L_PAVING,
            IMPERVIOUS,
            _PAVINGS[0],
            "paving",
            (u0 + u1) / 2,
            (v0 + v1) / 2,
            (u1 - u0) / 2 / max(math.cos(ang), 0.5),
            w.m(1.2),
            ang,
        )
        _garden_items(b, u0, v0, u1, v1, trees_per_100m2=1.1, clutter_mean=2.0)
    else:  # yard: a soil / storage area with piles and containers, houses on one side
        side = int(rng.choice([1, -1]))
        mid = (v0 + v1) / 2
        _houses(b, u0, v0 if side == 1 else mid, u1, mid if side == 1 else v1, sides=(side,))
        ys0, ys1 = (mid + w.m(2), v1 - w.m(1)) if side == 1 else (v0 + w.m(1), mid - w.m(2))
        if ys1 - ys0 > w.m(4):
            hu = (u1 - u0) * rng.uniform(0.2, 0.4)
            cu = rng.uniform(u0 + hu, max(u0 + hu + 1, u1 - hu))
            b.poly(
                L_CLUTTER,
                CLUTTER,
                _SOIL * rng.uniform(0.85, 1.1, size=3),
                "soil",
                cu,
                (ys0 + ys1) / 2,
                hu,
                (ys1 - ys0) / 2 * 0.8,
            )
        _garden_items(b, u0, v0, u1, v1, trees_per_100m2=0.25, clutter_mean=4.0)
    return tuple(b.objs)


# --------------------------------------------------------------------------------------------
# Rendering a window.
# --------------------------------------------------------------------------------------------
# Noise fields that large objects (streets, lots) use: computed once per window.
_SHARED_NOISE = {1, 3, 4, 12, 13}


class _Canvas:
    """A window of the world: label and image arrays plus rasterisers in global pixel space."""

    def __init__(self, world: _World, r0: int, c0: int, h: int, w: int):
        self.world, self.r0, self.c0, self.h, self.w = world, r0, c0, h, w
        self._noise: dict[tuple[int, float], np.ndarray] = {}

    def noise(self, tag: int, cell_m: float, sl: tuple[slice, slice] | None = None) -> np.ndarray:
        """Value noise in [-1, 1] with features of ``cell_m`` metres, over the window or over
        the box ``sl``. Fields used by large objects are computed once for the whole window;
        the others only where asked (same values either way: they depend on coordinates only)."""
        cell = max(cell_m / self.world.gsd, 1.0)
        key = _key(self.world.seed, 100, tag)
        if sl is not None and tag not in _SHARED_NOISE:
            rs, cs = sl
            return _value_noise(
                key,
                self.r0 + rs.start,
                self.c0 + cs.start,
                rs.stop - rs.start,
                cs.stop - cs.start,
                cell,
            )
        if tag not in self._noise:
            self._noise[tag] = _value_noise(key, self.r0, self.c0, self.h, self.w, cell)
        return self._noise[tag] if sl is None else self._noise[tag][sl]

    def fine(self, k: int, sl: tuple[slice, slice] | None = None) -> np.ndarray:
        """Per-pixel white noise in [-1, 1) (three independent fields from one hash): grain
        finer than a pixel, e.g. leaves, gravel, grass blades."""
        if "fine" not in self._noise:
            h = _hash2d(
                _key(self.world.seed, 101),
                np.arange(self.r0, self.r0 + self.h)[:, None],
                np.arange(self.c0, self.c0 + self.w)[None, :],
            )
            self._noise["fine"] = [_to_unit(h, shift) * 2.0 - 1.0 for shift in (8, 29, 40)]
        field = self._noise["fine"][k]
        return field if sl is None else field[sl]

    def box(self, xmin: float, ymin: float, xmax: float, ymax: float):
        """Window slices covering the pixel centres in a global bbox, and their coordinates."""
        ca = max(math.floor(xmin - 0.5) - self.c0, 0)
        cb = min(math.ceil(xmax - 0.5) + 1 - self.c0, self.w)
        ra = max(math.floor(ymin - 0.5) - self.r0, 0)
        rb = min(math.ceil(ymax - 0.5) + 1 - self.r0, self.h)
        if ca >= cb or ra >= rb:
            return None
        xs = (self.c0 + np.arange(ca, cb) + 0.5)[None, :]
        ys = (self.r0 + np.arange(ra, rb) + 0.5)[:, None]
        return (slice(ra, rb), slice(ca, cb)), xs, ys

    def convex(self, verts) -> tuple | None:
        """Pixels whose centres lie in a convex polygon (half-plane tests, either orientation)."""
        px = [float(p[0]) for p in verts]
        py = [float(p[1]) for p in verts]
        got = self.box(min(px), min(py), max(px), max(py))  # cheap rejection first
        if got is None:
            return None
        n = len(px)
        area = sum(px[k] * py[(k + 1) % n] - px[(k + 1) % n] * py[k] for k in range(n))
        if area < 0:
            px, py = px[::-1], py[::-1]
        sl, xs, ys = got
        mask = np.ones((ys.shape[0], xs.shape[1]), dtype=bool)
        for k in range(n):
            ax, ay, bx, by = px[k], py[k], px[(k + 1) % n], py[(k + 1) % n]
            mask &= (bx - ax) * (ys - ay) - (by - ay) * (xs - ax) >= 0
        return sl, xs, ys, mask

    def disk(self, x: float, y: float, r: float) -> tuple | None:
        got = self.box(x - r, y - r, x + r, y + r)
        if got is None:
            return None
        sl, xs, ys = got
        return sl, xs, ys, (xs - x) ** 2 + (ys - y) ** 2 <= r * r

    def capsule(self, x0, y0, x1, y1, r) -> tuple | None:
        got = self.box(min(x0, x1) - r, min(y0, y1) - r, max(x0, x1) + r, max(y0, y1) + r)
        if got is None:
            return None
        sl, xs, ys = got
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((xs - x0) * dx + (ys - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
        return sl, xs, ys, (xs - x0 - t * dx) ** 2 + (ys - y0 - t * dy) ** 2 <= r * r


def _cells_for_window(world: _World, r0: int, c0: int, h: int, w: int) -> list[tuple[int, int]]:
    xs, ys = np.array([c0, c0 + w, c0, c0 + w], float), np.array([r0, r0, r0 + h, r0 + h], float)
    u, v = world.to_layout(xs, ys)
    pitch = world.params["pitch"]
    # One block of margin: objects (shadows, crowns) reach at most ~0.5 block beyond their own.
    i0, i1 = math.floor(u.min() / pitch) - 1, math.floor(u.max() / pitch) + 1
    j0, j1 = math.floor(v.min() / pitch) - 1, math.floor(v.max() / pitch) + 1
    return [(i, j) for j in range(j0, j1 + 1) for i in range(i0, i1 + 1)]


def _texture(cv: _Canvas, obj: _Obj, sl, xs, ys) -> np.ndarray:
    """Colour (3, h, w) of an object over its box, before shadows and sensor noise."""
    base = np.asarray(obj.color, dtype=np.float32)[:, None, None]
    t = obj.texture
    if t == "flat":
        return np.broadcast_to(base, (3, ys.shape[0], xs.shape[1]))
    if t == "asphalt":
        f = 1.0 + 0.05 * cv.fine(0, sl) + 0.06 * cv.noise(12, 3.0, sl)
    elif t == "paving":
        f = 1.0 + 0.04 * cv.fine(0, sl) + 0.04 * cv.noise(13, 1.5, sl)
    elif t == "soil":
        f = 1.0 + 0.12 * cv.noise(14, 0.6, sl) + 0.1 * cv.noise(15, 4.0, sl)
    elif t == "smooth":
        f = 1.0 + 0.03 * cv.noise(12, 3.0, sl)
    else:
        raise ValueError(t)
    return base * f[None]


def _paint(cv: _Canvas, label, img, got, cls: int, color: np.ndarray) -> None:
    sl, _, _, mask = got
    label[sl][mask] = cls
    np.copyto(img[(slice(None),) + sl], color, where=mask[None])


def _draw(cv: _Canvas, obj: _Obj, label, img, shade) -> None:
    w = cv.world
    if obj.kind in ("poly", "roof", "car"):
        got = cv.convex(obj.geom)
    elif obj.kind == "crown":
        got = cv.disk(*obj.geom)
    elif obj.kind == "shadow_poly":
        got = cv.convex(obj.geom)
    elif obj.kind == "shadow_capsule":
        got = cv.capsule(*obj.geom)
    else:
        raise ValueError(obj.kind)
    if got is None:
        return
    sl, xs, ys, mask = got
    if obj.kind.startswith("shadow"):
        np.minimum(
            shade[sl], np.where(mask, np.float32(obj.extra[0]), np.float32(1.0)), out=shade[sl]
        )
        return
    base = np.asarray(obj.color, dtype=np.float32)[:, None, None]
    if obj.kind == "poly":
        color = _texture(cv, obj, sl, xs, ys)
    elif obj.kind == "roof":
        cx, cy, ridge, stripe, half_along, half_across, rim = obj.extra
        # Across-ridge coordinate: its sign says which roof half a pixel is on.
        nx, ny = -math.sin(ridge), math.cos(ridge)
        across = (xs - cx) * nx + (ys - cy) * ny
        along = (xs - cx) * ny - (ys - cy) * nx
        sdx, sdy = w.params["shadow_dir"]
        if obj.texture == "gable":
            facing = -(nx * sdx + ny * sdy)  # > 0: the +across half faces the sun
            lit = np.where(across > 0, 1.0 + 0.2 * facing, 1.0 - 0.2 * facing).astype(np.float32)
            # Tile rows as a triangle wave: plain arithmetic, so every window rounds alike
            # (vectorised sin may differ in the last bit between array lengths).
            phase = across / max(stripe * 1.2, 2.5)
            stripes = (1.0 + 0.3 * (np.abs(phase - np.floor(phase) - 0.5) - 0.25)).astype(
                np.float32
            )
            f = lit * stripes * (1.0 + 0.03 * cv.fine(0, sl))
            f = np.where(np.abs(across) < 0.5 * rim, np.float32(1.12), f)  # ridge cap
        else:  # flat: gravel grain, a grid of skylights / vents and a bright parapet rim
            f = 1.0 + 0.05 * cv.noise(16, 0.5, sl) + 0.04 * cv.noise(13, 1.5, sl)
            pa, pc = along / w.m(4.5), across / w.m(4.5)
            fixture = (pa - np.floor(pa) < 0.27) & (pc - np.floor(pc) < 0.27)
            f = np.where(fixture, np.float32(1.35), f)
            edge = (np.abs(along) > half_along - rim) | (np.abs(across) > half_across - rim)
            f = np.where(edge, np.float32(1.18), f)
        color = base * f[None]
    elif obj.kind == "car":
        cx, cy, ang, length, width = obj.extra
        a = (
            (xs - cx) * math.cos(ang) + (ys - cy) * math.sin(ang)
        ) / length + 0.5  # 0 rear .. 1 front
        b = np.abs(-(xs - cx) * math.sin(ang) + (ys - cy) * math.cos(ang)) / width
        window = (((a > 0.62) & (a < 0.76)) | ((a > 0.16) & (a < 0.26))) & (b < 0.42)
        color = np.where(window[None], np.float32(40.0), base * np.float32(1.05)).astype(np.float32)
    else:  # crown: bright centre, sun-side highlight, dark leafy texture
        x, y, r = obj.geom
        d2 = ((xs - x) ** 2 + (ys - y) ** 2) / (r * r)
        sdx, sdy = w.params["shadow_dir"]
        towards_sun = -((xs - x) * sdx + (ys - y) * sdy) / r
        f = (0.72 + 0.3 * (1.0 - d2) + 0.14 * towards_sun).astype(np.float32)
        f = f * (
            1.0
            + 0.16 * cv.noise(17, 0.35, sl)
            + 0.1 * cv.fine(1, sl)
            + 0.08 * cv.noise(18, 1.2, sl)
        )
        color = base * f[None]
    _paint(cv, label, img, got, obj.cls, color)


def render_window(
    seed: int, row0: int, col0: int, height: int, width: int, *, gsd_m: float = GSD_M
) -> tuple[np.ndarray, np.ndarray]:
    """Render a window of the synthetic world of ``seed``: (image uint8 (3, H, W) NIR-R-G,
    labels uint8 (H, W) ISPRS class indices). Any window of the plane gives the same pixels as
    the same window cut from a larger rendering."""
    if height <= 0 or width <= 0:
        raise UsageError(f"window size must be positive, got {height} x {width}")
    if gsd_m <= 0:
        raise UsageError(f"gsd_m must be positive, got {gsd_m}")
    world = _World(int(seed), float(gsd_m))
    cv = _Canvas(world, row0, col0, height, width)
    # Ground: low vegetation everywhere, with dry patches and fine grass texture.
    label = np.full((height, width), LOW_VEG, dtype=np.uint8)
    dry = np.clip(cv.noise(1, 12.0) * 1.5 + 0.2, 0.0, 1.0)
    texture = 1.0 + 0.05 * cv.fine(2) + 0.07 * cv.noise(3, 2.5)
    img = np.empty((3, height, width), dtype=np.float32)
    for band in range(3):
        img[band] = dry * np.float32(_DRY_GRASS[band] - _GRASS[band])
        img[band] += np.float32(_GRASS[band])
        img[band] *= texture
    shade = np.ones((height, width), dtype=np.float32)
    objs = [
        o
        for cell in _cells_for_window(world, row0, col0, height, width)
        for o in _block_objects(world, *cell)
    ]
    objs.sort(key=lambda o: o.layer)  # stable: keeps the global block order within a layer
    for o in objs:
        if o.layer > L_SHADOW and shade is not None:
            img *= shade[None]  # shadows darken what lies below roofs and crowns
            shade = None
        _draw(cv, o, label, img, shade)
    if shade is not None:
        img *= shade[None]
    # Large-scale illumination drift and per-pixel sensor noise (one hash feeds three bands).
    img *= (1.0 + 0.04 * cv.noise(4, 40.0))[None]
    h = _hash2d(
        _key(world.seed, 5),
        np.arange(row0, row0 + height)[:, None],
        np.arange(col0, col0 + width)[None, :],
    )
    for band, shift in enumerate((8, 29, 40)):
        img[band] += (_to_unit(h, shift) - 0.5) * np.float32(10.0)
    np.clip(img, 1, 255, out=img)
    return np.rint(img, out=img).astype(np.uint8), label


def generate_tile(
    size: int | tuple[int, int], seed: int, *, gsd_m: float = GSD_M
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic orthophoto tile: image uint8 (3, H, W) in NIR, R, G order and labels uint8
    (H, W) with ISPRS class indices 0..5. Deterministic in (size, seed, gsd_m)."""
    h, w = (size, size) if isinstance(size, int) else size
    return render_window(seed, 0, 0, int(h), int(w), gsd_m=gsd_m)


# --------------------------------------------------------------------------------------------
# Labels: RGB coding and eroded boundaries.
# --------------------------------------------------------------------------------------------
def encode_labels_rgb(labels: np.ndarray, ignore: np.ndarray | None = None) -> np.ndarray:
    """Class indices (H, W) -> ISPRS colour-coded label (3, H, W) uint8; ``ignore`` pixels black."""
    lut = np.array(ISPRS_COLORS, dtype=np.uint8)
    rgb = np.moveaxis(lut[labels], -1, 0).copy()
    if ignore is not None:
        rgb[:, ignore] = 0
    return rgb


def erode_boundaries(labels: np.ndarray, radius: int = 3) -> np.ndarray:
    """Boolean mask of pixels within ``radius`` pixels (disc) of another class: the band the
    ISPRS ``_noBoundary`` labels blacken."""
    if radius <= 0:
        return np.zeros(labels.shape, dtype=bool)
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disc = xx * xx + yy * yy <= radius * radius
    lo = ndimage.minimum_filter(labels, footprint=disc, mode="nearest")
    hi = ndimage.maximum_filter(labels, footprint=disc, mode="nearest")
    return lo != hi


# --------------------------------------------------------------------------------------------
# The official Vaihingen layout.
# --------------------------------------------------------------------------------------------
def _north_up(east: float, north: float, gsd_m: float) -> Affine:
    """North-up geotransform with square ``gsd_m`` pixels and top-left corner (east, north)."""
    return Affine.translation(east, north) @ Affine.scale(gsd_m, -gsd_m)


def _official_areas() -> list[int]:
    spec = get_spec("vaihingen")
    return sorted(int(a) for a in spec.train_tiles + spec.test_tiles)


def area_origin(area: int) -> tuple[float, float]:
    """Top-left corner (easting, northing, UTM 32N metres) of synthetic area ``area``."""
    k = area - 1
    return (
        _AREA_EASTING0 + (k % _AREAS_PER_ROW) * _AREA_SPACING_M,
        _AREA_NORTHING0 - (k // _AREAS_PER_ROW) * _AREA_SPACING_M,
    )


def area_seed(seed: int, area: int) -> int:
    """The world seed of synthetic area ``area``: each area is its own village."""
    return _key(seed, 7, area)


def area_sizes(areas: Iterable[int], seed: int = 0) -> dict[int, tuple[int, int]]:
    """Realistic per-area (height, width): 1900..3800 px per side like the real tiles,
    deterministic in (area, seed)."""
    out = {}
    for a in areas:
        rng = np.random.default_rng(_key(seed, 6, a))
        out[a] = (int(rng.integers(1900, 3801)), int(rng.integers(1900, 3801)))
    return out


def vaihingen_relative_paths(areas: Iterable[int], *, as_zip: bool = False) -> list[str]:
    """The relative paths :func:`write_vaihingen_layout` writes (archive members if ``as_zip``)."""
    train = set(int(a) for a in get_spec("vaihingen").train_tiles)
    out = []
    for a in areas:
        name = f"top_mosaic_09cm_area{a}.tif"
        out += [f"top/{name}", name, f"top_mosaic_09cm_area{a}_noBoundary.tif"]
        if a in train:
            out.append(f"gts_for_participants/{name}")
    return sorted(out)


def _resolve_sizes(areas: list[int], size, seed: int) -> dict[int, tuple[int, int]]:
    if isinstance(size, str):
        if size != "realistic":
            raise UsageError(
                f"unknown size {size!r}; give an int, (height, width), a mapping or 'realistic'"
            )
        return area_sizes(areas, seed)
    if isinstance(size, Mapping):
        missing = [a for a in areas if a not in size]
        if missing:
            raise UsageError(f"no size given for area(s) {', '.join(map(str, missing))}")
        return {
            a: (size[a], size[a]) if isinstance(size[a], int) else tuple(size[a]) for a in areas
        }
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return {a: hw for a in areas}


def _geotiff_bytes(
    array: np.ndarray, transform: Affine, *, compress: str | None, descriptions=None
) -> bytes:
    profile = dict(
        driver="GTiff",
        height=array.shape[1],
        width=array.shape[2],
        count=array.shape[0],
        dtype=array.dtype,
        crs=CRS,
        transform=transform,
        interleave="pixel",
        photometric="RGB",
    )
    if compress:
        profile["compress"] = compress
    with MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(array)
            if descriptions:
                dst.descriptions = descriptions
        return mem.read()


def write_vaihingen_layout(
    root: Path,
    areas: Iterable[int] | None = None,
    size: int | tuple[int, int] | Mapping[int, int | tuple[int, int]] | str = 512,
    seed: int = 0,
    *,
    as_zip: bool = False,
    boundary_radius: int = 3,
    compress: str | None = None,
    gsd_m: float = GSD_M,
) -> Path:
    """Write synthetic areas in the official ISPRS Vaihingen layout under ``root``; returns it.

    Extracted (default), as torchgeo's ``Vaihingen2D`` reads it::

        top/top_mosaic_09cm_areaN.tif                  image, 3-band uint8 NIR-R-G GeoTIFF
        gts_for_participants/top_mosaic_09cm_areaN.tif labels of the training areas (RGB-coded)
        top_mosaic_09cm_areaN.tif                      complete labels (RGB-coded)
        top_mosaic_09cm_areaN_noBoundary.tif           labels with boundaries eroded to black

    With ``as_zip`` the same files go into the three official archives in ``root`` instead:
    the first two lines into ``ISPRS_semantic_labeling_Vaihingen.zip``, the complete labels into
    ``..._ground_truth_COMPLETE.zip`` and the eroded ones into
    ``..._ground_truth_eroded_COMPLETE.zip``.

    ``areas`` default to the 33 official area numbers; ``size`` is one size for all, a mapping
    area -> size, or ``"realistic"`` (1900..3800 px per side, drawn from the seed). Each area is
    its own world (seeded from ``seed`` and the area number) placed at its own UTM 32N origin.
    """
    root = Path(root)
    areas = _official_areas() if areas is None else [int(a) for a in areas]
    bad = [a for a in areas if a <= 0]
    if bad:
        raise UsageError(f"area numbers must be positive, got {bad}")
    if len(set(areas)) != len(areas):
        raise UsageError("area numbers must be unique")
    sizes = _resolve_sizes(areas, size, seed)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {root}: {exc.strerror or exc}") from exc
    train = set(int(a) for a in get_spec("vaihingen").train_tiles)
    zips = {}
    if as_zip:
        for name in (IMAGE_ARCHIVE, LABEL_ARCHIVE, ERODED_ARCHIVE):
            zips[name] = zipfile.ZipFile(root / name, "w", compression=zipfile.ZIP_DEFLATED)

    def put(rel: str, archive: str, data: bytes) -> None:
        if as_zip:
            zips[archive].writestr(rel, data)
        else:
            path = root / rel
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            except OSError as exc:
                raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc

    try:
        for a in areas:
            h, w = sizes[a]
            image, labels = generate_tile((h, w), area_seed(seed, a), gsd_m=gsd_m)
            transform = _north_up(*area_origin(a), gsd_m)
            name = f"top_mosaic_09cm_area{a}.tif"
            put(
                f"top/{name}",
                IMAGE_ARCHIVE,
                _geotiff_bytes(image, transform, compress=compress, descriptions=BAND_NAMES),
            )
            full = _geotiff_bytes(encode_labels_rgb(labels), transform, compress=compress)
            put(name, LABEL_ARCHIVE, full)
            if a in train:
                put(f"gts_for_participants/{name}", IMAGE_ARCHIVE, full)
            eroded = encode_labels_rgb(labels, erode_boundaries(labels, boundary_radius))
            put(
                f"top_mosaic_09cm_area{a}_noBoundary.tif",
                ERODED_ARCHIVE,
                _geotiff_bytes(eroded, transform, compress=compress),
            )
    finally:
        for z in zips.values():
            z.close()
    return root


# --------------------------------------------------------------------------------------------
# Large scenes, written window by window.
# --------------------------------------------------------------------------------------------
def _valid_footprint(
    seed: int, r0: int, c0: int, h: int, w: int, H: int, W: int, border: int
) -> np.ndarray:
    """Inside-footprint mask for a window of an H x W scene whose edges are eaten by an irregular
    nodata border of mean depth ``border`` pixels (depth varies smoothly along each edge)."""
    if border <= 0:
        return np.ones((h, w), dtype=bool)
    cell = max(4.0 * border, 32.0)
    rows, cols = np.arange(r0, r0 + h), np.arange(c0, c0 + w)

    def depth(tag: int, pos_start: int, n: int) -> np.ndarray:
        # 1-D smooth noise along an edge, in [0.3, 1.7] * border.
        return border * (1.0 + 0.7 * _value_noise(_key(seed, 8, tag), 0, pos_start, 1, n, cell)[0])

    top, bottom = depth(0, c0, w), depth(1, c0, w)
    left, right = depth(2, r0, h), depth(3, r0, h)
    return (
        (rows[:, None] >= top[None, :])
        & (rows[:, None] < H - bottom[None, :])
        & (cols[None, :] >= left[:, None])
        & (cols[None, :] < W - right[:, None])
    )


_SCENE_DTYPES = {
    "uint8": (np.uint8, 1.0),
    "uint16": (np.uint16, 16.0),
    "float32": (np.float32, 1.0 / 255.0),
}


def _scene_profile(height, width, count, dtype, nodata, transform, block) -> dict:
    return dict(
        driver="GTiff",
        height=height,
        width=width,
        count=count,
        dtype=dtype,
        crs=CRS,
        transform=transform,
        nodata=nodata,
        tiled=True,
        blockxsize=block,
        blockysize=block,
        compress="deflate",
        predictor=3 if dtype == "float32" else 2,
        interleave="pixel",
        BIGTIFF="IF_SAFER",
    )


def scene_seed(seed: int) -> int:
    """The world seed of the scenes written with ``seed`` (a village apart from the tiles')."""
    return _key(seed, 9)


def _open_output(stack: contextlib.ExitStack, path: Path, profile: dict):
    """Open a GeoTIFF for writing (closed by ``stack``); failures become one-line OutputErrors."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return stack.enter_context(rasterio.open(path, "w", **profile))
    except (OSError, rasterio.errors.RasterioIOError) as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc


def _write_scene(
    path, height, width, seed, tile, nodata_border, dtype, blockwise, labels_path, gsd_m
):
    if height <= 0 or width <= 0:
        raise UsageError(f"scene size must be positive, got {height} x {width}")
    if dtype not in _SCENE_DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; valid dtypes: {', '.join(_SCENE_DTYPES)}")
    if tile <= 0:
        raise UsageError(f"tile must be positive, got {tile}")
    np_dtype, scale = _SCENE_DTYPES[dtype]
    world_seed = scene_seed(seed)
    transform = _north_up(*_SCENE_ORIGIN, gsd_m)
    step = tile if blockwise else max(height, width)
    with contextlib.ExitStack() as stack:
        dst = ldst = None
        if path is not None:
            nodata = 0 if nodata_border > 0 else None
            profile = _scene_profile(height, width, 3, dtype, nodata, transform, 256)
            dst = _open_output(stack, path, profile)
            dst.descriptions = BAND_NAMES
        if labels_path is not None:
            profile = _scene_profile(height, width, 1, "uint8", LABEL_NODATA, transform, 256)
            ldst = _open_output(stack, labels_path, profile)
            ldst.write_colormap(1, {i: c + (255,) for i, c in enumerate(ISPRS_COLORS)})
        for r0 in range(0, height, step):
            for c0 in range(0, width, step):
                h, w = min(step, height - r0), min(step, width - c0)
                image, labels = render_window(world_seed, r0, c0, h, w, gsd_m=gsd_m)
                valid = _valid_footprint(seed, r0, c0, h, w, height, width, nodata_border)
                win = Window(c0, r0, w, h)
                if dst is not None:
                    out = image.astype(np_dtype) * np_dtype(scale) if scale != 1.0 else image
                    dst.write(np.where(valid[None], out, np_dtype(0)).astype(np_dtype), window=win)
                if ldst is not None:
                    out = np.where(valid, labels, LABEL_NODATA).astype(np.uint8)
                    ldst.write(out[None], window=win)


def write_scene(
    path: Path,
    height: int,
    width: int,
    seed: int = 0,
    *,
    tile: int = 1024,
    nodata_border: int = 0,
    dtype: str = "uint8",
    blockwise: bool = True,
    labels_path: Path | None = None,
    gsd_m: float = GSD_M,
) -> Path:
    """Write one large synthetic NIR-R-G scene as a tiled, deflate-compressed GeoTIFF.

    The scene is rendered ``tile`` x ``tile`` pixels at a time and written window by window, so
    memory stays flat however large it is (``blockwise=False`` renders it in one piece, for
    checks on small scenes). Content depends only on global coordinates and the seed, so the
    pixels do not depend on ``tile``. ``nodata_border`` > 0 eats an irregular border of about
    that depth: those pixels are 0 in every band and the file's nodata is 0 (valid pixels are
    never 0). ``dtype`` "uint16" stores DN * 16 (12-bit-like), "float32" reflectance DN / 255.
    ``labels_path`` also writes the matching class GeoTIFF (see :func:`write_scene_labels`).
    """
    _write_scene(
        path, height, width, seed, tile, nodata_border, dtype, blockwise, labels_path, gsd_m
    )
    return Path(path)


def write_scene_labels(
    path: Path,
    height: int,
    width: int,
    seed: int = 0,
    *,
    tile: int = 1024,
    nodata_border: int = 0,
    blockwise: bool = True,
    gsd_m: float = GSD_M,
) -> Path:
    """The class labels of the :func:`write_scene` scene with the same arguments: one uint8 band
    of ISPRS class indices with a colour table, 255 (nodata) outside the valid footprint."""
    _write_scene(None, height, width, seed, tile, nodata_border, "uint8", blockwise, path, gsd_m)
    return Path(path)
