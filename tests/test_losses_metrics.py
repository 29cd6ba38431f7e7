"""Loss, metrics, TTA and augmentation against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from rsseg.config import AugmentConfig
from rsseg.data.augment import mosaic, train_transform
from rsseg.train.losses import SegmentationLoss, SoftCrossEntropy
from rsseg.train.metrics import confusion_matrix, convention_text, scores_from_confusion
from rsseg.train.module import SegmentationModule, optimizer_groups
from rsseg.train.tta import predict_probs

IGNORE = 3


def _tiny():
    # 3 classes, 1 image of 1 x 3 pixels; the last pixel is ignored.
    logits = torch.tensor([[[[2.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]], [[-1.0, 0.5, 3.0]]]])
    target = torch.tensor([[[0, 2, IGNORE]]])
    return logits, target


def _hand_soft_ce(logits, target, eps=0.05):
    total, n = 0.0, 0
    for j in range(logits.shape[-1]):
        t = int(target[0, 0, j])
        if t == IGNORE:
            continue
        z = [float(logits[0, c, 0, j]) for c in range(3)]
        lse = math.log(sum(math.exp(v) for v in z))
        logp = [v - lse for v in z]
        total += (1 - eps) * -logp[t] + eps / 3 * sum(-v for v in logp)
        n += 1
    return total / n


def _hand_dice(logits, target, smooth=0.05):
    losses = []
    for c in range(3):
        inter = card = 0.0
        present = False
        for j in range(logits.shape[-1]):
            t = int(target[0, 0, j])
            if t == IGNORE:
                continue
            z = [float(logits[0, k, 0, j]) for k in range(3)]
            p = math.exp(z[c]) / sum(math.exp(v) for v in z)
            y = 1.0 if t == c else 0.0
            present |= t == c
            inter += p * y
            card += p + y
        score = (2 * inter + smooth) / (card + smooth)
        losses.append((1 - score) if present else 0.0)  # absent classes count as 0
    return sum(losses) / 3


def test_soft_ce_equals_hand_computed_value():
    logits, target = _tiny()
    got = SoftCrossEntropy(0.05, IGNORE)(logits, target)
    assert got.item() == pytest.approx(_hand_soft_ce(logits, target), rel=1e-6)


def test_loss_is_soft_ce_plus_dice_plus_weighted_aux():
    logits, target = _tiny()
    loss = SegmentationLoss(IGNORE, smoothing=0.05, dice_smooth=0.05, aux_weight=0.4)
    expected = _hand_soft_ce(logits, target) + _hand_dice(logits, target)
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    aux = torch.tensor([[[[0.3, 0.1, 0.0]], [[1.0, -1.0, 0.0]], [[0.0, 2.0, 0.0]]]])
    with_aux = loss({"out": logits, "aux": [aux]}, target).item()
    assert with_aux == pytest.approx(expected + 0.4 * _hand_soft_ce(aux, target), rel=1e-5)


def test_all_ignored_batch_gives_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = SegmentationLoss(IGNORE)(logits, torch.full((1, 2, 2), IGNORE))
    assert torch.isfinite(loss) and loss.item() == 0.0


def test_model_with_its_own_criterion_is_used():
    class Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x)

        def compute_loss(self, outputs, target, ignore_index):
            return outputs.sum() * 0 + 42.0 + ignore_index

    module = SegmentationModule(Own(), num_classes=3, ignore_index=IGNORE, mean=[0.0] * 3,
                                std=[1.0] * 3, mean_classes=(0, 1, 2))
    x = torch.randn(1, 3, 4, 4)
    assert module.compute_loss(module(x), torch.zeros(1, 4, 4, dtype=torch.long)).item() == 45.0


def test_confusion_matrix_and_scores_equal_hand_counts():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 1]])  # 3 = ignore (num_classes 3)
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    cm = confusion_matrix(pred, target, 3, IGNORE)
    hand = np.array([[1, 1, 0], [0, 2, 1], [1, 0, 1]])  # rows true, cols predicted
    np.testing.assert_array_equal(cm.numpy(), hand)
    s = scores_from_confusion(cm, mean_classes=(0, 1))
    # class 0: TP 1, FP 1, FN 1; class 1: TP 2, FP 1, FN 1; class 2: TP 1, FP 1, FN 1
    np.testing.assert_allclose(s.iou, [1 / 3, 2 / 4, 1 / 3])
    np.testing.assert_allclose(s.f1, [2 / 4, 4 / 6, 2 / 4])
    assert s.oa == pytest.approx(4 / 7)
    assert s.miou == pytest.approx((1 / 3 + 1 / 2) / 2)  # class 2 left out, like ISPRS Clutter
    assert s.mf1 == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_class_absent_everywhere_is_left_out_of_the_means():
    cm = np.array([[5, 0, 0], [1, 4, 0], [0, 0, 0]])
    s = scores_from_confusion(cm)
    assert math.isnan(s.iou[2])
    assert s.miou == pytest.approx((5 / 6 + 4 / 5) / 2)
    assert "without clutter" in convention_text(("a", "b", "clutter"), (0, 1))


class _Asymmetric(nn.Module):
    """Not flip-invariant: logits depend on the column index."""

    def forward(self, x):
        ramp = torch.arange(x.shape[-1], dtype=x.dtype).expand_as(x[:, :1])
        return torch.cat([x[:, :1] * ramp, x[:, 1:2], -x[:, :1]], dim=1)


def test_flip_tta_averages_the_logits_of_geosegs_four_views():
    """GeoSeg's 'lr' TTA: every combination of horizontal and vertical flip; logits averaged
    (ttach's merge), softmax after."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    m = _Asymmetric()
    views = [m(x), m(x.flip(-1)).flip(-1), m(x.flip(-2)).flip(-2), m(x.flip(-1).flip(-2)).flip(-2).flip(-1)]
    expected = (sum(views) / 4).softmax(1)
    torch.testing.assert_close(predict_probs(m, x, "flip"), expected)


def test_d4_tta_of_an_equivariant_model_is_the_plain_prediction():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1)  # 1x1 convolution commutes with flips and rotations
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(predict_probs(conv, x, "d4"), conv(x).softmax(1), atol=1e-6, rtol=1e-5)
    ms = predict_probs(conv, torch.randn(1, 3, 64, 64), "ms")
    assert ms.shape == (1, 4, 64, 64)
    torch.testing.assert_close(ms.sum(1), torch.ones(1, 64, 64))


