"""The shared reader and strict loader every paper backbone's initial weights go through."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from rsseg.models.checkpoints import CheckpointError, load_state_strict, read_state_dict

SIDE_EFFECTS: list[str] = []


def _record(what: str) -> None:
    SIDE_EFFECTS.append(what)


class Payload:
    """Unpickling this would run code: what a malicious checkpoint does."""

    def __reduce__(self):
        return (_record, ("ran",))


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_released_layouts_unwrap_and_the_rmt_namespace_is_allowed(tmp_path):
    net = _net()
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    for i, wrapped in enumerate(({"model": state, "args": argparse.Namespace(lr=1e-3)},
                                 {"state_dict": state, "meta": {"epoch": 3}}, state)):
        path = tmp_path / f"c{i}.pth"
        torch.save(wrapped, path)
        read = read_state_dict(path)
        assert set(read) == set(net.state_dict())  # "module." stripped, wrapper unwrapped
        for k, v in net.state_dict().items():
            torch.testing.assert_close(read[k], v)


def test_a_pickled_object_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _net().state_dict(), "x": Payload()}, path)
    SIDE_EFFECTS.clear()
    with pytest.raises(CheckpointError, match="pickles a Python object") as err:
        read_state_dict(path, what="A2Mamba-S weights")
    assert SIDE_EFFECTS == [] and "\n" not in str(err.value)
    with open(path, "rb") as f:  # the same file unpickled unsafely does run the payload
        torch.load(f, weights_only=False)
    assert SIDE_EFFECTS == ["ran"]


def test_unreadable_files_are_one_line_errors(tmp_path):
    garbage = tmp_path / "g.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        read_state_dict(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "missing.pth")
    nested = tmp_path / "n.pth"
    torch.save({"model": {"a": [1, 2]}}, nested)
    with pytest.raises(CheckpointError, match="not a tensor"):
        read_state_dict(nested)


def test_strict_loading_names_missing_extra_and_misshaped_tensors():
    net = _net()
    good = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in net.state_dict().items()}
    load_state_strict(net, good, what="w")
    for k, v in good.items():
        torch.testing.assert_close(net.state_dict()[k], v)
    missing = dict(good)
    missing.pop("0.weight")
    with pytest.raises(CheckpointError, match=r"1 missing \(0.weight\)"):
        load_state_strict(_net(), missing, what="w")
    extra = {**good, "head.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"1 unexpected \(head.weight\)"):
        load_state_strict(_net(), extra, what="w")
    shaped = {**good, "0.weight": torch.zeros(4, 4, 3, 3)}
    with pytest.raises(CheckpointError, match=r"mis-shaped .*0.weight: file \(4, 4, 3, 3\)"):
        load_state_strict(_net(), shaped, what="w")
    load_state_strict(_net(), missing, what="w", optional=["0.weight"])  # optional keys may lack


def test_safetensors_files_are_read(tmp_path):
    from safetensors.torch import save_file

    net = _net()
    save_file(net.state_dict(), tmp_path / "w.safetensors")
    assert set(read_state_dict(tmp_path / "w.safetensors")) == set(net.state_dict())
