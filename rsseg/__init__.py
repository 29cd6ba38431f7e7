"""rsseg: semantic segmentation of high-resolution remote-sensing imagery."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rsseg")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from rsseg.models.registry import create_model, list_models  # noqa: E402

__all__ = ["__version__", "create_model", "list_models"]
