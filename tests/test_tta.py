"""The one TTA module against ttach itself (what GeoSeg's test scripts run), and predict = eval."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from torch import nn

from rsseg.errors import UsageError
from rsseg.train.tta import TTA_MODES, predict_probs, tta_protocol

tta = pytest.importorskip("ttach")


def _small_model(seed: int = 0, classes: int = 5) -> nn.Module:
    """A few convolutions with random weights: neither flip- nor rotation- nor scale-invariant."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU(),
        nn.Conv2d(8, classes, 3, padding=1),
    )
    return model.eval()


# GeoSeg's transforms, written as its test scripts write them (ttach objects).
def _geoseg_transforms(mode: str, dataset: str | None):
    if mode == "flip":  # every *_test.py, --tta lr
        return tta.Compose([tta.HorizontalFlip(), tta.VerticalFlip()])
    if mode == "d4":
        return tta.aliases.d4_transform()
    scales = [0.75, 1.0, 1.25, 1.5]
    if dataset == "loveda":  # loveda_test.py --tta d4
        return tta.Compose([tta.HorizontalFlip(),
                            tta.Scale(scales=scales, interpolation="bicubic", align_corners=False)])
    if dataset == "potsdam":  # potsdam_test.py --tta d4
        return tta.Compose([tta.HorizontalFlip(), tta.VerticalFlip(),
                            tta.Scale(scales=scales, interpolation="bicubic", align_corners=False)])
    # vaihingen_test.py --tta d4
    return tta.Compose([tta.HorizontalFlip(), tta.VerticalFlip(), tta.Rotate90(angles=[90]),
                        tta.Scale(scales=[0.5] + scales, interpolation="bicubic", align_corners=False)])


@pytest.mark.parametrize(
    ("mode", "dataset", "views"),
    [("flip", None, 4), ("d4", None, 8), ("ms", "vaihingen", 40), ("ms", "potsdam", 16),
     ("ms", "loveda", 8)],
)
def test_each_mode_equals_ttach_wrapper_then_softmax(mode, dataset, views):
    model = _small_model()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    protocol = tta_protocol(mode, dataset)
    assert protocol.num_views == views == len(_geoseg_transforms(mode, dataset))
    with torch.no_grad():
        expected = tta.SegmentationTTAWrapper(model, _geoseg_transforms(mode, dataset))(x).softmax(1)
        ours = predict_probs(model, x, mode, dataset)
        plain = model(x).softmax(1)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    # The views matter for this model: TTA is not the plain prediction.
    assert (ours - plain).abs().max() > 1e-3


def test_logits_not_probabilities_are_averaged():
    """ttach merges raw outputs; averaging softmaxes instead gives a measurably different answer."""
    model = _small_model(seed=3)
    torch.manual_seed(2)
    x = torch.randn(1, 3, 32, 32) * 3
    with torch.no_grad():
        ours = predict_probs(model, x, "flip")
        views = [(x, ()), (x.flip(-1), (-1,)), (x.flip(-2), (-2,)), (x.flip(-1).flip(-2), (-2, -1))]
        prob_mean = sum(model(v).softmax(1).flip(d) if d else model(v).softmax(1) for v, d in views) / 4
        logit_mean = sum(model(v).flip(d) if d else model(v) for v, d in views) / 4
    torch.testing.assert_close(ours, logit_mean.softmax(1), rtol=1e-5, atol=1e-6)
    assert (ours - prob_mean).abs().max() > 1e-3


def test_rectangular_input_rotates_without_being_cropped():
    model = _small_model()
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        expected = tta.SegmentationTTAWrapper(model, tta.aliases.d4_transform())(x).softmax(1)
        ours = predict_probs(model, x, "d4")
    assert ours.shape == (1, 5, 32, 64)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_padding_to_the_input_multiple_only_where_scales_need_it():
    ms = tta_protocol("ms", "vaihingen")
    assert ms.input_multiple(32) == 128  # 0.75 x 128 = 96 = 3 x 32
    assert tta_protocol("flip").input_multiple(32) == 32
    assert tta_protocol("ms", "loveda").input_multiple(32) == 128
    model = _small_model()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():  # already a multiple: the size hint changes nothing
        torch.testing.assert_close(predict_probs(model, x, "ms", "vaihingen", size_multiple=32),
                                   predict_probs(model, x, "ms", "vaihingen"))
        small = predict_probs(model, x[..., :40, :72], "ms", "vaihingen", size_multiple=32)
    assert small.shape == (1, 5, 40, 72)
    torch.testing.assert_close(small.sum(1), torch.ones(1, 40, 72))


def test_protocol_description_names_views_scales_and_source():
    d = tta_protocol("ms", "potsdam").describe()
    assert d["views"] == 16 and d["scales"] == [0.75, 1.0, 1.25, 1.5]
    assert d["interpolation"] == "bicubic" and "potsdam_test.py" in d["source"]
    assert "logits" in d["merge"]
    assert tta_protocol("ms", "synthetic").num_views == 40  # Vaihingen's set
    assert tta_protocol(None).describe()["views"] == 1
    assert set(TTA_MODES) == {"none", "flip", "d4", "ms"}
    with pytest.raises(UsageError, match="valid TTAs"):
        tta_protocol("lr")


@pytest.mark.parametrize("mode", ["flip", "d4", "ms"])
def test_predict_and_eval_give_the_same_probabilities_for_one_window(tmp_path, monkeypatch, mode):
    """A 128 x 128 scene predicted as a single window vs the same window in eval's code path."""
    from rsseg.inference.predict import InputSpec, PredictOptions, predict_scene
    from rsseg.train.evaluate import window_probs

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (3, 128, 128)).astype(np.uint8)
    scene = tmp_path / "scene.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=128, height=128, count=3, dtype="uint8",
                       crs="EPSG:32632", transform=from_origin(0, 0, 0.09, 0.09)) as dst:
        dst.write(image)
    spec = InputSpec(bands=[1, 2, 3], mean=[120.0, 110.0, 100.0], std=[50.0, 55.0, 60.0],
                     class_names=[f"c{i}" for i in range(5)], class_colors=[(i, i, i) for i in range(5)],
                     dataset="vaihingen")
    model = _small_model()
    options = PredictOptions(tile=128, overlap=0, batch_size=1, tta=mode, progress=False)
    # The probabilities predict blends for its one window.
    captured = {}
    from rsseg.inference import predict as predict_module

    original = predict_module.predict_probs

    def spy(forward, x, *args, **kwargs):
        captured["probs"] = out = original(forward, x, *args, **kwargs)
        return out

    monkeypatch.setattr(predict_module, "predict_probs", spy)
    predict_scene(scene, model, spec, tmp_path / "out.tif", options=options)
    # Eval's path on the same window: raw bands -> normalise -> window_probs.
    x = (torch.from_numpy(image).float()[None] - torch.tensor(spec.mean).view(1, 3, 1, 1)) \
        / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        eval_probs = window_probs(model, x, mode, "vaihingen")
    torch.testing.assert_close(captured["probs"], eval_probs, rtol=1e-5, atol=1e-6)
    with rasterio.open(tmp_path / "out.tif") as src:
        classes = src.read(1)
    assert np.array_equal(classes, eval_probs[0].argmax(0).numpy())
