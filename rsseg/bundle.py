"""Model bundles: one ``.safetensors`` file holding weights plus everything needed to use them.

A bundle is what ``--model`` takes. Its safetensors header carries one metadata entry, ``rsseg``,
a JSON document (:class:`BundleMeta` plus a format tag and a checksum). The checksum covers the
metadata and every tensor's name, dtype, shape and bytes, so a bundle whose metadata or weights
were altered after saving is refused instead of silently producing wrong maps.

Nothing in a bundle is ever unpickled: safetensors stores raw tensors only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from rsseg.errors import BundleError, RssegError

FORMAT_NAME = "rsseg-bundle"
FORMAT_VERSION = 1
_METADATA_KEY = "rsseg"
# Model options that name a source of initial weights (a local file or a hub name).
WEIGHT_SOURCE_KEYS = frozenset({"pretrained", "encoder_weights"})


@dataclass
class BundleMeta:
    """Everything ``predict``/``eval`` need besides the weights."""

    model_name: str
    class_names: list[str]
    class_colors: list[list[int]]
    ignore_index: int
    bands: list[int]  # 1-based indexes of the source image's bands, in the order the model reads
    band_names: list[str]
    mean: list[float]  # per band, in source units (e.g. 0..255 for uint8 imagery)
    std: list[float]
    patch_size: int
    model_config: dict[str, Any] = field(default_factory=dict)
    gsd_m: float | None = None  # ground sampling distance of the training data, metres
    dataset: str | None = None
    rsseg_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # Radiometry of the training data (None = unknown, as in bundles made before it was recorded:
    # predict then skips the checks that need it).
    source_dtype: str | None = None  # numpy dtype name of the source images, e.g. "uint8"
    source_band_count: int | None = None  # bands in each training source image
    source_band_labels: list[str] | None = None  # per band read: "red", "nir", ... or "" (unknown)
    band_stats: list[dict[str, float]] | None = None  # per band read: p1, p99, min, max

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return len(self.bands)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BundleMeta:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleError(f"bundle metadata has unknown fields: {', '.join(unknown)}")
        required = [
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise BundleError(f"bundle metadata lacks required fields: {', '.join(missing)}")
        meta = cls(**data)
        meta.validate()
        return meta

    def validate(self) -> None:
        """Refuse metadata that cannot describe a working model (one clear line per problem)."""
        if not isinstance(self.model_name, str) or not self.model_name:
            raise BundleError("bundle metadata: model_name must be a non-empty string")
        if not isinstance(self.model_config, dict):
            raise BundleError("bundle metadata: model_config must be a JSON object")
        names = self.class_names
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise BundleError("bundle metadata: class_names must be a non-empty list of strings")
        if len(set(names)) != len(names):
            raise BundleError("bundle metadata: class_names contains duplicates")
        colors = self.class_colors
        if not isinstance(colors, list) or len(colors) != len(names):
            raise BundleError(
                f"bundle metadata: {len(names)} class names but "
                f"{len(colors) if isinstance(colors, list) else 'no'} class colours"
            )
        for c in colors:
            if not (
                isinstance(c, list)
                and len(c) == 3
                and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            ):
                raise BundleError(f"bundle metadata: class colour {c!r} is not [r, g, b] in 0..255")
        if not isinstance(self.ignore_index, int) or 0 <= self.ignore_index < len(names):
            raise BundleError(
                f"bundle metadata: ignore_index {self.ignore_index!r} must be an integer outside "
                f"the class range 0..{len(names) - 1}"
            )
        bands = self.bands
        if (
            not isinstance(bands, list)
            or not bands
            or not all(isinstance(b, int) and b >= 1 for b in bands)
        ):
            raise BundleError("bundle metadata: bands must be a non-empty list of 1-based integers")
        for label, values in (("band_names", self.band_names), ("mean", self.mean), ("std", self.std)):
            if not isinstance(values, list) or len(values) != len(bands):
                raise BundleError(
                    f"bundle metadata: {label} must have one entry per band ({len(bands)})"
                )
        if not all(isinstance(s, (int, float)) and s > 0 for s in self.std):
            raise BundleError("bundle metadata: every std must be a positive number")
        if not all(isinstance(m, (int, float)) for m in self.mean):
            raise BundleError("bundle metadata: every mean must be a number")
        if not isinstance(self.patch_size, int) or self.patch_size < 1:
            raise BundleError("bundle metadata: patch_size must be a positive integer")
        if self.gsd_m is not None and not (isinstance(self.gsd_m, (int, float)) and self.gsd_m > 0):
            raise BundleError("bundle metadata: gsd_m must be a positive number or null")
        self._validate_radiometry()

    def _validate_radiometry(self) -> None:
        if self.source_dtype is not None:
            try:
                np.dtype(self.source_dtype)
            except TypeError:
                raise BundleError(
                    f"bundle metadata: source_dtype {self.source_dtype!r} is not a data type"
                ) from None
        count = self.source_band_count
        if count is not None and not (isinstance(count, int) and count >= max(self.bands)):
            raise BundleError(
                f"bundle metadata: source_band_count {count!r} must be an integer >= "
                f"{max(self.bands)} (the highest band read)"
            )
        labels = self.source_band_labels
        if labels is not None and not (
            isinstance(labels, list) and len(labels) == len(self.bands)
            and all(isinstance(v, str) for v in labels)
        ):
            raise BundleError(
                f"bundle metadata: source_band_labels must be one string per band ({len(self.bands)})"
            )
        stats = self.band_stats
        if stats is not None:
            keys = {"p1", "p99", "min", "max"}
            if not (
                isinstance(stats, list) and len(stats) == len(self.bands)
                and all(isinstance(s, dict) and keys <= set(s)
                        and all(isinstance(s[k], (int, float)) for k in keys) for s in stats)
            ):
                raise BundleError(
                    "bundle metadata: band_stats must hold p1, p99, min and max numbers for each "
                    f"of the {len(self.bands)} bands"
                )


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        # Viewing as bytes works for every dtype, bfloat16 included (numpy has none).
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _checksum(meta_json: str, tensor_digest: str) -> str:
    return hashlib.sha256((meta_json + "\n" + tensor_digest).encode()).hexdigest()


def _canonical(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"))


def save_bundle(path: str | os.PathLike[str], model: nn.Module, meta: BundleMeta) -> Path:
    """Write ``model``'s weights and ``meta`` to ``path`` atomically (temporary name, then rename)."""
    from rsseg import __version__

    meta.validate()
    # Keys that only say where initial weights come from: the bundle holds the trained weights,
    # and keeping them would make load_bundle look for that file (or the network) again.
    meta.model_config = {
        k: v for k, v in meta.model_config.items() if k not in WEIGHT_SOURCE_KEYS
    }
    if not meta.rsseg_version:
        meta.rsseg_version = __version__
    # clone() breaks storage sharing (tied weights), which safetensors refuses to save.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta_dict = meta.to_dict()
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "meta": meta_dict,
        "checksum": _checksum(_canonical(meta_dict), _tensor_digest(tensors)),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata={_METADATA_KEY: json.dumps(document)})
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _read_document(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BundleError(f"model bundle not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{path} is not a readable .safetensors bundle ({exc})") from exc
    if _METADATA_KEY not in header:
        raise BundleError(f"{path} is a safetensors file without rsseg metadata (not a bundle)")
    try:
        document = json.loads(header[_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: bundle metadata is not valid JSON ({exc.msg})") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise BundleError(f"{path}: metadata is not in the {FORMAT_NAME} format")
    if document.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {document.get('format_version')!r} is not supported "
            f"(this rsseg reads version {FORMAT_VERSION})"
        )
    if not isinstance(document.get("meta"), dict) or not isinstance(document.get("checksum"), str):
        raise BundleError(f"{path}: bundle metadata lacks 'meta' or 'checksum'")
    return document


def read_bundle_meta(path: str | os.PathLike[str]) -> BundleMeta:
    """The bundle's metadata, validated, without loading or checking the weights."""
    path = Path(path)
    document = _read_document(path)
    try:
        return BundleMeta.from_dict(document["meta"])
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from exc


def load_bundle(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[nn.Module, BundleMeta]:
    """Build the bundle's model, load its weights, and return ``(model in eval mode, meta)``.

    Every inconsistency is a :class:`BundleError` with one line saying what is wrong: unreadable
    file, altered content, unknown model, class count vs head, missing/extra keys, shape mismatch.
    """
    from rsseg.models.registry import create_model, list_models

    path = Path(path)
    document = _read_document(path)
    meta = read_bundle_meta(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{path}: weights are unreadable ({exc})") from exc
    expected = _checksum(_canonical(document["meta"]), _tensor_digest(tensors))
    if expected != document["checksum"]:
        raise BundleError(
            f"{path}: checksum mismatch: the bundle's weights or metadata were altered after saving"
        )

    if meta.model_name not in list_models():
        raise BundleError(
            f"{path}: unknown model {meta.model_name!r} (this rsseg knows: {', '.join(list_models())})"
        )
    try:
        model = create_model(meta.model_name, meta.num_classes, meta.in_channels, **meta.model_config)
    except RssegError as exc:
        raise BundleError(f"{path}: cannot build model {meta.model_name!r}: {exc}") from exc

    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    mismatched = [k for k in own if k in tensors and own[k].shape != tensors[k].shape]
    for key in mismatched:
        built, stored = tuple(own[key].shape), tuple(tensors[key].shape)
        if built[:1] == (meta.num_classes,) and stored[:1] != built[:1]:
            raise BundleError(
                f"{path}: metadata lists {meta.num_classes} classes but the weights' head "
                f"{key!r} has {stored[0]} outputs"
            )
    if mismatched:
        key = mismatched[0]
        raise BundleError(
            f"{path}: weight {key!r} has shape {tuple(tensors[key].shape)} but model "
            f"{meta.model_name!r} expects {tuple(own[key].shape)} ({len(mismatched)} mismatched)"
        )
    if missing:
        raise BundleError(
            f"{path}: weights lack {len(missing)} tensors model {meta.model_name!r} needs "
            f"(first: {missing[0]!r})"
        )
    if extra:
        raise BundleError(
            f"{path}: weights hold {len(extra)} tensors model {meta.model_name!r} does not have "
            f"(first: {extra[0]!r})"
        )
    model.load_state_dict(tensors, strict=True)
    model.to(device).eval()
    return model, meta
