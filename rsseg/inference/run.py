"""``rsseg predict`` as a Python API: many scenes, one model load, raster and/or vector outputs.

Every output is checked before any work starts (suffix, existing file, writable folder, not one
of the inputs) and every scene is opened and checked against the bundle (bands, masks, value
range, GSD), so a mistake surfaces in a second, not after an hour of inference.

Interrupted runs leave nothing behind: Ctrl-C and SIGTERM remove the partial files of the scene
in progress, and a run killed outright (SIGKILL, power loss) has its partials removed by the next
run that writes to the same folder (see :mod:`rsseg.inference.paths`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from torch import nn

from rsseg.errors import OutputError, UsageError
from rsseg.inference.paths import (
    is_local_file,
    remove_stale_partials,
    scene_name,
    scene_stem,
    scratch_prefix,
)
from rsseg.inference.predict import (
    InputSpec,
    PredictOptions,
    distributed_context,
    open_scene,
    predict_scene,
    resolve_scene,
)
from rsseg.inference.georef import pixel_size
from rsseg.inference.mosaic import mosaic_scene, wants_mosaic
from rsseg.inference.ranks import rank_device
from rsseg.inference.rasterio_out import remove_quietly
from rsseg.inference.vectorize import (
    RASTER_SUFFIXES,
    VECTOR_DRIVERS,
    ClassInfo,
    check_not_inputs,
    check_writable,
    vectorize_to_file,
)


@dataclass
class SceneOutputs:
    scene: str  # as given: a local path, a URL or a GDAL /vsi path
    classes: Path | None = None  # the class raster the user asked for (None if only vectors)
    confidence: Path | None = None
    vectors: Path | None = None
    extra_files: list[Path] = field(default_factory=list)
    polygons: int = 0


def output_for(template: Path, scene: str | os.PathLike[str], many: bool) -> Path:
    """The output path for one scene: ``{stem}`` in the template is replaced by the scene's stem;
    with several scenes and no ``{stem}``, ``_<stem>`` is added before the suffix."""
    text = str(template)
    stem = scene_stem(scene)
    if "{stem}" in text:
        return Path(text.replace("{stem}", stem))
    if many:
        return template.with_name(f"{template.stem}_{stem}{template.suffix}")
    return template


def input_files(scenes: Sequence[str | os.PathLike[str]], extra: Sequence[Path] = ()) -> list[Path]:
    """Every local file the run reads: the scenes, the files GDAL reads with them (a .vrt's
    sources, .aux.xml, .ovr, .msk) where it can open them, and ``extra`` (the model bundle)."""
    files = [Path(p) for p in extra]
    for scene in scenes:
        text = os.fspath(scene)
        if is_local_file(text):
            files.append(Path(text))
        try:
            with open_scene(text) as src:
                files += [Path(f) for f in src.files if is_local_file(f)]
        except Exception:  # unreadable scenes are reported by the scene checks, not here
            continue
    return files


def plan_outputs(scenes: Sequence[str | os.PathLike[str]], out: Path, raster: Path | None,
                 confidence: Path | None, overwrite: bool, *,
                 inputs: Sequence[Path] = ()) -> list[SceneOutputs]:
    """Output paths per scene, checked (suffix, writable, unique, not an input) before any work.
    Several scenes with no ``{stem}`` in ``out`` are one mosaic: one plan, whose scene is the
    first tile until the mosaic is built. ``inputs``: further files the run reads (the bundle)."""
    suffix = out.suffix.lower()
    if suffix not in RASTER_SUFFIXES and suffix not in VECTOR_DRIVERS:
        raise OutputError(
            f"unknown output suffix {out.suffix or '(none)'!r} for {out.name}; use one of "
            f"{', '.join(list(RASTER_SUFFIXES) + list(VECTOR_DRIVERS))}"
        )
    for extra, flag in ((raster, "--raster"), (confidence, "--confidence")):
        if extra is not None and extra.suffix.lower() not in RASTER_SUFFIXES:
            raise OutputError(f"{flag} must name a .tif file, got {extra.name}")
    all_scenes = list(scenes)
    if wants_mosaic(all_scenes, out):
        for extra, flag in ((raster, "--raster"), (confidence, "--confidence")):
            if extra is not None and "{stem}" in str(extra):
                raise UsageError(f"{flag} has {{stem}} but -o has none: several scenes with one -o "
                                 "are one mosaic with one output; put {stem} in -o for one per scene")
        scenes = all_scenes[:1]
    many = len(scenes) > 1
    plans: list[SceneOutputs] = []
    for scene in scenes:
        p = SceneOutputs(scene=os.fspath(scene))
        if suffix in RASTER_SUFFIXES:
            p.classes = output_for(out, p.scene, many)
            if raster is not None:
                raise UsageError("--raster is only for vector outputs; -o already names the class raster")
        else:
            p.vectors = output_for(out, p.scene, many)
            p.classes = output_for(raster, p.scene, many) if raster is not None else None
        p.confidence = output_for(confidence, p.scene, many) if confidence is not None else None
        for path in (p.classes, p.confidence, p.vectors):
            if path is not None:
                check_writable(path, overwrite)
        plans.append(p)
    targets = [x for p in plans for x in (p.classes, p.confidence, p.vectors) if x is not None]
    if len(set(targets)) != len(targets):
        raise OutputError("two outputs would get the same file name; use {stem} in the output path")
    check_not_inputs(targets, input_files(all_scenes, inputs))
    return plans


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) arrived: unwinds like Ctrl-C, so partial outputs are removed."""


