"""Test-wide settings and fixtures shared by every test module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def pytest_configure(config: pytest.Config) -> None:
    # Tests never see a developer's weights caches, and never try the network for weights.
    import tempfile

    empty = tempfile.mkdtemp(prefix="rsseg-test-caches-")
    os.environ["RSSEG_WEIGHTS"] = os.path.join(empty, "weights")
    os.environ["HF_HOME"] = os.path.join(empty, "hf")
    os.environ["TORCH_HOME"] = os.path.join(empty, "torch")
    os.environ["HF_HUB_OFFLINE"] = "1"
    # Under pytest-xdist every worker gets an equal share of the cores, so that parallel workers
    # do not oversubscribe the CPU with torch's intra-op threads.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's shared folder (beside the checkout, also in CI); skip where it is absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared folder not found at {SHARED_DIR}")
    return SHARED_DIR


@pytest.fixture(scope="session")
def rgb_byte_tif(shared_dir: Path) -> Path:
    """A real Landsat-derived GeoTIFF: 3 x 718 x 791 uint8, EPSG:32618, nodata 0."""
    path = shared_dir / "data" / "RGB.byte.tif"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path
