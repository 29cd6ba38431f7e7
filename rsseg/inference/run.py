"""``rsseg predict`` as a Python API: many scenes, one model load, raster and/or vector outputs.

Every output is checked before any work starts (suffix, existing file, writable folder) and
every scene is opened and checked against the bundle's bands, so a mistake surfaces in a second,
not after an hour of inference.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from rsseg.errors import OutputError, UsageError
from rsseg.inference.predict import (
    InputSpec,
    PredictOptions,
    check_bands,
    distributed_context,
    open_scene,
    predict_scene,
)
from rsseg.inference.rasterio_out import remove_quietly
from rsseg.inference.vectorize import (
    RASTER_SUFFIXES,
    VECTOR_DRIVERS,
    ClassInfo,
    check_writable,
    vectorize_raster,
    write_vectors,
)


@dataclass
class SceneOutputs:
    scene: Path
    classes: Path | None = None  # the class raster the user asked for (None if only vectors)
    confidence: Path | None = None
    vectors: Path | None = None
    extra_files: list[Path] = field(default_factory=list)
    polygons: int = 0


def output_for(template: Path, scene: Path, many: bool) -> Path:
    """The output path for one scene: ``{stem}`` in the template is replaced by the scene's stem;
    with several scenes and no ``{stem}``, ``_<stem>`` is added before the suffix."""
    text = str(template)
    if "{stem}" in text:
        return Path(text.replace("{stem}", scene.stem))
    if many:
        return template.with_name(f"{template.stem}_{scene.stem}{template.suffix}")
    return template


def plan_outputs(scenes: Sequence[Path], out: Path, raster: Path | None, confidence: Path | None,
                 overwrite: bool) -> list[SceneOutputs]:
    suffix = out.suffix.lower()
    if suffix not in RASTER_SUFFIXES and suffix not in VECTOR_DRIVERS:
        raise OutputError(
            f"unknown output suffix {out.suffix or '(none)'!r} for {out.name}; use one of "
            f"{', '.join(list(RASTER_SUFFIXES) + list(VECTOR_DRIVERS))}"
        )
    for extra, flag in ((raster, "--raster"), (confidence, "--confidence")):
        if extra is not None and extra.suffix.lower() not in RASTER_SUFFIXES:
            raise OutputError(f"{flag} must name a .tif file, got {extra.name}")
    many = len(scenes) > 1
    plans: list[SceneOutputs] = []
    for scene in scenes:
        p = SceneOutputs(scene=Path(scene))
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
    return plans


def predict_scenes(
    scenes: Sequence[Path],
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
) -> list[SceneOutputs]:
    """Predict every scene with one loaded model; write class rasters and/or vectors."""
    options = options or PredictOptions()
    rank, world, barrier = distributed_context()
    if world > 1 and rank != 0:
        options.progress = False
    spec = InputSpec.from_meta(meta)
    scenes = [Path(s) for s in scenes]
    plans = plan_outputs(scenes, Path(out), raster, confidence, overwrite)
    for scene in scenes:
        with open_scene(scene) as src:
            check_bands(src, spec, scene.name)
    info = ClassInfo(spec.class_names, spec.class_colors)
    for plan in plans:
        scratch_dir = None
        classes_path = plan.classes
        if classes_path is None:  # vectors only: the class raster is an intermediate
            target = plan.vectors
            scratch_dir = tempfile.TemporaryDirectory(prefix=".rsseg-", dir=target.parent)
            classes_path = Path(scratch_dir.name) / f"{plan.scene.stem}.tif"
        try:
            result = predict_scene(plan.scene, model, spec, classes_path, plan.confidence, options,
                                   rank=rank, world_size=world, barrier=barrier)
            if plan.vectors is not None and rank == 0:
                gdf = vectorize_raster(classes_path, classes=info, simplify=simplify,
                                       min_area=min_area, progress=options.progress)
                plan.extra_files = write_vectors(gdf, plan.vectors, info, overwrite=overwrite)[1:]
                plan.polygons = len(gdf)
            if barrier is not None:
                barrier()
        finally:
            if scratch_dir is not None:
                remove_quietly(classes_path)
                scratch_dir.cleanup()
        if rank == 0:
            done = [str(p) for p in (plan.classes, plan.confidence, plan.vectors) if p is not None]
            skipped = f", {result.windows_skipped} all-nodata windows skipped" if result.windows_skipped else ""
            echo(f"{plan.scene.name}: {result.windows_run} windows{skipped} -> {', '.join(done)}")
    return plans
