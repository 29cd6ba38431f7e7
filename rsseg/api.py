"""rsseg's Python API: the same operations as the command line, as functions.

``rsseg train``, ``rsseg eval``, ``rsseg predict``, ``rsseg vectorize`` are thin click layers over
these; everything they do is reachable from Python::

    import rsseg

    result = rsseg.train("cpu-tiny", max_steps=50, out="runs")      # preset name, file or TrainConfig
    scores = rsseg.evaluate(result.bundle_path, split="test")
    model, meta = rsseg.load_bundle(result.bundle_path)

Messages go through the ``rsseg`` logger (``logging``), not ``print``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from rsseg.config import TrainConfig
    from rsseg.train.evaluate import EvalResult
    from rsseg.train.fit import TrainResult

log = logging.getLogger("rsseg")

# Keyword names the API and the CLI accept for TrainConfig fields they spell differently.
_ALIASES = {"out": "output_dir", "output": "output_dir", "name": "run_name", "data": "data_dir"}


def train_config(
    config: str | os.PathLike[str] | TrainConfig | None = None,
    *,
    set_items: list[str] | tuple[str, ...] = (),
    no_pretrained: bool = False,
    **options: Any,
) -> TrainConfig:
    """The fully resolved training configuration, as ``rsseg train`` builds it.

    ``config``: a preset name (``rsseg configs``), a YAML file, a TrainConfig, or None (the
    ``cpu-tiny`` preset for ``dataset="synthetic"``, else the defaults). ``options`` override
    fields (None values are ignored, so CLI flags pass through); ``set_items`` are dotted
    ``key=value`` overrides applied last; ``no_pretrained`` trains the backbone from scratch.
    """
    from rsseg.config import TrainConfig, apply_overrides, load_config
    from rsseg.errors import UsageError

    options = {_ALIASES.get(k, k): v for k, v in options.items()}
    if isinstance(config, TrainConfig):
        cfg = config
    elif config:
        cfg = load_config(config)
    elif options.get("dataset") == "synthetic":
        cfg = load_config("cpu-tiny")  # generated data: a run that finishes in minutes on a CPU
    else:
        cfg = TrainConfig()
    if options.get("model") and options["model"] != cfg.model:
        # A preset's model options belong to its own model; another model starts from its defaults.
        cfg = cfg.replace(model_cfg={})
    if no_pretrained:
        if options.get("pretrained"):
            raise UsageError("--pretrained and --no-pretrained exclude each other")
        options["pretrained"] = ""  # replace() turns "" into None: from scratch
    cfg = cfg.replace(**options)
    return apply_overrides(cfg, list(set_items)) if set_items else cfg


def describe_config(cfg: TrainConfig) -> str:
    """``cfg`` as YAML, followed by what its automatic values resolve to on this machine."""
    import yaml

    from rsseg.errors import RssegError
    from rsseg.train.fit import effective_backbone_lr, initial_weights

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    try:
        weights = initial_weights(cfg)
        source = f"{weights.name or 'file'}: {weights.path}" if weights.path else "none (from scratch)"
        lr = effective_backbone_lr(cfg, weights.pretrained)
    except RssegError as exc:
        source, lr = f"not available here ({exc})", effective_backbone_lr(cfg, True)
    return text + f"# resolved: initial weights {source}\n# resolved: backbone_lr {lr:g}\n"


def train(
    config: str | os.PathLike[str] | TrainConfig | None = None,
    *,
    set_items: list[str] | tuple[str, ...] = (),
    no_pretrained: bool = False,
    **options: Any,
) -> TrainResult:
    """Train a model; returns where the bundle, checkpoints and logs are (see :func:`train_config`)."""
    from rsseg.train.fit import train as run_training

    cfg = train_config(config, set_items=set_items, no_pretrained=no_pretrained, **options)
    result = run_training(cfg)
    if result.bundle_path is not None:
        log.info("bundle %s; run folder %s", result.bundle_path, result.run_dir)
    return result


def evaluate(
    model: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
    *,
    echo: Callable[[str], None] | None = None,
    **options: Any,
) -> EvalResult:
    """Score a bundle on a prepared split from one global confusion matrix
    (:func:`rsseg.train.evaluate.evaluate`: ``data_dir``, ``split``, ``tta``, ``batch_size``,
    ``device``, ``progress``). ``model`` None takes the default model, as predict does."""
    from rsseg.default_model import resolve_model
    from rsseg.train.evaluate import evaluate as run_evaluation

    chosen = resolve_model(model, echo=echo or log.info)
    return run_evaluation(chosen.path, dataset, **options)


def predict(
    scenes: str | os.PathLike[str] | list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    model: str | os.PathLike[str] | None = None,
    *,
    raster: str | os.PathLike[str] | None = None,
    confidence: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    simplify: float | None = None,
    min_area: float = 0.0,
    rescale: str | float | None = None,
    bands: list[int] | None = None,
    echo: Callable[[str], None] | None = None,
    **options: Any,
) -> list[Any]:
    """Segment scenes (GeoTIFFs or anything GDAL opens) into a class raster and/or polygons on
    their own grid.

    ``out``'s suffix picks the output (``.tif`` class COG; ``.gpkg`` / ``.geojson`` / ``.fgb`` /
    ``.parquet`` polygons). Several scenes (files, folders, globs) with one ``out`` are one mosaic
    with one output; ``{stem}`` in ``out`` gives one output per scene instead. ``model``: a bundle; None takes the
    default (:mod:`rsseg.default_model`) and says which. ``rescale``: "check" (default), "auto",
    "none" or a factor; ``bands``: scene bands in the model's order. ``options`` are
    :class:`rsseg.inference.predict.PredictOptions` fields (``tile``, ``overlap``,
    ``batch_size``, ``tta``, ``device``, ``resample``, ``progress``...). Returns one record of
    outputs per scene.
    """
    from rsseg.bundle import load_bundle as read
    from rsseg.data.radiometry import parse_rescale
    from rsseg.default_model import resolve_model
    from rsseg.inference.mosaic import expand_scenes
    from rsseg.inference.ranks import rank_device
    from rsseg.inference.predict import PredictOptions
    from rsseg.inference.run import plan_outputs, predict_scenes

    echo = echo or log.info
    scene_list = [scenes] if isinstance(scenes, (str, os.PathLike)) else list(scenes)
    # Text: URLs and /vsi paths go to GDAL as given; folders and globs give their rasters.
    scene_list = expand_scenes([os.fspath(s) for s in scene_list])
    chosen = resolve_model(model, echo=echo)
    raster_path = Path(raster) if raster else None
    confidence_path = Path(confidence) if confidence else None
    rescale_mode = parse_rescale(None if rescale is None else str(rescale))
    # Cheap checks first: a wrong suffix, an existing output or an output that is an input is
    # reported before the model loads.
    plan_outputs(scene_list, Path(out), raster_path, confidence_path, overwrite, inputs=[chosen.path])
    options.setdefault("progress", False)
    # Under torchrun each rank loads the model straight onto its own GPU (cuda -> cuda:LOCAL_RANK).
    options["device"] = rank_device(options.get("device", "cpu"))
    net, meta = read(chosen.path, device=options["device"])
    settings = PredictOptions(rescale=rescale_mode, bands=bands, **options)
    return predict_scenes(scene_list, Path(out), net, meta, options=settings, raster=raster_path,
                          confidence=confidence_path, overwrite=overwrite, simplify=simplify,
                          min_area=min_area, echo=echo, inputs=[chosen.path])


def vectorize(
    raster: str | os.PathLike[str] | list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    classes: str | os.PathLike[str] | None = None,
    **options: Any,
) -> tuple[list[Path], int]:
    """Polygons of a uint8 class raster (255 = nodata), merged across blocks, simplified as a
    coverage, styled for QGIS. Several class rasters (files, folders, globs: e.g. the outputs of
    per-area jobs) are vectorized as one mosaic, so polygons are whole across their borders.
    ``classes``: a bundle, JSON or text file of names/colours (default: the first raster's own
    metadata). ``options``: ``simplify``, ``min_area``, ``overwrite``, ``progress``,
    ``block_rows``, ``block_cols``. Returns (files written, polygon count)."""
    from rsseg.inference.mosaic import expand_scenes, mosaic_scene
    # From vectorize, not rsseg.inference.run: run imports torch (0.6 GB) for predict.
    from rsseg.inference.vectorize import (
        check_not_inputs,
        class_info_from_raster,
        read_classes_file,
        vectorize_to_file,
    )

    rasters = [raster] if isinstance(raster, (str, os.PathLike)) else list(raster)
    rasters = expand_scenes([os.fspath(r) for r in rasters])
    check_not_inputs([Path(out)], [Path(r) for r in rasters])
    info = read_classes_file(Path(classes)) if classes is not None else None
    if len(rasters) == 1:
        return vectorize_to_file(Path(rasters[0]), Path(out), classes=info, **options)
    info = info or class_info_from_raster(Path(rasters[0]))
    with mosaic_scene(rasters) as vrt:
        return vectorize_to_file(Path(vrt), Path(out), classes=info, **options)


def load_bundle(path: str | os.PathLike[str], device: str = "cpu") -> tuple[Any, Any]:
    """(model in eval mode, BundleMeta) of a ``.safetensors`` bundle written by ``rsseg train``."""
    from rsseg.bundle import load_bundle as read

    return read(path, device=device)
