"""GPU readiness checked on the CPU (issue 18 item 2): mixed precision with the selective scan in
float32, Lightning's precision choice, channels-last, pinned/non-blocking transfers, read-ahead
and torch.compile. What only a GPU can show (speed, real pinned copies) is in docs/gpu.md."""

from __future__ import annotations

import copy
import inspect
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from torch import nn

import rsseg.models.ssm.scan as scan_module
from rsseg.accel import compile_model, compile_unavailable_reason, to_channels_last, uses_pinned_transfer
from rsseg.config import TrainConfig
from rsseg.errors import UsageError
from rsseg.inference import predict as predict_module
from rsseg.inference.predict import InputSpec, PredictOptions, predict_scene
from rsseg.models.registry import create_model
from rsseg.train.fit import compute_device, select_precision
from rsseg.train.module import SegmentationModule

from _predict_helpers import CLASSES, COLORS, one_torch_thread, per_pixel_model  # noqa: F401

# The paper models at their smallest registered sizes, and the smp baseline; True: the model runs
# Mamba's selective scan (SegRet is a retention network, U-Net a plain CNN).
PAPER_MODELS = {
    "unet-r18": False,
    "mafmamba-tiny": True,
    "reload-mamba": True,
    "segman-v2-n": True,
    "segret-t": False,
}
NUM_CLASSES = 6
SMALL_UNET = dict(encoder_depth=3, decoder_channels=[32, 16, 8])  # configs/cpu-tiny.yaml's U-Net


def _module(name: str) -> SegmentationModule:
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES, 3)
    return SegmentationModule(model, num_classes=NUM_CLASSES, ignore_index=255, mean=[0.0] * 3,
                              std=[1.0] * 3, mean_classes=tuple(range(5)), scheduler="none")


def _batch(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, size, size, generator=g), torch.randint(0, NUM_CLASSES, (2, size, size), generator=g)


