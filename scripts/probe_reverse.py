"""
Where the reverse model G is wrong, measured against its own frozen F (the checkpoint carries it):

    python scripts/probe_reverse.py gap --ckpt OUT/reverse.pt --n 500 --json gap.json
    python scripts/probe_reverse.py pair --ckpt OUT/reverse.pt --png f_vs_g.png
    python scripts/probe_reverse.py curves --json curves.json --png curves.png

gap: on prior noise z ~ N(0, I) (w = 0, the labels uniform), each of G's heads against F's exact
inverse states for the same z and label, the output against F's Tweedie-denoised x^0 (what F
samples), and the cycle residual |F(G(z)) - z|^2; then on data z's (z = F(x + sigma*eps)) the
same per-depth terms as the training loss, for training images and for held-out images (digits'
val split from index --heldout_from, away from the 1000 images the README scores FID against).
Prior far worse than both data splits: G does not generalise from data z's to the prior. Held-out
near training: no overfitting. All distances divided by the target's mean square, as in training.

pair: F^-1's samples (exact inverse + CFG + Tweedie) and G's one pass, for the same z and labels,
side by side (column pairs: F, G), at guidance --guidance.

curves: FID and read-as-class against stage-2 steps from a JSON list of rows
{"name", "step", "fid", "acc"}; a row with step null is drawn as a horizontal line (F).
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import data  # noqa: E402
import sample  # noqa: E402
from model import align_targets, cycle_loss, patchify, state_distance, unpatchify  # noqa: E402


@torch.no_grad()
def inverse_trajectory(flow, z, y):
    """F's exact inverse of z (B, N, d), block by block, unguided: [x^0 (noisy), x^1, ..., x^T = z]
    in token space, the order of the forward pass's trajectory."""
    states = [z]
    for block in reversed(flow.blocks):
        states.append(block.reverse(states[-1], y))
    return states[::-1]


@torch.no_grad()
def prior_gap(G, flow, z, y):
    """G at w = 0 against F's inverse on the same prior z: {'align<i>': distance to x^i,
    'out': output against F's Tweedie-denoised x^0 (learned denoising) or its noisy x^0,
    'cycle': |F(G(z)) - z|^2}, means over the batch."""
    traj = inverse_trajectory(flow, z, y)
    preds = G(z, y, torch.zeros(len(z)))
    c = flow.cfg
    x0 = unpatchify(traj[0], c.patch_size, c.img_size)
    clean = patchify(flow.denoise(x0, y), c.patch_size)
    targets = align_targets(G, traj, clean)
    T = len(traj) - 1
    out = {
        f'align{T - 1 - g}': state_distance(pred, target, G.cfg.norm).mean().item()
        for g, (pred, target) in enumerate(zip(preds[:-1], targets[:-1]))
    }
    out['out'] = state_distance(preds[-1], targets[-1], G.cfg.norm).mean().item()
    out['cycle'] = cycle_loss(G, flow, z, y, preds).mean().item()
    return out


@torch.no_grad()
def data_gap(G, flow, x, y, eps):
    """G at w = 0 on data z's, z = F(x + sigma*eps): the training loss's per-depth distances
    {'align<i>', 'out'}, means over the batch (no Eq. 5 recombination: w = 0)."""
    _, _, traj = flow(x + flow.cfg.noise_std * eps, y)
    preds = G(traj[-1], y, torch.zeros(len(x)))
    targets = align_targets(G, traj, patchify(x, flow.cfg.patch_size))
    T = len(traj) - 1
    out = {
        f'align{T - 1 - g}': state_distance(pred, target, G.cfg.norm).mean().item()
        for g, (pred, target) in enumerate(zip(preds[:-1], targets[:-1]))
    }
    out['out'] = state_distance(preds[-1], targets[-1], G.cfg.norm).mean().item()
    return out


def images(split, start, n, img_size, seed):
    """n digits of a split from index start as (x in [-1, 1], labels, eps seeded per image)."""
    ds = data.build_dataset('digits', img_size, split, seed)
    items = [ds[i] for i in range(start, start + n)]
    x = torch.stack([im for im, _ in items]).float() / 127.5 - 1
    y = torch.tensor([lab for _, lab in items])
    eps = torch.stack(
        [
            torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(start + i))
            for i in range(n)
        ]
    )
    return x, y, eps


