"""Streaming prediction of scenes of any size: read -> batch -> forward -> blend -> write.

Memory stays flat in the scene height: blended class scores live in a buffer one window tall
and as wide as the scene. When the next row of windows starts, the rows above it can receive no
more contributions, so they are turned into classes and handed to a writer thread, and the
buffer moves down. Reading runs ahead in a thread and writing behind in another, so the model's
own time is the floor of the wall time.

Under ``torchrun`` every rank owns a contiguous range of output rows, processes exactly the
windows that touch it (in the same order as a single process would, so every sum is formed in
the same order) and writes a strip; rank 0 stitches the strips. The result is bit-identical to
a single process.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import queue
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from torch import nn
from tqdm.auto import tqdm

from rsseg.accel import (
    compile_error_types,
    compile_failure,
    compile_model,
    to_channels_last,
    uses_pinned_transfer,
)
from rsseg.data.radiometry import (
    AlphaRule,
    auto_rescale,
    band_label,
    band_statistics,
    decide_alpha,
    parse_rescale,
    radiometry_mismatch,
    read_valid,
    sample_scene,
)
from rsseg.errors import DataError, UsageError, warn
from rsseg.inference.rasterio_out import (
    CONFIDENCE_NODATA,
    NODATA_CLASS,
    TiledRasterWriter,
    publish_class_raster,
    publish_confidence_raster,
    remove_quietly,
    temporary_path,
)
from rsseg.inference.georef import (  # noqa: F401  (pixel_size and the transforms: re-exported)
    GDAL_NO_TRANSFORM,
    QGIS_PIXEL_TRANSFORM,
    is_georeferenced,
    output_transform,
    pixel_size,
)
from rsseg.inference.paths import gdal_path, is_local_file, scene_name
from rsseg.inference.windows import Window, blend_weights, check_tile_overlap, ramp_1d, window_grid
from rsseg.train.tta import TTA_MODES, predict_probs, tta_protocol

# One TTA for predict and eval (rsseg.train.tta): GeoSeg's flip (4 views), d4 (8), ms (per dataset).
TTA_CHOICES = TTA_MODES


@dataclass
class PredictOptions:
    """How to run a model over a scene. ``tile``/``overlap`` are in model (training-GSD) pixels."""

    tile: int = 1024
    overlap: int = 256
    batch_size: int = 4
    tta: str = "none"  # one of TTA_CHOICES; "ms" takes the bundle's dataset's GeoSeg set
    device: str = "cpu"
    resample: bool = True
    progress: bool = True
    # Pad every window up to a multiple of this (encoders with 5 stride-2 stages need 32); with
    # scaled TTA views, up to the multiple that keeps every scaled side a multiple of it (128).
    pad_multiple: int = 32
    # "check": refuse a scene whose values do not match the training data's (when the bundle
    # records them); "auto": map the scene's 1st..99th percentiles onto the training ones per
    # band; "none": no check, no change; a number: multiply the scene's values by it.
    rescale: str | float = "check"
    # Scene bands to feed the model, in the model's order (default: the bundle's band indexes).
    bands: list[int] | None = None
    # Channels-last (NHWC) layout for the model's 4-D weights and the input batches: the layout
    # tensor-core convolutions want on GPUs (docs/gpu.md has the measurements). Converts the
    # model in place, as ``device`` moves it.
    channels_last: bool = False
    # torch.compile the model (default mode) for this scene's run; the first windows pay the
    # compilation. Needs a C++ compiler on the CPU, triton on CUDA (a UsageError says which).
    compile: bool = False


@dataclass
class InputSpec:
    """What the predictor needs from a bundle's metadata (any object with these attributes works)."""

    bands: list[int]
    mean: list[float]
    std: list[float]
    class_names: list[str]
    class_colors: list[tuple[int, int, int]]
    gsd_m: float | None = None
    band_names: list[str] = field(default_factory=list)
    dataset: str | None = None  # picks the "ms" TTA set (GeoSeg's per-dataset scales)
    # The training data's radiometry (None: unknown, no check); see rsseg.data.radiometry.
    source_dtype: str | None = None
    source_band_count: int | None = None
    source_band_labels: list[str] | None = None
    band_stats: list[dict[str, float]] | None = None
    # Set per scene by resolve_scene: source values -> x * gain + offset before normalisation,
    # how its alpha band is used, and whether the checks ran.
    gain: list[float] | None = None
    offset: list[float] | None = None
    alpha: AlphaRule = field(default_factory=AlphaRule)
    resolved: bool = False

    @classmethod
    def from_meta(cls, meta: Any) -> "InputSpec":
        return cls(
            bands=[int(b) for b in meta.bands],
            mean=[float(m) for m in meta.mean],
            std=[float(s) for s in meta.std],
            class_names=list(meta.class_names),
            class_colors=[tuple(int(v) for v in c[:3]) for c in meta.class_colors],
            gsd_m=getattr(meta, "gsd_m", None),
            band_names=list(getattr(meta, "band_names", []) or []),
            dataset=getattr(meta, "dataset", None),
            source_dtype=getattr(meta, "source_dtype", None),
            source_band_count=getattr(meta, "source_band_count", None),
            source_band_labels=getattr(meta, "source_band_labels", None),
            band_stats=getattr(meta, "band_stats", None),
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class SceneResult:
    scene: str | Path
    classes: Path | None
    confidence: Path | None
    windows_run: int
    windows_skipped: int
    model_scale: float


# ----------------------------------------------------------------------------- scene geometry


def open_scene(path: str | os.PathLike[str]) -> rasterio.DatasetReader:
    """Open anything GDAL opens (a file, ``/vsicurl/``, ``s3://``, a ``.vrt``) or raise a
    one-line DataError. Only plain local paths are checked for existence here; for the others
    GDAL decides."""
    text = os.fspath(path)
    if is_local_file(text) and not os.path.exists(text):
        raise DataError(f"scene {text} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(gdal_path(text))
    except RasterioIOError as err:
        raise DataError(f"{text} is not a raster GDAL can read ({str(err).splitlines()[0]})") from None


def _band_list(spec: InputSpec, bands: list[int] | None = None) -> str:
    bands = bands or spec.bands
    return ", ".join(
        f"{b}" + (f" ({n})" if n else "")
        for b, n in zip(bands, spec.band_names or [""] * len(bands))
    )


def check_bands(src: rasterio.DatasetReader, spec: InputSpec, name: str) -> None:
    need = max(spec.bands)
    if need > src.count or min(spec.bands) < 1:
        raise DataError(
            f"{name} has {src.count} band(s) but the model bundle reads source band(s) "
            f"{_band_list(spec)}"
        )


def choose_bands(src: rasterio.DatasetReader, spec: InputSpec, chosen: list[int] | None,
                 name: str) -> list[int]:
    """The scene bands that feed the model: ``--bands`` when given, else the bundle's, refused
    when the scene's band count or band names say they are not what the model was trained on."""
    if chosen is not None:
        if len(chosen) != len(spec.bands):
            raise UsageError(
                f"--bands lists {len(chosen)} band(s) but the model reads {len(spec.bands)} "
                f"({', '.join(spec.band_names) or 'unnamed'})"
            )
        if max(chosen) > src.count or min(chosen) < 1:
            raise DataError(f"{name} has {src.count} band(s); --bands asks for "
                            f"{','.join(map(str, chosen))}")
        return list(chosen)
    check_bands(src, spec, name)
    trained = spec.source_band_labels or [""] * len(spec.bands)
    scene = [band_label(src, b) for b in spec.bands]
    differs = [(b, s, t) for b, s, t in zip(spec.bands, scene, trained) if s and t and s != t]
    confirmed = all(s and s == t for s, t in zip(scene, trained))
    count = spec.source_band_count
    if not differs and (count is None or src.count == count or confirmed):
        return list(spec.bands)
    hint = ",".join(map(str, spec.bands))
    if all(trained):  # name the scene bands that carry the trained labels, if it has them
        labels = [band_label(src, b) for b in range(1, src.count + 1)]
        if all(labels.count(t) == 1 for t in trained):
            hint = ",".join(str(labels.index(t) + 1) for t in trained)
    if differs:
        b, s, t = differs[0]
        what = f"its band {b} is {s} where the training images had {t}"
    else:
        what = (f"it has {src.count} bands, the training images had {count} (the model reads "
                f"bands {_band_list(spec)})")
    raise DataError(f"{name} does not have the model's bands: {what}; pass --bands with the "
                    f"scene's bands in the model's order (e.g. --bands {hint})")


# Largest ratio between scene and training GSD that --resample bridges.
MAX_RESAMPLE_FACTOR = 8.0


# Running the model this many times off its training GSD (with --no-resample) earns a warning.
GSD_WARN_FACTOR = 2.0
def scene_gsd_m(src: rasterio.DatasetReader) -> float | None:
    """Ground sampling distance in metres (geometric mean of the pixel's sides), or None if the
    scene has no usable CRS."""
    if src.crs is None:
        return None
    width, height = pixel_size(src.transform)
    if src.crs.is_geographic:
        lat = (src.bounds.top + src.bounds.bottom) / 2
        # Degrees of longitude shrink with cos(latitude), degrees of latitude do not.
        return math.sqrt(width * abs(math.cos(math.radians(lat))) * height) * 111_320.0
    factor = src.crs.linear_units_factor[1] if src.crs.linear_units_factor else 1.0
    return math.sqrt(width * height) * factor


def resolve_scene(src: rasterio.DatasetReader, spec: InputSpec, options: PredictOptions,
                  name: str, *, speak: bool = True) -> InputSpec:
    """Every check of a scene against the bundle, before any work: bands, masks, radiometry, GSD
    and georeferencing; returns the spec to run it with. ``speak``: emit this scene's warnings
    (one line each, once per scene)."""
    say = warn if speak else (lambda message: None)
    bands = choose_bands(src, spec, options.bands, name)
    alpha = decide_alpha(src, bands, name)
    if alpha.note:
        say(alpha.note)
    gain = offset = None
    rescale = parse_rescale(options.rescale) if isinstance(options.rescale, str) else options.rescale
    if isinstance(rescale, float):
        gain, offset = [rescale] * len(bands), [0.0] * len(bands)
    elif rescale in ("check", "auto") and spec.band_stats:
        scene_stats = band_statistics(sample_scene(src, bands, alpha))
        dtype = src.dtypes[bands[0] - 1]
        if rescale == "auto":
            mapping = auto_rescale(scene_stats, spec.band_stats)
            gain, offset = list(mapping.gain), list(mapping.offset)
        else:
            problem = radiometry_mismatch(scene_stats, dtype, spec.band_stats, spec.source_dtype,
                                          spec.band_names)
            if problem:
                raise DataError(
                    f"{name} does not match the model's training radiometry: {problem}; pass "
                    "--rescale auto (map its 1st-99th percentiles onto the training ones), "
                    "--rescale FACTOR (multiply its values) or --rescale none (run as is)"
                )
    elif rescale == "auto":
        raise UsageError("--rescale auto needs the training value range, which this bundle does "
                         "not record; use --rescale FACTOR")
    gsd = scene_gsd_m(src)
    if not options.resample and gsd and spec.gsd_m:
        off = max(gsd / spec.gsd_m, spec.gsd_m / gsd)
        if off > GSD_WARN_FACTOR:
            say(f"{name}: pixels are {gsd:.3g} m and the model was trained at {spec.gsd_m:.3g} m "
                f"({off:.3g}x apart); --no-resample runs it at the scene's resolution anyway")
    if not is_georeferenced(src):
        say(f"{name} has no CRS and no geotransform: outputs use pixel coordinates as QGIS draws "
            "such a raster (x = column, y = -row), so they overlay it; areas are in pixels")
    elif src.crs is None:
        say(f"{name} has no CRS: outputs keep its geotransform without a CRS; areas are in "
            "squared map units")
    return replace(spec, bands=bands, alpha=alpha, gain=gain, offset=offset, resolved=True)


def model_scale(src: rasterio.DatasetReader, spec: InputSpec, resample: bool) -> float:
    """Model pixels per scene pixel (1.0 unless the scene GSD differs from the training GSD)."""
    if not resample or not spec.gsd_m:
        return 1.0
    gsd = scene_gsd_m(src)
    if gsd is None:
        return 1.0
    scale = gsd / spec.gsd_m
    if not 1 / MAX_RESAMPLE_FACTOR <= scale <= MAX_RESAMPLE_FACTOR:
        # e.g. a 30 m Landsat scene with a 9 cm model would be upsampled 333x (billions of pixels):
        # refuse instead of planning an absurd run; the user decides whether the model fits at all.
        raise UsageError(
            f"the scene's pixels are {gsd:g} m but the model was trained at {spec.gsd_m:g} m "
            f"(factor {scale:.3g}, over {MAX_RESAMPLE_FACTOR}x); pass --no-resample to run the model "
            "at the scene's own resolution"
        )
    return 1.0 if abs(scale - 1.0) < 1e-3 else scale


def row_ranges_for_ranks(grid: list[list[Window]], height: int, world_size: int) -> list[tuple[int, int]]:
    """Split output rows among ranks at the points where a row of windows finishes rows."""
    starts = [line[0].row for line in grid]
    finished = [(s, starts[k + 1] if k + 1 < len(starts) else height) for k, s in enumerate(starts)]
    n = len(finished)
    ranges = []
    for r in range(world_size):
        a, b = (n * r) // world_size, (n * (r + 1)) // world_size
        ranges.append((finished[a][0], finished[b - 1][1]) if b > a else (height, height))
    return ranges


# ----------------------------------------------------------------------------- model running


@dataclass
class _Batch:
    windows: list[Window]
    inputs: torch.Tensor  # (B, bands, h_model, w_model), normalised and padded
    valid: list[np.ndarray]  # per window (h, w) bool, in scene pixels
    model_shapes: list[tuple[int, int]]


class _SceneReader:
    """Reads, masks and normalises windows; runs in a background thread."""

    def __init__(self, path: str | Path, spec: InputSpec, scale: float, options: PredictOptions) -> None:
        self.src = open_scene(path)
        self.spec = spec
        self.scale = scale
        self.options = options
        mean = np.asarray(spec.mean, dtype=np.float64)
        std = np.asarray(spec.std, dtype=np.float64)
        gain = np.asarray(spec.gain if spec.gain is not None else [1.0] * len(mean), np.float64)
        offset = np.asarray(spec.offset if spec.offset is not None else [0.0] * len(mean), np.float64)
        # (x * gain + offset - mean) / std folded into one multiply-add; without a rescale it
        # is exactly (x - mean) / std as before.
        if spec.gain is None and spec.offset is None:
            self.mul, self.add = None, None
        else:
            self.mul = (gain / std).astype(np.float32)[:, None, None]
            self.add = ((offset - mean) / std).astype(np.float32)[:, None, None]
        self.mean = mean.astype(np.float32)[:, None, None]
        self.std = std.astype(np.float32)[:, None, None]

    def close(self) -> None:
        self.src.close()

    def read(self, w: Window) -> tuple[np.ndarray | None, np.ndarray, tuple[int, int]]:
        """(normalised bands at model scale or None if all nodata, valid mask at scene scale)."""
        win = rasterio.windows.Window(w.col, w.row, w.width, w.height)
        valid = read_valid(self.src, win, self.spec.alpha)
        mh = max(1, round(w.height * self.scale))
        mw = max(1, round(w.width * self.scale))
        if not valid.any():
            return None, valid, (mh, mw)
        data = self.src.read(
            self.spec.bands,
            window=win,
            out_shape=(len(self.spec.bands), mh, mw),
            out_dtype="float32",
            resampling=Resampling.bilinear,
        )
        finite = np.isfinite(data).all(axis=0)
        valid &= _resize_mask(finite, w.height, w.width) if (mh, mw) != valid.shape else finite
        x = (data - self.mean) / self.std if self.mul is None else data * self.mul + self.add
        # Nodata pixels take the band mean (0 after normalisation), never a raw fill value.
        model_valid = _resize_mask(valid, mh, mw) if (mh, mw) != valid.shape else valid
        x = np.where(model_valid[None], x, 0.0).astype(np.float32)
        return x, valid, (mh, mw)


def _resize_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    t = torch.from_numpy(mask.astype(np.uint8))[None, None].float()
    return F.interpolate(t, size=(h, w), mode="nearest")[0, 0].numpy() > 0.5


def _pad_size(n: int, multiple: int) -> int:
    """Windows are padded (with zeros, the band means) up to a multiple of ``multiple``; a scene
    smaller than a tile is therefore run at about its own size, not blown up to a whole tile."""
    return int(math.ceil(n / multiple) * multiple)


def _batches(reader: _SceneReader, lines: list[list[Window]], options: PredictOptions,
             skipped: list[Window], on_read: Any = None, pad_multiple: int | None = None,
             pin: bool = False) -> Iterator[_Batch | list[Window]]:
    """Yields batches of one window row; a row's windows never share a batch with the next row's.

    Windows are padded to ``pad_multiple`` (default ``options.pad_multiple``). With ``pin`` (a
    CUDA device, see :func:`rsseg.accel.uses_pinned_transfer`) each batch is assembled straight
    in pinned host memory, here in the reader thread, so that its copy to the GPU can be
    asynchronous and no extra pinning copy is made."""
    multiple = pad_multiple or options.pad_multiple
    for line in lines:
        pending: list[tuple[Window, np.ndarray, np.ndarray, tuple[int, int]]] = []

        def flush() -> _Batch:
            ph = _pad_size(max(p[3][0] for p in pending), multiple)
            pw = _pad_size(max(p[3][1] for p in pending), multiple)
            inputs = torch.zeros((len(pending), pending[0][1].shape[0], ph, pw), dtype=torch.float32,
                                 pin_memory=pin)
            x = inputs.numpy()  # shares the tensor's memory
            for i, (_, data, _, (mh, mw)) in enumerate(pending):
                x[i, :, :mh, :mw] = data
            return _Batch(
                windows=[p[0] for p in pending],
                inputs=inputs,
                valid=[p[2] for p in pending],
                model_shapes=[p[3] for p in pending],
            )

        for w in line:
            data, valid, shape = reader.read(w)
            if on_read is not None:
                on_read(1)
            if data is None:
                skipped.append(w)
                continue
            pending.append((w, data, valid, shape))
            if len(pending) == options.batch_size:
                yield flush()
                pending = []
        if pending:
            yield flush()
        yield line  # marks the end of a window row


def _threaded(iterator: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run a generator in a thread, ``depth`` items ahead; re-raise its errors here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as err:  # handed to the consumer
            q.put(err)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


# ----------------------------------------------------------------------------- the row buffer


class _RowBuffer:
    """Weighted class scores for rows [top, top + height) across a column stripe of the scene
    (``left`` .. ``left + width``; ``col_sum`` is the stripe's part).

    The blend weight of a window is ``outer(wy, wx)`` with ``wy`` depending only on its window
    row and ``wx`` only on its window column, so the total weight at a pixel is the product of a
    per-row and a per-column sum (``row_sum``, ``col_sum``); no per-pixel weight buffer is kept.
    Windows skipped as all-nodata break this only on nodata pixels, which are never read back.
    """

    def __init__(self, num_classes: int, height: int, width: int, top: int,
                 row_sum: np.ndarray, col_sum: np.ndarray, left: int = 0) -> None:
        self.scores = np.zeros((num_classes, height, width), dtype=np.float32)
        self.valid = np.zeros((height, width), dtype=bool)
        self.top = top
        self.left = left  # scene column of the buffer's first column (a column stripe's start)
        self.height = height
        self.row_sum, self.col_sum = row_sum, col_sum

    def add(self, w: Window, probs: np.ndarray, weights: np.ndarray, valid: np.ndarray) -> None:
        r, c = w.row - self.top, w.col - self.left
        sl = (slice(r, r + w.height), slice(c, c + w.width))
        self.scores[(slice(None),) + sl] += probs * weights
        self.valid[sl] |= valid

    def take(self, until: int, chunk: int = 128) -> tuple[int, np.ndarray, np.ndarray]:
        """Finish rows [top, until): classes (uint8) and confidence (float32); shift the buffer.

        Rows are finished ``chunk`` at a time so that temporaries stay small for wide scenes.
        """
        n = until - self.top
        width = self.scores.shape[2]
        classes = np.empty((n, width), dtype=np.uint8)
        conf = np.empty((n, width), dtype=np.float32)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            scores = self.scores[:, a:b]
            valid = self.valid[a:b]
            np.argmax(scores, axis=0, out=(idx := np.empty((b - a, width), dtype=np.intp)))
            classes[a:b] = idx
            total = self.row_sum[self.top + a : self.top + b, None] * self.col_sum[None, :]
            with np.errstate(invalid="ignore", divide="ignore"):
                conf[a:b] = scores.max(axis=0) / total
            classes[a:b][~valid] = NODATA_CLASS
            conf[a:b][~valid] = CONFIDENCE_NODATA
        top = self.top
        # Move the unfinished rows to the top and clear the rest, in place.
        keep = self.height - n
        if keep > 0:
            self.scores[:, :keep] = self.scores[:, n:]
            self.valid[:keep] = self.valid[n:]
        self.scores[:, max(keep, 0):] = 0
        self.valid[max(keep, 0):] = False
        self.top = until
        return top, classes, conf


def weight_sums(grid: list[list[Window]], height: int, width: int, tile: int, overlap: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per-row and per-column sums of the separable blend weights over the whole grid."""
    row_sum = np.zeros(height, dtype=np.float32)
    col_sum = np.zeros(width, dtype=np.float32)
    for line in grid:
        w = line[0]
        row_sum[w.row : w.row + w.height] += ramp_1d(tile, overlap, w.top_border, w.bottom_border)[: w.height]
    for w in grid[0]:
        col_sum[w.col : w.col + w.width] += ramp_1d(tile, overlap, w.left_border, w.right_border)[: w.width]
    return row_sum, col_sum


# ----------------------------------------------------------------------------- column stripes

# The row buffer holds (classes x one window's height x stripe width) float32 scores. A scene
# (or mosaic) wider than this budget is predicted in vertical stripes, one after the other, so
# memory does not grow with the width either; see column_stripes.
ROW_BUFFER_MB = 256


@dataclass(frozen=True)
class ColumnStripe:
    first: int  # index of the stripe's first and last window column (inclusive)
    last: int
    left: int  # scene columns [left, right) this stripe writes
    right: int


def column_stripes(columns: Sequence[Window], width: int, max_width: int) -> list[ColumnStripe]:
    """Split a window grid's columns into stripes whose windows span at most ``max_width``
    pixels (at least two window columns each). A stripe writes only the columns that no window
    outside it touches, so every written pixel has all its windows' contributions, added in the
    same order as in one pass: the result is identical to predicting the scene in one stripe.
    Neighbouring stripes share the window columns that reach across their border (computed
    twice: the price of memory flat in width)."""
    starts = [w.col for w in columns]
    ends = [w.col + w.width for w in columns]
    m = len(columns)
    stripes: list[ColumnStripe] = []
    first, left = 0, 0
    while True:
        last = first
        while last + 1 < m and ends[last + 1] - starts[first] <= max_width:
            last += 1
        last = max(last, min(first + 1, m - 1))
        # The next stripe must start after the window columns that end by this one's right edge;
        # with overlaps over half a tile that needs more than two columns here.
        while last + 1 < m and ends[first] > starts[last + 1]:
            last += 1
        if last == m - 1:
            stripes.append(ColumnStripe(first, last, left, width))
            return stripes
        right = starts[last + 1]
        stripes.append(ColumnStripe(first, last, left, right))
        first, left = sum(1 for e in ends if e <= right), right


def stripe_width_limit(num_classes: int, tile: int) -> int:
    """The widest stripe (scene pixels) whose row buffer fits ROW_BUFFER_MB."""
    return max(2 * tile, (ROW_BUFFER_MB << 20) // (4 * max(num_classes, 1) * max(tile, 1)))


# ----------------------------------------------------------------------------- one scene


# GDAL's block cache defaults to 5 % of RAM and fills as a scene streams through it, which
# would make peak memory grow with the scene; a fixed cache keeps it flat.
GDAL_CACHE_MB = 128


def _with_gdal_cache(fn: Callable[..., SceneResult]) -> Callable[..., SceneResult]:
    """Run ``fn`` under a fixed GDAL block cache (see GDAL_CACHE_MB), without rasterio's
    NotGeoreferencedWarning."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> SceneResult:
        # GDAL's "no geotransform" notice is ours to give (resolve_scene), once, in one line.
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return fn(*args, **kwargs)

    return wrapper


@_with_gdal_cache
def predict_scene(
    scene: str | Path,
    model: nn.Module,
    meta: Any,
    classes_out: Path,
    confidence_out: Path | None = None,
    options: PredictOptions | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier: Any = None,
) -> SceneResult:
    """Predict one scene into a class COG (and optionally a confidence COG) on the scene's grid.

    ``meta`` is a bundle's metadata (or an :class:`InputSpec`). Outputs appear under their final
    names only when complete; on any error or interrupt the partial files are removed. Under
    torchrun pass ``rank``/``world_size``/``barrier`` from :func:`distributed_context`.
    """
    options = options or PredictOptions()
    spec = meta if isinstance(meta, InputSpec) else InputSpec.from_meta(meta)
    check_tile_overlap(options.tile, options.overlap)
    scene = os.fspath(scene)
    name = scene_name(scene)
    classes_out = Path(classes_out)
    confidence_out = Path(confidence_out) if confidence_out else None
    with open_scene(scene) as src:
        if not spec.resolved:
            spec = resolve_scene(src, spec, options, name, speak=rank == 0)
        height, width, crs, transform = src.height, src.width, src.crs, output_transform(src)
        scale = model_scale(src, spec, options.resample)

    tile_s = max(1, round(options.tile / scale))
    overlap_s = min(tile_s - 1, max(0, round(options.overlap / scale)))
    grid = window_grid(height, width, tile_s, overlap_s)
    y0, y1 = row_ranges_for_ranks(grid, height, world_size)[rank]
    lines = [line for line in grid if line[0].row < y1 and line[0].row + line[0].height > y0]

    if world_size > 1:
        part_classes = temporary_path(classes_out, f"rank{rank}", unique=False)
        part_conf = temporary_path(confidence_out, f"rank{rank}", unique=False) if confidence_out else None
        strip = (y0, y1)
    else:
        part_classes = temporary_path(classes_out)
        part_conf = temporary_path(confidence_out) if confidence_out else None
        strip = (0, height)
    strip_h = max(strip[1] - strip[0], 1)
    strip_transform = transform @ rasterio.Affine.translation(0, strip[0])
    writers: list[TiledRasterWriter] = []
    try:
        cls_writer = TiledRasterWriter(part_classes, height=strip_h, width=width, crs=crs,
                                       transform=strip_transform, dtype="uint8", nodata=NODATA_CLASS)
        writers.append(cls_writer)
        conf_writer = None
        if part_conf is not None:
            conf_writer = TiledRasterWriter(part_conf, height=strip_h, width=width, crs=crs,
                                            transform=strip_transform, dtype="float32",
                                            nodata=CONFIDENCE_NODATA)
            writers.append(conf_writer)
        run, skipped = 0, []
        for stripe in column_stripes(grid[0], width, stripe_width_limit(spec.num_classes, tile_s)):
            part = [line[stripe.first : stripe.last + 1] for line in lines]
            n_run, n_skipped = _predict_rows(scene, model, spec, options, scale, grid, part, (y0, y1),
                                             height, width, tile_s, overlap_s, cls_writer, conf_writer,
                                             strip[0], stripe)
            run += n_run
            skipped += n_skipped
        if world_size > 1:
            for w in writers:
                w.close_scratch()
            if barrier is not None:
                barrier()
            if rank == 0:
                _stitch(classes_out, confidence_out, grid, height, width, world_size, crs, transform,
                        spec)
            if barrier is not None:
                barrier()
            for w in writers:
                w.discard()
            total = _all_reduce_sum([run, len(skipped)])
            run, n_skipped = total
        else:
            publish_class_raster(cls_writer, classes_out, spec.class_names, spec.class_colors)
            if conf_writer is not None and confidence_out is not None:
                publish_confidence_raster(conf_writer, confidence_out)
            n_skipped = len(skipped)
    except BaseException:
        for w in writers:
            w.discard()
        raise
    return SceneResult(scene, classes_out, confidence_out, run, n_skipped, scale)


def _predict_rows(scene, model, spec, options, scale, grid, lines, rows, height, width, tile_s,
                  overlap_s, cls_writer, conf_writer, strip_top, stripe: ColumnStripe | None = None
                  ) -> tuple[int, list[Window]]:
    y0, y1 = rows
    # The buffer spans the stripe's windows; only the stripe's own columns are written.
    x0 = lines[0][0].col if lines else 0
    x1 = lines[0][-1].col + lines[0][-1].width if lines else width
    left, right = (stripe.left, stripe.right) if stripe is not None else (0, width)
    if not lines or y1 <= y0:
        return 0, []
    device = torch.device(options.device)
    model.eval().to(device)  # batch norm / dropout in inference behaviour, whatever the caller left
    if options.channels_last:
        model.to(memory_format=torch.channels_last)  # 4-D weights only
    net = compile_model(model, device) if options.compile else model  # toolchain checked here
    # CUDA: batches built in pinned memory by the reader thread, copied in and out without
    # blocking the host. Elsewhere plain tensors and no change at all.
    pin = uses_pinned_transfer(device)
    protocol = tta_protocol(options.tta, spec.dataset)
    pad_multiple = protocol.input_multiple(options.pad_multiple)
    reader = _SceneReader(scene, spec, scale, options)
    skipped: list[Window] = []
    row_sum, col_sum = weight_sums(grid, height, width, tile_s, overlap_s)
    buffer = _RowBuffer(spec.num_classes, lines[0][0].height, x1 - x0, lines[0][0].row, row_sum,
                        col_sum[x0:x1], left=x0)
    n_windows = sum(len(line) for line in lines)
    read_bar = tqdm(total=n_windows, desc=f"read {scene_name(scene)}", unit="win", disable=not options.progress,
                    leave=False, position=0)
    bar = tqdm(total=n_windows, desc=f"infer {scene_name(scene)}", unit="win", disable=not options.progress,
               leave=False, position=1)
    write_bar = tqdm(total=y1 - y0, desc=f"write {scene_name(scene)}", unit="row", disable=not options.progress,
                     leave=False, position=2)
    writer_pool = ThreadPoolExecutor(max_workers=1)
    pending_writes: list[Future] = []
    run = 0

    def launch(item: _Batch) -> tuple[_Batch, torch.Tensor, Any]:
        """Start the model on a batch: (batch, probabilities on the host, event that marks them
        complete or None). On CUDA nothing here waits for the GPU: the input copy, the forward
        and the copy back into pinned memory are queued, so the host blends the previous batch
        meanwhile."""
        x = item.inputs.to(device, non_blocking=pin)
        if options.channels_last:
            x = to_channels_last(x)
        try:
            probs = predict_probs(net, x, protocol)
        except Exception as exc:
            if options.compile and isinstance(exc, compile_error_types()):
                raise compile_failure(exc) from exc
            raise
        if not pin:
            return item, probs.cpu(), None
        host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
        host.copy_(probs, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return item, host, done

    def blend(launched: tuple[_Batch, torch.Tensor, Any]) -> None:
        nonlocal run
        item, probs, done = launched
        if done is not None:
            done.synchronize()
        run += len(item.windows)
        for i, w in enumerate(item.windows):
            mh, mw = item.model_shapes[i]
            p = probs[i : i + 1, :, :mh, :mw]
            if (mh, mw) != (w.height, w.width):
                p = F.interpolate(p, size=(w.height, w.width), mode="bilinear", align_corners=False)
            buffer.add(w, p[0].numpy(), blend_weights(w, tile_s, overlap_s), item.valid[i])

    def write(top: int, classes: np.ndarray, conf: np.ndarray) -> None:
        a, b = max(top, y0), min(top + classes.shape[0], y1)
        if b <= a:
            return
        cols = slice(left - x0, right - x0)
        cls_writer.write_rows(a - strip_top, classes[a - top : b - top, cols], col=left)
        if conf_writer is not None:
            conf_writer.write_rows(a - strip_top, conf[a - top : b - top, cols], col=left)
        write_bar.update(b - a)

    try:
        line_index = 0
        # A batch's results are blended once the next batch has been launched, so that the
        # GPU works while the host blends; always in batch order, so every sum is formed as
        # before (on the CPU the results are bit-identical to blending at once).
        waiting: tuple[_Batch, torch.Tensor, Any] | None = None
        # The queue also carries the row-end marks: 4 places keep >= 2 batches read ahead.
        batches = _batches(reader, lines, options, skipped, read_bar.update, pad_multiple, pin)
        with torch.inference_mode():
            for item in _threaded(batches, depth=4):
                if isinstance(item, list):  # a window row is complete
                    if waiting is not None:
                        blend(waiting)
                        waiting = None
                    line_index += 1
                    bar.update(len(item))
                    until = lines[line_index][0].row if line_index < len(lines) else None
                    if until is None:
                        until = buffer.top + buffer.height
                        until = min(until, lines[-1][0].row + lines[-1][0].height)
                    if until > buffer.top:
                        top, classes, conf = buffer.take(until)
                        pending_writes.append(writer_pool.submit(write, top, classes, conf))
                    for f in [f for f in pending_writes if f.done()]:
                        f.result()
                        pending_writes.remove(f)
                    # Finished rows wait in memory until written: never let more than two pile up.
                    while len(pending_writes) > 2:
                        pending_writes.pop(0).result()
                    continue
                launched = launch(item)
                if waiting is not None:
                    blend(waiting)
                waiting = launched
        assert waiting is None  # every row ends with its mark, which blends the last batch
        for f in pending_writes:
            f.result()
    finally:
        writer_pool.shutdown(wait=True)
        reader.close()
        read_bar.close()
        bar.close()
        write_bar.close()
    return run, skipped


# ----------------------------------------------------------------------------- torchrun


def distributed_context() -> tuple[int, int, Any]:
    """(rank, world_size, barrier) from torchrun's environment; (0, 1, None) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
        # The group we made is torn down before interpreter shutdown: a gloo group left to the
        # shutdown sequence was seen to abort one rank (SIGABRT) after a successful run.
        atexit.register(_destroy_process_group)
    return dist.get_rank(), dist.get_world_size(), dist.barrier


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _all_reduce_sum(values: Sequence[int]) -> list[int]:
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.int64)
    dist.all_reduce(t)
    return [int(v) for v in t]


def _stitch(classes_out: Path, confidence_out: Path | None, grid, height: int, width: int,
            world_size: int, crs, transform, spec: InputSpec) -> None:
    """Rank 0: copy every rank's strip into one raster and publish it."""
    ranges = row_ranges_for_ranks(grid, height, world_size)
    outputs = [(classes_out, "uint8", NODATA_CLASS)]
    if confidence_out is not None:
        outputs.append((confidence_out, "float32", CONFIDENCE_NODATA))
    for final, dtype, nodata in outputs:
        writer = TiledRasterWriter(temporary_path(final), height=height, width=width, crs=crs,
                                   transform=transform, dtype=dtype, nodata=nodata)
        try:
            for r, (a, b) in enumerate(ranges):
                if b <= a:
                    continue
                part = temporary_path(final, f"rank{r}", unique=False)
                with rasterio.open(part) as ds:
                    for top in range(0, b - a, 1024):
                        n = min(1024, b - a - top)
                        data = ds.read(1, window=rasterio.windows.Window(0, top, width, n))
                        writer.write_rows(a + top, data)
            if dtype == "uint8":
                publish_class_raster(writer, final, spec.class_names, spec.class_colors)
            else:
                publish_confidence_raster(writer, final)
        except BaseException:
            writer.discard()
            raise


__all__ = [
    "InputSpec",
    "PredictOptions",
    "SceneResult",
    "predict_probs",
    "predict_scene",
    "distributed_context",
    "open_scene",
    "remove_quietly",
]
