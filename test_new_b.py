"""
Tests for issue 8: inpainting must not see the pixels it redraws, and pins on details that mutation testing showed
no other test checks (alignment indices, EMA direction, centre-crop rounding, flip alternation, null class).

    pytest test_new_b.py
"""
import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from data import center_crop
from model import align_targets, inpaint
from test_biflow import TINY, batch, make_flow, make_pair
from train import ema_update


@torch.no_grad()
def test_inpaint_does_not_see_the_redrawn_pixels():
    f, g = make_pair()
    for p in g.parameters():  # a fresh G has zero output layers and would decode every z to the same image
        p.data.normal_(0, 0.1)
    x, y, _, eps = batch()
    redraw = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    redraw[:, :, 2:6, 2:6] = True  # a hole in the middle: kept tokens before and after it in both token orders
    other = torch.where(redraw, torch.randn(4, 3, 8, 8) * 3, x)  # same known pixels, anything in the hole
    noise = torch.randn(4, TINY.num_tokens, TINY.token_dim)
    out, z = inpaint(g, f, x, redraw, y, noise, 1.0, eps)
    out2, z2 = inpaint(g, f, other, redraw, y, noise, 1.0, eps)
    assert torch.equal(z, z2) and torch.equal(out, out2)
    assert not torch.equal(z, noise)  # the kept tokens really come from the image


def test_align_targets_pair_group_g_with_forward_state_T_minus_1_minus_g():
    T = TINY.num_blocks
    traj = [torch.full((2, TINY.num_tokens, TINY.token_dim), float(i)) for i in range(T + 1)]  # x^0 .. x^T = z
    clean = torch.full_like(traj[0], -1.0)
    for denoise, want in [('learned', [T - 1 - g for g in range(T)] + [-1]),          # last head: noisy x^0
                          ('score', [T - 1 - g for g in range(T - 1)] + [0]),          # output: noisy x^0
                          ('none', [T - 1 - g for g in range(T - 1)] + [0])]:
        _, g = make_pair(denoise=denoise)
        got = [t[0, 0, 0].item() for t in align_targets(g, traj, clean)]
        assert got == want, (denoise, got)


def test_ema_update_moves_the_average_towards_the_model():
    ema, model = nn.Linear(3, 2), nn.Linear(3, 2)
    for p in ema.parameters():
        p.data.fill_(1.0)
    for p in model.parameters():
        p.data.fill_(3.0)
    ema_update(ema, model, 0.75)  # 0.75 * 1 + 0.25 * 3 (an inverted update would give 0.25 * 1 + 0.75 * 3 = 2.5)
    assert all(torch.allclose(p, torch.full_like(p, 1.5)) for p in ema.parameters())
    assert all(torch.equal(p, torch.full_like(p, 3.0)) for p in model.parameters())


def test_center_crop_offset_rounds_down():
    size = 8
    for h, w, rows, cols in [(8, 11, slice(0, 8), slice(1, 9)), (11, 8, slice(1, 9), slice(0, 8))]:
        # the short side is already `size`, so the resize is a no-op; 11 - 8 = 3 is odd: offset 1, not 2
        idx = np.arange(h * w).reshape(h, w)  # every pixel distinct
        arr = np.stack([idx, 255 - idx, idx * 7 % 256], -1).astype(np.uint8)
        out = center_crop(Image.fromarray(arr), size)
        assert out.shape == (8, 8, 3) and np.array_equal(out, arr[rows, cols])


@torch.no_grad()
def test_flow_block_0_is_in_raster_order_and_block_1_reversed():
    f = make_flow()
    assert [b.flip for b in f.blocks] == [t % 2 == 1 for t in range(TINY.num_blocks)]
    x = torch.randn(2, TINY.num_tokens, TINY.token_dim)
    y = torch.tensor([0, 1])
    for t, first in [(0, 0), (1, TINY.num_tokens - 1)]:  # the token each block leaves unchanged, in raster order
        block, last = f.blocks[t], TINY.num_tokens - 1 - first
        z = block(x, y)[0]
        assert torch.equal(z[:, first], x[:, first])
        x2 = x.clone()
        x2[:, last] += 1.0  # the last token in the block's order: no other token's output depends on it
        z2 = block(x2, y)[0]
        others = [i for i in range(TINY.num_tokens) if i != last]
        assert torch.equal(z2[:, others], z[:, others]) and not torch.equal(z2[:, last], z[:, last])


def test_flow_null_class_is_the_mean_class_embedding():
    block = make_flow().blocks[0]
    with torch.no_grad():
        block.class_embed.normal_(0, 1.0)  # well apart from zero and from each other
    mean = block.class_embed.mean(0)  # (1, D)
    c = block.condition(torch.tensor([-1, 2, -1, 0]))
    assert c.shape == (4, 1, TINY.channels)
    for i in (0, 2):
        assert torch.allclose(c[i], mean, atol=1e-6)
    assert torch.equal(c[1], block.class_embed[2]) and torch.equal(c[3], block.class_embed[0])
    assert torch.allclose(block.condition(None).expand(4, -1, -1), mean.expand(4, -1, -1), atol=1e-6)