def batched(fn, n, bs, *tensors):
    """fn over chunks of the tensors, its dict of means averaged with the chunks' sizes."""
    acc = {}
    for s in range(0, n, bs):
        means = fn(*[tensor[s : s + bs] for tensor in tensors])
        count = min(bs, n - s)
        for key, v in means.items():
            acc[key] = acc.get(key, 0.0) + v * count / n
    return acc


@torch.no_grad()
def z_metric(flow, x, y, eps, blur=3, seed=0):
    """How the cycle term's z-space distance weighs two kinds of x^0 error of equal size: a fresh
    draw of the sigma-noise (what the learned denoiser removes) and a change of the image content
    (the clean image box-blurred over blur x blur pixels, rescaled to the same norm); the fresh
    noise is drawn from seed.
    -> {kind: |F(x^0 + delta) - z|^2 / |z|^2, kind_x: |delta|^2 / |x^0|^2}, means over the batch."""
    sigma = flow.cfg.noise_std
    x0 = x + sigma * eps
    z, _, _ = flow(x0, y)
    fresh = torch.randn(eps.shape, generator=torch.Generator().manual_seed(seed))
    noise = sigma * (fresh - eps)
    padded = torch.nn.functional.pad(x, (blur // 2,) * 4, mode='replicate')
    content = torch.nn.functional.avg_pool2d(padded, blur, stride=1) - x
    scale = noise.flatten(1).norm(dim=1) / content.flatten(1).norm(dim=1)
    content = content * scale.view(-1, 1, 1, 1)
    out = {}
    for kind, delta in (('noise', noise), ('content', content)):
        zd, _, _ = flow(x0 + delta, y)
        out[kind] = ((zd - z).pow(2).sum((1, 2)) / z.pow(2).sum((1, 2))).mean().item()
        out[kind + '_x'] = (delta.pow(2).sum((1, 2, 3)) / x0.pow(2).sum((1, 2, 3))).mean().item()
    return out


def gap(args):
    G, flow, _ = sample.load_models(args.ckpt)
    n, c = args.n, flow.cfg
    z = sample.noise_for(sample.noise_seeds(args.seed, range(n)), G, 'cpu')
    y = sample.draw_labels(n, c.num_classes, args.seed)
    res = {
        'ckpt': args.ckpt,
        'n': n,
        'seed': args.seed,
        'prior': batched(lambda zb, yb: prior_gap(G, flow, zb, yb), n, args.batch_size, z, y),
    }
    for name, split, start in (('train', 'train', 0), ('heldout', 'val', args.heldout_from)):
        x, yx, eps = images(split, start, n, c.img_size, args.seed)
        res[name] = batched(
            lambda xb, yb, eb: data_gap(G, flow, xb, yb, eb), n, args.batch_size, x, yx, eps
        )
    held = images('val', args.heldout_from, min(n, 200), c.img_size, args.seed)
    res['z_metric'] = z_metric(flow, *held, seed=args.seed)
    res['step'] = torch.load(args.ckpt, weights_only=True, map_location='cpu')['step']
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(res, f, indent=1)


@torch.no_grad()
def pair(args):
    G, flow, _ = sample.load_models(args.ckpt)
    labels = torch.arange(args.n) % flow.cfg.num_classes
    z = sample.noise_for(sample.noise_seeds(args.seed, range(args.n)), G, 'cpu')
    xf = sample.generate(flow, None, z, labels, guidance=args.guidance)
    xg = sample.generate(G, flow, z, labels, guidance=args.guidance)
    imgs_f, imgs_g = sample.to_uint8(xf), sample.to_uint8(xg)  # (n, side, side, 3)
    side, scale, gap_px = imgs_f.shape[1], args.scale, 2
    cols = args.n // args.rows
    W = cols * (2 * side + 3 * gap_px)
    canvas = Image.new(
        'RGB', (W * scale, (args.rows * (side + gap_px) + 12) * scale // 1 + 14), 'white'
    )
    draw = ImageDraw.Draw(canvas)
    for i in range(args.n):
        row, col = divmod(i, cols)
        x0 = col * (2 * side + 3 * gap_px) * scale
        y0 = 14 + row * (side + gap_px) * scale
        for j, im in enumerate((imgs_f[i], imgs_g[i])):
            canvas.paste(
                Image.fromarray(im).resize((side * scale, side * scale), Image.NEAREST),
                (x0 + j * (side + gap_px) * scale, y0),
            )
    draw.text(
        (2, 1),
        'pairs: F^-1 (exact inverse + CFG + Tweedie) | G (one pass), same z and label, '
        f'w = {args.guidance}, noise seed {args.seed}; labels 0..9 by column',
        fill='black',
    )
    canvas.save(args.png)
    print(f'wrote {args.png}')


def plot(rows, path, size=(760, 300)):
    """Two panels, FID and read-as-class against steps, one polyline per name; step None: a line."""
    W, H = size
    img = Image.new('RGB', (W, H), 'white')
    d = ImageDraw.Draw(img)
    colors = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b']
    names = list(dict.fromkeys(r['name'] for r in rows))
    steps = [r['step'] for r in rows if r['step'] is not None]
    smax = max(steps) if steps else 1
    for panel, (key, label) in enumerate(
        (('fid', 'FID-1000 (selection slice)'), ('acc', 'read as class (%)'))
    ):
        vals = [r[key] for r in rows if r.get(key) is not None]
        lo, hi = min(vals), max(vals)
        lo, hi = lo - 0.05 * (hi - lo + 1), hi + 0.05 * (hi - lo + 1)
        x0, x1, y0, y1 = panel * W // 2 + 45, (panel + 1) * W // 2 - 10, 20, H - 60
        d.rectangle([x0, y0, x1, y1], outline='black')
        d.text((x0, 4), label, fill='black')
        for tick in np.linspace(lo, hi, 5):
            yy = y1 - (tick - lo) / (hi - lo) * (y1 - y0)
            d.text((x0 - 40, yy - 5), f'{tick:.0f}', fill='black')
        for step in sorted(set(steps)):
            xx = x0 + step / smax * (x1 - x0)
            d.text((xx - 12, y1 + 3), str(step), fill='black')
        d.text(((x0 + x1) // 2 - 30, y1 + 16), 'stage-2 steps', fill='black')
        for k, name in enumerate(names):
            col = colors[k % len(colors)]
            pts = sorted(
                (r['step'], r[key])
                for r in rows
                if r['name'] == name and r.get(key) is not None and r['step'] is not None
            )
            flat = [
                r[key]
                for r in rows
                if r['name'] == name and r['step'] is None and r.get(key) is not None
            ]
            for v in flat:
                yy = y1 - (v - lo) / (hi - lo) * (y1 - y0)
                d.line([x0, yy, x1, yy], fill=col, width=1)
            xy = [
                (x0 + step / smax * (x1 - x0), y1 - (v - lo) / (hi - lo) * (y1 - y0))
                for step, v in pts
            ]
            if len(xy) > 1:
                d.line(xy, fill=col, width=2)
            for px, py in xy:
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=col)
            if panel == 0:
                d.text((10 + 150 * k, H - 22), name, fill=col)
    img.save(path)


def curves(args):
    with open(args.json) as f:
        plot(json.load(f), args.png)
    print(f'wrote {args.png}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    a = sub.add_parser(
        'gap', help="G's distances to F on prior z's and on training/held-out data z's"
    )
    a.add_argument('--ckpt', required=True, help='a reverse checkpoint (it carries its F)')
    a.add_argument('--n', type=int, default=500, help='prior draws and images per split')
    a.add_argument('--seed', type=int, default=0, help="noise and label seed (sample.py's streams)")
    a.add_argument(
        '--heldout_from',
        type=int,
        default=1000,
        help="first index of the val split's held-out images "
        '(the first 1000 are the FID reference)',
    )
    a.add_argument('--batch_size', type=int, default=100, help='rows per pass')
    a.add_argument('--json', default=None, help='also write the result here')
    a = sub.add_parser('pair', help="F^-1's and G's samples side by side, same z and labels")
    a.add_argument('--ckpt', required=True, help='a reverse checkpoint (it carries its F)')
    a.add_argument('--png', required=True, help='the picture to write')
    a.add_argument('--n', type=int, default=30, help='pairs (labels 0..9 cycled)')
    a.add_argument('--rows', type=int, default=3, help='rows of pairs')
    a.add_argument('--guidance', type=float, default=2.0, help='guidance scale w of both samplers')
    a.add_argument('--seed', type=int, default=0, help="noise seed (sample.py's stream)")
    a.add_argument('--scale', type=int, default=3, help='pixels per image pixel')
    a = sub.add_parser('curves', help='FID and read-as-class against steps')
    a.add_argument('--json', required=True, help='a list of {"name", "step", "fid", "acc"} rows')
    a.add_argument('--png', required=True, help='the picture to write')
    args = p.parse_args(argv)
    torch.set_grad_enabled(True)
    {'gap': gap, 'pair': pair, 'curves': curves}[args.cmd](args)


if __name__ == '__main__':
    main()
