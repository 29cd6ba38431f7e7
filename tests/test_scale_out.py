"""Scale-out: torchrun ranks on their own GPUs, two "nodes", and per-area jobs merged exactly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from scipy import ndimage

from rsseg.errors import UsageError
from rsseg.inference.ranks import rank_device

from _predict_helpers import one_torch_thread  # noqa: F401

TESTS = Path(__file__).parent


@pytest.mark.parametrize("device,local,ranks,want", [
    ("cuda", 0, 1, "cuda"),
    ("cuda", 1, 2, "cuda:1"),
    ("cuda", 3, 4, "cuda:3"),
    ("cuda:1", 0, 2, "cuda:1"),          # an explicit device is the user's choice
    ("cpu", 1, 2, "cpu"),
    ("cuda:0,cuda:2", 1, 2, "cuda:2"),
    ("cuda:4,5", 1, 2, "cuda:5"),
])
def test_each_rank_takes_its_own_device(monkeypatch, device, local, ranks, want) -> None:
    monkeypatch.setenv("LOCAL_RANK", str(local))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    assert rank_device(device) == want


def test_a_device_list_shorter_than_the_node_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(UsageError, match="lists 2 device"):
        rank_device("cuda:0,cuda:1")


# ----------------------------------------------------------------------------- per-area jobs


def write_classes(path: Path, classes: np.ndarray, col: int = 0, row: int = 0) -> Path:
    names = ["road", "roof", "grass", "tree"]
    transform = rasterio.Affine(0.5, 0, 400000 + col * 0.5, 0, -0.5, 5000000 - row * 0.5)
    with rasterio.open(path, "w", driver="GTiff", height=classes.shape[0], width=classes.shape[1],
                       count=1, dtype="uint8", nodata=255, crs="EPSG:32632", transform=transform) as dst:
        dst.write(classes, 1)
        dst.update_tags(RSSEG_CLASS_NAMES=json.dumps(names))
    return path


def blobs(h: int, w: int) -> np.ndarray:
    noise = ndimage.gaussian_filter(np.random.default_rng(5).random((h, w)), 3)
    return ((noise - noise.min()) / np.ptp(noise) * 3.99).astype(np.uint8)


def normalized(gdf: gpd.GeoDataFrame) -> list[tuple[int, bytes]]:
    return sorted(zip(gdf["class_id"].tolist(), shapely.to_wkb(shapely.normalize(gdf.geometry.to_numpy()))))


def test_per_area_job_outputs_vectorize_into_the_whole_areas_polygons(tmp_path: Path) -> None:
    """Three jobs' class rasters (one with a gap of nodata at its edge) vectorized together give
    exactly the polygons of the one raster they tile: regions crossing job borders are whole."""
    from click.testing import CliRunner

    from rsseg.cli import main

    whole = blobs(90, 120)
    whole[40:50, 0:15] = 255
    write_classes(tmp_path / "whole.tif", whole)
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    write_classes(jobs / "a.tif", whole[:, :50], col=0)
    write_classes(jobs / "b.tif", whole[:45, 50:], col=50)
    write_classes(jobs / "c.tif", whole[45:, 50:], col=50, row=45)
    run = CliRunner().invoke
    r1 = run(main, ["vectorize", str(tmp_path / "whole.tif"), "-o", str(tmp_path / "whole.gpkg"),
                    "--simplify", "0", "-q"])
    r2 = run(main, ["vectorize", str(jobs), "-o", str(tmp_path / "merged.gpkg"), "--simplify", "0", "-q"])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    a = gpd.read_file(tmp_path / "whole.gpkg", layer="whole")
    b = gpd.read_file(tmp_path / "merged.gpkg", layer="merged")
    assert normalized(a) == normalized(b)
    assert b["class_name"].isin(["road", "roof", "grass", "tree"]).all()
    border = shapely.LineString([(400000 + 25, 0), (400000 + 25, 1e7)])
    assert shapely.crosses(b.geometry.to_numpy(), border).sum() >= 3


# ----------------------------------------------------------------------------- two nodes

_NODE_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from rsseg.cli import main
main({args!r})
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_predict_a_mosaic_like_one_process(tmp_path: Path) -> None:
    """`torchrun --nnodes 2` (two launches on this machine, gloo, static rendezvous): the mosaic's
    class raster and polygons equal a single process's."""
    from click.testing import CliRunner

    import torch

    from rsseg import create_model
    from rsseg.bundle import save_bundle
    from rsseg.cli import main

    from test_mosaic import cut, smooth_scene
    from test_predict import spec_meta

    torch.manual_seed(0)
    bundle = tmp_path / "model.safetensors"
    save_bundle(bundle, create_model("unet-r18", num_classes=4, in_channels=3), spec_meta())
    tiles_dir = tmp_path / "tiles"
    tiles_dir.mkdir()
    cut(tiles_dir, smooth_scene(100, 80), rows=[50], cols=[40])
    common = ["--model", str(bundle), "--tile", "32", "--overlap", "8", "--rescale", "none", "-q",
              "--raster"]
    r = CliRunner().invoke(main, ["predict", str(tiles_dir), "-o", str(tmp_path / "one.gpkg"),
                                  *common, str(tmp_path / "one.tif")])
    assert r.exit_code == 0, r.output
    script = tmp_path / "node.py"
    script.write_text(_NODE_SCRIPT.format(tests=str(TESTS), args=[
        "predict", str(tiles_dir), "-o", str(tmp_path / "two.gpkg"), *common, str(tmp_path / "two.tif")]))
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
         str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True) for node in (0, 1)]
    errors = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=300)
            errors.append(err)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-4000:] for e in errors)
    with rasterio.open(tmp_path / "one.tif") as a, rasterio.open(tmp_path / "two.tif") as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
    assert normalized(gpd.read_file(tmp_path / "one.gpkg", layer="one")) == \
        normalized(gpd.read_file(tmp_path / "two.gpkg", layer="two"))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