def test_augmentations_move_image_and_label_together():
    torch.manual_seed(0)
    ignore = 6
    mask = torch.randint(0, 6, (48, 48))
    image = torch.stack([mask.float() * 10, mask.float(), torch.zeros(48, 48)])
    cfg = AugmentConfig(scales=(1.0,), mosaic_p=0.0)
    for _ in range(5):
        img, lab = train_transform(image, mask, cfg, crop_size=32, ignore_index=ignore)
        assert img.shape == (3, 32, 32) and lab.shape == (32, 32)
        assert torch.equal(img[0], lab.float() * 10)
    # Larger crop than the sample: padding is ignore in the label and 0 in the image.
    img, lab = train_transform(image, mask, cfg, crop_size=64, ignore_index=ignore)
    assert (lab == ignore).sum() == 64 * 64 - 48 * 48
    assert torch.all(img[0][lab == ignore] == 0)
    # Mosaic of four samples keeps each pixel's label with its image value.
    parts = [(image + k, mask) for k in range(4)]
    img, lab = mosaic(parts, ignore)
    offsets = img[0] - lab.float() * 10
    assert set(offsets.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert len(offsets.unique()) == 4
    # Rescaling: labels by nearest neighbour stay valid class indices.
    img, lab = train_transform(image, mask, AugmentConfig(scales=(0.5,), mosaic_p=0.0), 16, ignore)
    assert set(lab.unique().tolist()) <= set(range(6))


def test_backbone_parameters_are_split_by_name_prefix():
    model = nn.Module()
    model.encoder = nn.Linear(2, 2)
    model.backbone = nn.Linear(2, 2)
    model.head = nn.Linear(2, 2)
    groups = optimizer_groups(model, lr=1.0, backbone_lr=0.1, weight_decay=0.0)
    backbone = [p for g in groups if g["name"].startswith("backbone") for p in g["params"]]
    rest = [p for g in groups if g["name"].startswith("head") for p in g["params"]]
    assert {id(p) for p in backbone} == {id(p) for p in (*model.encoder.parameters(), *model.backbone.parameters())}
    assert {id(p) for p in rest} == {id(p) for p in model.head.parameters()}
    assert all(g["lr"] == (0.1 if g["name"].startswith("backbone") else 1.0) for g in groups)


def test_low_resolution_aux_logits_are_upsampled_to_the_label_size():
    torch.manual_seed(0)
    main = torch.randn(2, 3, 8, 8)
    aux = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 8, 8))
    loss = SegmentationLoss(IGNORE)
    up = torch.nn.functional.interpolate(aux, size=(8, 8), mode="bilinear", align_corners=False)
    expected = loss(main, target) + 0.4 * SoftCrossEntropy(0.05, IGNORE)(up, target)
    torch.testing.assert_close(loss({"out": main, "aux": aux}, target), expected)
