"""
Tests for issue 8: inpainting must not see the pixels it redraws, and pins on details that mutation testing showed
no other test checks (alignment indices, EMA direction, centre-crop rounding, flip alternation, null class).

    pytest test_new_b.py
"""
import torch

from model import inpaint
from test_biflow import TINY, batch, make_pair


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
