"""Model bundles: bit-identical round trips, and refusal of anything altered or inconsistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rsseg
from rsseg.bundle import (
    BundleMeta,
    _canonical,
    _checksum,
    _tensor_digest,
    load_bundle,
    read_bundle_meta,
    save_bundle,
)
from rsseg.data.specs import get_spec
from rsseg.errors import BundleError


def _meta(**overrides) -> BundleMeta:
    spec = get_spec("vaihingen")
    fields = dict(
        model_name="unet-r18",
        class_names=list(spec.classes),
        class_colors=[list(c) for c in spec.colors],
        ignore_index=spec.ignore_index,
        bands=[1, 2, 3],
        band_names=["NIR", "R", "G"],
        mean=list(spec.mean),
        std=list(spec.std),
        patch_size=1024,
        gsd_m=0.09,
        dataset="vaihingen",
    )
    fields.update(overrides)
    return BundleMeta(**fields)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = rsseg.create_model("unet-r18", 6, 3).eval()
    # Non-trivial BatchNorm statistics, so the round trip covers buffers too.
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    model.eval()
    path = tmp_path_factory.mktemp("bundle") / "model.safetensors"
    save_bundle(path, model, _meta())
    return path, model


def _rewrite(src: Path, dst: Path, edit_document=None, edit_tensors=None, fix_checksum=False) -> Path:
    """Copy a bundle while altering its metadata and/or tensors (optionally re-signing it)."""
    tensors = load_file(str(src))
    with safe_open(str(src), framework="pt") as handle:
        document = json.loads(handle.metadata()["rsseg"])
    if edit_document:
        edit_document(document)
    if edit_tensors:
        edit_tensors(tensors)
    if fix_checksum:
        document["checksum"] = _checksum(_canonical(document["meta"]), _tensor_digest(tensors))
    save_file(tensors, str(dst), metadata={"rsseg": json.dumps(document)})
    return dst


def test_round_trip_is_bit_identical(saved) -> None:
    path, model = saved
    loaded, meta = load_bundle(path)
    assert not loaded.training
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert meta == read_bundle_meta(path)
    assert meta.num_classes == 6 and meta.in_channels == 3 and meta.rsseg_version == rsseg.__version__
    assert meta.class_colors[1] == [0, 0, 255] and meta.gsd_m == 0.09


def test_save_leaves_no_temporary_file(saved) -> None:
    path, _ = saved
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_altered_metadata_is_refused(saved, tmp_path) -> None:
    def rename_class(doc):
        doc["meta"]["class_names"][0] = "road"

    bad = _rewrite(saved[0], tmp_path / "meta.safetensors", edit_document=rename_class)
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(bad)


def test_altered_weights_are_refused(saved, tmp_path) -> None:
    def nudge(tensors):
        tensors["segmentation_head.0.bias"][0] += 1e-3

    bad = _rewrite(saved[0], tmp_path / "weights.safetensors", edit_tensors=nudge)
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(bad)


def test_flipped_byte_is_refused(saved, tmp_path) -> None:
    data = bytearray(saved[0].read_bytes())
    data[-100] ^= 0xFF
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(bad)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "not a readable"), (b"not a safetensors file at all", "not a readable")],
)
def test_garbage_is_refused(tmp_path, content: bytes, message: str) -> None:
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(content)
    with pytest.raises(BundleError, match=message):
        load_bundle(bad)


def test_truncated_file_is_refused(saved, tmp_path) -> None:
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(saved[0].read_bytes()[:5000])
    with pytest.raises(BundleError):
        load_bundle(bad)


def test_missing_file_and_plain_safetensors(tmp_path) -> None:
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "absent.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(BundleError, match="without rsseg metadata"):
        load_bundle(plain)


def test_unknown_model_is_refused(saved, tmp_path) -> None:
    def rename(doc):
        doc["meta"]["model_name"] = "unet-r34x"

    bad = _rewrite(saved[0], tmp_path / "m.safetensors", edit_document=rename, fix_checksum=True)
    with pytest.raises(BundleError, match="unknown model 'unet-r34x'.*unet-r18"):
        load_bundle(bad)


def test_class_count_against_head(saved, tmp_path) -> None:
    def add_class(doc):
        doc["meta"]["class_names"].append("water")
        doc["meta"]["class_colors"].append([0, 0, 128])
        doc["meta"]["ignore_index"] = 7

    bad = _rewrite(saved[0], tmp_path / "c.safetensors", edit_document=add_class, fix_checksum=True)
    with pytest.raises(BundleError, match="lists 7 classes but the weights' head"):
        load_bundle(bad)


def test_missing_extra_and_misshaped_keys(saved, tmp_path) -> None:
    def drop(tensors):
        del tensors["encoder.layer1.0.bn1.running_mean"]

    def add(tensors):
        tensors["decoder.extra.weight"] = torch.zeros(3)

    def reshape(tensors):
        tensors["encoder.conv1.weight"] = torch.zeros(64, 3, 5, 5)

    cases = [(drop, "lack 1 tensors"), (add, "hold 1 tensors"), (reshape, "has shape")]
    for i, (edit, message) in enumerate(cases):
        bad = _rewrite(saved[0], tmp_path / f"k{i}.safetensors", edit_tensors=edit, fix_checksum=True)
        with pytest.raises(BundleError, match=message):
            load_bundle(bad)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(class_colors=[[0, 0, 0]] * 5), "6 class names but 5 class colours"),
        (dict(ignore_index=3), "ignore_index"),
        (dict(mean=[0.0, 0.0]), "mean must have one entry per band"),
        (dict(std=[1.0, 0.0, 1.0]), "positive"),
        (dict(bands=[0, 1, 2]), "1-based"),
        (dict(class_colors=[[0, 0, 256]] * 6), "0..255"),
    ],
)
def test_inconsistent_metadata_is_refused(overrides, message: str, tmp_path, saved) -> None:
    with pytest.raises(BundleError, match=message):
        save_bundle(tmp_path / "x.safetensors", saved[1], _meta(**overrides))
    assert not any(tmp_path.iterdir())

    def edit(doc):
        doc["meta"].update(overrides)

    bad = _rewrite(saved[0], tmp_path / "y.safetensors", edit_document=edit, fix_checksum=True)
    with pytest.raises(BundleError, match=message):
        load_bundle(bad)


def test_weights_file_is_never_unpickled(saved) -> None:
    # A bundle is a plain safetensors file: its header is JSON and its body raw tensor bytes.
    header_len = int.from_bytes(saved[0].read_bytes()[:8], "little")
    header = json.loads(saved[0].read_bytes()[8 : 8 + header_len])
    assert "rsseg" in header["__metadata__"]


def test_weight_source_options_are_not_kept(tmp_path, saved) -> None:
    # The bundle holds the trained weights; a pretrained-file path in the config would make
    # loading look for that file again (or try the network for "imagenet").
    path = save_bundle(
        tmp_path / "w.safetensors",
        saved[1],
        _meta(model_config={"encoder_weights": "imagenet", "pretrained": "/gone/r18.pth"}),
    )
    assert read_bundle_meta(path).model_config == {}
    load_bundle(path)