@contextlib.contextmanager
def _terminate_like_interrupt() -> Iterator[None]:
    """While predicting, SIGTERM/SIGHUP raise :class:`Terminated` in the main thread (Ctrl-C
    already raises KeyboardInterrupt); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    previous = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def predict_scenes(
    scenes: Sequence[str | os.PathLike[str]],
    out: Path,
    model: nn.Module,
    meta: Any,
    *,
    options: PredictOptions | None = None,
    raster: Path | None = None,
    confidence: Path | None = None,
    overwrite: bool = False,
    simplify: float | None = None,
    min_area: float = 0.0,
    echo: Callable[[str], None] = print,
    inputs: Sequence[Path] = (),
) -> list[SceneOutputs]:
    """Predict every scene with one loaded model; write class rasters and/or vectors.

    ``scenes`` are anything GDAL opens (paths, URLs, /vsi paths); ``inputs`` are further files
    the run reads (the model bundle), which no output may replace. Several scenes and an ``out``
    without ``{stem}`` are predicted as one mosaic (:mod:`rsseg.inference.mosaic`)."""
    scenes = [os.fspath(s) for s in scenes]
    if wants_mosaic(scenes, Path(out)):
        # Outputs are checked against every tile before the mosaic is laid out.
        plan_outputs(scenes, Path(out), raster, confidence, overwrite, inputs=inputs)
        with mosaic_scene(scenes) as vrt:
            tiles = [Path(s) for s in scenes if is_local_file(s)]
            return predict_scenes([vrt], out, model, meta, options=options, raster=raster,
                                  confidence=confidence, overwrite=overwrite, simplify=simplify,
                                  min_area=min_area, echo=echo, inputs=[*inputs, *tiles])
    options = options or PredictOptions()
    rank, world, barrier = distributed_context()
    options.device = rank_device(options.device)  # each torchrun rank on its own GPU
    if world > 1 and rank != 0:
        options.progress = False
    spec = InputSpec.from_meta(meta)
    raster = Path(raster) if raster is not None else None
    confidence = Path(confidence) if confidence is not None else None
    plans = plan_outputs(scenes, Path(out), raster, confidence, overwrite, inputs=inputs)
    # Every scene checked against the bundle before the first one runs; each scene's warnings
    # are said here, once.
    specs = {}
    for scene in scenes:
        with open_scene(scene) as src:
            specs[scene] = resolve_scene(src, spec, options, scene_name(scene), speak=rank == 0)
    if rank == 0:  # partials of killed runs (their process is gone) go before we write
        for folder in {p.parent for plan in plans
                       for p in (plan.classes, plan.confidence, plan.vectors) if p is not None}:
            remove_stale_partials(folder if str(folder) else Path("."))
    info = ClassInfo(spec.class_names, spec.class_colors)
    with _terminate_like_interrupt():
        for plan in plans:
            _predict_one(plan, model, specs[plan.scene], options, info, rank, world, barrier,
                         overwrite, simplify, min_area, echo)
    return plans


def _predict_one(plan: SceneOutputs, model: nn.Module, spec: InputSpec, options: PredictOptions,
                 info: ClassInfo, rank: int, world: int, barrier: Any, overwrite: bool,
                 simplify: float | None, min_area: float, echo: Callable[[str], None]) -> None:
    scratch_dir = None
    classes_path = plan.classes
    if classes_path is None:  # vectors only: the class raster is an intermediate
        target = plan.vectors
        scratch_dir = tempfile.TemporaryDirectory(prefix=scratch_prefix(), dir=target.parent)
        classes_path = Path(scratch_dir.name) / f"{scene_stem(plan.scene)}.tif"
    try:
        result = predict_scene(plan.scene, model, spec, classes_path, plan.confidence, options,
                               rank=rank, world_size=world, barrier=barrier)
        if plan.vectors is not None and rank == 0:
            with warnings.catch_warnings():
                # resolve_scene already said what a scene without a CRS means for its outputs.
                warnings.filterwarnings("ignore", message="class raster has no CRS",
                                        category=UserWarning)
                # pyogrio's note that a layer has no CRS: resolve_scene said it, in one line.
                warnings.filterwarnings("ignore", message="'crs' was not provided", category=UserWarning)
                # Streamed strip by strip: memory does not grow with the scene's height.
                files, plan.polygons = vectorize_to_file(
                    classes_path, plan.vectors, classes=info,
                    simplify=_simplify_tolerance(classes_path, simplify), min_area=min_area,
                    overwrite=overwrite, progress=options.progress)
            plan.extra_files = files[1:]
        if barrier is not None:
            barrier()
    finally:
        if scratch_dir is not None:
            remove_quietly(classes_path)
            scratch_dir.cleanup()
    if rank == 0:
        done = [str(p) for p in (plan.classes, plan.confidence, plan.vectors) if p is not None]
        skipped = f", {result.windows_skipped} all-nodata windows skipped" if result.windows_skipped else ""
        echo(f"{scene_name(plan.scene)}: {result.windows_run} windows{skipped} -> {', '.join(done)}")


def _simplify_tolerance(classes_path: Path, simplify: float | None) -> float | None:
    """The default tolerance, one pixel, measured along the pixel's true sides (a rotated grid's
    |a| and |e| can be 0)."""
    if simplify is not None:
        return simplify
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(classes_path) as ds:
            return sum(pixel_size(ds.transform)) / 2
