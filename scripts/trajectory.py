"""
Sampling as a trajectory, in one picture: for each sample a row z = x^T, x^{T-1}, ..., x^0 along F's
exact inverse (one flow per column), then the Tweedie-denoised image; for a reverse checkpoint, a
row beneath of what G's heads predict at the same depths (model.align_targets), then G's output.

    python scripts/trajectory.py --ckpt out/reverse.pt --out traj.png --labels 0,3,5,8 --guidance 0

The noise is sample.py's at --seed 0: the rows are the first samples of `sample.py --labels ...`.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import (HelpFormatter, UsageError, check_flags, check_writable,  # noqa: E402
                  run_cli, save_grid)
from model import unpatchify  # noqa: E402
from sample import int_list, load_models, noise_for, to_uint8  # noqa: E402


def draw(flow, path, y, z, guidance=0.0, G=None):
    """z (B, N, d), labels y (B,) or None, frozen models (as load_models gives them) -> a PNG of 1
    (F) or 2 (F, G) rows per sample. z and the states x^T..x^1 are no images and their scale grows
    with depth: each is shown min-max stretched over its own pixels; x^0, G's prediction of it and
    the clean images are shown as [-1, 1] images (clipped), so the noise left before denoising
    stays visible."""
    img = lambda t: unpatchify(t.float(), flow.cfg.patch_size, flow.cfg.img_size)  # noqa: E731
    stretch = lambda x: ((x - x.amin((1, 2, 3), True)) / (  # noqa: E731  # (B, C, H, W)
        x.amax((1, 2, 3), True) - x.amin((1, 2, 3), True)).clamp(min=1e-8) * 2 - 1)
    states = [z.float()]
    for block in reversed(flow.blocks):   # x^T -> x^{T-1} -> ... -> x^0, as TarFlow.reverse
        states.append(block.reverse(states[-1], y, guidance))
    *xs, x0 = [img(s) for s in states]   # z = x^T, x^{T-1}, ..., x^1, then the noisy x^0
    rows, T = [[*map(stretch, xs), x0, flow.denoise(x0, y)]], len(xs)
    if G is not None:   # w as G's input (training-time CFG) or Eq. 4's inference-time CFG
        w, iw = (torch.tensor(guidance), 0) if G.cfg.guidance_mode == 'train' else (None, guidance)
        # head h predicts x^{T-1-h}: column h + 1, stretched but for x^0's; the heads a G lacks
        # ('naive' has none; without learned denoising none for x^0) are black (-1, stretched too)
        heads = [img(p) for p in (G(z, y, w, iw)[:-1] + [-torch.ones_like(z)] * T)[:T]]
        rows.append([rows[0][0], *map(stretch, heads[:-1]), heads[-1], G.decode(z, y, w, iw, flow)])
    grid = torch.stack([torch.stack(r, 1) for r in rows], 1).flatten(0, 2)   # F's row, then G's
    save_grid(to_uint8(grid.clamp(-1, 1)), path, nrow=T + 2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a('--ckpt', required=True, help='a forward or reverse checkpoint of a pixel model')
    a('--out', default='trajectory.png', help='the PNG to write')
    a('--num_samples', type=int, default=4, help='samples, one or two rows each')
    a('--labels', type=int_list, help='class labels 3,5,... (cycled; default 0, 1, 2, ...)')
    a('--guidance', type=float, default=2.0, help='CFG scale w (0: none), constant')
    args = p.parse_args(argv)
    check_flags(vars(args), {'num_samples': '[1, inf)', 'guidance': '(-inf, inf)'})
    check_writable(args.out, '--out')
    model, flow, _ = load_models(args.ckpt, verbose=False)   # latent ones: refused (need a VAE)
    flow, G = (flow, model) if flow is not None else (model, None)
    ncls, n = flow.cfg.num_classes, args.num_samples
    y = torch.tensor(args.labels or range(ncls)).repeat(n)[:n] if ncls else None   # 0, 1, 2, ..
    if y is not None and not 0 <= y.min() <= y.max() < ncls:
        raise UsageError(f'--labels: {args.ckpt} has the classes 0..{ncls - 1}')
    draw(flow, args.out, y, noise_for(0, range(n), flow, 'cpu'), args.guidance, G)
    print(f'wrote {args.out}: {n} samples along the exact inverse' + (", G's beneath" if G else ''))


if __name__ == '__main__':
    run_cli(main)