class ScanSpy:
    """Wraps ``scan_elementwise`` (every exact scan backend goes through it) and records, per
    call, whether autocast was on when the scan was called, and the dtypes the recurrence itself
    received and whether autocast was still on there."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict] = []
        original = scan_module.scan_elementwise

        def spy(core, u, delta, A, B, C, *rest):
            entry_autocast = torch.is_autocast_enabled("cpu")

            def watched_core(*tensors):
                self.calls.append({
                    "entry_autocast": entry_autocast,
                    "entry_dtypes": (u.dtype, delta.dtype),
                    "core_dtypes": {t.dtype for t in tensors if t is not None},
                    "core_autocast": torch.is_autocast_enabled("cpu"),
                })  # fmt: skip
                return core(*tensors)

            return original(watched_core, u, delta, A, B, C, *rest)

        monkeypatch.setattr(scan_module, "scan_elementwise", spy)


def _matmul_output_dtypes(model: nn.Module) -> tuple[set[torch.dtype], list]:
    """Forward hooks recording the output dtype of every convolution and linear layer."""
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return seen, hooks


# ----------------------------------------------------------------------------- AMP


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_bf16_autocast_training_step_is_finite_close_to_fp32_and_scans_in_fp32(name, monkeypatch):
    # The torch scan: the reference backend, the one every device can run, and (through
    # scan_elementwise) the dtype handling the fused CPU scan shares. The GPU kernels take half
    # inputs themselves and compute in float32 inside (docs/ssm.md).
    monkeypatch.setenv(scan_module.ENV_VAR, "torch")
    spy = ScanSpy(monkeypatch)
    module = _module(name).train()
    reference = copy.deepcopy(module)
    x, y = _batch()

    torch.manual_seed(2)  # same drop-path / dropout draws in both runs
    loss32 = reference.compute_loss(reference(x), y)
    spy.calls.clear()
    dtypes, hooks = _matmul_output_dtypes(module.model)
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.compute_loss(module(x), y)
    for h in hooks:
        h.remove()
    assert torch.bfloat16 in dtypes  # autocast really ran the convolutions / projections in bf16
    loss.backward()

    assert torch.isfinite(loss)
    assert math.isclose(loss.item(), loss32.item(), rel_tol=2e-2), (loss.item(), loss32.item())
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if p.grad is None]
    assert not missing, missing[:5]
    bad = [n for n, p in params if not torch.isfinite(p.grad).all()]
    assert not bad, bad[:5]

    if PAPER_MODELS[name]:
        assert spy.calls, f"{name} never reached the selective scan"
        for call in spy.calls:
            assert call["entry_autocast"]  # the scan was called inside the autocast region...
            assert call["core_dtypes"] == {torch.float32}, call  # ...and the recurrence ran in fp32
            assert not call["core_autocast"]  # with autocast off
    else:
        assert not spy.calls

    optimizer = module.configure_optimizers()
    before = {n: p.detach().clone() for n, p in params}
    optimizer.step()
    for n, p in params:
        assert torch.isfinite(p).all(), n
        # AdamW's first step moves an element by about lr * g / (|g| + 1e-8): by ~lr wherever
        # |g| is well above 1e-8 (far below, the move can be under one float32 ulp).
        moved = p.detach() != before[n]
        assert moved[p.grad.abs() > 1e-6].all(), n


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_bf16_autocast_gradients_point_where_fp32_ones_do(name, monkeypatch):
    # Eval mode (BatchNorm on running statistics, no drop-path): in training mode at random init
    # with batch 2, batch statistics make the gradients of the weights before every BatchNorm
    # chaotic in any precision, so only the loss is compared there.
    monkeypatch.setenv(scan_module.ENV_VAR, "torch")
    module = _module(name).eval()
    reference = copy.deepcopy(module)
    x, y = _batch()
    reference.compute_loss(reference(x), y).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.compute_loss(module(x), y)
    loss.backward()
    g32 = torch.cat([p.grad.flatten() for p in reference.parameters() if p.grad is not None])
    g16 = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    assert g32.shape == g16.shape
    cosine = torch.nn.functional.cosine_similarity(g32, g16, dim=0).item()
    # Measured 0.89 (segman-v2-n: bf16 noise in its attention logits reaches the stem biases) to
    # 1.0. This guards the custom backwards of the whole network under mixed dtypes; it cannot
    # see a wrong scan backward: at random init the scan parameters' gradients are ~1e-10 (checked:
    # flipping the sign of d(delta) leaves the cosine unchanged). tests/test_scan.py covers that.
    assert cosine > 0.8, cosine


def test_lightning_bf16_mixed_runs_the_training_step_under_bf16_autocast(monkeypatch):
    """The whole LightningModule path (training_step, Lightning's precision plugin, the
    optimizer step) with "bf16-mixed" on the CPU, on a Mamba model with the default scan."""
    import lightning as L

    module = _module("mafmamba-tiny")
    x, y = _batch()
    data = [{"image": x[i], "mask": y[i]} for i in range(2)]
    seen: list[tuple[bool, torch.dtype]] = []
    module.model.register_forward_pre_hook(
        lambda _m, _a: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
    losses: list[float] = []

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Capture()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notes on workers and the small dataset
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    assert seen == [(True, torch.bfloat16)]
    assert len(losses) == 1 and math.isfinite(losses[0])
    changed = [n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) > len(before) // 2
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("cuda,bf16,accelerator,configured,expected", [
    (True, True, "auto", None, "bf16-mixed"),  # Ampere and later: bf16, no loss scaling
    (True, True, "gpu", None, "bf16-mixed"),
    (True, False, "auto", None, "16-mixed"),  # V100 / T4: fp16 tensor cores, GradScaler
    (True, False, "cuda", None, "16-mixed"),
    (True, True, "cpu", None, "32-true"),  # a CPU run on a GPU machine
    (False, False, "auto", None, "32-true"),
    (True, True, "auto", "32-true", "32-true"),  # the config's choice always wins
    (False, False, "cpu", "bf16-mixed", "bf16-mixed"),
])  # fmt: skip
def test_select_precision(monkeypatch, cuda, bf16, accelerator, configured, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    cfg = TrainConfig(accelerator=accelerator, precision=configured)
    assert select_precision(cfg) == expected


def test_compute_device_follows_the_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compute_device(TrainConfig(accelerator="auto")) == "cuda"
    assert compute_device(TrainConfig(accelerator="gpu")) == "cuda"
    assert compute_device(TrainConfig(accelerator="cpu")) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_device(TrainConfig(accelerator="auto")) in ("cpu", "mps")


# ----------------------------------------------------------------------------- transfers


def test_pinned_non_blocking_transfers_are_chosen_only_for_cuda_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert uses_pinned_transfer("cuda") and uses_pinned_transfer("cuda:1")
    assert uses_pinned_transfer(torch.device("cuda", 0))
    assert not uses_pinned_transfer("cpu") and not uses_pinned_transfer(torch.device("cpu"))
    assert not uses_pinned_transfer("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not uses_pinned_transfer("cuda")  # pin_memory would fail without a CUDA runtime


def write_scene(path: Path, h: int, w: int, seed: int = 0) -> Path:
    data = np.random.default_rng(seed).integers(1, 256, (3, h, w)).astype(np.uint8)
    profile = dict(driver="GTiff", height=h, width=w, count=3, dtype="uint8", nodata=0, crs="EPSG:32618",
                   transform=rasterio.Affine(0.5, 0, 500000, 0, -0.5, 4000000))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def spec() -> InputSpec:
    return InputSpec(bands=[1, 2, 3], mean=[100.0] * 3, std=[50.0] * 3, class_names=CLASSES,
                     class_colors=COLORS)


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def test_the_reader_keeps_two_batches_ready_while_the_model_runs(tmp_path, monkeypatch):
    # One window per row: every batch is followed by a row-end mark in the read-ahead queue, the
    # case where a two-item queue held a single batch.
    scene = write_scene(tmp_path / "s.tif", 16 * 8, 16)
    reads = []
    original = predict_module._SceneReader.read
    monkeypatch.setattr(predict_module._SceneReader, "read",
                        lambda self, w: (reads.append(w), original(self, w))[1])

    class WaitsOnFirstBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = per_pixel_model()
            self.reads_seen: list[int] = []

        def forward(self, x):
            if not self.reads_seen:  # give the reader up to 10 s to run ahead
                deadline = time.monotonic() + 10
                while len(reads) < 3 and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(0.2)  # and a moment to read past that, if it could
            self.reads_seen.append(len(reads))
            return self.net(x)

    model = WaitsOnFirstBatch()
    predict_scene(scene, model, spec(), tmp_path / "c.tif", None,
                  PredictOptions(tile=16, overlap=0, batch_size=1, progress=False))
    # While batch 1 ran, batches 2 and 3 were read and queued with their row marks (the queue
    # is then full: the reader waits to hand over row 3's mark before reading row 4).
    assert model.reads_seen[0] == 3
    assert len(model.reads_seen) == 8


# ----------------------------------------------------------------------------- channels-last


def _predict_twice(tmp_path: Path, model: nn.Module, **changed) -> tuple[np.ndarray, ...]:
    scene = write_scene(tmp_path / "s.tif", 96, 160, seed=3)
    out = []
    for tag, extra in (("plain", {}), ("changed", changed)):
        options = PredictOptions(tile=64, overlap=32, batch_size=2, progress=False, **extra)
        predict_scene(scene, model, spec(), tmp_path / f"c_{tag}.tif", tmp_path / f"p_{tag}.tif", options)
        out += [read(tmp_path / f"c_{tag}.tif"), read(tmp_path / f"p_{tag}.tif")]
    return tuple(out)


@pytest.mark.parametrize("name,cfg", [("unet-r18", SMALL_UNET), ("mafmamba-tiny", {})])
def test_channels_last_predictions_equal_the_default_layout(tmp_path, name, cfg):
    torch.manual_seed(0)
    model = create_model(name, len(CLASSES), 3, **cfg)
    classes, conf, classes_cl, conf_cl = _predict_twice(tmp_path, model, channels_last=True)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # the option took effect
    np.testing.assert_array_equal(classes_cl, classes)
    np.testing.assert_allclose(conf_cl, conf, rtol=1e-5, atol=1e-6)


def test_channels_last_training_forward_feeds_nhwc_and_matches(monkeypatch):
    plain = _module("unet-r18").train()
    nhwc = copy.deepcopy(plain)
    nhwc.channels_last = True
    nhwc.model.to(memory_format=torch.channels_last)
    layouts: list[bool] = []
    nhwc.model.register_forward_pre_hook(
        lambda _m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    x, y = _batch()
    losses = []
    for module in (plain, nhwc):
        loss = module.compute_loss(module(x), y)
        loss.backward()
        losses.append(loss.item())
    assert layouts == [True]
    assert math.isclose(losses[0], losses[1], rel_tol=1e-5)
    for (n, a), b in zip(plain.named_parameters(), nhwc.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_a_channels_last_training_run_feeds_nhwc_batches_and_saves_a_normal_bundle(tmp_path, monkeypatch):
    from _fake_layouts import make_vaihingen
    from rsseg.bundle import load_bundle
    from rsseg.config import AugmentConfig
    from rsseg.data.prepare import prepare_dataset
    from rsseg.train import module as module_file
    from rsseg.train.fit import train

    make_vaihingen(tmp_path / "raw", size=(128, 128))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_dataset("vaihingen", tmp_path / "raw", tmp_path / "prepared", patch=64, progress=False)
    converted: list[bool] = []

    def watched(x):
        y = to_channels_last(x)
        converted.append(y.is_contiguous(memory_format=torch.channels_last))
        return y

    monkeypatch.setattr(module_file, "to_channels_last", watched)
    cfg = TrainConfig(dataset="vaihingen", data_dir=str(prepared), patch_size=64, crop_size=64, model="unet-r18",
                      model_cfg=SMALL_UNET, pretrained=None, max_steps=2, epochs=1, batch_size=4, scheduler="none",
                      workers=0, output_dir=str(tmp_path / "runs"), progress=False, limit_val_batches=1,
                      augment=AugmentConfig(scales=(1.0,), mosaic_p=0.0), channels_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(cfg)
    assert len(converted) >= 3 and all(converted)  # 2 training steps and the validation batch
    model, meta = load_bundle(result.bundle_path)
    assert meta.extra["train_config"]["channels_last"] is True
    x = torch.randn(1, 3, 64, 64)
    assert model(x).shape == (1, len(meta.class_names), 64, 64)


def test_to_channels_last_changes_only_4d_layouts():
    x = torch.randn(2, 3, 4, 5)
    y = to_channels_last(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, x)
    v = torch.randn(2, 3, 4)
    assert to_channels_last(v) is v


# ----------------------------------------------------------------------------- torch.compile


def _inductor_reason() -> str | None:
    return compile_unavailable_reason("cpu")


@pytest.mark.skipif(_inductor_reason() is not None, reason=f"inductor cannot build here: {_inductor_reason()}")
def test_compiled_unet_predicts_like_eager(tmp_path):
    # 96 x 160 at tile 64 / overlap 32 is 2 rows of 4 full windows, batches of 2: one input shape,
    # so one compilation (about 30 s on one core).
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = create_model("unet-r18", len(CLASSES), 3, **SMALL_UNET)
    graphs_before = counters["stats"]["unique_graphs"]
    classes, conf, classes_c, conf_c = _predict_twice(tmp_path, model, compile=True)
    assert counters["stats"]["unique_graphs"] > graphs_before  # dynamo did capture the network
    np.testing.assert_array_equal(classes_c, classes)
    np.testing.assert_allclose(conf_c, conf, rtol=1e-4, atol=1e-5)


def test_a_missing_cpp_compiler_is_a_one_line_usage_error():
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"cpp.cxx": ("rsseg-test-no-such-compiler",)}), pytest.raises(UsageError) as err:
        compile_model(per_pixel_model(), "cpu")
    message = str(err.value)
    assert "\n" not in message and "C++ compiler" in message and "cpu" in message


def test_compile_on_cuda_without_triton_says_so(monkeypatch):
    import torch.utils._triton as triton_utils

    monkeypatch.setattr(triton_utils, "has_triton", lambda: False)
    with pytest.raises(UsageError, match="triton"):
        compile_model(per_pixel_model(), "cuda")


def test_a_compiler_failure_during_prediction_is_a_one_line_usage_error(tmp_path, monkeypatch):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("simulated: the C++ compiler crashed\nwith a long log")

    import rsseg.accel

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend=broken_backend))
    monkeypatch.setattr(rsseg.accel, "compile_unavailable_reason", lambda device: None)  # any machine
    scene = write_scene(tmp_path / "s.tif", 32, 32)
    with pytest.raises(UsageError) as err:
        predict_scene(scene, per_pixel_model(), spec(), tmp_path / "c.tif", None,
                      PredictOptions(tile=32, overlap=0, compile=True, progress=False))
    assert "\n" not in str(err.value) and "--compile" in str(err.value)
    assert not (tmp_path / "c.tif").exists()


def test_compile_network_keeps_the_checkpoint_keys():
    module = _module("unet-r18")
    keys = list(module.state_dict())
    module.compile_network("cpu")  # compilation itself waits for the first call
    assert list(module.state_dict()) == keys
    assert module.__dict__["_compiled"]._orig_mod is module.model


# ----------------------------------------------------------------------------- on a GPU (-m cuda)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_prediction_through_pinned_memory_matches_the_cpu(tmp_path, monkeypatch, channels_last):
    pins: list[bool] = []
    original = predict_module._batches

    def watched(*args, **kwargs):
        pins.append(inspect.signature(original).bind(*args, **kwargs).arguments.get("pin", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(predict_module, "_batches", watched)
    torch.manual_seed(0)
    model = create_model("unet-r18", len(CLASSES), 3, **SMALL_UNET)
    scene = write_scene(tmp_path / "s.tif", 96, 160, seed=3)
    results = []
    for device in ("cpu", "cuda"):
        options = PredictOptions(tile=64, overlap=32, batch_size=2, device=device, progress=False,
                                 channels_last=channels_last and device == "cuda")
        predict_scene(scene, model, spec(), tmp_path / f"c_{device}.tif", tmp_path / f"p_{device}.tif", options)
        results.append((read(tmp_path / f"c_{device}.tif"), read(tmp_path / f"p_{device}.tif")))
    assert pins == [False, True]
    (classes_cpu, conf_cpu), (classes_gpu, conf_gpu) = results
    # cuDNN may use TF32 for float32 convolutions: probabilities agree to ~1e-3, and classes
    # everywhere but at near-ties.
    np.testing.assert_allclose(conf_gpu, conf_cpu, atol=5e-3)
    assert (classes_gpu == classes_cpu).mean() > 0.99


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", ["mafmamba-tiny", "segman-v2-n"])
def test_cuda_bf16_autocast_training_step_is_finite_and_close_to_fp32(name):
    """The GPU scan backends (mamba-ssm or Triton) under autocast: they take the bf16 projections
    as they come and compute in float32 inside (docs/ssm.md)."""
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    module = _module(name).train().cuda()
    reference = copy.deepcopy(module)
    x, y = (t.cuda() for t in _batch())
    torch.manual_seed(2)
    loss32 = reference.compute_loss(reference(x), y)
    torch.manual_seed(2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = module.compute_loss(module(x), y)
    loss.backward()
    assert torch.isfinite(loss) and math.isclose(loss.item(), loss32.item(), rel_tol=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
