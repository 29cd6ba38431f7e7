"""Neighbourhood attention against a brute-force loop over natten's window rule."""

from __future__ import annotations

import math

import pytest
import torch

from rsseg.models.neighborhood_attention import (
    adaptive_dilation,
    neighbourhood_aggregate,
    neighbourhood_attention,
    self_index,
)


def _window(i: int, length: int, kernel: int, dilation: int) -> list[tuple[int, int]]:
    """(neighbour, window step k) pairs for query i, written straight from the rule in DESIGN.md,
    on an axis padded at its end to K * dilation when shorter; padded neighbours are dropped."""
    padded = max(length, kernel * dilation)
    g = i % dilation
    lg = math.ceil((padded - g) / dilation)
    start = g + dilation * min(max(i // dilation - kernel // 2, 0), lg - kernel)
    pairs = [(start + dilation * k, k) for k in range(kernel)]
    return [(nb, k) for nb, k in pairs if nb < length]


def _brute_force(q, k, v, kernel, dilation, rpb):
    """Loop over every query; softmax over its real neighbours with bias on step offsets."""
    b, n, h, w, c = q.shape
    out = torch.zeros_like(v)
    for bi in range(b):
        for hi in range(n):
            for i in range(h):
                for j in range(w):
                    rows = _window(i, h, kernel, dilation[0])
                    cols = _window(j, w, kernel, dilation[1])
                    logits, values = [], []
                    for r, _ in rows:
                        for s, _ in cols:
                            logit = (q[bi, hi, i, j] * k[bi, hi, r, s]).sum()
                            if rpb is not None:
                                dr = r // dilation[0] - i // dilation[0] + kernel - 1
                                ds = s // dilation[1] - j // dilation[1] + kernel - 1
                                logit = logit + rpb[hi, dr, ds]
                            logits.append(logit)
                            values.append(v[bi, hi, r, s])
                    weights = torch.softmax(torch.stack(logits), 0)
                    out[bi, hi, i, j] = (weights[:, None] * torch.stack(values)).sum(0)
    return out


CASES = [
    # (H, W, K, dilation): plain, dilated with borders, L not a multiple of d, L < K*d, L < K
    (7, 9, 3, (1, 1)),
    (9, 8, 3, (2, 3)),
    (10, 11, 3, (3, 2)),
    (10, 5, 3, (4, 2)),
    (4, 6, 5, (1, 1)),
    (3, 2, 5, (1, 2)),
]


@pytest.mark.parametrize("h,w,kernel,dilation", CASES)
def test_matches_brute_force(h, w, kernel, dilation):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, h, w, 4, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(2, 2 * kernel - 1, 2 * kernel - 1, dtype=torch.float64)
    out, attn = neighbourhood_attention(q, k, v, kernel, dilation, rpb)
    expected = _brute_force(q, k, v, kernel, dilation, rpb)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert attn.shape == (2, 2, h, w, kernel * kernel)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, h, w, dtype=torch.float64))


def test_gradients_match_autograd_reference():
    # gradcheck of the hand-written backward passes (qk and av) against finite differences
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 1, 5, 6, 2, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb = torch.randn(1, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, rpb: neighbourhood_attention(q, k, v, 3, (2, 3), rpb)[0],
        (q, k, v, rpb),
        fast_mode=True,
    )


def test_one_hot_self_map_is_identity():
    torch.manual_seed(3)
    h, w, kernel, dil = 9, 7, 3, (3, 2)
    v = torch.randn(2, 3, h, w, 5)
    one_hot = torch.nn.functional.one_hot(self_index(h, w, kernel, dil), kernel * kernel).float()
    attn = one_hot.expand(2, 3, h, w, kernel * kernel)
    torch.testing.assert_close(neighbourhood_aggregate(attn, v, kernel, dil), v)


def test_adaptive_dilation_follows_eq1():
    assert adaptive_dilation(128, 128, 11) == (11, 11)  # stage 1 of a 512 input
    assert adaptive_dilation(64, 30, 9) == (7, 3)
    assert adaptive_dilation(5, 7, 7) == (1, 1)  # smaller than the window: clamped to 1


def test_released_dilation_cap_at_the_kernel():
    # the released model uses min(H // K, K): equal to eq. 1 until a side exceeds K * K
    assert adaptive_dilation(128, 128, 11, max_dilation=11) == (11, 11)
    assert adaptive_dilation(256, 150, 11, max_dilation=11) == (11, 11)
    assert adaptive_dilation(256, 150, 11) == (23, 13)
    assert adaptive_dilation(200, 40, 7, max_dilation=7) == (7, 5)
    assert adaptive_dilation(5, 7, 7, max_dilation=7) == (1, 1)
