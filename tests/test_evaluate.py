"""rsseg eval's protocol record, --compare-paper, LoveDA split naming and the LoveDA submission."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from _fake_layouts import make_loveda
from rsseg.data.prepare import prepare_dataset, read_manifest, split_names_of
from rsseg.data.specs import get_spec
from rsseg.errors import DataError
from rsseg.train.evaluate import EvalResult, evaluate, window_probs
from rsseg.train.paper_scores import comparison_text, paper_score


def _loveda_bundle(tmp_path, seed: int = 0):
    from rsseg.bundle import BundleMeta, save_bundle
    from rsseg.models.registry import create_model

    spec = get_spec("loveda")
    torch.manual_seed(seed)
    model = create_model("unet-r18", spec.num_classes, 3).eval()
    meta = BundleMeta(
        model_name="unet-r18", class_names=list(spec.classes),
        class_colors=[list(c) for c in spec.colors], ignore_index=spec.ignore_index,
        bands=[1, 2, 3], band_names=["R", "G", "B"], mean=list(spec.mean), std=list(spec.std),
        patch_size=64, gsd_m=spec.gsd_m, dataset="loveda",
    )
    path = save_bundle(tmp_path / "loveda.safetensors", model, meta)
    return path, model, meta


@pytest.fixture(scope="module")
def loveda(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loveda")
    make_loveda(tmp / "raw", counts={"Train": 3, "Val": 2, "Test": 3}, size=64)
    with pytest.warns(Warning):  # pixel coordinates (no CRS) are reported
        prepared = prepare_dataset("loveda", tmp / "raw", tmp / "prepared", patch=64, progress=False)
    bundle, model, meta = _loveda_bundle(tmp)
    return {"raw": tmp / "raw", "prepared": prepared, "bundle": bundle, "model": model, "meta": meta}


def test_eval_json_carries_the_protocol_and_names_lovedas_official_val(loveda, tmp_path):
    from rsseg.commands.infer import eval_cmd

    out = tmp_path / "scores.json"
    res = CliRunner().invoke(eval_cmd, ["--model", str(loveda["bundle"]), "--dataset", "loveda",
                                        "--data", str(loveda["prepared"]), "--tta", "ms",
                                        "--json", str(out), "--compare-paper"])
    assert res.exit_code == 0, res.output
    assert "loveda official Val (rsseg split 'test')" in res.output
    assert "no published figure for this dataset" in res.output  # unet-r18 is in no seed paper
    scores = json.loads(out.read_text())
    assert scores["split"] == "test" and scores["split_name"] == "official Val"
    protocol = scores["protocol"]
    assert protocol["tta"]["mode"] == "ms" and protocol["tta"]["views"] == 8  # loveda_test.py set
    assert protocol["tta"]["scales"] == [0.75, 1.0, 1.25, 1.5]
    assert protocol["tta"]["interpolation"] == "bicubic" and "loveda_test.py" in protocol["tta"]["source"]
    assert protocol["metric"]["mean_classes"] == list(get_spec("loveda").classes)  # all 7
    assert protocol["metric"]["left_out_of_means"] == []
    assert protocol["split"]["name"] == "official Val" and protocol["split"]["patches"] == 2
    assert scores["paper"] is None
    # Each official Val image is one 64 x 64 patch; its 16 no-data pixels are not counted.
    assert scores["pixels"] == 2 * (64 * 64 - 16)


def test_eval_scores_equal_the_window_probabilities_argmax(loveda):
    """The confusion matrix is built from exactly the window TTA predict uses."""
    result = evaluate(loveda["bundle"], "loveda", loveda["prepared"], "test", "flip")
    manifest = read_manifest(loveda["prepared"])
    from rsseg.data.patches import PatchDataset

    data = PatchDataset(loveda["prepared"], "test")
    meta, model = loveda["meta"], loveda["model"]
    mean = torch.tensor(meta.mean).view(1, -1, 1, 1)
    std = torch.tensor(meta.std).view(1, -1, 1, 1)
    correct = total = 0
    for i in range(len(data)):
        sample = data[i]
        with torch.no_grad():
            pred = window_probs(model, (sample["image"][None] - mean) / std, "flip", "loveda").argmax(1)[0]
        valid = sample["mask"] != manifest["ignore_index"]
        correct += int((pred[valid] == sample["mask"][valid]).sum())
        total += int(valid.sum())
    assert result.pixels == total
    assert result.oa == pytest.approx(correct / total)
    assert result.tta_protocol["views"] == 4


def test_old_prepared_folders_are_read_or_refused_in_one_line(loveda):
    manifest = read_manifest(loveda["prepared"])
    assert manifest["split_names"]["test"] == "official Val"
    old = {k: v for k, v in manifest.items() if k != "split_names"}  # before this field existed
    assert split_names_of(old)["test"] == "official Val"
    wrong = dict(old, splits=dict(old["splits"], test=["train-urban-0"]))
    with pytest.raises(DataError, match="run rsseg prepare --dataset loveda again") as err:
        split_names_of(wrong)
    assert "\n" not in str(err.value)


def _result(model: str, dataset: str, miou: float, mf1: float, oa: float) -> EvalResult:
    spec = get_spec(dataset)
    n = spec.num_classes
    return EvalResult(
        dataset=dataset, split="test", tta="ms", bundle="x.safetensors",
        class_names=list(spec.classes), confusion=np.eye(n), iou=[miou] * n, f1=[mf1] * n,
        precision=[1.0] * n, recall=[1.0] * n, miou=miou, mf1=mf1, oa=oa,
        mean_classes=list(spec.mean_class_indices), convention="c", patches=1, pixels=n,
        model_name=model, split_name=spec.split_name("test"),
    )


def test_compare_paper_prints_mafmambas_published_figures(monkeypatch, tmp_path):
    from rsseg.commands import infer

    monkeypatch.setattr("rsseg.train.evaluate.evaluate",
                        lambda *a, **k: _result("mafmamba", "vaihingen", 0.8412, 0.9101, 0.9322))
    out = tmp_path / "s.json"
    res = CliRunner().invoke(infer.eval_cmd, ["--model", str(tmp_path / "m.safetensors"),
                                              "--compare-paper", "--json", str(out)])
    assert res.exit_code == 0, res.output
    paper_row = next(line for line in res.output.splitlines() if line.startswith("paper "))
    ours_row = next(line for line in res.output.splitlines() if line.startswith("ours "))
    assert paper_row.split()[1:] == ["85.09", "91.79", "93.66"]
    assert ours_row.split()[1:] == ["84.12", "91.01", "93.22"]
    assert json.loads(out.read_text())["paper"]["miou"] == 85.09


def test_published_table():
    assert (paper_score("mafmamba", "potsdam").miou, paper_score("mafmamba", "potsdam").mf1,
            paper_score("mafmamba", "potsdam").oa) == (86.89, 92.83, 91.35)
    loveda = paper_score("mafmamba", "loveda")
    assert loveda.miou == 53.46 and loveda.mf1 is None
    text = comparison_text("mafmamba", "loveda", 0.5, 0.6, 0.7)
    assert "53.46" in text and "n/a" in text and "official Val" in text  # not the same images
    for model in ("segret-t", "reload-mamba", "segman-v2-s", "mafmamba-tiny"):
        assert "no published figure for this dataset" in comparison_text(model, "vaihingen", 0.5, 0.5, 0.5)


def test_loveda_submission_layout(loveda, tmp_path):
    from rsseg.commands.infer import predict

    out = tmp_path / "sub" / "loveda_test.zip"
    res = CliRunner().invoke(predict, [str(loveda["raw"]), "-o", str(out), "--format", "loveda",
                                       "--model", str(loveda["bundle"]), "--tta", "flip", "-q"])
    assert res.exit_code == 0, res.output
    test_images = sorted((loveda["raw"] / "Test").glob("*/images_png/*.png"))
    assert {p.parent.parent.name for p in test_images} == {"Urban", "Rural"}
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
    # One PNG per official Test image, same file name, at the archive's root (no folder).
    assert sorted(names) == sorted(p.name for p in test_images)
    meta, model = loveda["meta"], loveda["model"]
    mean = torch.tensor(meta.mean).view(1, -1, 1, 1)
    std = torch.tensor(meta.std).view(1, -1, 1, 1)
    for image_path in test_images:
        with Image.open(out.with_suffix("") / image_path.name) as png:
            assert png.mode == "L"
            written = np.asarray(png)
        rgb = np.array(Image.open(image_path).convert("RGB")).transpose(2, 0, 1)
        with torch.no_grad():
            x = (torch.from_numpy(rgb).float()[None] - mean) / std
            expected = window_probs(model, x, "flip", "loveda").argmax(1)[0].numpy()
        assert written.shape == rgb.shape[1:]
        # Class indices 0..6 (background .. agriculture), not the mask codes 1..7.
        np.testing.assert_array_equal(written, expected)
        assert written.max() <= 6
    # A second run refuses to overwrite, in one line.
    again = CliRunner().invoke(predict, [str(loveda["raw"]), "-o", str(out), "--format", "loveda",
                                         "--model", str(loveda["bundle"])])
    assert again.exit_code != 0 and "--overwrite" in str(again.exception)


def test_loveda_submission_refuses_a_non_loveda_bundle(loveda, tmp_path):
    from rsseg.bundle import read_bundle_meta
    from rsseg.errors import BundleError
    from rsseg.inference.loveda_submission import check_loveda_bundle

    meta = read_bundle_meta(loveda["bundle"])
    meta.class_names = list(get_spec("vaihingen").classes) + ["x"]
    with pytest.raises(BundleError, match="LoveDA's classes"):
        check_loveda_bundle(meta)


def test_loveda_test_images_are_found_in_test_zip(tmp_path):
    from rsseg.data.layouts import find_loveda_test_images

    make_loveda(tmp_path / "raw", counts={"Train": 2, "Test": 3}, size=16, zipped=True)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["Test.zip", "Train.zip"]
    images = find_loveda_test_images(tmp_path / "raw", tmp_path / "work")
    assert [p.name for p in images] == ["2.png", "3.png", "4.png"]  # Train images 0, 1 left out
    assert all(p.parent.name == "images_png" and p.parent.parent.parent.name == "Test" for p in images)
    with pytest.raises(DataError, match="no LoveDA Test images"):
        find_loveda_test_images(tmp_path / "work", tmp_path / "work2")
