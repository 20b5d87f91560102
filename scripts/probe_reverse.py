"""
How far the reverse model G is from its own frozen F's states, depth by depth:

    python scripts/probe_reverse.py --ckpt OUT/reverse.pt --n 300 --json gap.json

G runs at w = 0 on three kinds of z: prior noise z ~ N(0, I) with uniform labels (against F's exact
unguided inverse of the same z, the output against F's Tweedie-denoised x^0), and the data's own
z = F(x + sigma*eps) for training digits and for held-out ones (val split from --heldout_from, past
the 1000 images the README scores FID against). Each distance is the training loss's: divided by
the target's mean square. prior/heldout is the shift from data z's to the z's G samples from;
heldout/train near 1 means no overfitting. scripts/reverse_recipe.md is its report.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import data  # noqa: E402
import sample  # noqa: E402
from model import align_targets, patchify, state_distance  # noqa: E402


@torch.no_grad()
def distances(G, z, y, traj, clean):
    """G's predictions from z (B, N, d) against F's states traj = [x^0, ..., x^T] (token space)
    and the clean x^0 -> {'align<i>': distance to x^i, 'out': the output's}, batch means."""
    preds = G(z, y, torch.zeros(len(z)))
    dist = [state_distance(p, t, G.cfg.norm).mean().item()
            for p, t in zip(preds, align_targets(G, traj, clean))]
    T = len(traj) - 1
    return {**{f'align{T - 1 - g}': d for g, d in enumerate(dist[:-1])}, 'out': dist[-1]}


@torch.no_grad()
def prior_gap(G, flow, z, y):
    """On prior z: F's states are those of its forward pass over its exact inverse x^0 = F^-1(z)."""
    x0 = flow.reverse(z, y)
    p = flow.cfg.patch_size
    return distances(G, z, y, flow(x0, y)[2], patchify(flow.denoise(x0, y), p))


@torch.no_grad()
def data_gap(G, flow, x, y, eps):
    """On data z's: F's states on x + sigma*eps, the output against the clean x."""
    traj = flow(x + flow.cfg.noise_std * eps, y)[2]
    return distances(G, traj[-1], y, traj, patchify(x, flow.cfg.patch_size))


def digits(split, start, n, img_size):
    """n digits of a split from index start: x (n, 3, H, W) in [-1, 1], labels (n,)."""
    ds = data.Digits(img_size, split)
    x = torch.stack([torch.from_numpy(ds.load(i)) for i in range(start, start + n)])
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1, torch.arange(start, start + n) % 10


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument('--ckpt', required=True, help='a reverse checkpoint (it carries its F)')
    p.add_argument('--n', type=int, default=300, help='prior draws and images per split')
    p.add_argument('--seed', type=int, default=0, help='seed of the prior z, labels and eps')
    p.add_argument('--heldout_from', type=int, default=1000,
                   help="first index of the val split's held-out images")
    p.add_argument('--batch_size', type=int, default=100, help='rows per pass')
    p.add_argument('--json', default=None, help='also write the result here')
    a = p.parse_args(argv)
    G, flow, decode = sample.load_models(a.ckpt)
    if flow is None or decode is not None:
        raise data.UsageError(f'--ckpt {a.ckpt}: expected a reverse checkpoint of a pixel model')
    c, gen = flow.cfg, torch.Generator().manual_seed(a.seed)
    inputs = {'prior': (torch.randn(a.n, c.num_tokens, c.token_dim, generator=gen),
                        torch.randint(max(c.num_classes, 1), (a.n,), generator=gen))}
    for name, split, start in (('train', 'train', 0), ('heldout', 'val', a.heldout_from)):
        inputs[name] = (*digits(split, start, a.n, c.img_size),
                        torch.randn(a.n, c.in_channels, c.img_size, c.img_size, generator=gen))
    res = dict(ckpt=a.ckpt, n=a.n, seed=a.seed)
    for name, tensors in inputs.items():   # means over batches, weighted by their sizes
        fn, starts = prior_gap if name == 'prior' else data_gap, range(0, a.n, a.batch_size)
        parts = [(fn(G, flow, *[t[s:s + a.batch_size] for t in tensors]),
                  min(a.batch_size, a.n - s)) for s in starts]
        res[name] = {k: sum(p[k] * m for p, m in parts) / a.n for k in parts[0][0]}
    res['shift'] = {k: res['prior'][k] / res['heldout'][k] for k in res['prior']}
    print(json.dumps(res, indent=1))
    if a.json:
        data.atomic_write(a.json, lambda f: f.write(json.dumps(res, indent=1).encode()))


if __name__ == '__main__':
    data.run_cli(main)
