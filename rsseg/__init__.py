"""rsseg: semantic segmentation of high-resolution remote-sensing imagery.

The Python API mirrors the command line: ``rsseg.train``, ``rsseg.evaluate``, ``rsseg.predict``,
``rsseg.vectorize``, ``rsseg.load_bundle`` (see :mod:`rsseg.api`), plus ``create_model`` and
``list_models``. They are loaded on first use so that ``import rsseg`` (and the CLI's --help /
--version) do not pay for importing torch.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("rsseg")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

_API = ("train", "train_config", "evaluate", "predict", "vectorize", "load_bundle")
__all__ = ["__version__", "create_model", "list_models", *_API]


def __getattr__(name: str) -> Any:
    if name in ("create_model", "list_models"):
        from rsseg.models import registry

        return getattr(registry, name)
    if name in _API:
        from rsseg import api

        return getattr(api, name)
    raise AttributeError(f"module 'rsseg' has no attribute {name!r}")
